//! Large files read as byte ranges in parallel, and dedup under a memory
//! budget too small for its keys: both give exactly what one reader of the
//! whole file, with all keys in memory, gives.

use std::io::Write;

use fhirflow_tests::{Moto, TestLake};

/// One Patient line of about `len` bytes.
fn patient(id: &str, len: usize, version: Option<&str>) -> String {
    let meta = version
        .map(|v| format!(r#","meta":{{"versionId":"{v}"}}"#))
        .unwrap_or_default();
    let head = format!(r#"{{"resourceType":"Patient","id":"{id}"{meta},"name":[{{"text":""#);
    let pad = len.saturating_sub(head.len() + 4).max(1);
    format!("{head}{}\"}}]}}", "n".repeat(pad))
}

/// Raw bytes with every edge a range boundary can cut: a byte order mark,
/// CRLF and LF endings, blank lines, bad lines, duplicates far apart, a
/// line spanning several ranges, one too long to keep, and a last line
/// without a newline.
fn awkward_file() -> Vec<u8> {
    let mut out = b"\xEF\xBB\xBF".to_vec();
    for i in 0..60 {
        let line = match i {
            7 => r#"{"resourceType":"Patient","id":"cut""#.to_string(),
            13 => "not json at all".to_string(),
            21 => patient("p3", 90, Some("2")), // a newer p3
            29 => patient("long", 1000, None),  // spans many ranges
            33 => patient("huge", 2000, None),  // over max_line_bytes
            41 => r#"{"resourceType":"Observation","id":"wrongtype"}"#.to_string(),
            47 => patient("p5", 75, None), // an exact copy of line 5
            _ => patient(&format!("p{i}"), 40 + (i * 7) % 80, None),
        };
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(if i % 3 == 0 { b"\r\n" } else { b"\n" });
        if i % 11 == 0 {
            out.extend_from_slice(b"\n   \n");
        }
    }
    out.extend_from_slice(patient("last", 60, None).as_bytes());
    out
}

/// What a curate run gave: every curated byte of each type in part order,
/// the import_errors rows that matter, and the counts.
async fn outcome(t: &TestLake) -> (Vec<u8>, Vec<Vec<String>>, String) {
    let report = t.curate().await.expect("curate");
    let joined: Vec<u8> = t
        .visible_files()
        .await
        .into_iter()
        .filter(|(n, _)| n.starts_with("Patient"))
        .flat_map(|(_, b)| b)
        .collect();
    let errors = t
        .sql(
            "SELECT regexp_replace(source_file, '.*/', ''), line_no, error_code, resource_id, location \
             FROM metadata.import_errors ORDER BY 1, 2, 3, 5",
        )
        .await;
    let t = &report.total;
    let counts = format!(
        "in {} curated {} rejected {} duplicates {} exact {} bytes {}",
        t.records_in, t.curated, t.rejected, t.duplicates, t.exact_duplicates, t.bytes_in
    );
    (joined, errors, counts)
}

/// On a local folder the ranges are read through memory maps; on S3 each is
/// one ranged GET, and the line that straddles its end is read on.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_read_in_ranges_gives_the_bytes_and_line_numbers_of_one_read() {
    ranges_give_one_read(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_read_in_ranges_of_s3_gives_the_bytes_and_line_numbers_of_one_read() {
    ranges_give_one_read(true).await;
}

async fn ranges_give_one_read(s3: bool) {
    let raw = awkward_file();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    let gz = gz.finish().unwrap();
    let run = |range_bytes: u64| {
        let (raw, gz) = (raw.clone(), gz.clone());
        async move {
            let moto = s3.then(|| {
                let moto = Moto::start();
                moto.create_bucket("lake");
                moto
            });
            let t = TestLake::with(|s| {
                if let Some(moto) = &moto {
                    moto.configure(s, "lake", "ranges");
                }
                s.curate.range_bytes = range_bytes;
                s.curate.max_line_bytes = 1500;
            });
            let dir = t.input("awkward");
            std::fs::write(dir.join("Patient.000.ndjson"), &raw).unwrap();
            std::fs::write(dir.join("Patient.001.ndjson.gz"), &gz).unwrap();
            t.ingest(&[dir], "src").await;
            outcome(&t).await
        }
    };
    let whole = run(0).await;
    // Sanity: the file holds every kind of line this test is about.
    let codes: Vec<&str> = whole.1.iter().map(|r| r[2].as_str()).collect();
    for code in [
        "TRUNCATED_JSON",
        "INVALID_JSON",
        "LINE_TOO_LONG",
        "RESOURCE_TYPE_MISMATCH",
    ] {
        assert!(codes.contains(&code), "{code} in {codes:?}");
    }
    assert!(!whole.2.contains("duplicates 0 "), "{}", whole.2);
    for range_bytes in [97, 256, 4096] {
        let split = run(range_bytes).await;
        assert_eq!(
            String::from_utf8_lossy(&split.0),
            String::from_utf8_lossy(&whole.0),
            "curated bytes with ranges of {range_bytes}"
        );
        assert_eq!(
            split.1, whole.1,
            "import_errors with ranges of {range_bytes}"
        );
        assert_eq!(split.2, whole.2, "counts with ranges of {range_bytes}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dedup_past_its_memory_budget_spills_and_keeps_the_same_survivors() {
    let mut lines = Vec::new();
    for i in 0..30_000 {
        lines.push(patient(&format!("p{i}"), 60, Some("1")));
        if i % 17 == 0 {
            lines.push(patient(&format!("p{i}"), 64, Some("2")));
        }
        if i % 23 == 0 {
            lines.push(patient(&format!("p{i}"), 60, Some("1")));
        }
    }
    let duplicates = lines.len() - 30_000;
    let text = lines.join("\n") + "\n";
    let run = |memory_limit_mb: usize| {
        let text = text.clone();
        async move {
            let t = TestLake::with(|s| {
                s.curate.memory_limit_mb = memory_limit_mb;
                s.curate.range_bytes = 256 << 10;
            });
            let dir = t.input("many");
            std::fs::write(dir.join("Patient.ndjson"), &text).unwrap();
            t.ingest(&[dir], "src").await;
            let spilled = t.curate().await.expect("curate").keys_spilled;
            // The second run of the same partition gives the same result.
            (outcome(&t).await, spilled)
        }
    };
    let (roomy, spilled) = run(512).await;
    assert_eq!(spilled, 0, "512 MiB holds every key");
    let (tight, spilled) = run(4).await;
    assert!(spilled > 20_000, "{spilled} key rows went to disk");
    assert_eq!(tight.1, roomy.1);
    assert_eq!(tight.2, roomy.2);
    assert!(
        tight.0 == roomy.0,
        "the same survivors, byte for byte ({} and {} bytes)",
        tight.0.len(),
        roomy.0.len()
    );
    let want = format!("duplicates {duplicates} ");
    assert!(roomy.2.contains(&want), "{want} in {}", roomy.2);
}
