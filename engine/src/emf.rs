//! CloudWatch Embedded Metric Format: one JSON object per line on stdout,
//! which the CloudWatch agent-less log paths (AWS Lambda's log stream, AWS
//! Batch's awslogs driver) turn into metrics. The format, as CloudWatch
//! documents it ("Specification: Embedded metric format"): a root member
//! `_aws` with `Timestamp` (milliseconds since the epoch) and
//! `CloudWatchMetrics`, a list of directives each with `Namespace`,
//! `Dimensions` (a list of dimension sets, each a list of member names) and
//! `Metrics` (each a `Name` and a `Unit`); every dimension and metric named
//! there is a member of the root object, a metric's value a number.
//!
//! fhirflow's namespace is `fhirflow`; dimensions are `stage`, `tenant` and,
//! for per-type lines, `resource_type`. The metrics the deployment's alarms
//! use are named in `deploy/cloudformation.yaml`.

use serde_json::{json, Map, Value};

use crate::curate::CurateReport;
use crate::extract::ExtractReport;
use crate::import::ImportReport;

pub const NAMESPACE: &str = "fhirflow";

/// One EMF line: `dims` are (name, value) pairs, `metrics` (name, unit, value).
pub fn line(dims: &[(&str, &str)], metrics: &[(&str, &str, f64)]) -> String {
    let mut root = Map::new();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": chrono::Utc::now().timestamp_millis(),
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [dims.iter().map(|(k, _)| *k).collect::<Vec<_>>()],
                "Metrics": metrics
                    .iter()
                    .map(|(name, unit, _)| json!({ "Name": name, "Unit": unit }))
                    .collect::<Vec<_>>(),
            }],
        }),
    );
    for (k, v) in dims {
        root.insert((*k).into(), Value::from(*v));
    }
    for (name, _, v) in metrics {
        root.insert((*name).into(), json!(v));
    }
    Value::Object(root).to_string()
}

const COUNT: &str = "Count";
const BYTES: &str = "Bytes";
const RATE: &str = "Megabytes/Second";

fn n(v: u64) -> f64 {
    v as f64
}

/// A curate run: one line per resource type, then the run's total.
pub fn curate(r: &CurateReport) -> Vec<String> {
    let tenant = r.tenant.to_string();
    let mut out: Vec<String> = r
        .types
        .iter()
        .map(|t| {
            let secs = t.seconds.max(1e-9);
            line(
                &[
                    ("stage", "curate"),
                    ("tenant", &tenant),
                    ("resource_type", &t.resource_type),
                ],
                &[
                    ("RecordsIn", COUNT, n(t.records_in)),
                    ("RecordsCurated", COUNT, n(t.curated)),
                    ("RecordsRejected", COUNT, n(t.rejected)),
                    ("RecordsDuplicate", COUNT, n(t.duplicates)),
                    ("BytesIn", BYTES, n(t.bytes_in)),
                    ("Throughput", RATE, t.bytes_in as f64 / 1e6 / secs),
                ],
            )
        })
        .collect();
    let t = &r.total;
    out.push(line(
        &[("stage", "curate"), ("tenant", &tenant)],
        &[
            ("RecordsIn", COUNT, n(t.records_in)),
            ("RecordsRejected", COUNT, n(t.rejected)),
            ("BytesIn", BYTES, n(t.bytes_in)),
            (
                "Throughput",
                RATE,
                t.bytes_in as f64 / 1e6 / r.seconds.max(1e-9),
            ),
            (
                "ConservationFailures",
                COUNT,
                if t.conserved() { 0.0 } else { 1.0 },
            ),
            ("CurateSucceeded", COUNT, 1.0),
        ],
    ));
    out
}

/// An import: one line per resource type sent, then the import's total (an
/// import that does not add up is an error: [`unit`] counts it).
pub fn import(tenant: &str, r: &ImportReport) -> Vec<String> {
    let mut out: Vec<String> = r
        .by_type
        .iter()
        .map(|(ty, &sent)| {
            line(
                &[
                    ("stage", "import"),
                    ("tenant", tenant),
                    ("resource_type", ty),
                ],
                &[("RecordsSent", COUNT, n(sent))],
            )
        })
        .collect();
    let failed = matches!(r.status.as_str(), "FAILED" | "COMPLETED_WITH_ERRORS");
    out.push(line(
        &[("stage", "import"), ("tenant", tenant)],
        &[
            ("RecordsIn", COUNT, n(r.records_in)),
            ("RecordsImported", COUNT, n(r.records_out)),
            ("RecordsRejected", COUNT, n(r.records_rejected)),
            ("RecordsUnchanged", COUNT, n(r.records_unchanged)),
            ("RecordsStale", COUNT, n(r.records_stale)),
            ("BytesNotSent", BYTES, n(r.bytes_not_sent)),
            ("DeletionsFailed", COUNT, n(r.deletions_failed)),
            (
                "HealthLakeJobsFailed",
                COUNT,
                if failed { 1.0 } else { 0.0 },
            ),
        ],
    ));
    out
}

/// An extraction: one line per resource type landed, then its total.
pub fn extract(r: &ExtractReport) -> Vec<String> {
    let tenant = r.tenant.as_str();
    let mut out: Vec<String> = r
        .by_type()
        .iter()
        .map(|(ty, &(_, resources, bytes))| {
            line(
                &[
                    ("stage", "extract"),
                    ("tenant", tenant),
                    ("resource_type", ty),
                ],
                &[
                    ("RecordsExtracted", COUNT, n(resources)),
                    ("BytesExtracted", BYTES, n(bytes)),
                ],
            )
        })
        .collect();
    let secs = r.seconds.max(1e-9);
    out.push(line(
        &[("stage", "extract"), ("tenant", tenant)],
        &[
            ("RecordsExtracted", COUNT, n(r.resources())),
            ("BytesExtracted", BYTES, n(r.bytes())),
            ("Throughput", RATE, r.bytes() as f64 / 1e6 / secs),
        ],
    ));
    out
}

/// A unit's end: done (1 or 0), skipped, failed, and a conservation failure
/// (exit code 3) when it failed with one.
pub fn unit(stage: &str, tenant: &str, exit_code: u8) -> String {
    let is = |b: bool| if b { 1.0 } else { 0.0 };
    line(
        &[("stage", stage), ("tenant", tenant)],
        &[
            ("UnitsDone", COUNT, is(exit_code == 0)),
            ("UnitsSkipped", COUNT, is(exit_code == 10)),
            ("UnitsBusy", COUNT, is(exit_code == 4)),
            ("UnitsFailed", COUNT, is(!matches!(exit_code, 0 | 4 | 10))),
            ("ConservationFailures", COUNT, is(exit_code == 3)),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_every_dimension_and_metric_at_its_root() {
        let l = line(
            &[("stage", "curate"), ("tenant", "t")],
            &[("RecordsIn", "Count", 3.0)],
        );
        let v: Value = serde_json::from_str(&l).unwrap();
        let d = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(d["Namespace"], "fhirflow");
        assert_eq!(d["Dimensions"], json!([["stage", "tenant"]]));
        assert_eq!(
            d["Metrics"],
            json!([{ "Name": "RecordsIn", "Unit": "Count" }])
        );
        assert!(v["_aws"]["Timestamp"].as_i64().unwrap() > 1_600_000_000_000);
        assert_eq!(v["stage"], "curate");
        assert_eq!(v["RecordsIn"], 3.0);
    }
}
