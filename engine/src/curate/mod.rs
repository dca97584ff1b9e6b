//! The curate stage: raw NDJSON of one (tenant, import date), all source
//! systems, becomes curated NDJSON plus its metadata rows.
//!
//! It runs DESIGN.md's steps in two passes over the raw bytes, so that memory
//! holds keys, never resource text:
//!
//! * **pass 1** (files in parallel): step 1, parse and key ([`parse`]); the
//!   validation (step 2) and rules (step 3) seams sit here. Accepted lines
//!   become key rows, rejected lines `import_errors` rows.
//! * **dedup** (step 4, [`dedup`]): `queries/dedup.sql` over the key rows.
//! * **pass 2** (resource types in parallel, files in path order): every line
//!   that is neither rejected nor a duplicate gets the tenant label (step 5)
//!   and is written to the run's staging area ([`write`]).
//! * **commit** (step 6): metadata Parquet, the conservation check, then
//!   [`crate::commit::publish`].
//!
//! Raw objects are checked (size and e-tag) when pass 2 reopens them: a file
//! replaced between the passes fails the run instead of mixing two versions.

pub mod dedup;
pub mod parse;
mod write;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use fhirflow_udfs::json::scan_resource;
use fhirflow_udfs::tenant_label::{LabelError, TenantLabeller};
use tokio::sync::Semaphore;

use crate::commit::{self, failpoint, Move};
use crate::error::{Error, Result};
use crate::layout::{parse_partition, ImportDate, Layer, MetadataTable, RawFileName, TenantGuid};
use crate::metadata::{self, ErrorRow, JobRow, MetricRow};
use crate::model::{FileOrigin, RowsBuilder, Shape};
use crate::raw::lines::Line;
use crate::raw::{read_lines, LayerFile};
use crate::report::Reporter;
use crate::settings::Settings;
use crate::storage::Lake;
use parse::{key_line, label_reject, Reject};

const STAGE: &str = "curate";

/// Counts for one resource type (or the total) of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeSummary {
    pub resource_type: String,
    /// Non-blank lines read.
    pub records_in: u64,
    pub curated: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub exact_duplicates: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Time spent on this type's files, summed over both passes.
    pub seconds: f64,
}

impl TypeSummary {
    pub fn conserved(&self) -> bool {
        self.records_in == self.curated + self.rejected + self.duplicates
    }
    fn add(&mut self, o: &TypeSummary) {
        self.records_in += o.records_in;
        self.curated += o.curated;
        self.rejected += o.rejected;
        self.duplicates += o.duplicates;
        self.exact_duplicates += o.exact_duplicates;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.seconds += o.seconds;
    }
}

/// What a committed curate run did.
#[derive(Debug, Clone)]
pub struct CurateReport {
    pub run_id: String,
    pub tenant: TenantGuid,
    pub date: ImportDate,
    pub types: Vec<TypeSummary>,
    pub total: TypeSummary,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
    pub curated_files: Vec<String>,
}

/// The outcome of pass 1 over one file.
struct Scanned {
    keyed: Vec<RecordBatch>,
    errors: Vec<ErrorRow>,
    /// Lines rejected in step 1, ascending.
    rejected: Vec<u64>,
    records: u64,
    bytes: u64,
    seconds: f64,
}

/// Shared, read-only context of one run.
struct Run {
    lake: Lake,
    settings: Settings,
    tenant: TenantGuid,
    date: ImportDate,
    run_id: String,
}

impl Run {
    fn error_row(
        &self,
        file: &LayerFile,
        line_no: Option<u64>,
        r: Reject,
        text: Option<&[u8]>,
    ) -> ErrorRow {
        let cap = self.settings.curate.error_record_max_bytes;
        let record = text
            .filter(|_| cap > 0)
            .map(|t| String::from_utf8_lossy(&t[..floor_char_boundary(t, cap)]).into_owned());
        ErrorRow {
            job_id: self.run_id.clone(),
            stage: STAGE.into(),
            tenant_guid: self.tenant.to_string(),
            import_date: self.date.days_since_epoch(),
            source_file: file.origin.source_file.clone(),
            line_no,
            resource_type: r.resource_type.or(file.file_type.map(str::to_string)),
            resource_id: r.resource_id,
            error_code: r.code.into(),
            message: r.message,
            location: r.location,
            record,
        }
    }

