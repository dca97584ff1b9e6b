//! What `deploy/` holds, checked with real tools: the CloudFormation
//! template linted by cfn-lint and deployed into moto's CloudFormation, its
//! resources read back through their APIs (`tests/deploy/check.py`); and the
//! worker image built from `deploy/Dockerfile` with podman and run
//! (`tests/deploy/container.sh`).

use std::path::Path;
use std::process::Command;

use fhirflow_tests::*;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn show(out: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_template_lints_clean_and_deploys_into_moto() {
    let moto = Moto::start();
    let out = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tests/deploy/check.py"))
        .args(["--endpoint", &moto.endpoint()])
        .current_dir(repo())
        .output()
        .expect("run tests/deploy/check.py");
    assert!(out.status.success(), "{}", show(&out));
}

#[test]
fn the_worker_image_builds_and_runs() {
    let out = Command::new("bash")
        .arg(repo().join("tests/deploy/container.sh"))
        .arg(binary())
        .current_dir(repo())
        .output()
        .expect("run tests/deploy/container.sh");
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("container.sh: ok"),
        "{}",
        show(&out)
    );
}
