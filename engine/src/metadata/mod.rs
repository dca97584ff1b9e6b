//! The metadata layer: `import_jobs`, `import_errors` and `import_metrics`
//! as Parquet (Snappy), Hive-partitioned by tenant and import date
//! (DESIGN.md, "Metadata tables"). Each run writes one file per table, named
//! by its run id, and the files become visible when the run commits.
//!
//! The files also carry `tenant_guid` and `import_date` as columns, so a file
//! read on its own is self-describing.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use object_store::path::Path;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::error::{Error, Result};
use crate::layout::MetadataTable;
use crate::storage::Root;

/// `import_jobs`: one row per stage run.
#[derive(Debug, Clone, Default)]
pub struct JobRow {
    pub job_id: String,
    pub stage: String,
    pub tenant_guid: String,
    pub source_system: Option<String>,
    pub import_date: i32,
    pub started_at: i64,
    pub ended_at: i64,
    pub status: String,
    pub input_uri: String,
    pub output_uri: String,
    pub records_in: u64,
    pub records_out: u64,
    pub records_rejected: u64,
    pub records_duplicate: u64,
    pub healthlake_job_id: Option<String>,
    pub healthlake_status: Option<String>,
    pub message: Option<String>,
    pub engine_version: String,
    /// The curation rule set(s) a curate run used: a folder's path,
    /// `builtin:<version>` or `none` (comma-separated when `rules_for`
    /// gave files different sets); NULL for other stages.
    pub rule_set: Option<String>,
}

/// `import_errors`: one row per rejected record.
#[derive(Debug, Clone, Default)]
pub struct ErrorRow {
    pub job_id: String,
    pub stage: String,
    pub tenant_guid: String,
    pub import_date: i32,
    pub source_file: String,
    pub line_no: Option<u64>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub error_code: String,
    pub message: String,
    pub location: Option<String>,
    pub record: Option<String>,
    /// The curation rule that rejected the record (its file in the rules
    /// folder), for rejections by step 3.
    pub rule: Option<String>,
    /// A finding about a record that was not rejected (an id collision
    /// whose loser counts as a duplicate): `severity` is `warning`, not
    /// `error`, and the row does not count as a rejection's.
    pub warning: bool,
}

/// `import_metrics`: one row per (job, resource type, stage), and one per
/// (job, resource type, rule) for curation rules.
#[derive(Debug, Clone, Default)]
pub struct MetricRow {
    pub job_id: String,
    pub stage: String,
    pub tenant_guid: String,
    pub import_date: i32,
    pub resource_type: String,
    /// For a rule's row: its name; records_out counts the rows it kept,
    /// records_changed those of them whose text it changed.
    pub rule: Option<String>,
    pub records_changed: u64,
    pub records_in: u64,
    pub records_out: u64,
    pub records_rejected: u64,
    pub records_duplicate: u64,
    pub records_exact_duplicate: u64,
    /// Records that lost to another source system's record with the same
    /// (type, id) and other content (`import_errors` ID_COLLISION rows).
    pub records_id_collision: u64,
    /// Import: records identical to the version the target holds, and
    /// records older than it; neither is sent.
    pub records_unchanged: u64,
    pub records_stale: u64,
    /// Import: the partition's deletions, read = applied + absent + failed.
    pub deletions_read: u64,
    pub deletions_applied: u64,
    pub deletions_absent: u64,
    pub deletions_failed: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Files written (the extract stage; None for other stages).
    pub files: Option<u64>,
    pub elapsed_seconds: f64,
    pub records_per_second: f64,
    pub mb_per_second: f64,
    /// records_in = records_out + records_rejected + records_duplicate
    /// (import: + records_unchanged + records_stale).
    pub conserved: bool,
}

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

