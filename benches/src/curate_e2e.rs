//! End-to-end curate benchmark, with DuckDB as the peer on the same data.
//!
//! 1. Builds a raw layer of the requested size by replicating the Synthea
//!    sample deterministically: copy `k` of every resource gets new UUIDs
//!    (the first group of each UUID xor-ed with `k`, so references stay
//!    consistent and ids stay valid), and about 5% of lines are written twice
//!    (exact duplicates).
//! 2. Runs `fhirflow curate` on it as a child process: validation off and
//!    no rules; strict validation and no rules; strict validation and the
//!    default rule set (built in, `queries/`); the same with the missing-Patient lookup
//!    switched on. Wall time, MB/s, records/s and peak resident memory (from
//!    the kernel's rusage), and what validation and the rules cost.
//! 3. Runs the floor (`benches/floor`: parse every line fully with sonic-rs,
//!    insert the label as text, write; one worker per core over byte ranges)
//!    on the same raw files: the least a curate run can cost here.
//! 4. Runs `benches/peer_duckdb.py` on the same raw files the same way.
//! 5. Prints all of them, fhirflow's time against the floor's and its
//!    throughput against DuckDB's.
//!
//! Usage (from the repository root, after `cargo build --release`):
//! `cargo run --release -p fhirflow-benches -- --size-mb 700`

use std::fs;
use std::process::Command;

use clap::Parser;
use fhirflow_benches::{
    generate, generate_types, ingest, median, run, Common, Measured, DATE, TENANT,
};

/// End-to-end curate benchmark against DuckDB.
#[derive(Parser)]
struct Args {
    /// Raw layer sizes to build and curate, in MB (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "700")]
    size_mb: Vec<u64>,
    /// Also curate one file of this resource type alone (as large as the
    /// sizes), with --concurrency 1 and 2: what byte ranges give one file.
    #[arg(long)]
    one_file: Option<String>,
    /// The floor's binary (`cargo build --release -p fhirflow-floor`).
    #[arg(long, default_value = "target/release/floor")]
    floor: std::path::PathBuf,
    #[command(flatten)]
    common: Common,
}

