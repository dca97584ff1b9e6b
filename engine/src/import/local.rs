//! `--target local`: the curated partition into the local Iceberg lake, one
//! snapshot per resource type. Tables are written `curate.concurrency` at a
//! time, the largest first; a table's curated files are read one at a time
//! and streamed into its writer, so memory holds one file per table being
//! written (below `curate.part_max_bytes`) and one batch.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinSet;

use super::ledger::{self, content_hash, Entry, Ledger, Verdict};
use super::{
    curated, job_row, metric_rows, Deletions, ImportReport, ImportRequest, TypeCounts, STAGE,
};
use crate::commit;
use crate::curate::parse::key_and_scan;
use crate::error::{Error, Result};
use crate::lake::{Appended, ImportRun, LeftOut, LocalLake};
use crate::metadata;
use crate::report::Reporter;
use crate::settings::{ImportTarget, Settings};
use crate::storage::Lake;

pub(super) async fn import(
    lake: &Lake,
    settings: &Settings,
    req: &ImportRequest,
    reporter: &dyn Reporter,
) -> Result<ImportReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now().timestamp_micros();
    let job_id = uuid::Uuid::now_v7().to_string();
    let lease = commit::lease_partition(
        lake,
        settings,
        &req.tenant,
        req.date,
        STAGE,
        &job_id,
        commit::lease::Take::Free,
    )
    .await?;
    let result = import_pinned(
        lake, settings, req, reporter, &lease, &job_id, started, started_at,
    )
    .await;
    // The run's own error first; a failed release (the lease then lapses
    // after its time to live) is an error of a run that otherwise worked.
    let released = lease.release().await;
    let report = result?;
    released?;
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn import_pinned(
    lake: &Lake,
    settings: &Settings,
    req: &ImportRequest,
    reporter: &dyn Reporter,
    lease: &commit::lease::Lease,
    job_id: &str,
    started: Instant,
    started_at: i64,
) -> Result<ImportReport> {
    let job_id = job_id.to_string();
    let curated = curated(lake, &req.tenant, req.date).await?;
    // Sizes from the commit only order the tables; metrics count what was read.
    let sizes = curated.bytes();
    let published = curated.records();
    let local = Arc::new(
        LocalLake::open(&lake.metadata, true)
            .await?
            .expect("created when missing"),
    );
    let run = Arc::new(ImportRun {
        tenant: req.tenant.clone(),
        date: req.date,
        job_id: job_id.clone(),
        curate_run: curated.record.run_id.clone(),
        imported_at_micros: started_at,
        batch_rows: settings.curate.batch_rows,
    });
    let mut report = ImportReport {
        job_id: job_id.clone(),
        target: ImportTarget::Local,
        curate_run: curated.record.run_id.clone(),
        ..Default::default()
    };
    let total: usize = curated.files.values().map(Vec::len).sum();
    reporter.start(STAGE, total as u64);
    // Each type's files and deletions (a type may have only deletions).
    let deletions = crate::curate::deletions::of_commit(lake, &curated.record.deletions).await?;
    let mut by_type: BTreeMap<&'static str, (Vec<commit::Object>, Vec<String>)> = curated
        .files
        .into_iter()
        .map(|(ty, files)| (ty, (files, Vec::new())))
        .collect();
    for d in deletions {
        if let Some(ty) = crate::fhir::resource_type(&d.resource_type) {
            by_type.entry(ty).or_default().1.push(d.id);
        }
    }
    // Largest tables first, so that the last one to finish is a small one.
    let mut tables: Vec<_> = by_type.into_iter().collect();
    tables.sort_by_key(|(ty, _)| Reverse(sizes.get(*ty).copied().unwrap_or(0)));
    let mut tables = tables.into_iter();
    // Dropping the set (on an error) aborts the other tables' imports; a
    // table commits all of its rows or none.
    let ledger = Arc::new(Ledger::load(lake, &req.tenant, LEDGER).await?);
    let mut running = JoinSet::new();
    let mut already = 0;
    let mut bytes = BTreeMap::new();
    let mut left_out = BTreeMap::new();
    let mut sent = Vec::new();
    loop {
        while running.len() < settings.curate.concurrency.max(1) {
            let Some((ty, (files, deletions))) = tables.next() else {
                break;
            };
            let task = TableImport {
                lake: lake.clone(),
                local: local.clone(),
                run: run.clone(),
                resource_type: ty,
                files,
                deletions,
                max_depth: settings.curate.max_depth,
                ledger: ledger.clone(),
            };
            running.spawn(task.run());
        }
        let Some(done) = running.join_next().await else {
            break;
        };
        let done = done.map_err(|e| Error::Import(format!("an import task failed: {e}")))??;
        let appended = done.appended;
        already += usize::from(done.was_there);
        reporter.advance(done.files as u64);
        bytes.insert(appended.resource_type.clone(), done.bytes_read);
        left_out.insert(appended.resource_type.clone(), appended.clone());
        report.bytes_not_sent += done.bytes_not_sent;
        sent.extend(done.sent);
        report
            .by_type
            .insert(appended.resource_type.clone(), appended.rows);
        report
            .snapshots
            .insert(appended.resource_type, appended.snapshot_id);
    }
    reporter.finish();
    // What the lake now holds, for the next import's ledger.
    ledger::save(lake, &req.tenant, LEDGER, &job_id, &sent).await?;
    drop(sent);
    report.records_out = report.by_type.values().sum();
    report.records_unchanged = left_out.values().map(|a| a.unchanged).sum();
    report.records_stale = left_out.values().map(|a| a.stale).sum();
    report.deletions_applied = left_out.values().map(|a| a.deleted).sum();
    report.deletions_absent = left_out.values().map(|a| a.absent).sum();
    report.deletions_read = report.deletions_applied + report.deletions_absent;
    report.records_in = report.records_out + report.records_unchanged + report.records_stale;
    report.seconds = started.elapsed().as_secs_f64();
    let tables = report.by_type.len();
    report.status = if already > 0 && already == tables {
        "already imported".into()
    } else {
        "succeeded".into()
    };
    // Every record curate published is a row of its table; a commit written
    // before parts carried their count is checked by what was read.
    let counts: BTreeMap<String, TypeCounts> = report
        .by_type
        .iter()
        .map(|(ty, &rows)| {
            let a = left_out.get(ty);
            let (unchanged, stale) = a.map_or((0, 0), |a| (a.unchanged, a.stale));
            let read = rows + unchanged + stale;
            let deletions = a.map_or_else(Default::default, |a| Deletions {
                read: a.deleted + a.absent,
                applied: a.deleted,
                absent: a.absent,
                failed: 0,
            });
            let c = TypeCounts {
                published: published.get(ty).copied().flatten().unwrap_or(read),
                imported: rows,
                rejected: 0,
                unchanged,
                stale,
                bytes: bytes.get(ty).copied().unwrap_or(0),
                deletions,
            };
            (ty.clone(), c)
        })
        .collect();
    let unconserved: Vec<String> = counts
        .iter()
        .filter(|(_, c)| !c.conserved())
        .map(|(ty, c)| {
            format!(
                "{ty}: curate published {} but the lake took {} and left out {} unchanged and {} stale",
                c.published, c.imported, c.unchanged, c.stale
            )
        })
        .collect();
    if !unconserved.is_empty() {
        report.status = "not conserved".into();
    }
    report.message = Some(format!(
        "curate run {}; {tables} tables, {already} already held this run",
        report.curate_run,
    ));
    let input = lake
        .curated
        .url_of(&lake.curated.paths.curated_partition(&req.tenant, req.date));
    let output = lake.metadata.url_of(&lake.metadata.paths.iceberg());
    let job = job_row(req, &report, started_at, input, output);
    let metrics = metric_rows(req, &report, &counts);
    let rows = metadata::StageRows {
        source_system: None,
        jobs: &[job],
        errors: &[],
        metrics: &metrics,
    };
    metadata::publish_stage_rows(
        lake,
        lease,
        STAGE,
        &req.tenant,
        req.date,
        &job_id,
        rows,
        Some(curated.record.sequence),
    )
    .await?;
    super::check_conserved(req, unconserved)?;
    Ok(report)
}

