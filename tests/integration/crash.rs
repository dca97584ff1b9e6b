//! Crash safety: a run killed at any point leaves no partial curated or
//! metadata output visible, and running it again gives byte-identical curated
//! output and no duplicated metadata rows. Conservation: a run whose records
//! do not add up fails and publishes nothing.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use fhirflow_tests::*;

/// The protocol's named points, in order (see engine/src/commit/mod.rs).
const POINTS: [&str; 6] = [
    "curate-after-lease",
    "after-curated-staged",
    "after-metadata-staged",
    "after-commit-record",
    "after-commit",
    "after-mirror",
];

fn ingest_cli(t: &TestLake, dir: &std::path::Path, system: &str) {
    let out = t.cli(
        &[
            "ingest",
            dir.to_str().unwrap(),
            "--tenant",
            TENANT,
            "--source-system",
            system,
            "--date",
            DATE,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A curate run; after a kill it waits for the dead run's lease to lapse.
fn curate_cli(t: &TestLake, failpoint: Option<&str>) -> std::process::Output {
    let mut env: Vec<(&str, &str)> = failpoint
        .map(|f| ("FHIRFLOW_FAILPOINT", f))
        .into_iter()
        .collect();
    env.push(("FHIRFLOW_WAIT", "30"));
    t.cli(&["curate", "--tenant", TENANT, "--date", DATE], &env)
}

/// Curated parts as readers see them (through the commit records), by
/// their visible names.
async fn visible_curated(t: &TestLake) -> BTreeMap<String, Vec<u8>> {
    let v = fhirflow::commit::visible(&t.lake, &Default::default())
        .await
        .unwrap();
    v.curated
        .iter()
        .map(|p| {
            let name = p.object.name.clone().unwrap();
            let bytes =
                std::fs::read(format!("/{}", p.object.path)).expect("a visible part exists");
            (name, bytes)
        })
        .collect()
}

/// Committed curate runs: (in the current table, in the history table).
async fn job_count(t: &TestLake) -> (usize, usize) {
    (
        t.sql("SELECT job_id FROM metadata.import_jobs").await.len(),
        t.sql("SELECT job_id FROM metadata.import_jobs_history")
            .await
            .len(),
    )
}

/// Two batches of input: the second adds resources and a new version.
fn inputs(t: &TestLake) -> (std::path::PathBuf, std::path::PathBuf) {
    let one = t.input("one");
    write_lines(
        &one,
        "Patient.ndjson",
        &[
            r#"{"resourceType":"Patient","id":"a","meta":{"versionId":"1"}}"#,
            r#"{"resourceType":"Patient","id":"b"}"#,
        ],
    );
    write_lines(
        &one,
        "Condition.ndjson",
        &[r#"{"resourceType":"Condition","id":"c1"}"#],
    );
    let two = t.input("two");
    write_lines(
        &two,
        "Patient.ndjson",
        &[
            r#"{"resourceType":"Patient","id":"a","meta":{"versionId":"2"}}"#,
            r#"{"resourceType":"Patient","id":"z"}"#,
        ],
    );
    write_lines(
        &two,
        "Encounter.ndjson",
        &[r#"{"resourceType":"Encounter","id":"e1"}"#],
    );
    (one, two)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_killed_at_each_point_of_the_protocol_leaves_nothing_partial() {
    // The reference: the same two runs, never interrupted.
    let reference = TestLake::new();
    let (one, two) = inputs(&reference);
    ingest_cli(&reference, &one, "s1");
    assert!(curate_cli(&reference, None).status.success());
    let old_state = reference.curated_files();
    ingest_cli(&reference, &two, "s2");
    assert!(curate_cli(&reference, None).status.success());
    let new_state = reference.curated_files();
    assert_ne!(old_state, new_state);

    for point in POINTS {
        let t = TestLake::new();
        let (one, two) = inputs(&t);
        ingest_cli(&t, &one, "s1");
        assert!(curate_cli(&t, None).status.success());
        ingest_cli(&t, &two, "s2");
        let out = curate_cli(&t, Some(point));
        assert!(
            !out.status.success(),
            "{point}: the failpoint must kill the run"
        );

        // Readers see the old state or (once committed) the new one.
        let seen = visible_curated(&t).await;
        let committed = matches!(
            point,
            "after-commit-record" | "after-commit" | "after-mirror"
        );
        let ok = if committed {
            seen == new_state
        } else {
            seen == old_state
        };
        assert!(
            ok,
            "{point}: readers see a partial state: {:?}",
            seen.keys().collect::<Vec<_>>()
        );
        if matches!(point, "after-curated-staged" | "after-metadata-staged") {
            assert_eq!(seen, old_state, "{point}: nothing published yet");
        }
        assert_eq!(
            job_count(&t).await,
            (1, if committed { 2 } else { 1 }),
            "{point}: metadata rows"
        );

        // Running again gives the reference bytes and no duplicated rows.
        let out = curate_cli(&t, None);
        assert!(
            out.status.success(),
            "{point}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(t.curated_files(), new_state, "{point}: re-run output");
        assert_eq!(visible_curated(&t).await, new_state, "{point}");
        assert_eq!(
            job_count(&t).await,
            (1, if committed { 3 } else { 2 }),
            "{point}: metadata rows after re-run"
        );
        // Only the current run's parts are left (and the previous commit's,
        // which a slow reader may still read), and metadata files of
        // committed runs only.
        let log = fhirflow::commit::log(&t.lake, &tenant(), date())
            .await
            .unwrap();
        let kept: Vec<String> = log
            .iter()
            .rev()
            .filter(|r| r.stage == "curate")
            .take(2)
            .flat_map(|r| r.curated.iter().map(|o| format!("/{}", o.path)))
            .collect();
        let mut runs: Vec<String> = walk(&t.root().join("curated/_runs"))
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        runs.sort();
        let mut kept_sorted = kept.clone();
        kept_sorted.sort();
        assert_eq!(runs, kept_sorted, "{point}: parts left");
        let jobs = walk(&t.root().join("metadata/import_jobs"));
        assert_eq!(jobs.len(), job_count(&t).await.1, "{point}: {jobs:?}");
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_arbitrary_moments_never_exposes_a_partial_run() {
    let sample = shared().join("data/synthea-10");
    let reference = TestLake::new();
    ingest_cli(&reference, &sample, "synthea");
    assert!(curate_cli(&reference, None).status.success());
    let full = reference.curated_files();

    for delay_ms in [5, 40, 100, 200, 350, 600] {
        let t = TestLake::new();
        ingest_cli(&t, &sample, "synthea");
        let mut child = std::process::Command::new(binary())
            .args(["curate", "--tenant", TENANT, "--date", DATE])
            .env("FHIRFLOW_LAKE", t.root())
            .env("FHIRFLOW_LEASE_TTL_SECONDS", "3")
            .env_remove("FHIRFLOW_FAILPOINT")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL: no chance to clean up
        let _ = child.wait();

        let seen = visible_curated(&t).await;
        assert!(
            seen.is_empty() || seen == full,
            "killed after {delay_ms} ms: partial state visible"
        );
        let (jobs, _) = job_count(&t).await;
        assert_eq!(
            jobs,
            usize::from(!seen.is_empty()),
            "killed after {delay_ms} ms"
        );

        let out = curate_cli(&t, None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            t.curated_files(),
            full,
            "killed after {delay_ms} ms: re-run bytes"
        );
        assert_eq!(job_count(&t).await, (1, jobs + 1));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_records_do_not_add_up_fails_and_publishes_nothing() {
    let t = TestLake::new();
    let (one, _) = inputs(&t);
    ingest_cli(&t, &one, "s1");
    let out = curate_cli(&t, Some("lose-a-line"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("do not add up"), "{err}");
    assert!(visible_curated(&t).await.is_empty());
    assert!(t.curated_files().is_empty());
    assert_eq!(job_count(&t).await, (0, 0));
}
