//! The views benchmark: SQL-on-FHIR v2 ViewDefinitions over a replicated
//! Synthea curated layer, fhirflow beside its peers on the same files.
//!
//! 1. Builds a raw layer of the requested size by replicating the Synthea
//!    sample plus the Pathling sample's Observations (the Synthea sample
//!    has none), as the curate benchmark does, and curates it once.
//! 2. For each view of `benches/views/` (patient demographics; flattened
//!    observation components), times as whole processes, each writing CSV:
//!    `fhirflow view run` over the curated layer, the same over the curated
//!    files given as files, and the peers of `benches/peer_views.py`
//!    (pysof, fhir4ds, Pathling) over those files.
//! 3. Prints rows, seconds, MB/s of the view's input, rows/s and peak
//!    resident memory, and whether each peer's rows are fhirflow's.
//!
//! Usage (from the repository root, after `cargo build --release`):
//! `cargo run --release -p fhirflow-benches --bin views_e2e -- --size-mb 700`

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use fhirflow_benches::{generate, ingest, median, run, Common, Measured, DATE, TENANT};

/// SQL-on-FHIR views against pysof, fhir4ds and Pathling.
#[derive(Parser)]
struct Args {
    /// Size of the raw layer to build and curate, in MB.
    #[arg(long, default_value_t = 700)]
    size_mb: u64,
    /// Observations to add to the sample (the Synthea sample has none).
    #[arg(long, default_value = "../shared/data/pathling-r4/Observation.ndjson")]
    observations: PathBuf,
    /// The views to run.
    #[arg(long, default_value = "benches/views")]
    views: PathBuf,
    /// Peers to run (of benches/peer_views.py).
    #[arg(long, value_delimiter = ',', default_value = "pysof,fhir4ds,pathling")]
    peers: Vec<String>,
    #[command(flatten)]
    common: Common,
}

