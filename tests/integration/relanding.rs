//! The raw layer is append-only (issue 13): a second landing of a type on
//! the same (tenant, source system, date) takes the next part number, a file
//! whose bytes are already there is recognised and not stored again, a
//! landing that stopped between claiming its name and uploading is
//! completed, and two ingests at once never pick the same name. On a local
//! lake and on S3 (moto).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use object_store::ObjectStoreExt;

use fhirflow::ingest::IngestReport;
use fhirflow::raw::landing::{Claim, Partition};
use fhirflow_tests::*;

const SYSTEM: &str = "ehr";

async fn ingest(t: &TestLake, paths: &[PathBuf]) -> IngestReport {
    fhirflow::ingest::ingest(&t.lake, paths, &tenant(), &SYSTEM.parse().unwrap(), date())
        .await
        .expect("ingest")
}

/// A file of `n` patients with ids `<prefix>-<i>`.
fn patients(dir: &Path, name: &str, prefix: &str, n: usize) -> PathBuf {
    let lines: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"resourceType":"Patient","id":"{prefix}-{i}","gender":"female"}}"#))
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    write_lines(dir, name, &refs)
}

/// The data files of the raw partition, on any store: name → bytes (the
/// claims under `_landed/` are not data).
async fn raw_files(t: &TestLake) -> BTreeMap<String, Vec<u8>> {
    let root = &t.lake.raw;
    let partition = root
        .paths
        .raw_partition(&tenant(), &SYSTEM.parse().unwrap(), date());
    let listed: Vec<_> = root
        .store
        .list(Some(&partition))
        .try_collect()
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for o in listed {
        if o.location.prefix_match(&partition).unwrap().count() != 1 {
            continue;
        }
        let bytes = root
            .store
            .get(&o.location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        out.insert(o.location.filename().unwrap().to_string(), bytes.to_vec());
    }
    out
}

/// The claims of the partition's names.
async fn claims(t: &TestLake) -> BTreeSet<String> {
    let root = &t.lake.raw;
    let dir = root
        .paths
        .raw_claims(&tenant(), &SYSTEM.parse().unwrap(), date());
    let listed: Vec<_> = root.store.list(Some(&dir)).try_collect().await.unwrap();
    listed
        .iter()
        .map(|o| o.location.filename().unwrap().to_string())
        .collect()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn stdout(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

async fn second_landing_takes_the_next_part(store: Store) {
    let t = &store.t;
    let a = patients(&t.input("a"), "Patient.ndjson", "a", 3);
    let b = patients(&t.input("b"), "Patient.ndjson", "b", 2);
    let first = ingest(t, &[t.input("a")]).await;
    assert!(first.files[0].target.ends_with("/Patient.ndjson"));
    let second = ingest(t, &[t.input("b")]).await;
    assert!(
        second.files[0].target.ends_with("/Patient.002.ndjson"),
        "{:?}",
        second.files
    );
    assert!(second.already_landed.is_empty());
    let files = raw_files(t).await;
    assert_eq!(
        files,
        BTreeMap::from([
            ("Patient.ndjson".to_string(), read(&a)),
            ("Patient.002.ndjson".to_string(), read(&b)),
        ])
    );
    assert_eq!(
        claims(t).await,
        BTreeSet::from([
            "Patient.ndjson.json".to_string(),
            "Patient.002.ndjson.json".into()
        ])
    );

    // Curation reads both landings, and no claim as data.
    let report = t.curate().await.expect("curate");
    assert_eq!(report.total.records_in, 5);
    assert_eq!(report.total.curated, 5);
    let ids = t.sql("SELECT id FROM curated.patient ORDER BY id").await;
    let ids: Vec<&str> = ids.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(ids, ["a-0", "a-1", "a-2", "b-0", "b-1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_landing_of_a_type_takes_the_next_part_on_a_local_lake() {
    second_landing_takes_the_next_part(Store::local()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_landing_of_a_type_takes_the_next_part_on_s3() {
    second_landing_takes_the_next_part(Store::s3("relanding")).await;
}

async fn same_bytes_are_stored_once(store: Store) {
    let t = &store.t;
    let dir = t.input("once");
    let patient = patients(&dir, "Patient.ndjson", "p", 4);
    // Above the 8 MiB of one put: a multipart upload.
    let big: String = (0..120_000)
        .map(|i| format!("{{\"resourceType\":\"Condition\",\"id\":\"c-{i}\",\"subject\":{{\"reference\":\"Patient/p-0\"}}}}\n"))
        .collect();
    assert!(big.len() > 8 << 20);
    let condition = dir.join("Condition.ndjson");
    std::fs::write(&condition, &big).unwrap();
    let d = dir.to_str().unwrap();
    let args = [
        "ingest",
        d,
        "--tenant",
        TENANT,
        "--source-system",
        SYSTEM,
        "--date",
        DATE,
    ];
    let out = stdout(&t.cli(&args, &[]));
    assert!(out.contains("ingested 2 files"), "{out}");

    // A retried ingest lands nothing, and says so.
    let out = stdout(&t.cli(&args, &[]));
    assert!(out.contains("ingested 0 files"), "{out}");
    for name in ["Patient.ndjson", "Condition.ndjson"] {
        assert!(
            out.contains(&format!("{}: already landed as ", dir.join(name).display()))
                && out.contains(&format!("/import_date={DATE}/{name}\n")),
            "{out}"
        );
    }
    // The same bytes under another part number are the same file too.
    let copy = t.input("copy").join("Patient.007.ndjson");
    std::fs::copy(&patient, &copy).unwrap();
    let report = ingest(t, std::slice::from_ref(&copy)).await;
    assert!(report.files.is_empty());
    assert_eq!(report.already_landed.len(), 1);
    assert!(report.already_landed[0].1.ends_with("/Patient.ndjson"));
    let files = raw_files(t).await;
    assert_eq!(
        files,
        BTreeMap::from([
            ("Condition.ndjson".to_string(), big.into_bytes()),
            ("Patient.ndjson".to_string(), read(&patient)),
        ])
    );

    // An ingest that died between claiming a name and uploading: the next
    // ingest of those bytes completes that landing under the claimed name.
    let late = patients(&t.input("late"), "Patient.ndjson", "late", 2);
    let bytes = read(&late);
    let hash = fhirflow::commit::Checksum::of(&bytes);
    let mut partition = Partition::read(
        &t.lake.raw,
        "test",
        &tenant(),
        &SYSTEM.parse().unwrap(),
        date(),
    )
    .await
    .unwrap();
    let claimed = partition
        .claim(
            &fhirflow::layout::RawFileName::parse("Patient.ndjson").unwrap(),
            Claim::new("ingest", Some((&hash, bytes.len() as u64))),
        )
        .await
        .unwrap();
    assert_eq!(claimed.as_str(), "Patient.002.ndjson");
    assert!(!raw_files(t).await.contains_key("Patient.002.ndjson"));
    let report = ingest(t, &[late]).await;
    assert_eq!(report.files.len(), 1);
    assert!(report.files[0].completed_earlier);
    assert!(report.files[0].target.ends_with("/Patient.002.ndjson"));
    assert_eq!(raw_files(t).await["Patient.002.ndjson"], bytes);
    assert_eq!(claims(t).await.len(), 3, "no new claim");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_file_ingested_twice_is_stored_once_on_a_local_lake() {
    same_bytes_are_stored_once(Store::local()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_file_ingested_twice_is_stored_once_on_s3() {
    same_bytes_are_stored_once(Store::s3("relanding")).await;
}

async fn concurrent_ingests_pick_different_names(store: Store) {
    let t = &store.t;
    let mut sources = Vec::new();
    // Rounds of two processes started together, each landing a Patient file
    // of its own: every round is another race for the next name.
    for round in 0..5 {
        let dirs: Vec<PathBuf> = ["x", "y"]
            .iter()
            .map(|who| {
                let dir = t.input(&format!("{who}{round}"));
                let file = patients(&dir, "Patient.ndjson", &format!("{who}{round}"), 50);
                sources.push(read(&file));
                dir
            })
            .collect();
        // Both commands first, then both spawns: building a command on an
        // S3 lake rewrites the settings file the binary reads, which must
        // not happen while a child reads it.
        let mut commands: Vec<_> = dirs
            .iter()
            .map(|dir| {
                let mut cmd = t.command(
                    &[
                        "ingest",
                        dir.to_str().unwrap(),
                        "--tenant",
                        TENANT,
                        "--source-system",
                        SYSTEM,
                        "--date",
                        DATE,
                    ],
                    &[],
                );
                cmd.stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped());
                cmd
            })
            .collect();
        let children: Vec<_> = commands
            .iter_mut()
            .map(|cmd| cmd.spawn().expect("spawn fhirflow"))
            .collect();
        for child in children {
            let out = stdout(&child.wait_with_output().unwrap());
            assert!(out.contains("ingested 1 files"), "{out}");
        }
    }
    let files = raw_files(t).await;
    let names: BTreeSet<&str> = files.keys().map(String::as_str).collect();
    let mut expected: BTreeSet<String> =
        (2..=10).map(|n| format!("Patient.{n:03}.ndjson")).collect();
    expected.insert("Patient.ndjson".into());
    assert_eq!(
        names,
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    // Each source landed exactly once, byte for byte.
    let landed: BTreeSet<&Vec<u8>> = files.values().collect();
    let wanted: BTreeSet<&Vec<u8>> = sources.iter().collect();
    assert_eq!(landed.len(), 10);
    assert_eq!(landed, wanted);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_ingests_at_once_never_pick_the_same_name_on_a_local_lake() {
    concurrent_ingests_pick_different_names(Store::local()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_ingests_at_once_never_pick_the_same_name_on_s3() {
    concurrent_ingests_pick_different_names(Store::s3("relanding")).await;
}
