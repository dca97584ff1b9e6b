//! The validator's throughput on one core, over the bundled Synthea sample
//! (`tests/data/synthea-10`, 7,160 resources, 10.4 MB): criterion prints the
//! time per pass and the throughput; the closing line prints MB/s (10^6
//! bytes) per core, the figure issue 3 sets at 150 or more.
//!
//! `cargo bench -p fhirflow-fhir --bench validate`

use std::path::Path;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fhirflow_fhir::{Level, Validator};

fn sample() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/synthea-10");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/data/synthea-10")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
        .collect();
    paths.sort();
    paths
        .iter()
        .flat_map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            text.lines().map(str::to_string).collect::<Vec<_>>()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let lines = sample();
    let bytes: usize = lines.iter().map(String::len).sum();
    let mut group = c.benchmark_group("validate");
    group.throughput(Throughput::Bytes(bytes as u64));
    for level in [Level::Strict, Level::StructureOnly] {
        let v = Validator::new(level, 128);
        group.bench_function(format!("synthea-10 {level}"), |b| {
            b.iter(|| {
                lines
                    .iter()
                    .map(|l| v.validate(l, None).len())
                    .sum::<usize>()
            })
        });
    }
    group.finish();

    // The headline figure, in MB/s (criterion's throughput is in MiB/s).
    let v = Validator::new(Level::Strict, 128);
    let started = Instant::now();
    let mut passes = 0;
    while started.elapsed().as_secs_f64() < 3.0 {
        for l in &lines {
            std::hint::black_box(v.validate(l, None));
        }
        passes += 1;
    }
    let mbps = (bytes * passes) as f64 / 1e6 / started.elapsed().as_secs_f64();
    println!("validator, strict, one core: {mbps:.0} MB/s over {passes} passes of {bytes} bytes");
}

criterion_group!(benches, bench);
criterion_main!(benches);
