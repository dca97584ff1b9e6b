//! One criterion benchmark per SQL function, over batches of 1,024 and 8,192
//! real resources (the Synthea sample, every type mixed), calling the
//! function as DataFusion's executor does. Throughput is in bytes of
//! resource text.
//!
//! `cargo bench -p fhirflow-udfs --bench functions`

use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray};
use arrow::datatypes::{DataType, Field};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use datafusion::common::config::ConfigOptions;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF};

/// Lines of the sample, round-robin over its files so every batch mixes types.
fn sample_lines() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/synthea-10");
    let mut files: Vec<Vec<String>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "ndjson"))
        .map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect()
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    let mut i = 0;
    while files.iter().any(|f| i < f.len()) {
        out.extend(files.iter().filter_map(|f| f.get(i).cloned()));
        i += 1;
    }
    out
}

fn text(s: &str) -> ColumnarValue {
    ColumnarValue::Scalar(ScalarValue::Utf8(Some(s.to_string())))
}

fn bench(c: &mut Criterion) {
    let lines = sample_lines();
    let udfs: std::collections::HashMap<String, ScalarUDF> = fhirflow_udfs::all_udfs()
        .into_iter()
        .map(|u| (u.name().to_string(), u))
        .collect();
    let tenant = "0f8fad5b-d9cb-469f-a165-70867728950e";
    // (function, extra arguments after the resource column; None: the
    // argument is a column derived from the resource).
    let cases: Vec<(&str, Vec<ColumnarValue>)> = vec![
        ("fhir_get", vec![text("subject.reference")]),
        ("fhir_get_all", vec![text("descendants().reference")]),
        (
            "fhir_code",
            vec![text("code"), text("http://snomed.info/sct")],
        ),
        ("fhir_set", vec![text("status"), text("\"final\"")]),
        ("fhir_remove", vec![text("meta")]),
        (
            "fhir_trim",
            vec![
                text("code"),
                text("descendants().code"),
                text("identifier.value"),
                text("descendants().identifier.value"),
            ],
        ),
        ("fhir_hash", vec![]),
        ("fhir_validate", vec![]),
        ("fhir_tenant_label", vec![text(tenant)]),
        ("fhir_tenant_label_error", vec![text(tenant)]),
        ("fhir_ref_type", vec![]),
        ("fhir_ref_id", vec![]),
        ("fhir_instant", vec![]),
        ("fhir_date", vec![]),
        ("rule_param", vec![text("default")]),
    ];
    for rows in [1024usize, 8192] {
        let batch: Vec<&str> = lines
            .iter()
            .cycle()
            .take(rows)
            .map(String::as_str)
            .collect();
        let resources: ArrayRef = Arc::new(StringArray::from(batch.clone()));
        // Inputs of the functions that read a value, not a resource.
        let refs: ArrayRef = Arc::new(StringArray::from_iter_values(
            (0..rows).map(|i| format!("Patient/{i:08x}-1b2c-4d5e-8f90-a1b2c3d4e5f6")),
        ));
        let times: ArrayRef = Arc::new(StringArray::from_iter_values((0..rows).map(|i| {
            format!(
                "20{:02}-0{}-1{}T10:0{}:00+02:00",
                i % 100,
                1 + i % 9,
                i % 10,
                i % 10
            )
        })));
        let names: ArrayRef = Arc::new(StringArray::from_iter_values(
            (0..rows).map(|i| format!("param{}", i % 4)),
        ));
        let bytes: usize = batch.iter().map(|l| l.len()).sum();
        let mut group = c.benchmark_group(format!("udf/{rows}"));
        for (name, extra) in &cases {
            let first = match *name {
                "fhir_ref_type" | "fhir_ref_id" => refs.clone(),
                "fhir_instant" | "fhir_date" => times.clone(),
                "rule_param" => names.clone(),
                _ => resources.clone(),
            };
            let per_byte = Arc::ptr_eq(&first, &resources);
            group.throughput(if per_byte {
                Throughput::Bytes(bytes as u64)
            } else {
                Throughput::Elements(rows as u64)
            });
            let udf = &udfs[*name];
            let mut args = vec![ColumnarValue::Array(first)];
            args.extend(extra.iter().cloned());
            let arg_fields: Vec<_> = args
                .iter()
                .enumerate()
                .map(|(i, _)| Arc::new(Field::new(format!("a{i}"), DataType::Utf8, true)))
                .collect();
            let types: Vec<DataType> = arg_fields.iter().map(|f| f.data_type().clone()).collect();
            let returns = udf.return_type(&types).unwrap();
            let return_field = Arc::new(Field::new("out", returns, true));
            let config = Arc::new(ConfigOptions::default());
            group.bench_with_input(BenchmarkId::from_parameter(name), &args, |b, args| {
                b.iter(|| {
                    udf.invoke_with_args(ScalarFunctionArgs {
                        args: args.clone(),
                        arg_fields: arg_fields.clone(),
                        number_rows: rows,
                        return_field: return_field.clone(),
                        config_options: config.clone(),
                    })
                    .unwrap()
                })
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
