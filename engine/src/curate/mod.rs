//! The curate stage: raw NDJSON of one (tenant, import date), all source
//! systems, becomes curated NDJSON plus its metadata rows.
//!
//! It runs DESIGN.md's steps in two passes over the raw bytes, so that memory
//! holds keys, never resource text:
//!
//! * **pass 1** (files in parallel): step 1, parse and key ([`parse`]);
//!   step 2, the validation checks ([`check`]); the rules (step 3) seam. Accepted lines
//!   become key rows plus a few bytes saying where the tenant label will go;
//!   rejected lines become `import_errors` rows.
//! * **dedup** (step 4, [`dedup`]): `engine/src/curate/dedup.sql` over the
//!   key rows, which wait in a [`dedup::KeyStore`] (in memory up to half of
//!   `curate.memory_limit_mb`, then on disk).
//! * **pass 2** (files in parallel): every line that is neither rejected nor
//!   a duplicate gets the tenant label (step 5) as planned in pass 1, without
//!   a second parse, and is written to the run's staging area ([`write`]).
//!   The label's rare hard cases (another tenant's label, extra copies) are
//!   scanned again here, after dedup, as DESIGN.md orders the steps.
//! * **commit** (step 6): the conservation check, metadata Parquet, then the
//!   run's record in the partition's commit log ([`crate::commit`]), under
//!   the partition's lease.
//!
//! The unit of work of each pass is a raw file, or a piece of one: a plain
//! file larger than `curate.range_bytes` is read as byte ranges at line
//! boundaries ([`raw::split`]), so that one large file keeps every core busy.
//! Pieces number their lines as the whole file would, and their curated
//! parts follow each other in order, so the output is the same bytes as a
//! run that reads the file whole (the parts are cut at pieces too).
//!
//! Raw objects are checked when pass 2 reopens them (size and e-tag, and each
//! line's length): a file replaced between the passes fails the run instead
//! of mixing two versions.
//!
//! One curate run per (tenant, date) at a time, by the partition's lease: a
//! second run waits or exits busy. A run cleans up what earlier, killed runs
//! of its partition left behind.

pub mod check;
pub mod dedup;
pub mod deletions;
pub mod parse;
pub mod rules_pass;
mod write;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use fhirflow_udfs::json::scan_resource;
use fhirflow_udfs::tenant_label::{LabelEdit, LabelError, Piece, TenantLabeller};
use tokio::sync::Semaphore;

use crate::commit::{self, failpoint};
use crate::error::{Error, Result};
use crate::layout::{ImportDate, MetadataTable, TenantGuid};
use crate::metadata::{self, ErrorRow, ErrorSink, JobRow, MetricRow};
use crate::model::{rules_batch, RowsBuilder, Shape, TextViews};
use crate::raw::lines::Line;
use crate::raw::{self, read_lines, LayerFile};
use crate::report::Reporter;
use crate::rules::exec::RuleCounts;
use crate::settings::Settings;
use crate::storage::Lake;
use check::LineCheck;
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
    /// Of the duplicates or rejected, those that were id collisions.
    pub id_collisions: u64,
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
        self.id_collisions += o.id_collisions;
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
    /// Each phase: pass 1, rules, dedup, pass 2, commit.
    pub phases: Vec<Phase>,
    /// What each rule did, per resource type.
    pub rules: Vec<RuleSummary>,
    /// The rule set(s) used, as `import_jobs.rule_set` has it.
    pub rule_set: String,
    /// Key rows that did not fit dedup's memory budget and went to disk.
    pub keys_spilled: u64,
    /// Resources the export's `deleted` files name, kept for the import.
    pub deletions: u64,
}

/// What one rule did to the records of one resource type in a run.
#[derive(Debug, Clone)]
pub struct RuleSummary {
    pub rule: String,
    pub resource_type: String,
    pub counts: RuleCounts,
}

/// One phase of a run, for engineers tuning throughput.
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: &'static str,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// The process's peak resident memory so far (Linux only).
    pub peak_rss_mb: Option<f64>,
}

impl Phase {
    /// The phase that began at `start` and ends now, logged as it ends.
    fn ended(name: &'static str, start: Instant) -> Phase {
        let phase = Phase {
            name,
            seconds: start.elapsed().as_secs_f64(),
            peak_rss_mb: peak_rss_mb(),
        };
        tracing::info!(
            phase = name,
            seconds = phase.seconds,
            peak_rss_mb = phase.peak_rss_mb,
            "curate phase ended"
        );
        phase
    }
}

/// VmHWM from /proc/self/status, in MB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// What pass 2 does with one accepted line, decided in pass 1 so that pass 2
/// copies bytes instead of scanning JSON again.
#[derive(Debug, Clone, Copy)]
struct LinePlan {
    line_no: u64,
    /// The line's length, checked again in pass 2.
    len: u32,
    /// Where the label goes (None: already labelled, or see `rescan`).
    insert: Option<(u32, Piece)>,
    /// The label step needs a full look in pass 2: the line carries another
    /// tenant's label, a malformed one, or extra copies of ours (rare).
    rescan: bool,
}

