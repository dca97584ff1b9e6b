//! A night's curate units on 1, 2 and 4 workers, against one process that
//! curates every partition in turn.
//!
//! The data: the replicated Synthea sample (`--unit-mb` per unit), ingested
//! under `--tenants` tenants × `--dates` dates of a fresh local lake for each
//! measurement. Then, timed:
//!
//! * single: one `fhirflow curate` per partition, one after the other;
//! * N workers: `fhirflow plan --stage curate`, then N slots that each start
//!   `fhirflow work --plan … --index i` for the next index until none is left
//!   (an AWS Batch array job with N children at a time); the plan is timed
//!   too.
//!
//! Printed per configuration: the median wall time of `--runs` runs, units
//! per minute and MB/s of raw data, and the ratio to the single process.
//!
//! Usage (after `cargo build --release -p fhirflow`):
//! `cargo run -p fhirflow-benches --bin fleet_e2e -- --unit-mb 40`

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use clap::Parser;
use fhirflow_benches::{generate, Common};

#[derive(Parser)]
struct Args {
    /// Raw data per unit (tenant and date), in MB.
    #[arg(long, default_value_t = 40)]
    unit_mb: u64,
    #[arg(long, default_value_t = 4)]
    tenants: usize,
    #[arg(long, default_value_t = 2)]
    dates: usize,
    /// Worker counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    workers: Vec<usize>,
    #[command(flatten)]
    common: Common,
}

fn tenant(i: usize) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", 0xbe00 + i, i)
}

fn date(i: usize) -> String {
    format!("2026-10-{:02}", i + 1)
}

fn fhirflow(bin: &Path, lake: &Path) -> Command {
    let mut c = Command::new(bin);
    c.env("FHIRFLOW_LAKE", lake)
        .env_remove("FHIRFLOW_CONFIG")
        .arg("--quiet")
        .stdout(Stdio::null());
    c
}

fn check(what: &str, status: std::process::ExitStatus) {
    assert!(status.success(), "{what}: {status}");
}

/// A fresh lake with the data under every (tenant, date).
fn fresh_lake(bin: &Path, work: &Path, data: &Path, args: &Args) -> PathBuf {
    let lake = work.join("fleet-lake");
    let _ = fs::remove_dir_all(&lake);
    for t in 0..args.tenants {
        for d in 0..args.dates {
            let status = fhirflow(bin, &lake)
                .args(["ingest", data.to_str().unwrap(), "--tenant", &tenant(t)])
                .args(["--source-system", "bench", "--date", &date(d)])
                .status()
                .unwrap();
            check("ingest", status);
        }
    }
    lake
}

/// One process, every partition in turn.
fn single(bin: &Path, lake: &Path, args: &Args) {
    for t in 0..args.tenants {
        for d in 0..args.dates {
            let status = fhirflow(bin, lake)
                .args(["curate", "--tenant", &tenant(t), "--date", &date(d)])
                .status()
                .unwrap();
            check("curate", status);
        }
    }
}

/// `plan`, then `workers` slots working through its units.
fn fleet(bin: &Path, lake: &Path, workers: usize) -> usize {
    // Not quiet: the plan's line is what it says.
    let out = Command::new(bin)
        .env("FHIRFLOW_LAKE", lake)
        .env_remove("FHIRFLOW_CONFIG")
        .args(["plan", "--stage", "curate"])
        .output()
        .unwrap();
    check("plan", out.status);
    let text = String::from_utf8(out.stdout).unwrap();
    // plan: N units (B bytes) at URI
    let units: usize = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let plan = text.split_whitespace().last().unwrap().to_string();
    let mut next = 0;
    let mut running: Vec<Child> = Vec::new();
    while next < units || !running.is_empty() {
        while running.len() < workers && next < units {
            let child = fhirflow(bin, lake)
                .args(["work", "--plan", &plan, "--index", &next.to_string()])
                .spawn()
                .unwrap();
            running.push(child);
            next += 1;
        }
        // Wait for any one child: poll, as std has no wait-any.
        loop {
            if let Some(i) = running
                .iter_mut()
                .position(|c| c.try_wait().unwrap().is_some())
            {
                let mut c = running.swap_remove(i);
                check("work", c.wait().unwrap());
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    units
}

fn main() {
    let args = Args::parse();
    let work = {
        fs::create_dir_all(&args.common.work).unwrap();
        fs::canonicalize(&args.common.work).unwrap()
    };
    let bin = fs::canonicalize(&args.common.fhirflow).expect("the fhirflow binary");
    let data = work.join(format!("data-{}mb", args.unit_mb));
    let (bytes, _) = generate(&args.common.sample, &data, args.unit_mb * 1_000_000);
    let units = args.tenants * args.dates;
    let total_mb = (bytes * units as u64) as f64 / 1e6;
    println!(
        "fleet benchmark: {} cores, {units} curate units of {:.0} MB ({total_mb:.0} MB), median of {} runs",
        std::thread::available_parallelism().map_or(2, |n| n.get()),
        bytes as f64 / 1e6,
        args.common.runs
    );
    println!(
        "{:<22} {:>9} {:>10} {:>8} {:>9}",
        "how", "seconds", "units/min", "MB/s", "vs single"
    );
    let measure = |f: &dyn Fn(&Path)| -> f64 {
        let mut times: Vec<f64> = (0..args.common.runs)
            .map(|_| {
                let lake = fresh_lake(&bin, &work, &data, &args);
                let started = Instant::now();
                f(&lake);
                started.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let row = |how: &str, secs: f64, base: f64| {
        println!(
            "{how:<22} {secs:>9.2} {:>10.1} {:>8.1} {:>8.2}x",
            units as f64 / secs * 60.0,
            total_mb / secs,
            base / secs
        );
    };
    let base = measure(&|lake| single(&bin, lake, &args));
    row("single process", base, base);
    for &n in &args.workers {
        let secs = measure(&|lake| {
            assert_eq!(
                fleet(&bin, lake, n),
                units,
                "the plan lists every partition"
            );
        });
        row(&format!("plan + {n} worker(s)"), secs, base);
    }
}
