//! One walk against two, per line, on one core: what curation's pass 1
//! costs a line when it validates it. `scan + validate` is what curation did
//! before the validator yielded step 1's spans (the span scan, then the
//! validator's own parse); `validate_scan` is the one walk that does both.
//! `scan_resource` (validation off) and `validate` alone are the bounds.
//!
//! Over the bundled Synthea sample (`tests/data/synthea-10`) and, when
//! `../shared` sits beside the repository, every R4 example (84 MB, lines up
//! to 2.75 MB). Criterion prints time and throughput; the closing lines print
//! MB/s (10^6 bytes), best of several passes.
//!
//! `cargo bench -p fhirflow-fhir --bench walk`

use std::path::Path;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fhirflow_fhir::json::scan_resource;
use fhirflow_fhir::{Level, Validator};

const MAX_DEPTH: usize = 128;

/// (file's resource type, line) of every FHIR file in `dir`.
fn lines(dir: &Path) -> Vec<(&'static str, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        let name = p.file_name().unwrap().to_str().unwrap();
        let Some(ty) = fhirflow_fhir::resource_type(name.split('.').next().unwrap()) else {
            continue; // the exporter's log
        };
        let text = std::fs::read_to_string(&p).unwrap();
        out.extend(text.lines().map(|l| (ty, l.to_string())));
    }
    out
}

type Pass = fn(&Validator, &[(&'static str, String)]) -> usize;

/// The ways of reading each line, with a result that keeps the work alive.
const PASSES: [(&str, Pass); 4] = [
    ("scan_resource", |_, ls| {
        ls.iter()
            .filter(|(_, l)| scan_resource(l, MAX_DEPTH).is_ok())
            .count()
    }),
    ("validate", |v, ls| {
        ls.iter().map(|(t, l)| v.validate(l, Some(t)).len()).sum()
    }),
    ("scan + validate", |v, ls| {
        ls.iter()
            .map(|(t, l)| {
                let scanned = scan_resource(l, MAX_DEPTH);
                scanned.is_ok() as usize + v.validate(l, Some(t)).len()
            })
            .sum()
    }),
    ("validate_scan", |v, ls| {
        ls.iter()
            .map(|(t, l)| {
                let (scanned, findings) = v.validate_scan(l, Some(t));
                scanned.is_ok() as usize + findings.len()
            })
            .sum()
    }),
];

fn bench(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sets = [
        ("synthea-10", lines(&root.join("../tests/data/synthea-10"))),
        (
            "r4-examples",
            lines(&root.join("../../shared/data/r4-examples")),
        ),
    ];
    let v = Validator::new(Level::Strict, MAX_DEPTH);
    let mut headline = Vec::new();
    for (name, ls) in sets.iter().filter(|(_, ls)| !ls.is_empty()) {
        let bytes: usize = ls.iter().map(|(_, l)| l.len()).sum();
        let mut group = c.benchmark_group(format!("walk {name}"));
        group.throughput(Throughput::Bytes(bytes as u64));
        group.sample_size(10);
        for (pass, f) in PASSES {
            group.bench_function(pass, |b| b.iter(|| f(&v, ls)));
        }
        group.finish();
        for (pass, f) in PASSES {
            let mut best = f64::MAX;
            let started = Instant::now();
            while started.elapsed().as_secs_f64() < 2.0 {
                let t = Instant::now();
                std::hint::black_box(f(&v, ls));
                best = best.min(t.elapsed().as_secs_f64());
            }
            headline.push(format!(
                "{name:12} {pass:16} {:6.0} MB/s",
                bytes as f64 / 1e6 / best
            ));
        }
    }
    for line in headline {
        println!("{line}");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
