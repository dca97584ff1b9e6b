//! Bad input never stops a run and never disappears: each bad line becomes an
//! `import_errors` row with its file, line number and reason.

use std::io::Write;

use fhirflow_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_bad_line_is_an_error_row_with_its_line() {
    let t = TestLake::with(|s| {
        s.curate.max_line_bytes = 300_000;
        s.curate.max_depth = 64;
    });
    let dir = t.input("bad");
    let deep = format!(
        r#"{{"resourceType":"Patient","id":"deep","extension":{}1{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let long = format!(
        r#"{{"resourceType":"Patient","id":"long","text":"{}"}}"#,
        "x".repeat(400_000)
    );
    let mut bytes: Vec<u8> = Vec::new();
    let mut line = |b: &[u8]| {
        bytes.extend_from_slice(b);
        bytes.extend_from_slice(b"\r\n"); // CRLF line endings are tolerated
    };
    line("\u{feff}{\"resourceType\":\"Patient\",\"id\":\"bom-ok\"}".as_bytes()); // 1
    line(b"{\"resourceType\":\"Patient\",\"id\":\"bad-json\",}"); // 2
    line(b""); // 3: blank, skipped
    line(b"{\"resourceType\":\"Patient\",\"id\":\"bad-utf8\",\"name\":\"\xff\"}"); // 4
    line(b"[{\"resourceType\":\"Patient\"}]"); // 5
    line(b"{\"id\":\"no-type\"}"); // 6
    line(b"{\"resourceType\":\"Pateint\",\"id\":\"typo\"}"); // 7
    line(b"{\"resourceType\":\"Observation\",\"id\":\"wrong-file\"}"); // 8
    line(b"{\"resourceType\":\"Patient\"}"); // 9
    line(b"{\"resourceType\":\"Patient\",\"id\":\"has space\"}"); // 10
    line(b"{\"resourceType\":\"Patient\",\"id\":\"m\",\"meta\":\"x\"}"); // 11
    line(b"{\"resourceType\":\"Patient\",\"id\":\"s\",\"meta\":{\"security\":{\"code\":\"x\"}}}"); // 12
    line(long.as_bytes()); // 13
    line(deep.as_bytes()); // 14
    line(b"   "); // 15: blank
    line(b"{\"resourceType\":\"Patient\",\"id\":\"good\"}"); // 16
    bytes.extend_from_slice(b"{\"resourceType\":\"Patient\",\"id\":\"cut"); // 17: truncated last line
    std::fs::write(dir.join("Patient.ndjson"), &bytes).unwrap();

    t.ingest(&[dir], "src").await;
    let report = t.curate().await.expect("bad input never stops a run");
    assert_eq!(report.total.records_in, 15);
    assert_eq!(report.total.curated, 2);
    assert_eq!(report.total.rejected, 13);

    let rows = t
        .sql("SELECT line_no, error_code, source_file FROM metadata.import_errors ORDER BY line_no")
        .await;
    let got: Vec<(String, String)> = rows.iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    let want = [
        (2, "INVALID_JSON"),
        (4, "INVALID_UTF8"),
        (5, "NOT_AN_OBJECT"),
        (6, "MISSING_RESOURCE_TYPE"),
        (7, "UNKNOWN_RESOURCE_TYPE"),
        (8, "RESOURCE_TYPE_MISMATCH"),
        (9, "MISSING_ID"),
        (10, "INVALID_ID"),
        (11, "INVALID_META"),
        (12, "INVALID_META"),
        (13, "LINE_TOO_LONG"),
        (14, "TOO_DEEP"),
        (17, "TRUNCATED_LINE"),
    ];
    assert_eq!(
        got,
        want.iter()
            .map(|(l, c)| (l.to_string(), c.to_string()))
            .collect::<Vec<_>>()
    );
    assert!(
        rows.iter().all(|r| r[2].ends_with("/Patient.ndjson")),
        "{rows:?}"
    );
    let ids = t.sql("SELECT id FROM curated.patient ORDER BY id").await;
    assert_eq!(
        ids,
        vec![vec!["bom-ok".to_string()], vec!["good".to_string()]]
    );
    // The raw table shows the bad lines too, with their reason.
    let raw = t
        .sql("SELECT count(*), count(error) FROM raw.patient")
        .await;
    assert_eq!(raw, vec![vec!["15".to_string(), "13".into()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn gzip_input_and_a_corrupt_gzip_file() {
    let t = TestLake::new();
    let dir = t.input("gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for i in 0..100 {
        writeln!(
            enc,
            r#"{{"resourceType":"Condition","id":"c{i}","subject":{{"reference":"Patient/p"}}}}"#
        )
        .unwrap();
    }
    let gz = enc.finish().unwrap();
    std::fs::write(dir.join("Condition.000.ndjson.gz"), &gz).unwrap();
    // The same stream cut in half: the lines before the cut are curated, the
    // rest is one FILE_UNREADABLE row counted as one rejected record, and
    // the run goes on.
    std::fs::write(dir.join("Condition.001.ndjson.gz"), &gz[..gz.len() / 2]).unwrap();
    t.ingest(&[dir], "src").await;
    let report = t.curate().await.unwrap();
    assert!(report.total.curated >= 100);
    assert_eq!(report.total.rejected, 1);
    assert!(report.total.conserved());
    let readable = report.total.records_in - 1 - 100;
    assert!(readable < 100, "{readable} lines of the cut copy were read");
    let errors = t
        .sql("SELECT error_code, source_file FROM metadata.import_errors")
        .await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0][0], "FILE_UNREADABLE");
    assert!(errors[0][1].ends_with("Condition.001.ndjson.gz"));
}

#[tokio::test(flavor = "multi_thread")]
async fn many_bad_lines_are_all_reported_with_their_line_numbers() {
    // More rejections than the error sink holds before it writes a row group.
    let t = TestLake::new();
    let dir = t.input("many");
    let mut text = String::new();
    for i in 0..10_000 {
        text.push_str(&format!(
            "{{\"resourceType\":\"Patient\",\"id\":\"bad_{i}\"}}\n"
        ));
        text.push_str(&format!(
            "{{\"resourceType\":\"Patient\",\"id\":\"ok-{i}\"}}\n"
        ));
    }
    std::fs::write(dir.join("Patient.ndjson"), text).unwrap();
    t.ingest(&[dir], "src").await;
    let report = t.curate().await.unwrap();
    assert_eq!(
        (report.total.curated, report.total.rejected),
        (10_000, 10_000)
    );
    let rows = t
        .sql("SELECT count(*), count(DISTINCT line_no), min(line_no), max(line_no), min(error_code), max(error_code) FROM metadata.import_errors")
        .await;
    assert_eq!(
        rows,
        vec![vec![
            "10000".to_string(),
            "10000".into(),
            "1".into(),
            "19999".into(),
            "INVALID_ID".into(),
            "INVALID_ID".into()
        ]]
    );
}