    /// Pass 1 over one file, on a blocking thread.
    fn scan(&self, file: &LayerFile) -> Result<Scanned> {
        let started = Instant::now();
        let c = &self.settings.curate;
        let mut rows = RowsBuilder::new(Shape::Keyed, file.origin.clone());
        let mut out = Scanned {
            keyed: Vec::new(),
            errors: Vec::new(),
            rejected: Vec::new(),
            records: 0,
            bytes: 0,
            seconds: 0.0,
        };
        let mut last_line = 0;
        let result = read_lines(
            &self.lake.raw,
            STAGE,
            file,
            c.max_line_bytes,
            |line_no, line| {
                out.records += 1;
                last_line = line_no;
                let rejected = match line {
                    Line::Text {
                        bytes,
                        last_unterminated,
                    } => match key_line(bytes, file.file_type, c.max_depth, last_unterminated) {
                        // Steps 2 (validation) and 3 (rules) plug in here.
                        Ok(keys) => {
                            rows.push_keys(line_no, &keys);
                            if rows.len() >= c.batch_rows {
                                out.keyed.push(rows.finish());
                            }
                            None
                        }
                        Err(r) => Some((r, Some(bytes))),
                    },
                    Line::TooLong { len } => Some((
                        Reject::new(
                            "LINE_TOO_LONG",
                            format!(
                                "the line has {len} bytes, more than the limit of {}",
                                c.max_line_bytes
                            ),
                        ),
                        None,
                    )),
                };
                if let Some((r, text)) = rejected {
                    out.rejected.push(line_no);
                    out.errors
                        .push(self.error_row(file, Some(line_no), r, text));
                }
                Ok(())
            },
        );
        match result {
            Ok(totals) => out.bytes = totals.bytes,
            Err(e) if is_bad_input(&e) => {
                // A corrupt compressed file: what was read counts, the rest is
                // reported against the next line and the run goes on.
                out.errors.push(self.error_row(
                    file,
                    Some(last_line + 1),
                    Reject::new(
                        "FILE_UNREADABLE",
                        format!("the rest of the file cannot be read: {e}"),
                    ),
                    None,
                ));
            }
            Err(e) => return Err(e),
        }
        if !rows.is_empty() {
            out.keyed.push(rows.finish());
        }
        out.seconds = started.elapsed().as_secs_f64();
        Ok(out)
    }
}

fn is_bad_input(e: &Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e, Error::Io { source, .. } if matches!(source.kind(), InvalidData | InvalidInput | UnexpectedEof))
}

fn floor_char_boundary(b: &[u8], max: usize) -> usize {
    if b.len() <= max {
        return b.len();
    }
    let mut i = max;
    while i > 0 && (b[i] & 0xC0) == 0x80 {
        i -= 1;
    }
    i
}

/// Lists the raw files of (tenant, date) across source systems, sorted.
pub async fn raw_files(
    lake: &Lake,
    tenant: &TenantGuid,
    date: ImportDate,
) -> Result<Vec<LayerFile>> {
    let root = &lake.raw;
    let base = root.paths.layer(Layer::Raw);
    let mut files = Vec::new();
    for obj in root.list(STAGE, &root.paths.raw_tenant(tenant)).await? {
        let Some(p) = parse_partition(&base, &obj.location) else {
            continue;
        };
        let (Some(t), Some(system), Some(d)) = (&p.tenant, &p.source_system, p.date) else {
            continue;
        };
        // Names starting with `_` or `.` are the extractor's own files
        // (manifests, error and deleted files), not resources to curate.
        if t != tenant || d != date || p.file_name.starts_with(['_', '.']) {
            continue;
        }
        let name = RawFileName::parse(&p.file_name);
        files.push(LayerFile {
            file_type: name.as_ref().map(|n| n.resource_type),
            gzip: p.file_name.ends_with(".gz"),
            origin: FileOrigin {
                tenant: tenant.to_string(),
                source_system: Some(system.to_string()),
                import_date: date.days_since_epoch(),
                source_file: root.url_of(&obj.location),
            },
            meta: obj,
        });
    }
    Ok(files)
}