fn main() {
    let args = Args::parse();
    if let Some(ty) = &args.one_file {
        return one_file(&args, ty);
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!(
        "curate benchmark: {threads} cores, sample {}",
        args.common.sample.display()
    );
    println!(
        "{:>8} {:>10} {:<30} {:>8} {:>9} {:>11} {:>9}",
        "raw MB", "records", "engine", "seconds", "MB/s", "records/s", "peak MB"
    );
    for &size in &args.size_mb {
        let data = args.common.work.join(format!("data-{size}mb"));
        let (bytes, records) = generate(&args.common.sample, &data, size * 1_000_000);
        let mb = bytes as f64 / 1e6;

        // Ours: ingest into a fresh lake (not timed), then curate. Each run
        // gets a fresh lake: a re-run replaces curated files, and replacing
        // files costs the file system a flush that a first run does not pay.
        let lake = args.common.work.join("lake");
        let curate = |level: &str, rules: &str, extra: &[&str]| {
            let _ = fs::remove_dir_all(&lake);
            ingest(&args.common.fhirflow, &data, &lake);
            run(Command::new(&args.common.fhirflow)
                .args(["curate", "--tenant", TENANT, "--date", DATE, "--quiet"])
                .args(["--validation", level, "--rules", rules])
                .args(extra)
                .env("FHIRFLOW_LAKE", &lake))
        };
        // Interleaved, so that a slow spell of the machine hits all alike.
        let (mut off, mut strict, mut rules, mut lookup, mut floor) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let floor_out = args.common.work.join("floor-out");
        for _ in 0..args.common.runs.max(1) {
            let _ = fs::remove_dir_all(&floor_out);
            floor.push(run(Command::new(&args.floor)
                .arg(&data)
                .arg(&floor_out)
                .arg(TENANT)
                .arg(threads.to_string())));
            off.push(curate("off", "none", &[]));
            strict.push(curate("strict", "none", &[]));
            rules.push(curate("strict", "builtin", &[]));
            lookup.push(curate(
                "strict",
                "builtin",
                &["--rule-param", "missing_patient=reject"],
            ));
        }
        let (unvalidated, no_rules) = (median(off), median(strict));
        let (ours, with_lookup) = (median(rules), median(lookup));
        let floor = median(floor);
        let _ = fs::remove_dir_all(&floor_out);
        let row = |name: &str, m: &Measured| {
            println!(
                "{:>8.0} {:>10} {:<30} {:>8.2} {:>9.1} {:>11.0} {:>9.0}",
                mb,
                records,
                name,
                m.seconds,
                mb / m.seconds,
                records as f64 / m.seconds,
                m.peak_rss_mb
            );
        };
        row("floor (parse, label, write)", &floor);
        row("fhirflow, off, no rules", &unvalidated);
        row("fhirflow, strict, no rules", &no_rules);
        row("fhirflow, strict, rules", &ours);
        row("fhirflow, strict, rules+lookup", &with_lookup);
        println!(
            "{:>8.0} validation costs {:+.0}% time; the default rules {:+.0}% over no rules ({:+.0}% with the missing-Patient lookup on)",
            mb,
            (no_rules.seconds / unvalidated.seconds - 1.0) * 100.0,
            (ours.seconds / no_rules.seconds - 1.0) * 100.0,
            (with_lookup.seconds / no_rules.seconds - 1.0) * 100.0
        );
        println!(
            "{:>8.0} against the floor: off, no rules {:.2}x; strict, no rules {:.2}x; strict, rules {:.2}x",
            mb,
            unvalidated.seconds / floor.seconds,
            no_rules.seconds / floor.seconds,
            ours.seconds / floor.seconds
        );

        if !args.common.no_peer {
            let out = args.common.work.join("duckdb-out.ndjson");
            let raw = lake.join("raw");
            let peer = median(
                (0..args.common.runs.max(1))
                    .map(|_| {
                        run(Command::new(&args.common.python).args([
                            "benches/peer_duckdb.py",
                            raw.to_str().unwrap(),
                            out.to_str().unwrap(),
                            TENANT,
                            &threads.to_string(),
                        ]))
                    })
                    .collect(),
            );
            row("duckdb", &peer);
            println!(
                "{:>8.0} ratio: fhirflow is {:.1}x DuckDB's throughput, at {:.2}x its peak memory",
                mb,
                peer.seconds / ours.seconds,
                ours.peak_rss_mb / peer.peak_rss_mb
            );
            let _ = fs::remove_file(out);
        }
    }
}

/// One large file of one type, curated with one and with two workers.
fn one_file(args: &Args, ty: &str) {
    println!(
        "{:>8} {:>10} {:<30} {:>8} {:>9} {:>9}",
        "raw MB", "records", "engine", "seconds", "MB/s", "peak MB"
    );
    for &size in &args.size_mb {
        let data = args.common.work.join(format!("data-{size}mb-{ty}"));
        let (bytes, records) =
            generate_types(&args.common.sample, &data, size * 1_000_000, Some(ty));
        let mb = bytes as f64 / 1e6;
        let lake = args.common.work.join("lake");
        let curate = |concurrency: &str| {
            let _ = fs::remove_dir_all(&lake);
            ingest(&args.common.fhirflow, &data, &lake);
            run(Command::new(&args.common.fhirflow)
                .args(["curate", "--tenant", TENANT, "--date", DATE, "--quiet"])
                .args(["--concurrency", concurrency])
                .env("FHIRFLOW_LAKE", &lake))
        };
        let (mut one, mut two) = (Vec::new(), Vec::new());
        for _ in 0..args.common.runs.max(1) {
            one.push(curate("1"));
            two.push(curate("2"));
        }
        let (one, two) = (median(one), median(two));
        for (name, m) in [("fhirflow, 1 worker", &one), ("fhirflow, 2 workers", &two)] {
            println!(
                "{:>8.0} {:>10} {:<30} {:>8.2} {:>9.1} {:>9.0}",
                mb,
                records,
                name,
                m.seconds,
                mb / m.seconds,
                m.peak_rss_mb
            );
        }
        println!(
            "{:>8.0} one {ty} file: 2 workers are {:.2}x as fast as 1",
            mb,
            one.seconds / two.seconds
        );
    }
}