/// The outcome of pass 1 over one file.
struct Scanned {
    keyed: Vec<RecordBatch>,
    /// Lines rejected in step 1.
    rejected: u64,
    /// Accepted lines, ascending.
    plans: Vec<LinePlan>,
    records: u64,
    bytes: u64,
    seconds: f64,
    /// What the rules did, when they ran in pass 1.
    ruled: Option<rules_pass::RulesDone>,
}

/// Shared, read-only context of one run.
struct Run {
    lake: Lake,
    settings: Settings,
    tenant: TenantGuid,
    date: ImportDate,
    run_id: String,
    /// `import_errors`, written as rejections are found.
    errors: ErrorSink,
    /// Step 2's checks.
    checks: Vec<Arc<dyn LineCheck>>,
    /// Dedup's input, as pass 1 makes it.
    keys: Arc<dedup::KeyStore>,
    /// The texts the rules changed, until pass 2.
    staged: rules_pass::Staging,
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
            rule: None,
            warning: false,
        }
    }

    /// The `import_errors` row of an id collision at `line` of `file`.
    fn collision_row(
        &self,
        file: &LayerFile,
        line: u64,
        c: &dedup::Collision,
        warning: bool,
    ) -> ErrorRow {
        let system = |s: &Option<String>| s.clone().unwrap_or_else(|| "(none)".into());
        let kept = if warning {
            "kept as a duplicate"
        } else {
            "rejected"
        };
        let r = Reject {
            code: "ID_COLLISION",
            message: format!(
                "{}/{} from source system {} has other content than the record kept from source system {} ({} line {}); {kept} ([curate] id_collision)",
                c.resource_type,
                c.id,
                system(&c.source_system),
                system(&c.survivor_system),
                c.survivor_file,
                c.survivor_line,
            ),
            resource_type: Some(c.resource_type.clone()),
            resource_id: Some(c.id.clone()),
            location: None,
        };
        ErrorRow {
            warning,
            ..self.error_row(file, Some(line), r, None)
        }
    }

    /// Pass 1 over one file, on a blocking thread.
    /// `rules`: the file's chain, when the rules run in pass 1.
    /// `keys_final`: no later step changes the key rows (no rules, or they
    /// run here), so they go to the run's [`dedup::KeyStore`] as they are
    /// made instead of staying with the scan.
    fn scan(
        &self,
        file: &LayerFile,
        labeller: &TenantLabeller,
        rules: &[Arc<crate::rules::Rule>],
        samples: usize,
        keys_final: bool,
    ) -> Result<Scanned> {
        let started = Instant::now();
        let c = &self.settings.curate;
        let mut rows = RowsBuilder::new(Shape::Keyed, file.origin.clone());
        let mut applier = match rules {
            [] => None,
            rules => Some(rules_pass::Applier::new(
                self,
                file,
                labeller,
                rules,
                Vec::new(),
                samples,
            )?),
        };
        let direct = keys_final && applier.is_none();
        // With rules, each batch of key rows is also the rules' batch (with
        // the lines' texts as views): the keys are built once.
        let batch_rows = match applier {
            Some(_) => c.batch_rows.min(rules_pass::RULE_BATCH_ROWS),
            None => c.batch_rows,
        };
        let mut texts = TextViews::default();
        let mut out = Scanned {
            keyed: Vec::new(),
            rejected: 0,
            plans: Vec::new(),
            records: 0,
            bytes: 0,
            seconds: 0.0,
            ruled: None,
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
                        block,
                    } => {
                        match self.key_and_check(bytes, file.file_type, last_unterminated) {
                            Ok((keys, scanned, findings)) => 'accepted: {
                                // Step 2: validation (made in step 1's walk).
                                if !findings.is_empty() {
                                    break 'accepted Some((findings, Some(bytes)));
                                }
                                rows.push_keys(line_no, &keys);
                                if applier.is_some() {
                                    texts.push(keys.text, block);
                                }
                                if rows.len() >= batch_rows {
                                    let batch = rows.finish();
                                    // Step 3, when the rules need no other
                                    // file.
                                    if let Some(a) = applier.as_mut() {
                                        a.process(rules_batch(&batch, texts.finish()))?;
                                    }
                                    if direct {
                                        self.keys.push(vec![batch])?;
                                    } else {
                                        out.keyed.push(batch);
                                    }
                                }
                                // Step 5 is planned now and applied to survivors in pass 2.
                                let (insert, rescan) = match labeller.plan(keys.text, &scanned) {
                                    Ok(LabelEdit::Unchanged) => (None, false),
                                    Ok(LabelEdit::Insert { at, piece }) => {
                                        (Some((at as u32, piece)), false)
                                    }
                                    Ok(LabelEdit::Remove(_)) | Err(_) => (None, true),
                                };
                                out.plans.push(LinePlan {
                                    line_no,
                                    len: bytes.len() as u32,
                                    insert,
                                    rescan,
                                });
                                None
                            }
                            Err(r) => Some((vec![r], Some(bytes))),
                        }
                    }
                    Line::TooLong { len } => Some((
                        vec![Reject::new(
                            "LINE_TOO_LONG",
                            format!(
                                "the line has {len} bytes, more than the limit of {}",
                                c.max_line_bytes
                            ),
                        )],
                        None,
                    )),
                };
                // A rejected line is one record, reported with every reason.
                if let Some((reasons, text)) = rejected {
                    out.rejected += 1;
                    for r in reasons {
                        self.errors
                            .push(self.error_row(file, Some(line_no), r, text))?;
                    }
                }
                Ok(())
            },
        );
        match result {
            Ok(totals) => out.bytes = totals.bytes,
            Err(e) if is_bad_input(&e) => {
                // A corrupt compressed file: what was read counts, and the
                // rest, whose lines no reader can count (a deflate stream
                // does not resume after a corrupt spot), counts as one
                // rejected record reported against the next line, so the
                // sums stay honest. The run goes on.
                out.records += 1;
                out.rejected += 1;
                self.errors.push(self.error_row(
                    file,
                    Some(last_line + 1),
                    Reject::new(
                        "FILE_UNREADABLE",
                        format!(
                            "the rest of the file after line {last_line} cannot be read ({e}); \
                             how many lines it held cannot be known, so it counts as one \
                             rejected record"
                        ),
                    ),
                    None,
                ))?;
            }
            Err(e) => return Err(e),
        }
        if !rows.is_empty() {
            let batch = rows.finish();
            if let Some(a) = applier.as_mut() {
                a.process(rules_batch(&batch, texts.finish()))?;
            }
            out.keyed.push(batch);
        }
        if let Some(a) = applier {
            let mut done = a.finish(
                std::mem::take(&mut out.keyed),
                std::mem::take(&mut out.plans),
            );
            out.keyed = std::mem::take(&mut done.rows.keyed);
            out.plans = std::mem::take(&mut done.rows.plans);
            out.rejected += done.rejected;
            out.ruled = Some(done);
        }
        if keys_final {
            self.keys.push(std::mem::take(&mut out.keyed))?;
        }
        out.seconds = started.elapsed().as_secs_f64();
        Ok(out)
    }
}

