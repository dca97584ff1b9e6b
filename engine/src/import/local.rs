//! `--target local`: the curated partition into the local Iceberg lake, one
//! snapshot per resource type. Curated files are read one at a time and
//! streamed into the table's writer, so memory holds one file (below
//! `curate.part_max_bytes`) and one batch.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Instant;

use serde::Deserialize;

use super::{curated, job_row, metric_rows, ImportReport, ImportRequest, STAGE};
use crate::error::{Error, Result};
use crate::lake::{ImportRun, LakeRow, LocalLake};
use crate::metadata;
use crate::report::Reporter;
use crate::settings::{ImportTarget, Settings};
use crate::storage::Lake;

/// The few fields of a curated resource the lake keeps as columns.
#[derive(Deserialize)]
struct Keys<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow, default)]
    meta: Option<Meta<'a>>,
}

#[derive(Deserialize)]
struct Meta<'a> {
    #[serde(borrow, default, rename = "versionId")]
    version_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "lastUpdated")]
    last_updated: Option<Cow<'a, str>>,
}

pub(super) async fn import(
    lake: &Lake,
    settings: &Settings,
    req: &ImportRequest,
    reporter: &dyn Reporter,
) -> Result<ImportReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now().timestamp_micros();
    let curated = curated(lake, &req.tenant, req.date).await?;
    let local = LocalLake::open(&lake.metadata, true)
        .await?
        .expect("created when missing");
    let job_id = uuid::Uuid::now_v7().to_string();
    let run = ImportRun {
        tenant: &req.tenant,
        date: req.date,
        job_id: &job_id,
        curate_run: &curated.record.run_id,
        imported_at_micros: started_at,
        batch_rows: settings.curate.batch_rows,
    };
    let mut report = ImportReport {
        job_id: job_id.clone(),
        target: ImportTarget::Local,
        curate_run: curated.record.run_id.clone(),
        ..Default::default()
    };
    let mut bytes: BTreeMap<String, u64> = BTreeMap::new();
    let mut already = 0;
    let total: usize = curated.files.values().map(Vec::len).sum();
    reporter.start(STAGE, total as u64);
    for (ty, files) in &curated.files {
        let appended = match local
            .already_imported(ty, &req.tenant, run.curate_run)
            .await?
        {
            Some(a) => {
                already += 1;
                reporter.advance(files.len() as u64);
                a
            }
            None => {
                let mut appender = local.appender(ty, &run).await?;
                for path in files {
                    let data = lake.curated.get_bytes(STAGE, path).await?.ok_or_else(|| {
                        Error::Import(format!(
                            "{} is gone: a newer curate run replaced it; import again",
                            lake.curated.url_of(path)
                        ))
                    })?;
                    *bytes.entry(ty.to_string()).or_default() += data.len() as u64;
                    for (n, line) in data.split(|&b| b == b'\n').enumerate() {
                        if line.is_empty() {
                            continue;
                        }
                        appender
                            .push(row(line).map_err(|reason| {
                                Error::Import(format!(
                                    "{} line {}: {reason}",
                                    lake.curated.url_of(path),
                                    n + 1
                                ))
                            })?)
                            .await?;
                    }
                    reporter.advance(1);
                }
                appender.commit().await?
            }
        };
        report.by_type.insert(ty.to_string(), appended.rows);
        report
            .snapshots
            .insert(ty.to_string(), appended.snapshot_id);
    }
    reporter.finish();
    report.records_in = report.by_type.values().sum();
    report.records_out = report.records_in;
    report.seconds = started.elapsed().as_secs_f64();
    report.status = if already > 0 && already == curated.files.len() {
        "already imported".into()
    } else {
        "succeeded".into()
    };
    report.message = Some(format!(
        "curate run {}; {} tables, {already} already held this run",
        report.curate_run,
        curated.files.len()
    ));
    let input = lake
        .curated
        .url_of(&lake.curated.paths.curated_partition(&req.tenant, req.date));
    let output = lake.metadata.url_of(&lake.metadata.paths.iceberg());
    let job = job_row(req, &report, started_at, input, output);
    let metrics = metric_rows(req, &report, &bytes, &BTreeMap::new());
    metadata::publish_stage_rows(
        lake,
        STAGE,
        &req.tenant,
        req.date,
        &job_id,
        &[job],
        &[],
        &metrics,
    )
    .await?;
    Ok(report)
}

/// A curated line as a lake row. Curated lines are valid JSON with an id:
/// a line that is not is a broken curated file, and fails the import.
fn row(line: &[u8]) -> std::result::Result<LakeRow<'_>, String> {
    let text = std::str::from_utf8(line).map_err(|e| e.to_string())?;
    let keys: Keys = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let meta = keys.meta;
    let last_updated = meta
        .as_ref()
        .and_then(|m| m.last_updated.as_deref())
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_micros());
    Ok(LakeRow {
        id: keys.id,
        version_id: meta.and_then(|m| m.version_id),
        last_updated,
        resource: text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_a_curated_line() {
        let r = row(br#"{"resourceType":"Patient","id":"a\u002Db","meta":{"versionId":"3","lastUpdated":"2024-05-01T10:00:00+02:00"},"x":[1.50]}"#).unwrap();
        assert_eq!(r.id, "a-b");
        assert_eq!(r.version_id.as_deref(), Some("3"));
        assert_eq!(r.last_updated, Some(1_714_550_400_000_000));
        assert!(row(b"{\"resourceType\":\"Patient\"}").is_err());
    }
}
