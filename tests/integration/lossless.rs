//! Lossless: every resource of the FHIR R4 specification examples comes out
//! byte for byte as it went in, plus the tenant label.

use std::collections::HashMap;

use fhirflow_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn every_r4_example_survives_byte_for_byte_but_the_label() {
    // About bytes, not validity: the 18 examples that break R4 (listed in
    // fhir/tests/spec_examples.rs) must survive too, so validation is off,
    // and so are the rules (the default set rejects the types HealthLake
    // does not store; tests/integration/rules.rs covers what rules change).
    let t = TestLake::with(|s| {
        s.curate.validation = fhirflow_fhir::Level::Off;
        s.curate.rules = "none".into();
    });
    let examples = shared().join("data/r4-examples");
    t.ingest(std::slice::from_ref(&examples), "hl7").await;
    let report = t.curate().await.expect("curate");

    // Index raw lines by (type, id) to find each curated line's source.
    let mut raw: HashMap<(String, String), Vec<Vec<u8>>> = HashMap::new();
    let mut raw_lines = 0u64;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(ty) = name.strip_suffix(".ndjson") else {
            continue;
        };
        for line in std::fs::read(&path).unwrap().split(|&b| b == b'\n') {
            if line.is_empty() {
                continue;
            }
            raw_lines += 1;
            let v: serde_json::Value = serde_json::from_slice(line).unwrap();
            let id = v["id"].as_str().unwrap_or_default().to_string();
            raw.entry((ty.to_string(), id))
                .or_default()
                .push(line.to_vec());
        }
    }
    assert_eq!(raw_lines, 5298);
    assert_eq!(report.total.records_in, 5298);

    let mut curated_lines = 0u64;
    for (name, bytes) in t.curated_files() {
        let ty = name
            .strip_suffix("-processed.ndjson")
            .expect("one part per type")
            .to_string();
        for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            curated_lines += 1;
            let v: serde_json::Value = serde_json::from_slice(line).expect("curated line is JSON");
            let id = v["id"].as_str().unwrap().to_string();
            let candidates = &raw[&(ty.clone(), id.clone())];
            // The survivor of a duplicated id is one of its raw lines.
            let source = candidates
                .iter()
                .find(|r| {
                    r.len() + label(TENANT).len() + 40 >= line.len()
                        && line.starts_with(&r[..r.len().min(20)])
                })
                .unwrap_or(&candidates[0]);
            assert_label_only_edit(source, line);
            let sec = v["meta"]["security"].as_array().unwrap();
            let ours = sec.iter().filter(|s| s["system"] == LABEL_SYSTEM).count();
            assert_eq!(ours, 1, "{ty}/{id}: exactly one tenant label");
        }
    }
    assert_eq!(curated_lines, report.total.curated);

    // What did not come through is accounted for: one id over 64 characters
    // (HealthLake's id pattern) and one id that occurs twice.
    let errors = t
        .sql("SELECT resource_type, error_code, line_no FROM metadata.import_errors")
        .await;
    assert_eq!(
        errors,
        vec![vec![
            "SearchParameter".to_string(),
            "INVALID_ID".into(),
            errors[0][2].clone()
        ]]
    );
    assert_eq!(report.total.rejected, 1);
    assert_eq!(report.total.duplicates, 1);
    assert_eq!(report.total.curated, 5298 - 2);
    let m = t
        .sql("SELECT sum(records_in), sum(records_out) + sum(records_rejected) + sum(records_duplicate), bool_and(conserved) FROM metadata.import_metrics WHERE rule IS NULL")
        .await;
    assert_eq!(
        m,
        vec![vec!["5298".to_string(), "5298".into(), "true".into()]]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn number_text_escapes_and_unicode_are_untouched() {
    let t = TestLake::new();
    let dir = t.input("odd");
    let lines = [
        r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"t"},"valueQuantity":{"value":1E-22,"unit":"\u00b5g"},"note":[{"text":"caf\u00e9 \"quoted\" \/ 日本 😀"}]}"#,
        r#"{"resourceType":"Observation", "id" : "o2" ,"status":"final","code":{"text":"t"},"valueQuantity":{"value":6.0},"component":[{"code":{"text":"c"},"valueQuantity":{"value":1.50}}]}"#,
        r#"{"id":"o3","resourceType":"Observation","meta":{"versionId":"1"},"status":"final","code":{"text":"t"},"valueInteger":-0}"#,
    ];
    write_lines(&dir, "Observation.ndjson", &lines);
    t.ingest(&[dir], "odd").await;
    t.curate().await.unwrap();
    let out = &t.curated_files()["Observation-processed.ndjson"];
    let got: Vec<&[u8]> = out
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(got.len(), 3);
    for (raw, cur) in lines.iter().zip(got) {
        assert_label_only_edit(raw.as_bytes(), cur);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn large_types_are_split_into_numbered_parts_in_order() {
    let t = TestLake::with(|s| s.curate.part_max_bytes = 400);
    let dir = t.input("parts");
    let lines: Vec<String> = (0..20)
        .map(|i| {
            format!(
                r#"{{"resourceType":"Condition","id":"c{i:02}","subject":{{"reference":"Patient/p"}},"note":[{{"text":"{}"}}]}}"#,
                "n".repeat(50)
            )
        })
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    write_lines(&dir, "Condition.000.ndjson", &refs[..10]);
    write_lines(&dir, "Condition.001.ndjson", &refs[10..]);
    write_lines(
        &dir,
        "Patient.ndjson",
        &[r#"{"resourceType":"Patient","id":"p"}"#],
    );
    t.ingest(&[dir], "src").await;
    t.curate().await.unwrap();

    let files = t.curated_files();
    let names: Vec<&String> = files.keys().collect();
    assert!(names.len() > 3, "{names:?}");
    assert!(
        files.contains_key("Patient-processed.ndjson"),
        "one part keeps the plain name: {names:?}"
    );
    let mut joined = Vec::new();
    for (n, (name, bytes)) in files
        .iter()
        .filter(|(n, _)| n.starts_with("Condition"))
        .enumerate()
    {
        assert_eq!(name, &format!("Condition-processed.{:03}.ndjson", n + 1));
        assert!(bytes.len() <= 400, "{name} has {} bytes", bytes.len());
        joined.extend_from_slice(bytes);
    }
    // The parts, in order, are the raw lines in raw file order, labelled.
    let got: Vec<&[u8]> = joined
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(got.len(), 20);
    for (raw, cur) in lines.iter().zip(got) {
        assert_label_only_edit(raw.as_bytes(), cur);
    }
    let rows = t.sql("SELECT count(*) FROM curated.condition").await;
    assert_eq!(rows, vec![vec!["20".to_string()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lake_in_memory_works_end_to_end() {
    let t = TestLake::with(|s| s.lake = "memory://".into());
    let dir = t.input("mem");
    write_lines(
        &dir,
        "Patient.ndjson",
        &[
            r#"{"resourceType":"Patient","id":"p"}"#,
            r#"{"resourceType":"Patient","id":"p"}"#,
        ],
    );
    t.ingest(&[dir], "src").await;
    let report = t.curate().await.unwrap();
    assert_eq!((report.total.curated, report.total.duplicates), (1, 1));
    let rows = t.sql("SELECT m.records_exact_duplicate, c.id FROM metadata.import_metrics m, curated.patient c WHERE m.rule IS NULL").await;
    assert_eq!(rows, vec![vec!["1".to_string(), "p".into()]]);
    assert!(!t.root().exists(), "nothing was written to disk");
}