/// Curates (tenant, date): every raw file of every source system.
pub async fn curate(
    lake: &Lake,
    settings: &Settings,
    tenant: &TenantGuid,
    date: ImportDate,
    reporter: &dyn Reporter,
) -> Result<CurateReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now().timestamp_micros();
    let run = Arc::new(Run {
        lake: lake.clone(),
        settings: settings.clone(),
        tenant: tenant.clone(),
        date,
        run_id: uuid::Uuid::now_v7().to_string(),
    });
    commit::recover(lake, tenant, date).await?;

    let files = Arc::new(raw_files(lake, tenant, date).await?);
    if files.is_empty() {
        return Err(Error::Usage(format!(
            "no raw files for tenant {tenant} and date {date} under {}",
            lake.raw.url_of(&lake.raw.paths.raw_tenant(tenant))
        )));
    }
    let total_bytes: u64 = files.iter().map(|f| f.meta.size).sum();
    reporter.start("curate", 2 * total_bytes);

    // Pass 1: parse and key, files in parallel.
    let limit = Arc::new(Semaphore::new(settings.curate.concurrency));
    let mut tasks = Vec::new();
    for i in 0..files.len() {
        let (run, files, limit) = (run.clone(), files.clone(), limit.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await.expect("semaphore open");
            tokio::task::spawn_blocking(move || run.scan(&files[i])).await?
        }));
    }
    let mut scans = Vec::with_capacity(files.len());
    for (task, file) in tasks.into_iter().zip(files.iter()) {
        scans.push(task.await??);
        reporter.advance(file.meta.size);
    }

    // Dedup over the keys of every accepted record.
    let keyed: Vec<RecordBatch> = scans
        .iter_mut()
        .flat_map(|s| std::mem::take(&mut s.keyed))
        .collect();
    let duplicates = dedup::find_duplicates(keyed, settings.curate.memory_limit_mb).await?;

    // Per type: the files in path order and the lines each must skip.
    let mut by_type: BTreeMap<&'static str, Vec<usize>> = BTreeMap::new();
    let mut summaries: BTreeMap<String, TypeSummary> = BTreeMap::new();
    let mut errors: Vec<ErrorRow> = Vec::new();
    let mut skips: Vec<Vec<u64>> = Vec::with_capacity(files.len());
    for (i, (file, scan)) in files.iter().zip(scans.iter_mut()).enumerate() {
        let ty = type_key(file);
        let s = summaries
            .entry(ty.to_string())
            .or_insert_with(|| TypeSummary {
                resource_type: ty.to_string(),
                ..Default::default()
            });
        let dups = duplicates
            .get(&file.origin.source_file)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        s.records_in += scan.records;
        s.rejected += scan.rejected.len() as u64;
        s.duplicates += dups.len() as u64;
        s.exact_duplicates += dups.iter().filter(|d| d.1).count() as u64;
        s.bytes_in += scan.bytes;
        s.seconds += scan.seconds;
        errors.append(&mut scan.errors);
        let mut skip: Vec<u64> = scan
            .rejected
            .iter()
            .copied()
            .chain(dups.iter().map(|d| d.0))
            .collect();
        skip.sort_unstable();
        skips.push(skip);
        if file.file_type.is_some() {
            by_type.entry(ty).or_default().push(i);
        }
    }
    drop(scans);

    // Pass 2: label and write, resource types in parallel.
    let skips = Arc::new(skips);
    let mut tasks = Vec::new();
    for (ty, idxs) in by_type {
        let (run, files, skips, limit) = (run.clone(), files.clone(), skips.clone(), limit.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await.expect("semaphore open");
            tokio::task::spawn_blocking(move || run.label_and_write(ty, &files, &idxs, &skips))
                .await?
        }));
    }
    let mut moves: Vec<Move> = Vec::new();
    for task in tasks {
        let w = task.await??;
        reporter.advance(w.bytes_in);
        let s = summaries
            .get_mut(w.resource_type)
            .expect("type seen in pass 1");
        s.curated += w.curated;
        s.rejected += w.errors.len() as u64;
        s.bytes_out += w.bytes_out;
        s.seconds += w.seconds;
        errors.extend(w.errors);
        moves.extend(w.parts);
    }
    failpoint("after-curated-staged");

    // Conservation, per type and in total.
    let mut total = TypeSummary {
        resource_type: "*".into(),
        ..Default::default()
    };
    for s in summaries.values() {
        total.add(s);
    }
    if let Some(bad) = summaries
        .values()
        .find(|s| !s.conserved())
        .or((!total.conserved()).then_some(&total))
    {
        return Err(Error::Conservation {
            tenant: tenant.to_string(),
            date: date.to_string(),
            read: bad.records_in,
            curated: bad.curated,
            rejected: bad.rejected,
            duplicates: bad.duplicates,
        });
    }

    // Metadata, staged like the curated files.
    let types: Vec<TypeSummary> = summaries.into_values().collect();
    let ended_at = chrono::Utc::now().timestamp_micros();
    let systems: BTreeSet<&str> = files
        .iter()
        .filter_map(|f| f.origin.source_system.as_deref())
        .collect();
    let job = JobRow {
        job_id: run.run_id.clone(),
        stage: STAGE.into(),
        tenant_guid: tenant.to_string(),
        source_system: Some(systems.into_iter().collect::<Vec<_>>().join(",")),
        import_date: date.days_since_epoch(),
        started_at,
        ended_at,
        status: "succeeded".into(),
        input_uri: format!(
            "{}/*/import_date={date}/",
            lake.raw.url_of(&lake.raw.paths.raw_tenant(tenant))
        ),
        output_uri: format!(
            "{}/",
            lake.curated
                .url_of(&lake.curated.paths.curated_partition(tenant, date))
        ),
        records_in: total.records_in,
        records_out: total.curated,
        records_rejected: total.rejected,
        records_duplicate: total.duplicates,
        healthlake_job_id: None,
        healthlake_status: None,
        message: Some(format!(
            "{} raw files, {} resource types",
            files.len(),
            types.len()
        )),
        engine_version: env!("CARGO_PKG_VERSION").into(),
    };
    let metrics: Vec<MetricRow> = types.iter().map(|s| run.metric_row(s)).collect();
    let mut metadata_moves = Vec::new();
    for (table, batch) in [
        (MetadataTable::ImportJobs, metadata::jobs_batch(&[job])),
        (MetadataTable::ImportErrors, metadata::errors_batch(&errors)),
        (
            MetadataTable::ImportMetrics,
            metadata::metrics_batch(&metrics),
        ),
    ] {
        let paths = &lake.metadata.paths;
        let target = paths.metadata_file(table, tenant, date, &run.run_id);
        let staged = paths.staged(Layer::Metadata, &run.run_id, &target);
        metadata::write_parquet(&lake.metadata, STAGE, &staged, &batch).await?;
        metadata_moves.push(Move { staged, target });
    }
    failpoint("after-metadata-staged");

    let record = commit::publish(lake, tenant, date, &run.run_id, &moves, &metadata_moves).await?;
    reporter.finish();
    Ok(CurateReport {
        run_id: run.run_id.clone(),
        tenant: tenant.clone(),
        date,
        types,
        total,
        seconds: started.elapsed().as_secs_f64(),
        curated_files: record.curated_files,
    })
}