impl Run {
    /// Reads `file` again (pass 2, the rules pass) and calls `f` with each
    /// line that has a plan, in order, once it is known to be the line pass 1
    /// read (same length). A corrupt compressed file ends where pass 1
    /// stopped, which reported it as FILE_UNREADABLE.
    fn reread(
        &self,
        file: &LayerFile,
        plans: &[LinePlan],
        mut f: impl FnMut(&LinePlan, &[u8], &arrow::buffer::Buffer) -> Result<()>,
    ) -> Result<()> {
        let mut next = 0;
        let max = self.settings.curate.max_line_bytes;
        let result = read_lines(&self.lake.raw, STAGE, file, max, |line_no, line| {
            // Lines without a plan were rejected in pass 1.
            let Some(plan) = plans.get(next).filter(|p| p.line_no == line_no) else {
                return Ok(());
            };
            next += 1;
            match line {
                Line::Text { bytes, block, .. } if bytes.len() == plan.len as usize => {
                    f(plan, bytes, block)
                }
                _ => Err(input_changed(
                    file,
                    format!("line {line_no} is not the line read before"),
                )),
            }
        });
        match result {
            Err(e) if !is_bad_input(&e) => Err(e),
            _ => Ok(()),
        }
    }
}

/// A raw file that differs from what pass 1 read.
fn input_changed(file: &LayerFile, detail: String) -> Error {
    Error::InputChanged {
        stage: STAGE,
        location: file.origin.source_file.clone(),
        detail,
    }
}

/// Pass 2's input for one raw file.
struct FileWork {
    plans: Vec<LinePlan>,
    /// Line numbers of duplicates, ascending.
    duplicates: Vec<u64>,
    /// Where the new text of each line the rules changed is staged.
    changed: HashMap<u64, rules_pass::StagedText>,
}

/// Pass 2's output for one raw file.
#[derive(Debug, Default)]
struct Written {
    curated: u64,
    bytes_out: u64,
    /// The parts written, in order.
    parts: Vec<commit::Object>,
    /// Survivors rejected by the label step.
    rejected: u64,
    seconds: f64,
}

/// Runs `jobs` on blocking threads, at most `concurrency` at once; their
/// results in order. Each job comes with its size: the largest start first,
/// so that no large file is left running alone at the end while the other
/// threads idle. `done(i)` is called as job `i`'s result is collected.
async fn run_blocking<T, F>(
    concurrency: usize,
    jobs: impl IntoIterator<Item = (u64, F)>,
    mut done: impl FnMut(usize),
) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let mut jobs: Vec<(usize, u64, F)> = jobs
        .into_iter()
        .enumerate()
        .map(|(i, (size, f))| (i, size, f))
        .collect();
    jobs.sort_by_key(|(i, size, _)| (std::cmp::Reverse(*size), *i));
    // One launcher starts the jobs in that order as permits free up; the
    // results are collected in input order as they arrive.
    let limit = Arc::new(Semaphore::new(concurrency));
    let mut receivers = Vec::with_capacity(jobs.len());
    let mut ordered = Vec::with_capacity(jobs.len());
    for (i, _, f) in jobs {
        let (tx, rx) = tokio::sync::oneshot::channel();
        receivers.push((i, rx));
        ordered.push((f, tx));
    }
    receivers.sort_by_key(|(i, _)| *i);
    let launcher = tokio::spawn(async move {
        for (f, tx) in ordered {
            let permit = limit.clone().acquire_owned().await.expect("semaphore open");
            if tx.is_closed() {
                break; // the run failed and stopped collecting: start no more
            }
            let job = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                f()
            });
            let _ = tx.send(job);
        }
    });
    let mut out = Vec::with_capacity(receivers.len());
    for (i, rx) in receivers {
        let job = rx.await.expect("the launcher sends every job");
        out.push(job.await??);
        done(i);
    }
    launcher.await?;
    Ok(out)
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

