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
    for entry in std::fs::read_dir(rules_dir()).unwrap() {
        let path = entry.unwrap().path();
        let copy = exported.join(path.file_name().unwrap());
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
