//! End-to-end curate benchmark, with DuckDB as the peer on the same data.
//!
//! 1. Builds a raw layer of the requested size by replicating the Synthea
//!    sample deterministically: copy `k` of every resource gets new UUIDs
//!    (the first group of each UUID xor-ed with `k`, so references stay
//!    consistent and ids stay valid), and about 5% of lines are written twice
//!    (exact duplicates).
//! 2. Runs `fhirflow curate` on it as a child process: validation off and
//!    no rules; strict validation and no rules; strict validation and the
//!    default rule set (`queries/`); the same with the missing-Patient lookup
//!    switched on. Wall time, MB/s, records/s and peak resident memory (from
//!    the kernel's rusage), and what validation and the rules cost.
//! 3. Runs `benches/peer_duckdb.py` on the same raw files the same way.
//! 4. Prints both and the throughput ratio.
//!
//! Usage (from the repository root, after `cargo build --release`):
//! `cargo run --release -p fhirflow-benches -- --size-mb 700`

use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Parser;

const TENANT: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";
const DATE: &str = "2024-08-06";

/// End-to-end curate benchmark against DuckDB.
#[derive(Parser)]
struct Args {
    /// Raw layer sizes to build and curate, in MB (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "700")]
    size_mb: Vec<u64>,
    /// Working folder (generated data is kept and reused).
    #[arg(long, default_value = "target/bench-curate")]
    work: PathBuf,
    /// The sample to replicate.
    #[arg(long, default_value = "tests/data/synthea-10")]
    sample: PathBuf,
    /// The fhirflow binary.
    #[arg(long, default_value = "target/release/fhirflow")]
    fhirflow: PathBuf,
    /// Python with duckdb installed (see benches/requirements.txt).
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// Skip the DuckDB run.
    #[arg(long)]
    no_peer: bool,
    /// Runs of each measurement; the median (by wall time) is printed.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// Wall time and peak memory of one child process.
struct Measured {
    seconds: f64,
    peak_rss_mb: f64,
}

fn main() {
    let args = Args::parse();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!(
        "curate benchmark: {threads} cores, sample {}",
        args.sample.display()
    );
    println!(
        "{:>8} {:>10} {:<30} {:>8} {:>9} {:>11} {:>9}",
        "raw MB", "records", "engine", "seconds", "MB/s", "records/s", "peak MB"
    );
    for &size in &args.size_mb {
        let data = args.work.join(format!("data-{size}mb"));
        let (bytes, records) = generate(&args.sample, &data, size * 1_000_000);
        let mb = bytes as f64 / 1e6;

        // Ours: ingest into a fresh lake (not timed), then curate. Each run
        // gets a fresh lake: a re-run replaces curated files, and replacing
        // files costs the file system a flush that a first run does not pay.
        let lake = args.work.join("lake");
        let curate = |level: &str, rules: &str, extra: &[&str]| {
            let _ = fs::remove_dir_all(&lake);
            run(Command::new(&args.fhirflow)
                .args([
                    "ingest",
                    data.to_str().unwrap(),
                    "--tenant",
                    TENANT,
                    "--source-system",
                    "bench",
                    "--date",
                    DATE,
                ])
                .env("FHIRFLOW_LAKE", &lake));
            run(Command::new(&args.fhirflow)
                .args(["curate", "--tenant", TENANT, "--date", DATE, "--quiet"])
                .args(["--validation", level, "--rules", rules])
                .args(extra)
                .env("FHIRFLOW_LAKE", &lake))
        };
        // Interleaved, so that a slow spell of the machine hits all alike.
        let (mut off, mut strict, mut rules, mut lookup) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.runs.max(1) {
            off.push(curate("off", "none", &[]));
            strict.push(curate("strict", "none", &[]));
            rules.push(curate("strict", "queries", &[]));
            lookup.push(curate(
                "strict",
                "queries",
                &["--rule-param", "missing_patient=reject"],
            ));
        }
        let (unvalidated, no_rules) = (median(off), median(strict));
        let (ours, with_lookup) = (median(rules), median(lookup));
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

        if !args.no_peer {
            let out = args.work.join("duckdb-out.ndjson");
            let raw = lake.join("raw");
            let peer = median(
                (0..args.runs.max(1))
                    .map(|_| {
                        run(Command::new(&args.python).args([
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

/// The run with the median wall time.
fn median(mut runs: Vec<Measured>) -> Measured {
    runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    runs.swap_remove(runs.len() / 2)
}

/// Runs a child to completion; its wall time and peak RSS.
fn run(cmd: &mut Command) -> Measured {
    let started = Instant::now();
    let child = cmd
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value, and wait4 fills it for the
    // child we spawned (and have not waited for).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(waited, pid, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed: status {status}"
    );
    std::mem::forget(child); // already reaped
    Measured {
        seconds,
        // ru_maxrss is in KiB on Linux.
        peak_rss_mb: usage.ru_maxrss as f64 / 1024.0,
    }
}

/// Writes copies of the sample into `dir` until it holds `target` bytes;
/// returns (bytes, lines). Reuses a complete earlier generation.
fn generate(sample: &Path, dir: &Path, target: u64) -> (u64, u64) {
    let done = dir.join("_complete");
    if let Ok(s) = fs::read_to_string(&done) {
        let mut it = s.split_whitespace().map(|v| v.parse::<u64>().unwrap());
        return (it.next().unwrap(), it.next().unwrap());
    }
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    let mut sources: Vec<(String, Vec<String>)> = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(sample)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let Some(ty) = name.strip_suffix(".000.ndjson") else {
            continue;
        };
        let lines = BufReader::new(File::open(&p).unwrap())
            .lines()
            .map(Result::unwrap)
            .collect();
        sources.push((ty.to_string(), lines));
    }
    let sample_bytes: u64 = sources
        .iter()
        .flat_map(|(_, l)| l)
        .map(|l| l.len() as u64 + 1)
        .sum();
    let copies = target.div_ceil(sample_bytes).max(1);
    // About 16 copies of a type per file keeps files in the tens of MB.
    let per_file = 16;
    let (mut bytes, mut lines) = (0u64, 0u64);
    for (ty, src) in &sources {
        for chunk in 0..copies.div_ceil(per_file) {
            let path = dir.join(format!("{ty}.{chunk:03}.ndjson"));
            let mut w = BufWriter::with_capacity(1 << 20, File::create(&path).unwrap());
            for k in chunk * per_file..((chunk + 1) * per_file).min(copies) {
                for (i, line) in src.iter().enumerate() {
                    let out = rekey(line, k);
                    let times = if mix(k, i as u64) % 100 < 5 { 2 } else { 1 };
                    for _ in 0..times {
                        w.write_all(out.as_bytes()).unwrap();
                        w.write_all(b"\n").unwrap();
                        bytes += out.len() as u64 + 1;
                        lines += 1;
                    }
                }
            }
            w.flush().unwrap();
        }
    }
    fs::write(done, format!("{bytes} {lines}")).unwrap();
    (bytes, lines)
}

/// A deterministic 64-bit mix of two numbers (splitmix64 finaliser).
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_add(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Copy `k` of a line: the first group of every lower-case UUID is xor-ed
/// with `k`, so ids change and references to them change the same way.
fn rekey(line: &str, k: u64) -> String {
    if k == 0 {
        return line.to_string();
    }
    let b = line.as_bytes();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    let mut copied = 0;
    while i + 36 <= b.len() {
        if is_uuid(&b[i..i + 36]) {
            let first = u32::from_str_radix(&line[i..i + 8], 16).unwrap() ^ (k as u32);
            out.push_str(&line[copied..i]);
            out.push_str(&format!("{first:08x}"));
            copied = i + 8;
            i += 36;
        } else {
            i += 1;
        }
    }
    out.push_str(&line[copied..]);
    out
}

fn is_uuid(s: &[u8]) -> bool {
    s.iter().enumerate().all(|(i, &c)| match i {
        8 | 13 | 18 | 23 => c == b'-',
        _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
    })
}