/// Pass 1 (steps 1 and 2) over every file, in parallel.
async fn pass_one(
    run: &Arc<Run>,
    files: &Arc<Vec<LayerFile>>,
    labeller: &Arc<TenantLabeller>,
    reporter: &dyn Reporter,
    rules: &rules_pass::RunRules,
    samples: usize,
) -> Result<Vec<Scanned>> {
    let keys_final = rules.inline || rules.chains.iter().all(Vec::is_empty);
    run_blocking(
        run.settings.curate.concurrency,
        (0..files.len()).map(|i| {
            let (run, files, labeller) = (run.clone(), files.clone(), labeller.clone());
            let chain = if rules.inline {
                rules.chains[i].clone()
            } else {
                Vec::new()
            };
            (files[i].work_bytes(), move || {
                run.scan(&files[i], &labeller, &chain, samples, keys_final)
            })
        }),
        |i| reporter.advance(files[i].work_bytes()),
    )
    .await
}

/// Lists the raw files of (tenant, date) across source systems, sorted.
pub async fn raw_files(
    lake: &Lake,
    tenant: &TenantGuid,
    date: ImportDate,
) -> Result<Vec<LayerFile>> {
    raw::tenant_files(&lake.raw, STAGE, tenant, None, Some(&[date])).await
}

/// Curates (tenant, date): every raw file of every source system.
pub async fn curate(
    lake: &Lake,
    settings: &Settings,
    tenant: &TenantGuid,
    date: ImportDate,
    reporter: &dyn Reporter,
) -> Result<CurateReport> {
    curate_with_checks(lake, settings, tenant, date, reporter, step_two(settings)).await
}

/// Step 2's checks as the settings choose them.
fn step_two(settings: &Settings) -> Vec<Arc<dyn LineCheck>> {
    let v = check::Validation::for_level(settings.curate.validation, settings.curate.max_depth);
    v.into_iter()
        .map(|v| Arc::new(v) as Arc<dyn LineCheck>)
        .collect()
}

/// [`curate`] with the given step 2 checks (instead of the validation the
/// settings choose). The run, in order: take the partition's lease, clean up
/// after dead runs, read the raw files, the two passes, account for every
/// record, write the metadata, commit, publish the visible folder.
pub async fn curate_with_checks(
    lake: &Lake,
    settings: &Settings,
    tenant: &TenantGuid,
    date: ImportDate,
    reporter: &dyn Reporter,
    checks: Vec<Arc<dyn LineCheck>>,
) -> Result<CurateReport> {
    curate_inner(lake, settings, tenant, date, reporter, checks, None).await
}

/// [`curate`] as a plan's unit: `after` is the partition's latest curate
/// commit when the unit was planned. Once this run holds the lease, a later
/// commit means another worker did the unit: the run stops with
/// [`Error::AlreadyDone`] (after finishing that commit's publication, if its
/// run died before it), so a unit is curated once however often it is run.
pub async fn curate_planned(
    lake: &Lake,
    settings: &Settings,
    tenant: &TenantGuid,
    date: ImportDate,
    reporter: &dyn Reporter,
    after: Option<u64>,
) -> Result<CurateReport> {
    let checks = step_two(settings);
    curate_inner(lake, settings, tenant, date, reporter, checks, Some(after)).await
}

