//! Validates every NDJSON line under a folder and prints the findings by code
//! (a development aid: `cargo run --release -p fhirflow-fhir --example scan_dir DIR`).
use std::collections::BTreeMap;

fn main() {
    let dir = std::env::args().nth(1).expect("a folder");
    let v = fhirflow_fhir::Validator::new(fhirflow_fhir::Level::Strict, 128);
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    let (mut lines, mut bad, mut bytes) = (0, 0, 0);
    let mut spent = std::time::Duration::ZERO;
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for p in paths
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
    {
        let text = std::fs::read_to_string(p).unwrap();
        for (n, line) in text.lines().enumerate() {
            lines += 1;
            bytes += line.len();
            let started = std::time::Instant::now();
            let f = if std::env::var("PARSE").is_ok() {
                v.parse_only(line);
                Vec::new()
            } else {
                v.validate(line, None)
            };
            spent += started.elapsed();
            if fhirflow_fhir::Validator::has_error(&f) {
                bad += 1;
            }
            for f in f {
                *codes.entry(f.code.to_string()).or_default() += 1;
                if std::env::var("SHOW").is_ok_and(|s| s == f.code) {
                    println!(
                        "{}:{} {} {} {}",
                        p.display(),
                        n + 1,
                        f.code,
                        f.location,
                        f.message
                    );
                }
            }
        }
    }
    let s = spent.as_secs_f64();
    println!(
        "{lines} lines, {bad} with errors, {:.0} MB/s",
        bytes as f64 / 1e6 / s
    );
    for (c, n) in codes {
        println!("{n:8} {c}");
    }
}