/// The resource type a file's lines are counted under.
fn type_key(file: &LayerFile) -> &'static str {
    file.file_type.unwrap_or("(unknown file type)")
}

impl Run {
    fn metric_row(&self, s: &TypeSummary) -> MetricRow {
        let secs = s.seconds.max(1e-9);
        MetricRow {
            job_id: self.run_id.clone(),
            stage: STAGE.into(),
            tenant_guid: self.tenant.to_string(),
            import_date: self.date.days_since_epoch(),
            resource_type: s.resource_type.clone(),
            records_in: s.records_in,
            records_out: s.curated,
            records_rejected: s.rejected,
            records_duplicate: s.duplicates,
            records_exact_duplicate: s.exact_duplicates,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            elapsed_seconds: s.seconds,
            records_per_second: s.records_in as f64 / secs,
            mb_per_second: s.bytes_in as f64 / 1e6 / secs,
            conserved: s.conserved(),
        }
    }

    /// Pass 2 for one resource type, on a blocking thread.
    fn label_and_write(
        &self,
        ty: &'static str,
        files: &[LayerFile],
        idxs: &[usize],
        skips: &[Vec<u64>],
    ) -> Result<write::Written> {
        let started = Instant::now();
        let c = &self.settings.curate;
        let labeller =
            TenantLabeller::new(&self.settings.tenant_label_system, self.tenant.as_str());
        let mut out = write::PartWriter::new(
            &self.lake.curated,
            &self.tenant,
            self.date,
            &self.run_id,
            ty,
            c.part_max_bytes,
        );
        let mut errors = Vec::new();
        // Test fault: drop one line on the floor, to prove the conservation
        // check catches a record lost by a bug.
        let mut lose_one = commit::failpoint_active("lose-a-line");
        for &i in idxs {
            let file = &files[i];
            let skip = &skips[i];
            let mut next_skip = 0;
            let changed = |detail: String| Error::InputChanged {
                stage: STAGE,
                location: file.origin.source_file.clone(),
                detail,
            };
            let result = read_lines(
                &self.lake.raw,
                STAGE,
                file,
                c.max_line_bytes,
                |line_no, line| {
                    while next_skip < skip.len() && skip[next_skip] < line_no {
                        next_skip += 1;
                    }
                    if skip.get(next_skip) == Some(&line_no) {
                        return Ok(());
                    }
                    let Line::Text { bytes, .. } = line else {
                        return Err(changed(format!(
                            "line {line_no} was accepted but is now too long"
                        )));
                    };
                    let text = std::str::from_utf8(bytes).map_err(|_| {
                        changed(format!(
                            "line {line_no} was accepted but is now invalid UTF-8"
                        ))
                    })?;
                    let edit = scan_resource(text, c.max_depth)
                        .map_err(LabelError::Json)
                        .and_then(|scanned| labeller.plan(text, &scanned));
                    match edit {
                        Ok(_) if std::mem::take(&mut lose_one) => Ok(()),
                        Ok(edit) => out.write_edited(text, &edit),
                        Err(e) => {
                            let id = key_line(bytes, file.file_type, c.max_depth, false)
                                .ok()
                                .map(|k| k.id.into_owned());
                            let r = label_reject(&e, ty, id.as_deref());
                            errors.push(self.error_row(file, Some(line_no), r, Some(bytes)));
                            Ok(())
                        }
                    }
                },
            );
            match result {
                Ok(_) => {}
                // Already reported by pass 1 as FILE_UNREADABLE.
                Err(e) if is_bad_input(&e) => {}
                Err(e) => return Err(e),
            }
        }
        let mut w = out.finish()?;
        w.errors = errors;
        w.bytes_in = idxs.iter().map(|&i| files[i].meta.size).sum();
        w.seconds = started.elapsed().as_secs_f64();
        Ok(w)
    }
}