async fn curate_inner(
    lake: &Lake,
    settings: &Settings,
    tenant: &TenantGuid,
    date: ImportDate,
    reporter: &dyn Reporter,
    checks: Vec<Arc<dyn LineCheck>>,
    planned: Option<Option<u64>>,
) -> Result<CurateReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now().timestamp_micros();
    let run_id = uuid::Uuid::now_v7().to_string();
    // A HealthLake job that read this partition and has ended since frees it.
    let settled = crate::services::settle(lake, settings, tenant, date).await;
    let lease = commit::lease_partition(
        lake,
        settings,
        tenant,
        date,
        STAGE,
        &run_id,
        commit::lease::Take::Free,
    )
    .await
    .map_err(|e| match (e, settled) {
        (
            Error::Busy {
                stage,
                partition,
                holder,
            },
            Err(why),
        ) => Error::Busy {
            stage,
            partition,
            holder: format!("{holder} (looking at the job failed: {why})"),
        },
        (e, _) => e,
    })?;
    failpoint("curate-after-lease");
    let dead: Vec<String> = lease
        .displaced()
        .map(|r| r.run_id.clone())
        .into_iter()
        .collect();
    if let Some(after) = planned {
        let since: Result<Option<commit::CommitRecord>> = async {
            let latest = commit::latest_curate(lake, tenant, date).await?;
            match latest.filter(|r| Some(r.sequence) != after) {
                // A dead run committed but may not have published.
                Some(r) if !dead.is_empty() => {
                    commit::mirror(lake, tenant, date, &r).await?;
                    commit::collect_garbage(lake, tenant, date, &run_id, &dead).await?;
                    Ok(Some(r))
                }
                other => Ok(other),
            }
        }
        .await;
        if !matches!(since, Ok(None)) {
            let released = lease.release().await;
            let r = since?;
            released?;
            let r = r.expect("matched");
            return Err(Error::AlreadyDone(format!(
                "curate: tenant {tenant} date {date} was curated since it was planned \
                 (commit {}, run {})",
                r.sequence, r.run_id
            )));
        }
    }
    let result = async {
        commit::collect_garbage(lake, tenant, date, &run_id, &dead).await?;
        let files = raw_files(lake, tenant, date).await?;
        let raw_inputs: Vec<String> = files.iter().map(|f| f.meta.location.to_string()).collect();
        let deletions = deletions::read(lake, tenant, date).await?;
        let files = Arc::new(raw::split(files, settings.curate.range_bytes));
        if files.is_empty() {
            return Err(Error::NothingToDo(format!(
                "no raw files for tenant {tenant} and date {date} under {}",
                lake.raw.url_of(&lake.raw.paths.raw_tenant(tenant))
            )));
        }
        let run = Run::start(lake, settings, tenant, date, &run_id, checks).await?;
        let processed = process(&run, &files, reporter).await?;
        let (types, total) = account(tenant, date, processed.summaries)?;
        let metadata = run
            .write_metadata(
                &files,
                &types,
                &total,
                &processed.rule_counts,
                &processed.rules_used,
                started_at,
            )
            .await?;
        failpoint("after-metadata-staged");
        let deletions = deletions::write(lake, tenant, date, &run_id, &deletions)
            .await?
            .into_iter()
            .collect();
        let draft = commit::Draft {
            curated: processed.parts,
            deletions,
            metadata,
            imported: None,
            source_system: None,
            raw_inputs,
        };
        let record =
            commit::commit(lake, &lease, tenant, date, &run_id, commit::CURATE, draft).await?;
        Ok((
            record,
            types,
            total,
            processed.phases,
            processed.rule_counts,
            processed.rules_used.join(","),
            run.keys.rows_on_disk() as u64,
        ))
    }
    .await;
    let (record, types, total, mut phases, rule_counts, rule_set, keys_spilled) = match result {
        Ok(done) => done,
        Err(e) => {
            // Nothing of this run is visible; its objects go now (or with
            // the next run, if this clean-up fails too).
            let _ = commit::discard_run(lake, tenant, date, &run_id).await;
            let _ = lease.release().await;
            return Err(e);
        }
    };
    // Committed: the run's state is the partition's. The visible folder and
    // the clean-up follow; if this process dies here, the next holder of the
    // lease redoes both.
    let publish_start = Instant::now();
    failpoint("after-commit");
    // Each step checks the lease first: a run that stalled past it leaves
    // the folder and the clean-up to the next holder.
    let published = async {
        lease.ensure_held().await?;
        commit::mirror(lake, tenant, date, &record).await?;
        failpoint("after-mirror");
        lease.ensure_held().await?;
        commit::collect_garbage(lake, tenant, date, &run_id, &[]).await
    }
    .await;
    let released = lease.release().await;
    published?;
    released?;
    phases.push(Phase::ended("publish", publish_start));
    reporter.finish();
    Ok(CurateReport {
        run_id,
        tenant: tenant.clone(),
        date,
        types,
        total,
        seconds: started.elapsed().as_secs_f64(),
        curated_files: record
            .curated
            .iter()
            .filter_map(|o| o.name.as_deref())
            .map(|n| {
                lake.curated
                    .url_of(&lake.curated.paths.curated_partition(tenant, date).join(n))
            })
            .collect(),
        phases,
        rules: rule_summaries(rule_counts),
        rule_set,
        keys_spilled,
        deletions: record.deletions.iter().filter_map(|o| o.records).sum(),
    })
}

/// What the passes produced.
struct Processed {
    summaries: BTreeMap<String, TypeSummary>,
    /// The run's curated parts with their visible names.
    parts: Vec<commit::Object>,
    rule_counts: BTreeMap<(String, String), RuleCounts>,
    /// The rule sets the run used, by name.
    rules_used: Vec<String>,
    phases: Vec<Phase>,
}

