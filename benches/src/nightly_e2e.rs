//! Two nights of the same full export, end to end: the second sends only
//! what changed (nothing), into the local lake and into HealthLake (the
//! tests' stand-in, on moto's S3).
//!
//! For each target, on a fresh lake: night 1 runs `fhirflow run` (ingest,
//! curate, import) over the replicated Synthea data under one import date;
//! night 2 runs it again over the same files under the next date. Printed:
//! each night's wall time and peak memory, the records curated, sent and
//! left out as unchanged or stale, and the bytes not sent.
//!
//! Usage (from the repository root, after `cargo build --release -p fhirflow`
//! and `tests/run.sh` or `.venv` with tests/requirements.txt for moto):
//! `cargo run --release -p fhirflow-benches --bin nightly_e2e -- --size-mb 700`

use std::fs;
use std::path::Path;
use std::process::Command;

use clap::Parser;
use fhirflow_benches::{generate, run_json, Common, TENANT};
use fhirflow_tests::healthlake::HealthLake;
use fhirflow_tests::Moto;

#[derive(Parser)]
struct Args {
    /// Raw data to build and run, in MB.
    #[arg(long, default_value_t = 700)]
    size_mb: u64,
    /// Only this target: `local` or `healthlake`.
    #[arg(long)]
    target: Option<String>,
    #[command(flatten)]
    common: Common,
}

const NIGHTS: [&str; 2] = ["2024-08-06", "2024-08-07"];
const DATASTORE: &str = "ds0f8fad5bd9cb469fa16570867728950e";
const ROLE: &str = "arn:aws:iam::123456789012:role/healthlake-import";

fn main() {
    let args = Args::parse();
    let work = fs::canonicalize(&args.common.work).unwrap_or_else(|_| {
        fs::create_dir_all(&args.common.work).unwrap();
        fs::canonicalize(&args.common.work).unwrap()
    });
    let fhirflow = fs::canonicalize(&args.common.fhirflow).expect("the fhirflow binary");
    let data = work.join(format!("data-{}mb", args.size_mb));
    let (bytes, lines) = generate(&args.common.sample, &data, args.size_mb * 1_000_000);
    println!(
        "nightly benchmark: {} cores, {lines} lines, {:.0} MB, the same export two nights running",
        std::thread::available_parallelism().map_or(2, |n| n.get()),
        bytes as f64 / 1e6
    );
    println!(
        "{:<11} {:>5} {:>9} {:>8} {:>9} {:>9} {:>10} {:>8} {:>12}",
        "target",
        "night",
        "seconds",
        "peak MB",
        "curated",
        "sent",
        "unchanged",
        "stale",
        "MB not sent"
    );
    let want = |t: &str| args.target.as_deref().is_none_or(|w| w == t);
    if want("local") {
        let dir = work.join("nightly-local");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("fhirflow.toml"),
            format!("lake = \"{}\"\n", dir.join("lake").display()),
        )
        .unwrap();
        nights(&fhirflow, &dir, &data, "local");
    }
    if want("healthlake") {
        let moto = Moto::start();
        moto.create_bucket("lake");
        moto.create_bucket("hl-output");
        let hl = HealthLake::start(&moto.endpoint(), &[(DATASTORE, ROLE)]);
        let dir = work.join("nightly-healthlake");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let config = format!(
            r#"lake = "s3://lake/fhir"

[import]
target = "healthlake"

[s3]
endpoint = "{s3}"
region = "us-east-1"
allow_http = true
access_key_id = "testing"
secret_access_key = "testing"

[glue]
endpoint = "{s3}"
region = "us-east-1"

[healthlake]
endpoint = "{hl}"
region = "us-east-1"
data_access_role_arn = "{ROLE}"
output_s3_uri = "s3://hl-output/jobs"
kms_key_id = "arn:aws:kms:us-east-1:123456789012:key/bench"
poll_initial_seconds = 0.2
poll_max_seconds = 1.0

[healthlake.datastores]
"{TENANT}" = "{DATASTORE}"
"#,
            s3 = moto.endpoint(),
            hl = hl.endpoint(),
        );
        fs::write(dir.join("fhirflow.toml"), config).unwrap();
        nights(&fhirflow, &dir, &data, "healthlake");
        println!(
            "HealthLake stand-in: {} jobs, {} resources stored",
            hl.jobs().len(),
            hl.stored(DATASTORE).len()
        );
    }
}

/// Runs the two nights in `dir` (which holds the configuration).
fn nights(fhirflow: &Path, dir: &Path, data: &Path, target: &str) {
    for (n, date) in NIGHTS.iter().enumerate() {
        let (m, doc) = run_json(
            Command::new(fhirflow)
                .current_dir(dir)
                .args(["run", data.to_str().unwrap(), "--tenant", TENANT])
                .args([
                    "--source-system",
                    "bench",
                    "--date",
                    date,
                    "--output",
                    "json",
                ]),
            &dir.join("out.json"),
        );
        let import = &doc["import"];
        let count = |k: &str| import[k].as_u64().unwrap_or(0);
        println!(
            "{target:<11} {:>5} {:>9.2} {:>8.0} {:>9} {:>9} {:>10} {:>8} {:>12.1}",
            n + 1,
            m.seconds,
            m.peak_rss_mb,
            count("records_in"),
            count("records_out") + count("records_rejected"),
            count("records_unchanged"),
            count("records_stale"),
            count("bytes_not_sent") as f64 / 1e6
        );
    }
}