fn main() {
    let args = Args::parse();
    let work = &args.common.work;
    let fhirflow = fs::canonicalize(&args.common.fhirflow).expect("the fhirflow binary");

    // The sample: Synthea's files and the Observations, as `<Type>.000.ndjson`.
    let sample = work.join("views-sample");
    fs::create_dir_all(&sample).unwrap();
    for e in fs::read_dir(&args.common.sample).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_owned();
        if p.to_string_lossy().ends_with(".000.ndjson") && !sample.join(&name).exists() {
            fs::copy(&p, sample.join(&name)).unwrap();
        }
    }
    let obs = sample.join("Observation.000.ndjson");
    if !obs.exists() {
        fs::copy(&args.observations, &obs).expect("the Observations sample");
    }

    let raw = work.join(format!("views-raw-{}", args.size_mb));
    let (bytes, lines) = generate(&sample, &raw, args.size_mb << 20);
    let lake = work.join(format!("views-lake-{}", args.size_mb));
    let curated_marker = lake.join("_bench_curated");
    if !curated_marker.exists() {
        let _ = fs::remove_dir_all(&lake);
        ingest(&fhirflow, &raw, &lake);
        let m = run(Command::new(&fhirflow)
            .args(["curate", "--tenant", TENANT, "--date", DATE, "-q"])
            .env("FHIRFLOW_LAKE", &lake));
        println!(
            "built {} MB raw ({lines} records) and curated it in {:.1} s",
            bytes >> 20,
            m.seconds
        );
        fs::write(&curated_marker, "").unwrap();
    }
    let curated = curated_by_type(&lake.join("curated"));

    let mut views: Vec<PathBuf> = fs::read_dir(&args.views)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    views.sort();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!(
        "views benchmark: {threads} cores, {} MB raw layer, median of {} runs (whole processes)",
        args.size_mb, args.common.runs
    );
    println!(
        "{:<30} {:<22} {:>9} {:>8} {:>8} {:>11} {:>8}  rows as fhirflow's",
        "view", "engine", "rows", "seconds", "MB/s", "rows/s", "peak MB"
    );
    for view in &views {
        let text = fs::read_to_string(view).unwrap();
        let def: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ty = def["resource"].as_str().expect("a view's resource");
        let name = view.file_stem().unwrap().to_string_lossy().to_string();
        let files = curated
            .get(ty)
            .unwrap_or_else(|| panic!("no curated {ty} files"));
        let input_bytes: u64 = files.iter().map(|f| fs::metadata(f).unwrap().len()).sum();
        // The peers read `<Type>.NNN.ndjson`: the curated parts under those names.
        let input = work.join(format!("views-input-{}/{ty}", args.size_mb));
        let _ = fs::remove_dir_all(&input);
        fs::create_dir_all(&input).unwrap();
        for (i, f) in files.iter().enumerate() {
            let target = fs::canonicalize(f).unwrap();
            std::os::unix::fs::symlink(target, input.join(format!("{ty}.{i:03}.ndjson"))).unwrap();
        }
        let out_dir = work.join("views-out");
        fs::create_dir_all(&out_dir).unwrap();
        let ours = out_dir.join(format!("{name}.fhirflow.csv"));
        let mut engines: Vec<(String, Option<Measured>, PathBuf, String)> = Vec::new();
        // fhirflow over the curated layer, then over the same files as the peers.
        let files_out = out_dir.join(format!("{name}.fhirflow-files.csv"));
        let input_arg = input.to_str().unwrap();
        for (label, over, out) in [
            ("fhirflow (curated layer)", None, &ours),
            ("fhirflow (files)", Some(input_arg), &files_out),
        ] {
            let m = measure(args.common.runs, || {
                let mut cmd = Command::new(&fhirflow);
                cmd.args(["view", "run", view.to_str().unwrap()]);
                if let Some(dir) = over {
                    cmd.args(["--over", dir]);
                }
                run(cmd
                    .args(["--format", "csv", "--output"])
                    .arg(out)
                    .env("FHIRFLOW_LAKE", &lake))
            });
            engines.push((label.into(), Some(m), out.clone(), String::new()));
        }
        if !args.common.no_peer {
            for peer in &args.peers {
                let out = out_dir.join(format!("{name}.{peer}.csv"));
                let mut cmd = Command::new(&args.common.python);
                cmd.args([
                    "benches/peer_views.py",
                    peer,
                    view.to_str().unwrap(),
                    input.to_str().unwrap(),
                    "--out",
                ])
                .arg(&out);
                // A peer that cannot run here says why and exits non-zero.
                let probe = cmd.output().expect("run the peer");
                if !probe.status.success() {
                    let why = String::from_utf8_lossy(&probe.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                        .to_string();
                    engines.push((peer.clone(), None, out, why));
                    continue;
                }
                let m = measure(args.common.runs, || run(&mut cmd));
                engines.push((peer.clone(), Some(m), out, String::new()));
            }
        }
        let reference = csv_rows(&ours);
        for (engine, m, out, why) in &engines {
            let Some(m) = m else {
                println!("{name:<30} {engine:<22} cannot run here: {why}");
                continue;
            };
            let rows = csv_rows(out);
            let same = if rows == reference {
                "yes".to_string()
            } else {
                let differ = rows
                    .iter()
                    .filter(|r| reference.binary_search(r).is_err())
                    .count();
                format!("no: {differ} of {} rows differ", rows.len())
            };
            println!(
                "{name:<30} {engine:<22} {:>9} {:>8.2} {:>8.1} {:>11.0} {:>8.0}  {same}",
                rows.len(),
                m.seconds,
                input_bytes as f64 / (1 << 20) as f64 / m.seconds,
                rows.len() as f64 / m.seconds,
                m.peak_rss_mb,
            );
        }
        println!(
            "{name:<30} input: {} files, {:.1} MB of {ty}",
            files.len(),
            input_bytes as f64 / (1 << 20) as f64
        );
    }
}

fn measure(runs: usize, mut f: impl FnMut() -> Measured) -> Measured {
    median((0..runs.max(1)).map(|_| f()).collect())
}

/// The visible curated parts of each type.
fn curated_by_type(root: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                // `_runs/` holds each run's own parts; the partition's
                // folder has the visible ones (hard links of the same bytes).
                if p.file_name().is_some_and(|n| n != "_runs") {
                    stack.push(p);
                }
            } else if let Some(ty) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.split_once("-processed."))
                .map(|(ty, _)| ty.to_string())
            {
                out.entry(ty).or_default().push(p);
            }
        }
    }
    for files in out.values_mut() {
        files.sort();
    }
    out
}

/// A CSV file's data lines, normalised for comparison: sorted, with
/// numbers in their shortest form (5.0 and 5 alike).
fn csv_rows(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut rows: Vec<String> = text
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .map(|f| match f.parse::<f64>() {
                    Ok(v) if !f.is_empty() && f.contains('.') => format!("{v}"),
                    _ => f.to_string(),
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    rows.sort();
    rows
}