/// Steps 1 to 6 over `files`: pass 1, the rules, dedup, pass 2.
async fn process(
    run: &Arc<Run>,
    files: &Arc<Vec<LayerFile>>,
    reporter: &dyn Reporter,
) -> Result<Processed> {
    let (settings, lake) = (&run.settings, &run.lake);
    let (tenant, date) = (&run.tenant, run.date);
    let rules = rules_pass::chains_for(settings, tenant.as_str(), files).await?;
    let has_rules = rules.chains.iter().any(|c| !c.is_empty());
    let total_bytes: u64 = files.iter().map(LayerFile::work_bytes).sum();
    let mut phases: Vec<Phase> = Vec::new();
    let mut phase_start = Instant::now();
    let mut phase = |name: &'static str| {
        phases.push(Phase::ended(name, phase_start));
        phase_start = Instant::now();
    };
    let passes = if has_rules && !rules.inline { 3 } else { 2 };
    reporter.start("curate", passes * total_bytes);

    // Pass 1: parse and key (and plan the label), files in parallel.
    let labeller = Arc::new(TenantLabeller::new(
        &settings.tenant_label_system,
        tenant.as_str(),
    ));
    let mut scans = pass_one(run, files, &labeller, reporter, &rules, 0).await?;
    phase(if has_rules && rules.inline {
        "parse, key and rules"
    } else {
        "parse and key"
    });

    // Step 3: the rules, over the files that have any.
    let step = rules_pass::rules_step(
        run,
        files,
        &rules.chains,
        &mut scans,
        &labeller,
        reporter,
        0,
    )
    .await?;
    if has_rules && !rules.inline {
        phase("rules");
    }
    let (rule_counts, mut changed) = (step.counts, step.changed);

    // Dedup over the keys of every accepted record (those the rules step
    // kept back, if it ran apart, join the store now).
    let kept: Vec<RecordBatch> = scans
        .iter_mut()
        .flat_map(|s| std::mem::take(&mut s.keyed))
        .collect();
    {
        let run = run.clone();
        tokio::task::spawn_blocking(move || run.keys.push(kept)).await??;
    }
    let duplicates =
        dedup::find_duplicates(run.keys.clone(), dedup::query_memory_mb(settings)).await?;
    phase("dedup");

    // Per file: what pass 2 writes. Counts per type.
    let mut summaries: BTreeMap<String, TypeSummary> = BTreeMap::new();
    let mut work: Vec<FileWork> = Vec::with_capacity(files.len());
    for (file, scan) in files.iter().zip(scans.iter_mut()) {
        let ty = type_key(file);
        let s = summaries
            .entry(ty.to_string())
            .or_insert_with(|| TypeSummary {
                resource_type: ty.to_string(),
                ..Default::default()
            });
        let mut dups = duplicates
            .get(&file.origin.source_file)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if let Some(p) = &file.piece {
            // The file's duplicates among this piece's lines.
            let lines = p.counts.lines_of(p.index);
            let from = dups.partition_point(|d| d.line < *lines.start());
            let to = dups.partition_point(|d| d.line <= *lines.end());
            dups = &dups[from..to];
        }
        // Id collisions: a warning beside the duplicate, or a rejection.
        let reject = settings.curate.id_collision == crate::settings::IdCollision::Reject;
        let collisions: Vec<ErrorRow> = dups
            .iter()
            .filter_map(|d| {
                d.collision
                    .as_ref()
                    .map(|c| run.collision_row(file, d.line, c, !reject))
            })
            .collect();
        let collided = collisions.len() as u64;
        if collided > 0 {
            let run = run.clone();
            tokio::task::spawn_blocking(move || {
                collisions.into_iter().try_for_each(|r| run.errors.push(r))
            })
            .await??;
        }
        s.records_in += scan.records;
        s.rejected += scan.rejected;
        s.duplicates += dups.len() as u64;
        s.exact_duplicates += dups.iter().filter(|d| d.exact).count() as u64;
        s.id_collisions += collided;
        if reject {
            s.duplicates -= collided;
            s.rejected += collided;
        }
        s.bytes_in += scan.bytes;
        s.seconds += scan.seconds;
        work.push(FileWork {
            plans: std::mem::take(&mut scan.plans),
            duplicates: dups.iter().map(|d| d.line).collect(),
            changed: std::mem::take(&mut changed[work.len()]),
        });
    }
    drop(scans);

    // Pass 2: label and write the survivors, files in parallel.
    let written = run_blocking(
        settings.curate.concurrency,
        work.into_iter().enumerate().map(|(i, w)| {
            let (run, files, labeller) = (run.clone(), files.clone(), labeller.clone());
            (files[i].work_bytes(), move || {
                run.label_and_write(i, &files[i], w, &labeller)
            })
        }),
        |i| reporter.advance(files[i].work_bytes()),
    )
    .await?;
    // Parts of each type in raw file order (files are sorted by path).
    let mut by_type: BTreeMap<&'static str, Vec<commit::Object>> = BTreeMap::new();
    for (file, w) in files.iter().zip(written) {
        let s = summaries
            .get_mut(type_key(file))
            .expect("type seen in pass 1");
        s.curated += w.curated;
        s.rejected += w.rejected;
        s.bytes_out += w.bytes_out;
        s.seconds += w.seconds;
        if let Some(ty) = file.file_type {
            by_type.entry(ty).or_default().extend(w.parts);
        }
    }
    let parts: Vec<commit::Object> = by_type
        .into_iter()
        .flat_map(|(ty, parts)| write::name_parts(&lake.curated, tenant, date, ty, parts))
        .collect();
    failpoint("after-curated-staged");
    phase("label and write");
    Ok(Processed {
        summaries,
        parts,
        rule_counts,
        rules_used: rules.sets,
        phases,
    })
}

/// Conservation, per type and in total: the run stops here, before anything
/// is committed, when a record is unaccounted for.
fn account(
    tenant: &TenantGuid,
    date: ImportDate,
    summaries: BTreeMap<String, TypeSummary>,
) -> Result<(Vec<TypeSummary>, TypeSummary)> {
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
    Ok((summaries.into_values().collect(), total))
}

