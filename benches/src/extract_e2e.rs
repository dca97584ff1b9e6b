//! End-to-end extract benchmark against a local FHIR server (sekmet-fhir),
//! with a hand-written Python Bulk Data client (`peer_bulk_client.py`) as
//! the peer.
//!
//! 1. Starts sekmet from `.venv` (tests/requirements.txt) on a free loopback
//!    port and loads `--copies` copies of the Synthea sample (copy `k` gets
//!    ids suffixed `-k`).
//! 2. Runs `fhirflow extract` (the release binary) for a system export,
//!    `--runs` times on fresh lakes, and prints its own split: the time the
//!    server took to prepare the export, the download wall time,
//!    resources/s, MB/s, and of the per-file time how much went to waiting
//!    for the server's bytes versus writing them.
//! 3. Runs the peer the same way and prints both.
//!
//! Usage (from the repository root, after `cargo build --release` and
//! `tests/run.sh` or `.venv/bin/pip install -r tests/requirements.txt`):
//! `cargo run --release -p fhirflow-benches --bin extract_e2e -- --copies 10`

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use clap::Parser;
use fhirflow_tests::fhir_server::{synthea_resources, Sekmet, ServerAuth, TOKEN};

#[derive(Parser)]
struct Args {
    /// Copies of the Synthea sample (7,160 resources, 10.4 MB each) to load.
    #[arg(long, default_value_t = 10)]
    copies: usize,
    /// Runs of each client; the median (by wall time) is printed.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Files downloaded at once by fhirflow.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// The fhirflow binary.
    #[arg(long, default_value = "target/release/fhirflow")]
    fhirflow: PathBuf,
    /// Python with httpx (the virtual environment the tests install).
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// Working folder.
    #[arg(long, default_value = "target/bench-extract")]
    work: PathBuf,
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = Sekmet::start_with(ServerAuth::Bearer(TOKEN.into()), false);
    let sample = synthea_resources();
    let mut all = Vec::with_capacity(sample.len() * args.copies);
    for k in 0..args.copies {
        for r in &sample {
            let mut r = r.clone();
            if k > 0 {
                let id = format!("{}-{k}", r["id"].as_str().unwrap());
                r["id"] = id.into();
            }
            all.push(r);
        }
    }
    let t = Instant::now();
    rt.block_on(server.load(&all, &format!("Bearer {TOKEN}")));
    eprintln!(
        "loaded {} resources in {:.1} s",
        all.len(),
        t.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&args.work);

    let mut ours = Vec::new();
    for run in 0..args.runs {
        let lake = args.work.join(format!("lake-{run}"));
        let t = Instant::now();
        let out = Command::new(&args.fhirflow)
            .args(["--lake"])
            .arg(&lake)
            .args([
                "extract",
                "--fhir-url",
                &server.direct_base(),
                "--tenant",
                "0f8fad5b-d9cb-469f-a165-70867728950e",
                "--source-system",
                "bench",
                "--date",
                "2024-08-06",
            ])
            .env("FHIRFLOW_BEARER_TOKEN", TOKEN)
            .env("FHIRFLOW_CONFIG", write_config(&args))
            .output()
            .expect("run fhirflow");
        let secs = t.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ours.push((secs, text));
    }
    ours.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (secs, text) = &ours[ours.len() / 2];
    println!(
        "fhirflow extract ({} runs, median {secs:.2} s wall, process included):",
        args.runs
    );
    for line in text
        .lines()
        .filter(|l| l.starts_with("total") || l.starts_with("export") || l.starts_with("of the"))
    {
        println!("  {line}");
    }

    let mut peer = Vec::new();
    for run in 0..args.runs {
        let out = Command::new(&args.python)
            .arg("benches/peer_bulk_client.py")
            .arg(server.direct_base())
            .arg(TOKEN)
            .arg(args.work.join(format!("peer-{run}")))
            .output()
            .expect("run the peer");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        peer.push(v);
    }
    peer.sort_by(|a, b| {
        a["seconds"]
            .as_f64()
            .unwrap()
            .total_cmp(&b["seconds"].as_f64().unwrap())
    });
    let p = &peer[peer.len() / 2];
    let dl = p["download_seconds"].as_f64().unwrap();
    println!(
        "peer (Python httpx, files in turn): {:.2} s wall; export prepared in {:.2} s; downloads {dl:.2} s ({:.0} resources/s, {:.1} MB/s)",
        p["seconds"].as_f64().unwrap(),
        p["export_wait_seconds"].as_f64().unwrap(),
        p["resources"].as_f64().unwrap() / dl,
        p["bytes"].as_f64().unwrap() / 1e6 / dl
    );
}

/// A config file with the benchmark's parallelism.
fn write_config(args: &Args) -> PathBuf {
    std::fs::create_dir_all(&args.work).unwrap();
    let p = args.work.join("fhirflow.toml");
    std::fs::write(
        &p,
        format!(
            "[extract]\nparallel_downloads = {}\npoll_interval_seconds = 1\n",
            args.parallel
        ),
    )
    .unwrap();
    std::fs::canonicalize(p).unwrap()
}
