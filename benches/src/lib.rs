//! What the end-to-end benchmarks share: the replicated Synthea data set and
//! the measurement of a child process (wall time, peak memory).

use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The tenant and import date the benchmarks load their data under.
pub const TENANT: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";
pub const DATE: &str = "2024-08-06";

/// The options every end-to-end benchmark takes.
#[derive(clap::Args)]
pub struct Common {
    /// Working folder (generated raw data is kept and reused by every
    /// benchmark).
    #[arg(long, default_value = "target/bench-curate")]
    pub work: PathBuf,
    /// The sample to replicate.
    #[arg(long, default_value = "tests/data/synthea-10")]
    pub sample: PathBuf,
    /// The fhirflow binary.
    #[arg(long, default_value = "target/release/fhirflow")]
    pub fhirflow: PathBuf,
    /// Python with the peers' packages (benches/requirements.txt).
    #[arg(long, default_value = ".venv/bin/python")]
    pub python: PathBuf,
    /// Skip the peer's runs.
    #[arg(long)]
    pub no_peer: bool,
    /// Runs of each measurement; the median (by wall time) is printed.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// Wall time and peak memory of one child process.
pub struct Measured {
    pub seconds: f64,
    pub peak_rss_mb: f64,
}

/// Loads the files of `data` into the raw layer of the lake at `lake` with
/// `fhirflow ingest`, under the benchmarks' tenant and date.
pub fn ingest(fhirflow: &Path, data: &Path, lake: &Path) -> Measured {
    run(Command::new(fhirflow)
        .args(["ingest", data.to_str().unwrap(), "--tenant", TENANT])
        .args(["--source-system", "bench", "--date", DATE])
        .env("FHIRFLOW_LAKE", lake))
}

/// The run with the median wall time.
pub fn median(mut runs: Vec<Measured>) -> Measured {
    runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    runs.swap_remove(runs.len() / 2)
}

/// Runs a child to completion; its wall time and peak RSS.
pub fn run(cmd: &mut Command) -> Measured {
    run_with(cmd, Stdio::null())
}

/// [`run`] of a command that prints one JSON document (`--output json`);
/// the document too.
pub fn run_json(cmd: &mut Command, scratch: &Path) -> (Measured, serde_json::Value) {
    let out = File::create(scratch).unwrap();
    let m = run_with(cmd, Stdio::from(out));
    let text = fs::read_to_string(scratch).unwrap();
    let doc = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{cmd:?}: {e}: {text}"));
    (m, doc)
}

fn run_with(cmd: &mut Command, stdout: Stdio) -> Measured {
    let started = Instant::now();
    let child = cmd
        .stdout(stdout)
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
pub fn generate(sample: &Path, dir: &Path, target: u64) -> (u64, u64) {
    generate_types(sample, dir, target, None)
}

/// [`generate`], of one resource type only when `only` is given, then in
/// a single file.
pub fn generate_types(sample: &Path, dir: &Path, target: u64, only: Option<&str>) -> (u64, u64) {
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
        if only.is_some_and(|o| o != ty) {
            continue;
        }
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
    assert!(
        sample_bytes > 0,
        "no resources{} in {}",
        only.map(|o| format!(" of type {o}")).unwrap_or_default(),
        sample.display()
    );
    let copies = target.div_ceil(sample_bytes).max(1);
    // About 16 copies of a type per file keeps files in the tens of MB.
    let per_file = if only.is_some() { u64::MAX } else { 16 };
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
