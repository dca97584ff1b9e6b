//! The binary: bad partition values are refused before anything is written,
//! and `run`, `sql` and `config` work as a user would call them.

use fhirflow_tests::*;

#[test]
fn bad_partition_values_are_clear_errors_and_write_nothing() {
    let t = TestLake::new();
    let dir = t.input("p");
    write_lines(
        &dir,
        "Patient.ndjson",
        &[r#"{"resourceType":"Patient","id":"p"}"#],
    );
    let d = dir.to_str().unwrap();
    for (args, needle) in [
        (
            vec![
                "ingest",
                d,
                "--tenant",
                "not-a-guid",
                "--source-system",
                "s",
                "--date",
                DATE,
            ],
            "tenant GUID",
        ),
        (
            vec![
                "ingest",
                d,
                "--tenant",
                TENANT,
                "--source-system",
                "../../etc",
                "--date",
                DATE,
            ],
            "source system",
        ),
        (
            vec![
                "ingest",
                d,
                "--tenant",
                TENANT,
                "--source-system",
                "s",
                "--date",
                "2023-02-30",
            ],
            "import date",
        ),
        (
            vec!["curate", "--tenant", TENANT, "--date", "yesterday"],
            "import date",
        ),
    ] {
        let out = t.cli(&args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let raw = t.root().join("raw");
    assert!(
        !raw.exists() || std::fs::read_dir(&raw).unwrap().next().is_none(),
        "nothing written"
    );
}

#[test]
fn run_sql_and_config_from_the_command_line() {
    let t = TestLake::new();
    let sample = shared().join("data/synthea-10");
    let out = t.cli(
        &[
            "run",
            sample.to_str().unwrap(),
            "--tenant",
            TENANT,
            "--source-system",
            "synthea",
            "--date",
            DATE,
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Procedure"), "{stdout}");
    assert!(stdout.contains("imported into the local lake"), "{stdout}");
    assert!(
        stdout.contains("skipped") && stdout.contains("log.ndjson"),
        "{stdout}"
    );

    let out = t.cli(
        &[
            "sql",
            "SELECT count(*) AS n FROM curated.patient",
            "--format",
            "csv",
        ],
        &[],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "n\n13\n");
    let out = t.cli(
        &[
            "sql",
            "SELECT stage, status, records_in FROM metadata.import_jobs ORDER BY stage",
            "--format",
            "json",
        ],
        &[],
    );
    // run imported into the local lake after curate.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        concat!(
            r#"{"stage":"curate","status":"succeeded","records_in":7160}"#,
            "\n",
            r#"{"stage":"import","status":"succeeded","records_in":7160}"#
        )
    );
    let out = t.cli(
        &[
            "sql",
            "SELECT count(*) AS n FROM lake.patient",
            "--format",
            "csv",
        ],
        &[],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "n\n13\n");

    std::fs::write(
        t.dir.path().join("fhirflow.toml"),
        "[s3]\nsecret_access_key = \"hunter2\"\n",
    )
    .unwrap();
    let out = t.cli(&["config"], &[]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        shown.contains("****") && !shown.contains("hunter2"),
        "{shown}"
    );
}

/// The binary alone, as installed or in a container: run from an empty
/// folder with no rules folder anywhere, it curates with the rule set built
/// into it, and says so in `import_jobs`.
#[test]
fn the_installed_binary_alone_curates_with_its_built_in_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin").join("fhirflow");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(binary(), &bin).unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_lines(
        &data,
        "Patient.ndjson",
        &[r#"{"resourceType":"Patient","id":"p1"}"#],
    );
    write_lines(
        &data,
        "Basic.ndjson",
        &[r#"{"resourceType":"Basic","id":"b1","code":{"text":"note"}}"#],
    );
    let lake = tmp.path().join("lake");
    let fhirflow = |args: &[&str]| {
        let out = std::process::Command::new(&bin)
            .args(args)
            .arg("--lake")
            .arg(&lake)
            .current_dir(&work)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{args:?}: {text}");
        text
    };
    // Nothing landed yet: "nothing to do" has its own exit code.
    let out = std::process::Command::new(&bin)
        .args(["curate", "--tenant", TENANT, "--date", DATE, "--lake"])
        .arg(&lake)
        .current_dir(&work)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no raw files"));
    fhirflow(&[
        "ingest",
        data.to_str().unwrap(),
        "--tenant",
        TENANT,
        "--source-system",
        "s",
        "--date",
        DATE,
    ]);
    fhirflow(&["curate", "--tenant", TENANT, "--date", DATE]);
    let rows = fhirflow(&[
        "sql",
        "SELECT e.rule, j.rule_set FROM metadata.import_errors e JOIN metadata.import_jobs j USING (job_id)",
        "--format",
        "csv",
    ]);
    let builtin = format!("builtin:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(
        rows,
        format!("rule,rule_set\n010_healthlake_resource_types.sql,{builtin}\n")
    );
    assert_eq!(
        std::fs::read_dir(&work).unwrap().count(),
        0,
        "nothing written to the working directory"
    );

    // `rules test` works on the built-in set; `rules export` writes it out
    // as the repository has it, and refuses to overwrite.
    let tested = fhirflow(&["rules", "test"]);
    assert!(tested.contains("3 passed, 0 failed"), "{tested}");
    let exported = tmp.path().join("my-rules");
    fhirflow(&["rules", "export", exported.to_str().unwrap()]);
    // Rules at the top, ViewDefinitions in views/.
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    for entry in std::fs::read_dir(rules_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            files.push(path);
        }
    }
    assert!(files
        .iter()
        .any(|f| f.ends_with("views/patient_demographics.json")));
    for path in files {
        let rel = path.strip_prefix(rules_dir()).unwrap();
        let copy = exported.join(rel);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&copy).unwrap(),
            "{}",
            copy.display()
        );
    }
    let out = std::process::Command::new(&bin)
        .args(["rules", "export", exported.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
    let checked = fhirflow(&["rules", "check", exported.to_str().unwrap()]);
    assert!(checked.contains("3 rules in"), "{checked}");
}

/// `--output json` is one document on stdout, on success and failure;
/// `--log-format json` lines on stderr are JSON objects that carry timings
/// but never a record's text.
#[test]
fn output_json_and_json_logs() {
    let t = TestLake::new();
    let dir = t.input("p");
    let marker = "Zyxwvut-record-text";
    write_lines(
        &dir,
        "Patient.ndjson",
        &[
            &format!(r#"{{"resourceType":"Patient","id":"p1","name":[{{"family":"{marker}"}}]}}"#),
            r#"{"resourceType":"Patient","id":"p1","name":[{"family":"older"}],"meta":{"versionId":"0"}}"#,
            &format!(
                r#"{{"resourceType":"Patient","id":"bad!","name":[{{"family":"{marker}"}}]}}"#
            ),
        ],
    );
    let out = t.cli(
        &[
            "run",
            dir.to_str().unwrap(),
            "--tenant",
            TENANT,
            "--source-system",
            "s",
            "--date",
            DATE,
            "--output",
            "json",
            "--log-format",
            "json",
            "-v",
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(doc["command"], "run");
    assert_eq!(
        (doc["ok"].as_bool(), doc["exit_code"].as_u64()),
        (Some(true), Some(0))
    );
    let curate = &doc["curate"];
    assert_eq!(curate["total"]["records_in"], 3);
    assert_eq!(curate["total"]["curated"], 1);
    assert_eq!(curate["total"]["rejected"], 1);
    assert_eq!(curate["total"]["duplicates"], 1);
    assert_eq!(curate["types"]["Patient"]["curated"], 1);
    assert!(curate["run_id"].as_str().is_some_and(|r| !r.is_empty()));
    assert!(curate["phases"].as_array().is_some_and(|p| !p.is_empty()));
    assert_eq!(doc["ingest"]["files"].as_array().map(Vec::len), Some(1));
    assert_eq!(doc["import"]["records_in"], 1);
    assert!(doc["extract"].is_null());

    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "curate phase ended" && l["seconds"].is_f64()),
        "{stderr}"
    );
    assert!(
        !stderr.contains(marker),
        "record text in the logs: {stderr}"
    );

    // A failure is a document too, with its exit reason.
    let out = t.cli(
        &[
            "curate",
            "--tenant",
            TENANT,
            "--date",
            "2024-05-02",
            "--output",
            "json",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(5));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(
        (doc["ok"].as_bool(), doc["exit_reason"].as_str()),
        (Some(false), Some("nothing_to_do"))
    );
    assert!(doc["error"].as_str().unwrap().contains("no raw files"));
}

/// The parser refuses what makes no sense before anything runs, and a
/// command's help shows its own options first, the shared ones once, grouped.
#[test]
fn the_parser_refuses_flags_that_do_not_go_together() {
    let t = TestLake::new();
    let dir = t.input("p");
    let d = dir.to_str().unwrap();
    for (args, needle) in [
        (
            vec![
                "run",
                d,
                "--tenant",
                TENANT,
                "--source-system",
                "s",
                "--fhir-url",
                "http://127.0.0.1:1/fhir",
            ],
            "cannot be used with",
        ),
        (vec!["run", d, "--tenant", TENANT], "--source-system"),
        (vec!["import", "--tenant", TENANT], "--date"),
        (vec!["import", "status", "--date", DATE], "--tenant"),
        (
            vec!["curate", "--tenant", TENANT, "--date", DATE, "-q", "-v"],
            "cannot be used with",
        ),
    ] {
        let out = t.cli(&args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }

    let out = t.cli(&["curate", "--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    let at = |needle: &str| {
        help.find(needle)
            .unwrap_or_else(|| panic!("{needle}: {help}"))
    };
    assert!(at("--tenant") < at("Lake:") && at("Lake:") < at("--lake"));
    assert!(at("Curation:") < at("--rules") && at("Runs and logs:") < at("--log-format"));
    assert_eq!(help.matches("--lake").count(), 1, "{help}");
}