/// The local lake's name in the ledger.
const LEDGER: &str = "local";

/// What one table's import did.
struct TableDone {
    appended: Appended,
    files: usize,
    bytes_read: u64,
    /// An earlier import of the same curate run had made the snapshot.
    was_there: bool,
    /// The records appended, for the ledger.
    sent: Vec<Entry>,
    bytes_not_sent: u64,
}

/// One resource type's curated files into its table.
struct TableImport {
    lake: Lake,
    local: Arc<LocalLake>,
    run: Arc<ImportRun>,
    resource_type: &'static str,
    files: Vec<commit::Object>,
    /// The ids of this type the partition's export deleted.
    deletions: Vec<String>,
    max_depth: usize,
    ledger: Arc<Ledger>,
}

impl TableImport {
    async fn run(self) -> Result<TableDone> {
        let ty = self.resource_type;
        let run = &self.run;
        if let Some(a) = self
            .local
            .already_imported(ty, &run.tenant, &run.curate_run)
            .await?
        {
            return Ok(TableDone {
                appended: a,
                files: self.files.len(),
                bytes_read: 0,
                was_there: true,
                sent: Vec::new(),
                bytes_not_sent: 0,
            });
        }
        let curated = &self.lake.curated;
        let mut appender = self.local.appender(ty, run).await?;
        let mut bytes_read = 0;
        let (mut sent, mut unchanged, mut stale, mut skipped) = (Vec::new(), 0, 0, 0);
        let date = run.date.days_since_epoch();
        for part in &self.files {
            // Exactly the bytes the pinned commit lists, or the import fails
            // naming the object.
            let data = commit::read_verified(curated, STAGE, part).await?;
            let path = &part.location();
            bytes_read += data.len() as u64;
            // Curated lines passed curation's step 1: one that no longer
            // does is a broken curated file, and fails the import.
            let ends = memchr::memchr_iter(b'\n', &data).chain([data.len()]);
            let mut start = 0;
            for (n, end) in ends.enumerate() {
                let line = &data[start..end];
                start = end + 1;
                if line.is_empty() {
                    continue;
                }
                let (keys, scan) =
                    key_and_scan(line, Some(ty), self.max_depth, false).map_err(|r| {
                        Error::Import(format!(
                            "{} line {}: {}",
                            curated.url_of(path),
                            n + 1,
                            r.message
                        ))
                    })?;
                let entry = Entry::of(&keys, date, content_hash(keys.text, &scan));
                let verdict = self.ledger.judge(&entry);
                if verdict != Verdict::Send {
                    skipped += line.len() as u64 + 1;
                }
                match verdict {
                    Verdict::Unchanged => unchanged += 1,
                    Verdict::Stale => stale += 1,
                    Verdict::Send => {
                        appender.push(&keys).await?;
                        sent.push(entry);
                    }
                }
            }
        }
        // Deletions after the partition's own records: a resource it both
        // sends and deletes ends deleted. Only what the lake holds (or this
        // import just sent) gets a tombstone; the others are already absent.
        let mut absent = 0;
        for id in &self.deletions {
            let sent_now = sent.iter().any(|e: &Entry| &e.id == id);
            if self.ledger.holds(ty, id) || sent_now {
                appender.push_deletion(id).await?;
                sent.push(Entry::deletion(ty, id, date));
            } else {
                absent += 1;
            }
        }
        let left_out = LeftOut {
            unchanged,
            stale,
            absent,
        };
        Ok(TableDone {
            appended: appender.commit(left_out).await?,
            files: self.files.len(),
            bytes_read,
            was_there: false,
            sent,
            bytes_not_sent: skipped,
        })
    }
}