static JOBS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("job_id", DataType::Utf8, false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("tenant_guid", DataType::Utf8, false),
        Field::new("source_system", DataType::Utf8, true),
        Field::new("import_date", DataType::Date32, false),
        Field::new("started_at", ts(), false),
        Field::new("ended_at", ts(), false),
        Field::new("status", DataType::Utf8, false),
        Field::new("input_uri", DataType::Utf8, false),
        Field::new("output_uri", DataType::Utf8, false),
        Field::new("records_in", DataType::UInt64, false),
        Field::new("records_out", DataType::UInt64, false),
        Field::new("records_rejected", DataType::UInt64, false),
        Field::new("records_duplicate", DataType::UInt64, false),
        Field::new("healthlake_job_id", DataType::Utf8, true),
        Field::new("healthlake_status", DataType::Utf8, true),
        Field::new("message", DataType::Utf8, true),
        Field::new("engine_version", DataType::Utf8, false),
        Field::new("rule_set", DataType::Utf8, true),
    ]))
});

static ERRORS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("job_id", DataType::Utf8, false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("tenant_guid", DataType::Utf8, false),
        Field::new("import_date", DataType::Date32, false),
        Field::new("source_file", DataType::Utf8, false),
        Field::new("line_no", DataType::UInt64, true),
        Field::new("resource_type", DataType::Utf8, true),
        Field::new("resource_id", DataType::Utf8, true),
        Field::new("error_code", DataType::Utf8, false),
        Field::new("message", DataType::Utf8, false),
        Field::new("location", DataType::Utf8, true),
        Field::new("record", DataType::Utf8, true),
        Field::new("rule", DataType::Utf8, true),
        // Nullable: files written before the column existed read as NULL
        // (their rows are all errors).
        Field::new("severity", DataType::Utf8, true),
    ]))
});

static METRICS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("job_id", DataType::Utf8, false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("tenant_guid", DataType::Utf8, false),
        Field::new("import_date", DataType::Date32, false),
        Field::new("resource_type", DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, true),
        Field::new("records_in", DataType::UInt64, false),
        Field::new("records_out", DataType::UInt64, false),
        Field::new("records_rejected", DataType::UInt64, false),
        Field::new("records_changed", DataType::UInt64, false),
        Field::new("records_duplicate", DataType::UInt64, false),
        Field::new("records_exact_duplicate", DataType::UInt64, false),
        // Nullable, as `severity` is: older files lack it.
        Field::new("records_id_collision", DataType::UInt64, true),
        Field::new("records_unchanged", DataType::UInt64, true),
        Field::new("records_stale", DataType::UInt64, true),
        Field::new("deletions_read", DataType::UInt64, true),
        Field::new("deletions_applied", DataType::UInt64, true),
        Field::new("deletions_absent", DataType::UInt64, true),
        Field::new("deletions_failed", DataType::UInt64, true),
        Field::new("bytes_in", DataType::UInt64, false),
        Field::new("bytes_out", DataType::UInt64, false),
        Field::new("files", DataType::UInt64, true),
        Field::new("elapsed_seconds", DataType::Float64, false),
        Field::new("records_per_second", DataType::Float64, false),
        Field::new("mb_per_second", DataType::Float64, false),
        Field::new("conserved", DataType::Boolean, false),
    ]))
});

pub fn schema(table: MetadataTable) -> SchemaRef {
    match table {
        MetadataTable::ImportJobs => JOBS.clone(),
        MetadataTable::ImportErrors => ERRORS.clone(),
        MetadataTable::ImportMetrics => METRICS.clone(),
    }
}

fn utf8<'a>(v: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(v))
}
fn utf8_opt<'a>(v: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(v.collect::<StringArray>())
}
fn u64s(v: impl Iterator<Item = u64>) -> ArrayRef {
    Arc::new(v.collect::<UInt64Array>())
}
fn dates(v: impl Iterator<Item = i32>) -> ArrayRef {
    Arc::new(Date32Array::from_iter_values(v))
}
fn times(v: impl Iterator<Item = i64>) -> ArrayRef {
    Arc::new(
        v.map(Some)
            .collect::<TimestampMicrosecondArray>()
            .with_timezone("UTC"),
    )
}
fn f64s(v: impl Iterator<Item = f64>) -> ArrayRef {
    Arc::new(v.collect::<Float64Array>())
}

