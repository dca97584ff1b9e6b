//! The binary's `--output json`: one JSON document per command, on stdout.
//!
//! Every document has `command`, `ok`, `exit_code` and `exit_reason`; a
//! failed command adds `error`, a successful one its summary under the
//! command's name (`curate`, `import`, …; `run` has one per stage it ran).
//! The README documents the fields.

use fhirflow::curate::{CurateReport, TypeSummary};
use fhirflow::extract::ExtractReport;
use fhirflow::import::ImportReport;
use fhirflow::ingest::IngestReport;
use serde_json::{json, Map, Value};

/// The word for an exit code, as the README lists them.
pub fn exit_reason(code: u8) -> &'static str {
    match code {
        0 => "ok",
        2 => "usage",
        3 => "not_conserved",
        4 => "busy",
        10 => "skipped",
        5 => "nothing_to_do",
        _ => "failed",
    }
}

/// The document of a command that ended with `exit_code`: `body` is its
/// summary (on success) or its error message.
pub fn document(command: &str, exit_code: u8, body: Result<Value, String>) -> Value {
    let mut doc = Map::new();
    doc.insert("command".into(), json!(command));
    doc.insert("ok".into(), json!(body.is_ok()));
    doc.insert("exit_code".into(), json!(exit_code));
    doc.insert("exit_reason".into(), json!(exit_reason(exit_code)));
    match body {
        Ok(Value::Object(fields)) => doc.extend(fields),
        Ok(Value::Null) => {}
        Ok(other) => {
            doc.insert("result".into(), other);
        }
        Err(message) => {
            doc.insert("error".into(), json!(message));
        }
    }
    Value::Object(doc)
}

fn counts(s: &TypeSummary) -> Value {
    json!({
        "records_in": s.records_in,
        "curated": s.curated,
        "rejected": s.rejected,
        "duplicates": s.duplicates,
        "exact_duplicates": s.exact_duplicates,
        "id_collisions": s.id_collisions,
        "bytes_in": s.bytes_in,
        "bytes_out": s.bytes_out,
        "seconds": s.seconds,
    })
}

pub fn curate(r: &CurateReport) -> Value {
    json!({
        "run_id": r.run_id,
        "tenant": r.tenant.as_str(),
        "date": r.date.to_string(),
        "rule_set": r.rule_set,
        "seconds": r.seconds,
        "types": r.types.iter().map(|s| (s.resource_type.clone(), counts(s))).collect::<Map<_, _>>(),
        "total": counts(&r.total),
        "curated_files": r.curated_files,
        "deletions": r.deletions,
        "phases": r.phases.iter().map(|p| json!({
            "name": p.name,
            "seconds": p.seconds,
            "peak_rss_mb": p.peak_rss_mb,
        })).collect::<Vec<_>>(),
        "rules": r.rules.iter().map(|s| json!({
            "rule": s.rule,
            "resource_type": s.resource_type,
            "rows_in": s.counts.rows_in,
            "kept": s.counts.kept,
            "changed": s.counts.changed,
            "rejected": s.counts.rejected,
            "seconds": s.counts.seconds,
        })).collect::<Vec<_>>(),
    })
}

pub fn ingest(r: &IngestReport) -> Value {
    json!({
        "files": r.files.iter().map(|f| json!({
            "source": f.source.display().to_string(),
            "target": f.target,
            "bytes": f.bytes,
            "completed_earlier": f.completed_earlier,
        })).collect::<Vec<_>>(),
        "skipped": r.skipped.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "already_landed": r.already_landed.iter().map(|(source, landed)| json!({
            "source": source.display().to_string(),
            "landed_as": landed,
        })).collect::<Vec<_>>(),
        "bytes": r.files.iter().map(|f| f.bytes).sum::<u64>(),
    })
}

pub fn extract(r: &ExtractReport) -> Value {
    json!({
        "run_id": r.run_id,
        "tenant": r.tenant.as_str(),
        "source_system": r.source_system.as_str(),
        "date": r.date.to_string(),
        "resumed": r.resumed,
        "reused_files": r.reused,
        "transaction_time": r.transaction_time,
        "types": r.by_type().into_iter().map(|(ty, (files, resources, bytes))| {
            (ty.to_string(), json!({"files": files, "resources": resources, "bytes": bytes}))
        }).collect::<Map<_, _>>(),
        "files": r.files.len(),
        "resources": r.resources(),
        "bytes": r.bytes(),
        "seconds": r.seconds,
        "export_wait_seconds": r.export_wait_seconds,
        "download_seconds": r.download_seconds,
        "server_wait_seconds": r.server_wait_seconds,
        "write_seconds": r.write_seconds,
        "warning": r.delete_warning,
    })
}

pub fn import(r: &ImportReport) -> Value {
    json!({
        "job_id": r.job_id,
        "target": r.target,
        "curate_run": r.curate_run,
        "status": r.status,
        "records_in": r.records_in,
        "records_out": r.records_out,
        "records_rejected": r.records_rejected,
        "records_server_error": r.records_server_error,
        "records_unchanged": r.records_unchanged,
        "records_stale": r.records_stale,
        "bytes_not_sent": r.bytes_not_sent,
        "deletions": {
            "read": r.deletions_read,
            "applied": r.deletions_applied,
            "absent": r.deletions_absent,
            "failed": r.deletions_failed,
        },
        "types": r.by_type,
        "snapshots": r.snapshots,
        "healthlake_job_id": r.healthlake_job_id,
        "message": r.message,
        "seconds": r.seconds,
    })
}

pub fn catalog(r: &fhirflow::catalog::SyncReport) -> Value {
    json!({
        "databases": r.databases,
        "tables_created": r.tables_created,
        "tables_updated": r.tables_updated,
        "partitions_added": r.partitions_added,
    })
}

pub fn run(r: &fhirflow::run::RunReport) -> Value {
    json!({
        "extract": r.extract.as_ref().map(extract),
        "ingest": r.ingest.as_ref().map(ingest),
        "curate": curate(&r.curate),
        "import": r.import.as_ref().map(import),
        "catalog": r.catalog.as_ref().map(catalog),
    })
}

pub fn plan(r: &fhirflow::fleet::PlanReport) -> Value {
    json!({ "plan": {
        "id": r.id,
        "uri": r.uri,
        "bytes": r.bytes,
        "units": r.units.len(),
        "left_out": r.left_out,
    }})
}

pub fn work(r: &fhirflow::fleet::WorkReport) -> Value {
    let outcome = match &r.outcome {
        fhirflow::fleet::Outcome::Extracted(x) => json!({ "extract": extract(x) }),
        fhirflow::fleet::Outcome::Curated(c) => json!({ "curate": curate(c) }),
        fhirflow::fleet::Outcome::Imported(i) => {
            json!({ "import": i.iter().map(import).collect::<Vec<_>>() })
        }
    };
    json!({ "work": {
        "plan": r.plan,
        "index": r.index,
        "unit": r.unit,
        "outcome": outcome,
    }})
}
