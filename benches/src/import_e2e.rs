//! End-to-end local import benchmark, with PyIceberg as the peer on the same
//! curated files.
//!
//! 1. Builds (or reuses) the replicated Synthea raw layer of the curate
//!    benchmark, ingests and curates it once (not timed; no validation, no
//!    rules: the curated files are what matters here).
//! 2. Times `fhirflow import --target local` into a fresh Iceberg lake: every
//!    curated file read, its key columns pulled out, appended to one table
//!    per resource type (one snapshot each), plus the metadata rows.
//! 3. Times `benches/peer_pyiceberg.py` doing the same appends into a fresh
//!    SQL catalog on SQLite.
//! 4. Prints both, median of `--runs`, interleaved.
//!
//! Usage (from the repository root, after `cargo build --release -p fhirflow`
//! and `.venv/bin/pip install -r benches/requirements.txt`):
//! `cargo run --release -p fhirflow-benches --bin import_e2e -- --size-mb 700`

use std::fs;
use std::path::Path;
use std::process::Command;

use clap::Parser;
use fhirflow_benches::{generate, ingest, median, run, Common, Measured, DATE, TENANT};

/// End-to-end local import benchmark against PyIceberg.
#[derive(Parser)]
struct Args {
    /// Raw layer size to build, curate and import, in MB.
    #[arg(long, default_value_t = 700)]
    size_mb: u64,
    #[command(flatten)]
    common: Common,
}

fn main() {
    let args = Args::parse();
    let data = args.common.work.join(format!("data-{}mb", args.size_mb));
    generate(&args.common.sample, &data, args.size_mb * 1_000_000);

    let lake = args.common.work.join("import-lake");
    let _ = fs::remove_dir_all(&lake);
    ingest(&args.common.fhirflow, &data, &lake);
    run(Command::new(&args.common.fhirflow)
        .args(["curate", "--tenant", TENANT, "--date", DATE, "--quiet"])
        .args(["--validation", "off", "--rules", "none"])
        .env("FHIRFLOW_LAKE", &lake));
    let partition = lake
        .join("curated")
        .join(format!("tenantGuid={TENANT}"))
        .join(format!("import_date={DATE}"));
    let (bytes, records) = count(&partition);
    let mb = bytes as f64 / 1e6;
    println!(
        "import benchmark: {} cores, {records} curated records, {mb:.0} MB",
        std::thread::available_parallelism().map_or(2, |n| n.get())
    );

    let iceberg = lake.join("iceberg");
    let peer_warehouse = args.common.work.join("pyiceberg");
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    // Interleaved, so that a slow spell of the machine hits both alike.
    for _ in 0..args.common.runs.max(1) {
        let _ = fs::remove_dir_all(&iceberg);
        ours.push(run(Command::new(&args.common.fhirflow)
            .args(["import", "--tenant", TENANT, "--date", DATE, "--quiet"])
            .args(["--target", "local"])
            .env("FHIRFLOW_LAKE", &lake)));
        if !args.common.no_peer {
            let _ = fs::remove_dir_all(&peer_warehouse);
            peer.push(run(Command::new(&args.common.python).args([
                "benches/peer_pyiceberg.py",
                partition.to_str().unwrap(),
                peer_warehouse.to_str().unwrap(),
                TENANT,
                DATE,
                &records.to_string(),
            ])));
        }
    }
    println!(
        "{:<24} {:>8} {:>9} {:>11} {:>9}",
        "engine", "seconds", "MB/s", "records/s", "peak MB"
    );
    let row = |name: &str, m: &Measured| {
        println!(
            "{:<24} {:>8.2} {:>9.1} {:>11.0} {:>9.0}",
            name,
            m.seconds,
            mb / m.seconds,
            records as f64 / m.seconds,
            m.peak_rss_mb
        );
    };
    let ours = median(ours);
    row("fhirflow import --local", &ours);
    if !peer.is_empty() {
        let peer = median(peer);
        row("pyiceberg (+duckdb)", &peer);
        println!(
            "ratio: fhirflow is {:.1}x PyIceberg's throughput, at {:.2}x its peak memory",
            peer.seconds / ours.seconds,
            ours.peak_rss_mb / peer.peak_rss_mb
        );
    }
}

/// Bytes and lines of the curated NDJSON files of a partition.
fn count(partition: &Path) -> (u64, u64) {
    let (mut bytes, mut lines) = (0, 0);
    for entry in fs::read_dir(partition).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "ndjson") {
            let data = fs::read(&path).unwrap();
            bytes += data.len() as u64;
            lines += data.iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }
    (bytes, lines)
}