pub fn jobs_batch(rows: &[JobRow]) -> RecordBatch {
    let r = rows;
    RecordBatch::try_new(
        schema(MetadataTable::ImportJobs),
        vec![
            utf8(r.iter().map(|x| x.job_id.as_str())),
            utf8(r.iter().map(|x| x.stage.as_str())),
            utf8(r.iter().map(|x| x.tenant_guid.as_str())),
            utf8_opt(r.iter().map(|x| x.source_system.as_deref())),
            dates(r.iter().map(|x| x.import_date)),
            times(r.iter().map(|x| x.started_at)),
            times(r.iter().map(|x| x.ended_at)),
            utf8(r.iter().map(|x| x.status.as_str())),
            utf8(r.iter().map(|x| x.input_uri.as_str())),
            utf8(r.iter().map(|x| x.output_uri.as_str())),
            u64s(r.iter().map(|x| x.records_in)),
            u64s(r.iter().map(|x| x.records_out)),
            u64s(r.iter().map(|x| x.records_rejected)),
            u64s(r.iter().map(|x| x.records_duplicate)),
            utf8_opt(r.iter().map(|x| x.healthlake_job_id.as_deref())),
            utf8_opt(r.iter().map(|x| x.healthlake_status.as_deref())),
            utf8_opt(r.iter().map(|x| x.message.as_deref())),
            utf8(r.iter().map(|x| x.engine_version.as_str())),
            utf8_opt(r.iter().map(|x| x.rule_set.as_deref())),
        ],
    )
    .expect("import_jobs columns match")
}

pub fn errors_batch(rows: &[ErrorRow]) -> RecordBatch {
    let r = rows;
    RecordBatch::try_new(
        schema(MetadataTable::ImportErrors),
        vec![
            utf8(r.iter().map(|x| x.job_id.as_str())),
            utf8(r.iter().map(|x| x.stage.as_str())),
            utf8(r.iter().map(|x| x.tenant_guid.as_str())),
            dates(r.iter().map(|x| x.import_date)),
            utf8(r.iter().map(|x| x.source_file.as_str())),
            Arc::new(r.iter().map(|x| x.line_no).collect::<UInt64Array>()),
            utf8_opt(r.iter().map(|x| x.resource_type.as_deref())),
            utf8_opt(r.iter().map(|x| x.resource_id.as_deref())),
            utf8(r.iter().map(|x| x.error_code.as_str())),
            utf8(r.iter().map(|x| x.message.as_str())),
            utf8_opt(r.iter().map(|x| x.location.as_deref())),
            utf8_opt(r.iter().map(|x| x.record.as_deref())),
            utf8_opt(r.iter().map(|x| x.rule.as_deref())),
            utf8(
                r.iter()
                    .map(|x| if x.warning { "warning" } else { "error" }),
            ),
        ],
    )
    .expect("import_errors columns match")
}

pub fn metrics_batch(rows: &[MetricRow]) -> RecordBatch {
    let r = rows;
    RecordBatch::try_new(
        schema(MetadataTable::ImportMetrics),
        vec![
            utf8(r.iter().map(|x| x.job_id.as_str())),
            utf8(r.iter().map(|x| x.stage.as_str())),
            utf8(r.iter().map(|x| x.tenant_guid.as_str())),
            dates(r.iter().map(|x| x.import_date)),
            utf8(r.iter().map(|x| x.resource_type.as_str())),
            utf8_opt(r.iter().map(|x| x.rule.as_deref())),
            u64s(r.iter().map(|x| x.records_in)),
            u64s(r.iter().map(|x| x.records_out)),
            u64s(r.iter().map(|x| x.records_rejected)),
            u64s(r.iter().map(|x| x.records_changed)),
            u64s(r.iter().map(|x| x.records_duplicate)),
            u64s(r.iter().map(|x| x.records_exact_duplicate)),
            u64s(r.iter().map(|x| x.records_id_collision)),
            u64s(r.iter().map(|x| x.records_unchanged)),
            u64s(r.iter().map(|x| x.records_stale)),
            u64s(r.iter().map(|x| x.deletions_read)),
            u64s(r.iter().map(|x| x.deletions_applied)),
            u64s(r.iter().map(|x| x.deletions_absent)),
            u64s(r.iter().map(|x| x.deletions_failed)),
            u64s(r.iter().map(|x| x.bytes_in)),
            u64s(r.iter().map(|x| x.bytes_out)),
            Arc::new(r.iter().map(|x| x.files).collect::<UInt64Array>()),
            f64s(r.iter().map(|x| x.elapsed_seconds)),
            f64s(r.iter().map(|x| x.records_per_second)),
            f64s(r.iter().map(|x| x.mb_per_second)),
            Arc::new(
                r.iter()
                    .map(|x| Some(x.conserved))
                    .collect::<BooleanArray>(),
            ),
        ],
    )
    .expect("import_metrics columns match")
}

