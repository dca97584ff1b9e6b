//! The binary as an AWS Lambda function: packaged by
//! `deploy/package-lambda.sh` as the zip Lambda expects, unpacked as Lambda
//! would, and started as `bootstrap` against a stand-in of the Lambda
//! Runtime API. One invocation writes a plan, one curates one plan unit and answers on the
//! response endpoint; a repeated one says it skipped; a unit that cannot
//! run is reported on the error endpoint with an `errorType` Step Functions
//! can tell apart.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use fhirflow::layout::{ImportDate, TenantGuid};
use fhirflow_tests::lambda_api::{LambdaApi, Outcome};
use fhirflow_tests::*;
use serde_json::{json, Value};

const TENANTS: [&str; 2] = [
    "7d1f0b3c-2a44-4e5f-9a61-0c3b5d7e9f10",
    "7d1f0b3c-2a44-4e5f-9a61-0c3b5d7e9f11",
];
const DATE: &str = "2026-11-20";

/// Unpacks the deployment package as Lambda does: its entries under
/// `dir`, with the modes the zip records.
fn unpack(zip: &Path, dir: &Path) -> Vec<String> {
    let script = "import os, sys, zipfile\n\
        z = zipfile.ZipFile(sys.argv[1])\n\
        for i in z.infolist():\n\
        \x20   p = z.extract(i, sys.argv[2])\n\
        \x20   os.chmod(p, (i.external_attr >> 16) & 0o7777)\n\
        \x20   print(i.filename)\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(zip)
        .arg(dir)
        .output()
        .expect("python3 unpacks the zip");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn response(api: &LambdaApi, event: Value) -> Outcome {
    let id = api.invoke(event);
    api.outcome(&id, Duration::from_secs(120))
        .expect("the function answers")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_packaged_bootstrap_serves_one_unit_per_invocation() {
    let t = TestLake::new();
    let sample =
        std::fs::read_to_string(shared().join("data/synthea-10/Patient.000.ndjson")).unwrap();
    let lines: Vec<&str> = sample.lines().collect();
    for (n, tenant) in TENANTS.iter().enumerate() {
        let dir = t.input(&format!("t{n}"));
        write_lines(&dir, "Patient.ndjson", &lines[n * 3..n * 3 + 3]);
        let input = dir.to_str().unwrap();
        let out = t.cli(
            &[
                "ingest",
                input,
                "--tenant",
                tenant,
                "--source-system",
                "ehr",
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

    // The package: one entry, `bootstrap`, executable.
    let dir = tempfile::tempdir().unwrap();
    let zip = dir.path().join("fhirflow.zip");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/package-lambda.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(binary())
        .arg(&zip)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let task = dir.path().join("task");
    assert_eq!(unpack(&zip, &task), vec!["bootstrap".to_string()]);
    let bootstrap = task.join("bootstrap");

    let api = LambdaApi::start();
    let address = api.address();
    let mut function = t
        .command_of(
            &bootstrap,
            &[],
            &[
                ("AWS_LAMBDA_RUNTIME_API", address.as_str()),
                ("AWS_LAMBDA_FUNCTION_NAME", "fhirflow-worker"),
                ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024"),
                ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
                ("FHIRFLOW_LOG_FORMAT", "json"),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bootstrap");

    // The plan, written by the function.
    let Outcome::Response(planned) =
        response(&api, json!({ "command": "plan", "stage": "curate" }))
    else {
        panic!("plan failed");
    };
    assert_eq!(planned["status"], "planned", "{planned}");
    assert_eq!(planned["units"], 2, "{planned}");
    assert!(
        planned["key"].is_null(),
        "a local lake has no S3 key: {planned}"
    );
    let plan = planned["plan"]["uri"].as_str().unwrap().to_string();
    let Outcome::Error(bad_stage) = response(&api, json!({ "command": "plan", "stage": "nope" }))
    else {
        panic!("a plan of stage nope succeeded");
    };
    assert_eq!(bad_stage["errorType"], "Failed", "{bad_stage}");

    // One unit, done.
    let Outcome::Response(done) = response(&api, json!({ "plan": plan, "index": 0 })) else {
        panic!("unit 0 failed");
    };
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["summary"]["work"]["unit"]["tenant"], TENANTS[0]);
    assert_eq!(
        done["summary"]["work"]["outcome"]["curate"]["total"]["curated"], 3,
        "{done}"
    );
    // The same unit again (a retried invocation): skipped, not redone.
    let Outcome::Response(again) = response(&api, json!({ "plan": plan, "index": 0 })) else {
        panic!("the repeated unit failed");
    };
    assert_eq!(again["status"], "skipped", "{again}");
    // A unit the plan does not have: the error endpoint, typed Failed.
    let Outcome::Error(failed) = response(&api, json!({ "plan": plan, "index": 7 })) else {
        panic!("unit 7 succeeded");
    };
    assert_eq!(failed["errorType"], "Failed", "{failed}");
    assert!(
        failed["errorMessage"]
            .as_str()
            .unwrap()
            .contains("no unit 7"),
        "{failed}"
    );
    // An event that is not a unit's.
    let Outcome::Error(bad) = response(&api, json!({ "plan": plan })) else {
        panic!("an event without an index succeeded");
    };
    assert!(
        bad["errorMessage"]
            .as_str()
            .unwrap()
            .contains("deserialize"),
        "{bad}"
    );
    // The process serves on after a failure.
    let Outcome::Response(second) = response(&api, json!({ "plan": plan, "index": 1 })) else {
        panic!("unit 1 failed");
    };
    assert_eq!(second["status"], "done", "{second}");
    assert!(api.init_errors().is_empty());

    function.kill().unwrap();
    let out = function.wait_with_output().unwrap();
    let emf: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"_aws\""))
        .map(|l| serde_json::from_str(l).expect("an EMF line is JSON"))
        .collect();
    for line in &emf {
        check_emf(line).unwrap_or_else(|e| panic!("EMF line {line}: {e}"));
    }
    let units: Vec<(f64, f64, f64)> = emf
        .iter()
        .filter(|l| l.get("UnitsDone").is_some())
        .map(|l| {
            let n = |k: &str| l[k].as_f64().unwrap();
            (n("UnitsDone"), n("UnitsSkipped"), n("UnitsFailed"))
        })
        .collect();
    assert_eq!(
        units,
        vec![
            (1.0, 0.0, 0.0),
            (0.0, 1.0, 0.0),
            (0.0, 0.0, 1.0),
            (1.0, 0.0, 0.0)
        ],
        "one unit line per invocation that reached a unit"
    );
    let date: ImportDate = DATE.parse().unwrap();
    for tenant in TENANTS {
        let t_guid: TenantGuid = tenant.parse().unwrap();
        assert!(
            !t.visible_files_of(&t_guid, date).await.is_empty(),
            "{tenant}: curated"
        );
    }
}