impl Run {
    /// The run's shared context, with its `import_errors` sink open.
    async fn start(
        lake: &Lake,
        settings: &Settings,
        tenant: &TenantGuid,
        date: ImportDate,
        run_id: &str,
        checks: Vec<Arc<dyn LineCheck>>,
    ) -> Result<Arc<Run>> {
        let errors_path =
            lake.metadata
                .paths
                .metadata_file(MetadataTable::ImportErrors, tenant, date, run_id);
        let errors = {
            let root = lake.metadata.clone();
            tokio::task::spawn_blocking(move || ErrorSink::create(&root, &errors_path)).await??
        };
        Ok(Arc::new(Run {
            lake: lake.clone(),
            settings: settings.clone(),
            tenant: tenant.clone(),
            date,
            run_id: run_id.to_string(),
            errors,
            checks,
            keys: Arc::new(dedup::KeyStore::for_settings(settings)),
            staged: rules_pass::Staging::new()?,
        }))
    }

    /// Writes the run's metadata files (immutable, named by run id); what
    /// the commit lists of them.
    async fn write_metadata(
        self: &Arc<Self>,
        files: &[LayerFile],
        types: &[TypeSummary],
        total: &TypeSummary,
        rule_counts: &BTreeMap<(String, String), RuleCounts>,
        rules_used: &[String],
        started_at: i64,
    ) -> Result<Vec<commit::Object>> {
        let (lake, tenant, date) = (&self.lake, &self.tenant, self.date);
        let systems: BTreeSet<&str> = files
            .iter()
            .filter_map(|f| f.origin.source_system.as_deref())
            .collect();
        let job = JobRow {
            job_id: self.run_id.clone(),
            stage: STAGE.into(),
            tenant_guid: tenant.to_string(),
            source_system: Some(systems.into_iter().collect::<Vec<_>>().join(",")),
            import_date: date.days_since_epoch(),
            started_at,
            ended_at: chrono::Utc::now().timestamp_micros(),
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
                "{} raw files, {} resource types; rules: {}",
                files
                    .iter()
                    .filter(|f| f.piece.as_ref().is_none_or(|p| p.index == 0))
                    .count(),
                types.len(),
                rules_used.join(", ")
            )),
            engine_version: env!("CARGO_PKG_VERSION").into(),
            rule_set: Some(rules_used.join(",")),
        };
        let mut metrics: Vec<MetricRow> = types.iter().map(|s| self.metric_row(s)).collect();
        metrics.extend(
            rule_counts
                .iter()
                .map(|((ty, rule), c)| self.rule_metric_row(ty, rule, c)),
        );
        let (errors_written, errors_file) = {
            let run = self.clone();
            tokio::task::spawn_blocking(move || run.errors.finish()).await??
        };
        // In every build: a rejection without its row would be a record
        // lost from the accounting.
        if errors_written < total.rejected {
            return Err(Error::UnreportedRejections {
                tenant: tenant.to_string(),
                date: date.to_string(),
                rejected: total.rejected,
                rows: errors_written,
            });
        }
        let paths = &lake.metadata.paths;
        let mut written = vec![errors_file];
        for (table, batch) in [
            (MetadataTable::ImportJobs, metadata::jobs_batch(&[job])),
            (
                MetadataTable::ImportMetrics,
                metadata::metrics_batch(&metrics),
            ),
        ] {
            let path = paths.metadata_file(table, tenant, date, &self.run_id);
            written.push(metadata::write_parquet(&lake.metadata, STAGE, &path, &batch).await?);
        }
        Ok(written)
    }
}

fn rule_summaries(counts: BTreeMap<(String, String), RuleCounts>) -> Vec<RuleSummary> {
    counts
        .into_iter()
        .map(|((resource_type, rule), counts)| RuleSummary {
            rule,
            resource_type,
            counts,
        })
        .collect()
}

/// What the rules would do to (tenant, date): steps 1 to 3 without
/// writing anything (`fhirflow rules diff`).
pub struct RulesDryRun {
    /// Lines read, and those that steps 1 and 2 rejected before the rules.
    pub records_in: u64,
    pub rejected_before_rules: u64,
    pub rules: Vec<RuleSummary>,
    pub samples: Vec<rules_pass::RuleSample>,
}