/// Writes `batch` as one Snappy Parquet object at `path`; its commit entry.
/// The file is encoded in memory (these are a run's few job and metrics
/// rows), so its checksum needs no second read.
pub async fn write_parquet(
    root: &Root,
    stage: &'static str,
    path: &Path,
    batch: &RecordBatch,
) -> Result<crate::commit::Object> {
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_created_by(format!("fhirflow {}", env!("CARGO_PKG_VERSION")))
        .build();
    let perr = |source| Error::Parquet {
        stage,
        location: root.url_of(path),
        source,
    };
    let mut w = ArrowWriter::try_new(Vec::new(), batch.schema(), Some(props)).map_err(perr)?;
    w.write(batch).map_err(perr)?;
    let bytes = w.into_inner().map_err(perr)?;
    let object = crate::commit::Object {
        path: path.to_string(),
        size: bytes.len() as u64,
        xxh3: crate::commit::Checksum::of(&bytes),
        name: None,
        records: None,
    };
    root.put(stage, path, bytes).await?;
    Ok(object)
}

/// Writes a run's rows (one immutable file per non-empty table, named by run
/// id) and commits them as the run's record in the partition's log, under
/// `lease`: the path of every stage but curate, whose rows are few enough to
/// hold (see [`ErrorSink`] for curate's). Returns the record.
#[allow(clippy::too_many_arguments)]
pub async fn publish_stage_rows(
    lake: &crate::storage::Lake,
    lease: &crate::commit::lease::Lease,
    stage: &'static str,
    tenant: &crate::layout::TenantGuid,
    date: crate::layout::ImportDate,
    run: &str,
    rows: StageRows<'_>,
    imported: Option<u64>,
) -> Result<crate::commit::CommitRecord> {
    let m = &lake.metadata;
    // A run may publish more than once (a HealthLake import records the
    // submitted job, then its outcome): each publish gets its own files.
    let file_id = format!("{run}-{}", uuid::Uuid::now_v7().simple());
    let mut metadata = Vec::new();
    for (table, n, batch) in [
        (
            MetadataTable::ImportJobs,
            rows.jobs.len(),
            jobs_batch(rows.jobs),
        ),
        (
            MetadataTable::ImportErrors,
            rows.errors.len(),
            errors_batch(rows.errors),
        ),
        (
            MetadataTable::ImportMetrics,
            rows.metrics.len(),
            metrics_batch(rows.metrics),
        ),
    ] {
        if n == 0 {
            continue;
        }
        let path = m.paths.metadata_file(table, tenant, date, &file_id);
        metadata.push(write_parquet(m, stage, &path, &batch).await?);
    }
    let draft = crate::commit::Draft {
        curated: Vec::new(),
        deletions: Vec::new(),
        metadata,
        imported,
        source_system: rows.source_system.map(str::to_string),
        raw_inputs: Vec::new(),
    };
    crate::commit::commit(lake, lease, tenant, date, run, stage, draft).await
}

/// The rows of one run of a stage.
#[derive(Debug, Clone, Copy)]
pub struct StageRows<'a> {
    /// The source system of an extraction.
    pub source_system: Option<&'a str>,
    pub jobs: &'a [JobRow],
    pub errors: &'a [ErrorRow],
    pub metrics: &'a [MetricRow],
}