pub async fn dry_run_rules(
    lake: &Lake,
    settings: &Settings,
    tenant: &TenantGuid,
    date: ImportDate,
    samples: usize,
) -> Result<RulesDryRun> {
    let files = raw_files(lake, tenant, date).await?;
    let files = Arc::new(raw::split(files, settings.curate.range_bytes));
    let rules = rules_pass::chains_for(settings, tenant.as_str(), &files).await?;
    // Rejections go to a sink in memory that is dropped: nothing is written.
    let scratch = crate::storage::Root::open("memory://", &settings.s3)?;
    let errors = {
        let root = scratch.clone();
        tokio::task::spawn_blocking(move || ErrorSink::create(&root, &"dry-run".into())).await??
    };
    let checks = step_two(settings);
    let run = Arc::new(Run {
        lake: lake.clone(),
        settings: settings.clone(),
        tenant: tenant.clone(),
        date,
        run_id: "dry-run".into(),
        errors,
        checks,
        keys: Arc::new(dedup::KeyStore::for_settings(settings)),
        staged: rules_pass::Staging::new()?,
    });
    let labeller = Arc::new(TenantLabeller::new(
        &settings.tenant_label_system,
        tenant.as_str(),
    ));
    let quiet = crate::report::Quiet;
    // The rules run in their own pass here, after steps 1 and 2 are done
    // for every file, so that their counts stand apart.
    let separate = rules_pass::RunRules {
        inline: false,
        ..rules
    };
    let mut scans = pass_one(&run, &files, &labeller, &quiet, &separate, samples).await?;
    let records_in = scans.iter().map(|s| s.records).sum();
    let rejected_before_rules = scans.iter().map(|s| s.rejected).sum();
    let step = rules_pass::rules_step(
        &run,
        &files,
        &separate.chains,
        &mut scans,
        &labeller,
        &quiet,
        samples,
    )
    .await?;
    Ok(RulesDryRun {
        records_in,
        rejected_before_rules,
        rules: rule_summaries(step.counts),
        samples: step.samples,
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
            rule: None,
            records_changed: 0,
            records_in: s.records_in,
            records_out: s.curated,
            records_rejected: s.rejected,
            records_duplicate: s.duplicates,
            records_exact_duplicate: s.exact_duplicates,
            records_id_collision: s.id_collisions,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            files: None,
            elapsed_seconds: s.seconds,
            records_per_second: s.records_in as f64 / secs,
            mb_per_second: s.bytes_in as f64 / 1e6 / secs,
            conserved: s.conserved(),
            ..Default::default()
        }
    }

    fn rule_metric_row(&self, resource_type: &str, rule: &str, c: &RuleCounts) -> MetricRow {
        let secs = c.seconds.max(1e-9);
        MetricRow {
            job_id: self.run_id.clone(),
            stage: STAGE.into(),
            tenant_guid: self.tenant.to_string(),
            import_date: self.date.days_since_epoch(),
            resource_type: resource_type.to_string(),
            rule: Some(rule.to_string()),
            records_in: c.rows_in,
            records_out: c.kept,
            records_rejected: c.rejected,
            records_changed: c.changed,
            elapsed_seconds: c.seconds,
            records_per_second: c.rows_in as f64 / secs,
            conserved: c.rows_in == c.kept + c.rejected,
            ..Default::default()
        }
    }

    /// Pass 2 for one raw file, on a blocking thread: the survivors, labelled.
    fn label_and_write(
        &self,
        index: usize,
        file: &LayerFile,
        work: FileWork,
        labeller: &TenantLabeller,
    ) -> Result<Written> {
        let started = Instant::now();
        let c = &self.settings.curate;
        let mut out = Written::default();
        let Some(ty) = file.file_type else {
            return Ok(out); // every line was rejected in pass 1
        };
        let mut writer = write::PartWriter::new(
            &self.lake.curated,
            &self.tenant,
            self.date,
            &self.run_id,
            ty,
            index,
            c.part_max_bytes,
        );
        // Test fault: drop one line on the floor, to prove that the
        // conservation check catches a record lost by a bug.
        let mut lose_one = commit::failpoint_active("lose-a-line");
        let fail_writing = commit::failpoint_active("pass-2-write-fails");
        let dups = &work.duplicates;
        let mut next_dup = 0;
        self.reread(file, &work.plans, |plan, bytes, _| {
            let line_no = plan.line_no;
            while next_dup < dups.len() && dups[next_dup] < line_no {
                next_dup += 1;
            }
            if dups.get(next_dup) == Some(&line_no) {
                return Ok(());
            }
            let new;
            let text = match work.changed.get(&line_no) {
                Some(&at) => {
                    new = self.staged.get(at)?;
                    new.as_str()
                }
                None => std::str::from_utf8(bytes).map_err(|_| {
                    input_changed(file, format!("line {line_no} is no longer UTF-8"))
                })?,
            };
            let edit = if plan.rescan {
                // Step 5 in full: scan again to find the edit or the reason.
                let planned = scan_resource(text, c.max_depth)
                    .map_err(LabelError::Json)
                    .and_then(|scanned| labeller.plan(text, &scanned));
                match planned {
                    Ok(edit) => edit,
                    Err(e) => {
                        let id = key_line(text.as_bytes(), file.file_type, c.max_depth, false)
                            .ok()
                            .map(|k| k.id.into_owned());
                        let r = label_reject(&e, ty, id.as_deref());
                        out.rejected += 1;
                        return self.errors.push(self.error_row(
                            file,
                            Some(line_no),
                            r,
                            Some(bytes),
                        ));
                    }
                }
            } else {
                match plan.insert {
                    Some((at, piece)) => LabelEdit::Insert {
                        at: at as usize,
                        piece,
                    },
                    None => LabelEdit::Unchanged,
                }
            };
            if std::mem::take(&mut lose_one) {
                return Ok(());
            }
            // Test fault: a write that fails once a part is a multipart
            // upload, to prove the failed run leaves no upload behind.
            if fail_writing && writer.bytes > 9 << 20 {
                return Err(Error::Io {
                    stage: STAGE,
                    location: file.meta.location.to_string(),
                    source: std::io::Error::other("failpoint pass-2-write-fails"),
                });
            }
            writer.write(labeller, text, &edit)
        })?;
        out.curated = writer.lines;
        out.bytes_out = writer.bytes;
        out.parts = writer.finish()?;
        out.seconds = started.elapsed().as_secs_f64();
        Ok(out)
    }
}