/// `import_errors` rows streamed to one Parquet object as a run finds them,
/// so that a run over millions of bad lines holds one small batch in memory,
/// not every row. Shared by the threads of a run; call from blocking threads.
pub struct ErrorSink {
    state: std::sync::Mutex<SinkState>,
    path: Path,
    location: String,
}

type SinkWriter = ArrowWriter<crate::commit::Summing<crate::storage::ObjectWriter>>;

struct SinkState {
    rows: Vec<ErrorRow>,
    writer: Option<SinkWriter>,
    written: u64,
}

/// Rows gathered before they are written as one Parquet row group.
const ERROR_BATCH: usize = 4096;

impl ErrorSink {
    /// Opens the sink at `path`. Call from a blocking thread.
    pub fn create(root: &Root, path: &Path) -> Result<ErrorSink> {
        let location = root.url_of(path);
        // object_store's defaults: 10 MB parts, 8 in flight.
        let object = root.create_sync("curate", path, 10 << 20, 8)?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ERROR_BATCH))
            .set_created_by(format!("fhirflow {}", env!("CARGO_PKG_VERSION")))
            .build();
        let writer = ArrowWriter::try_new(
            crate::commit::Summing::new(object),
            schema(MetadataTable::ImportErrors),
            Some(props),
        )
        .map_err(|source| Error::Parquet {
            stage: "curate",
            location: location.clone(),
            source,
        })?;
        Ok(ErrorSink {
            state: std::sync::Mutex::new(SinkState {
                rows: Vec::with_capacity(ERROR_BATCH),
                writer: Some(writer),
                written: 0,
            }),
            path: path.clone(),
            location,
        })
    }

    fn perr(&self, source: parquet::errors::ParquetError) -> Error {
        Error::Parquet {
            stage: "curate",
            location: self.location.clone(),
            source,
        }
    }

    /// Adds a row; writes a row group when enough have gathered.
    pub fn push(&self, row: ErrorRow) -> Result<()> {
        let mut s = self.state.lock().expect("error sink not poisoned");
        s.rows.push(row);
        if s.rows.len() >= ERROR_BATCH {
            self.flush(&mut s)?;
        }
        Ok(())
    }

    fn flush(&self, s: &mut SinkState) -> Result<()> {
        if s.rows.is_empty() {
            return Ok(());
        }
        let batch = errors_batch(&s.rows);
        s.written += s.rows.iter().filter(|r| !r.warning).count() as u64;
        s.rows.clear();
        let writer = s.writer.as_mut().expect("sink open");
        writer.write(&batch).map_err(|e| self.perr(e))?;
        writer.flush().map_err(|e| self.perr(e))
    }

    /// Writes what is left and completes the object; the number of error
    /// rows (warnings left out), and the object's commit entry.
    pub fn finish(&self) -> Result<(u64, crate::commit::Object)> {
        let mut s = self.state.lock().expect("error sink not poisoned");
        self.flush(&mut s)?;
        let writer = s.writer.take().expect("finished once");
        let summing = writer.into_inner().map_err(|e| self.perr(e))?;
        let (writer, object) = summing.into_parts(&self.path);
        writer.complete().map_err(|source| Error::Io {
            stage: "curate",
            location: self.location.clone(),
            source,
        })?;
        Ok((s.written, object))
    }
}

impl Drop for ErrorSink {
    /// A sink abandoned by a failed run still has its upload open: abort it
    /// where blocking is allowed, so no multipart upload is left on S3. The
    /// staged object, if any, is removed with the failed run's others.
    fn drop(&mut self) {
        let state = self.state.get_mut().map(|s| s.writer.take());
        if let (Ok(Some(writer)), Ok(handle)) = (state, tokio::runtime::Handle::try_current()) {
            let (path, location) = (self.path.clone(), self.location.clone());
            handle.spawn_blocking(move || match writer.into_inner() {
                Ok(summing) => summing.into_parts(&path).0.abort(&location),
                Err(e) => {
                    tracing::warn!(location, "abandoning the import_errors upload failed: {e}")
                }
            });
        }
    }
}
