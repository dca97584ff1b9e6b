//! Step 3 in a curate run: the rules pass, between pass 1 and dedup.
//!
//! Rules may look at every record of the partition (`keys`), so they run
//! once pass 1 has keyed them all. The pass reads each file with rules
//! again, builds record-model batches from pass 1's key rows and the line
//! text, and runs the file's rule chain over them ([`crate::rules::exec`]).
//! Rejected and dropped rows leave the run here (before dedup, so an older
//! version can survive, as with validation). A changed row is keyed, checked
//! (step 2) and label-planned again from its new text, which pass 2 then
//! writes instead of the raw line.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::UInt64Type;
use fhirflow_udfs::tenant_label::{LabelEdit, TenantLabeller};

use super::parse::Reject;
use super::{input_changed, run_blocking, type_key, LinePlan, Run, Scanned};
use crate::error::Result;
use crate::model::{rules_batch, TextViews};
use crate::raw::LayerFile;
use crate::report::Reporter;
use crate::rules::exec::{Chain, RuleCounts, RuleSession};
use crate::rules::Rule;

/// Rows per batch the rules run over: large enough that the fixed cost of
/// running a rule's plan is small per row, small enough that the read
/// buffers a batch's texts are views into (about 10 MB) stay few.
pub(super) const RULE_BATCH_ROWS: usize = 8_192;

/// One file's pass 1 output that the rules pass reads and trims.
pub(super) struct FileRows {
    pub keyed: Vec<RecordBatch>,
    pub plans: Vec<LinePlan>,
}

/// Where the tenant label goes in a line's text, and whether pass 2 must
/// look again (see `LinePlan`).
type LabelPlan = (Option<(u32, fhirflow_udfs::tenant_label::Piece)>, bool);

/// What the rules did to one file.
pub(super) struct RulesDone {
    pub rows: FileRows,
    /// Where the new text of each changed line is staged, for pass 2.
    pub changed: HashMap<u64, StagedText>,
    pub rejected: u64,
    /// Per rule of the file's chain.
    pub counts: Vec<(Arc<Rule>, RuleCounts)>,
    pub samples: Vec<RuleSample>,
    pub seconds: f64,
}

/// A row a rule changed or rejected, for the dry run.
#[derive(Debug, Clone)]
pub struct RuleSample {
    pub rule: String,
    pub source_file: String,
    pub line_no: u64,
    pub id: String,
    /// Before and after text, for a change.
    pub change: Option<(String, String)>,
    /// The reason, for a rejection.
    pub reason: Option<String>,
}

/// What step 3 did in a run.
pub struct RulesStep {
    /// Per (resource type, rule).
    pub counts: std::collections::BTreeMap<(String, String), RuleCounts>,
    /// Per file: where the new text of each changed line is staged.
    pub changed: Vec<HashMap<u64, StagedText>>,
    pub samples: Vec<RuleSample>,
}

/// Step 3 over the files whose chain has rules; trims `scans` (keys and
/// plans) of rejected rows. `samples`: changed and rejected rows to keep per
/// rule and file, for the dry run.
pub(super) async fn rules_step(
    run: &Arc<Run>,
    files: &Arc<Vec<LayerFile>>,
    chains: &[Vec<Arc<Rule>>],
    scans: &mut [Scanned],
    labeller: &Arc<TenantLabeller>,
    reporter: &dyn Reporter,
    samples: usize,
) -> Result<RulesStep> {
    let mut step = RulesStep {
        counts: Default::default(),
        changed: vec![HashMap::new(); files.len()],
        samples: Vec::new(),
    };
    if chains.iter().all(Vec::is_empty) {
        return Ok(step);
    }
    if scans.iter().any(|s| s.ruled.is_some()) {
        // The rules already ran in pass 1.
        for (i, scan) in scans.iter_mut().enumerate() {
            if let Some(d) = scan.ruled.take() {
                step.add(type_key(&files[i]), i, d);
            }
        }
        return Ok(step);
    }
    let keyed: Vec<RecordBatch> = scans.iter().flat_map(|s| s.keyed.iter().cloned()).collect();
    let keys = crate::rules::exec::keys_from_keyed(&keyed);
    drop(keyed);
    let mut jobs = Vec::new();
    let mut with_rules = Vec::new();
    for (i, scan) in scans.iter_mut().enumerate() {
        if chains[i].is_empty() {
            reporter.advance(files[i].work_bytes());
            continue;
        }
        let rows = FileRows {
            keyed: std::mem::take(&mut scan.keyed),
            plans: std::mem::take(&mut scan.plans),
        };
        let (run, files, labeller) = (run.clone(), files.clone(), labeller.clone());
        let (rules, keys) = (chains[i].clone(), keys.clone());
        with_rules.push(i);
        jobs.push((files[i].work_bytes(), move || {
            run.apply_rules(&files[i], &rules, keys, rows, &labeller, samples)
        }));
    }
    let done = run_blocking(run.settings.curate.concurrency, jobs, |j| {
        reporter.advance(files[with_rules[j]].work_bytes())
    })
    .await?;
    for (i, mut d) in with_rules.into_iter().zip(done) {
        let scan = &mut scans[i];
        scan.keyed = std::mem::take(&mut d.rows.keyed);
        scan.plans = std::mem::take(&mut d.rows.plans);
        scan.rejected += d.rejected;
        scan.seconds += d.seconds;
        step.add(type_key(&files[i]), i, d);
    }
    Ok(step)
}

impl RulesStep {
    fn add(&mut self, resource_type: &str, file: usize, d: RulesDone) {
        self.changed[file] = d.changed;
        self.samples.extend(d.samples);
        for (rule, c) in d.counts {
            self.counts
                .entry((resource_type.to_string(), rule.name.clone()))
                .or_default()
                .add(&c);
        }
    }
}

/// Runs one file's rule chain over batches of its records and gathers what
/// it did. Driven by the rules pass, or by pass 1 itself when no rule needs
/// `keys` (then nothing is read twice).
pub(super) struct Applier<'a> {
    run: &'a Run,
    file: &'a LayerFile,
    labeller: &'a TenantLabeller,
    handle: tokio::runtime::Handle,
    session: RuleSession,
    chain: Chain,
    samples: usize,
    rejected_lines: HashSet<u64>,
    /// New label plans of changed lines, applied in `finish`.
    relabel: HashMap<u64, LabelPlan>,
    done: RulesDone,
}

impl<'a> Applier<'a> {
    pub(super) fn new(
        run: &'a Run,
        file: &'a LayerFile,
        labeller: &'a TenantLabeller,
        rules: &[Arc<Rule>],
        keys: Vec<RecordBatch>,
        samples: usize,
    ) -> Result<Self> {
        let handle = tokio::runtime::Handle::current();
        let session = RuleSession::new(&run.settings.curate.rule_params, keys)?;
        let chain = handle.block_on(Chain::plan(&session, rules))?;
        Ok(Applier {
            run,
            file,
            labeller,
            handle,
            session,
            chain,
            samples,
            rejected_lines: HashSet::new(),
            relabel: HashMap::new(),
            done: RulesDone {
                rows: FileRows {
                    keyed: Vec::new(),
                    plans: Vec::new(),
                },
                changed: HashMap::new(),
                rejected: 0,
                counts: rules
                    .iter()
                    .map(|r| (r.clone(), RuleCounts::default()))
                    .collect(),
                samples: Vec::new(),
                seconds: 0.0,
            },
        })
    }

    /// The chain over one batch of record-model rows.
    pub(super) fn process(&mut self, records: RecordBatch) -> Result<()> {
        let started = Instant::now();
        let (run, file) = (self.run, self.file);
        let applied = self.handle.block_on(self.chain.apply(
            &self.session,
            records.clone(),
            self.samples,
        ))?;
        if self.samples > 0 {
            collect_samples(
                &mut self.done.samples,
                self.samples,
                &self.chain,
                file,
                &records,
                &applied,
            );
        }
        let (lines, ids) = lines_and_ids(&records);
        let texts = records
            .column_by_name("resource")
            .expect("model")
            .as_string_view();
        for r in applied.rejected {
            let line = lines.value(r.row);
            self.rejected_lines.insert(line);
            let mut reject = Reject::new(r.code, r.reason);
            reject.resource_id = Some(ids.value(r.row).to_string());
            let text = texts.value(r.row).as_bytes();
            let mut row = run.error_row(file, Some(line), reject, Some(text));
            row.rule = Some(self.chain.rules[r.rule].0.name.clone());
            run.errors.push(row)?;
        }
        for (row, new) in applied.changed {
            let line = lines.value(row);
            match run.recheck(file, ids.value(row), &new, self.labeller) {
                Ok(plan) => {
                    self.relabel.insert(line, plan);
                    let staged = run.staged.put(&new)?;
                    self.done.changed.insert(line, staged);
                }
                Err(findings) => {
                    self.rejected_lines.insert(line);
                    for mut f in findings {
                        f.resource_id
                            .get_or_insert_with(|| ids.value(row).to_string());
                        run.errors.push(run.error_row(
                            file,
                            Some(line),
                            f,
                            Some(new.as_bytes()),
                        ))?;
                    }
                }
            }
        }
        for ((_, total), c) in self.done.counts.iter_mut().zip(&applied.counts) {
            total.add(c);
        }
        self.done.seconds += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// What the rules did; the rejected rows leave dedup's keys and pass
    /// 2's plans.
    pub(super) fn finish(mut self, keyed: Vec<RecordBatch>, mut plans: Vec<LinePlan>) -> RulesDone {
        let gone = &self.rejected_lines;
        self.done.rejected = gone.len() as u64;
        plans.retain(|p| !gone.contains(&p.line_no));
        for p in &mut plans {
            if let Some(&(insert, rescan)) = self.relabel.get(&p.line_no) {
                p.insert = insert;
                p.rescan = rescan;
            }
        }
        self.done.rows.plans = plans;
        self.done.rows.keyed = keyed
            .into_iter()
            .map(|b| without_lines(b, gone))
            .filter(|b| b.num_rows() > 0)
            .collect();
        self.done
    }
}

impl Run {
    /// The rules pass over one file, on a blocking thread: its accepted
    /// lines read again and run through its chain.
    pub(super) fn apply_rules(
        &self,
        file: &LayerFile,
        rules: &[Arc<Rule>],
        keys: Vec<RecordBatch>,
        rows: FileRows,
        labeller: &TenantLabeller,
        samples: usize,
    ) -> Result<RulesDone> {
        let mut applier = Applier::new(self, file, labeller, rules, keys, samples)?;
        let FileRows { keyed, plans } = rows;
        let batches = regroup(keyed, RULE_BATCH_ROWS);
        let mut batch_i = 0;
        let mut texts = TextViews::default();
        self.reread(file, &plans, |plan, bytes, block| {
            let text = std::str::from_utf8(bytes).map_err(|_| {
                input_changed(file, format!("line {} is no longer UTF-8", plan.line_no))
            })?;
            texts.push(text, block);
            if texts.len() == batches[batch_i].num_rows() {
                let records = rules_batch(&batches[batch_i], texts.finish());
                batch_i += 1;
                applier.process(records)?;
            }
            Ok(())
        })?;
        if batch_i != batches.len() {
            return Err(input_changed(
                file,
                "lines read in pass 1 are missing".into(),
            ));
        }
        Ok(applier.finish(batches, plans))
    }

    /// Steps 1, 2 and the label plan again for a line a rule changed: the
    /// label's new position, or why the new text is rejected.
    fn recheck(
        &self,
        file: &LayerFile,
        id: &str,
        text: &str,
        labeller: &TenantLabeller,
    ) -> std::result::Result<LabelPlan, Vec<Reject>> {
        let after = |mut r: Reject| {
            r.message = format!("after the rules changed the resource: {}", r.message);
            r
        };
        let (keys, scanned, findings) = self
            .key_and_check(text.as_bytes(), file.file_type, false)
            .map_err(|r| vec![after(r)])?;
        if keys.id != id {
            return Err(vec![Reject::new(
                "RULE_CHANGED_ID",
                format!("the rules changed the resource's id from {id:?} to {:?}; a rule may not change a record's identity", keys.id),
            )]);
        }
        if !findings.is_empty() {
            return Err(findings.into_iter().map(after).collect());
        }
        Ok(match labeller.plan(keys.text, &scanned) {
            Ok(LabelEdit::Unchanged) => (None, false),
            Ok(LabelEdit::Insert { at, piece }) => (Some((at as u32, piece)), false),
            Ok(LabelEdit::Remove(_)) | Err(_) => (None, true),
        })
    }
}

/// Where a changed record's text is in [`Staging`].
pub(super) type StagedText = (u64, u32);

/// The new texts of the records the rules changed, kept in a temporary file
/// (removed when dropped) until pass 2 writes them: memory holds where each
/// one is, not the text.
pub(super) struct Staging {
    file: std::fs::File,
    len: std::sync::Mutex<u64>,
}

impl Staging {
    pub(super) fn new() -> Result<Self> {
        Ok(Staging {
            file: tempfile::tempfile().map_err(staging_error)?,
            len: std::sync::Mutex::new(0),
        })
    }

    /// Appends `text`. Blocking.
    fn put(&self, text: &str) -> Result<StagedText> {
        use std::os::unix::fs::FileExt;
        let mut len = self.len.lock().expect("not poisoned");
        self.file
            .write_all_at(text.as_bytes(), *len)
            .map_err(staging_error)?;
        let at = (*len, text.len() as u32);
        *len += text.len() as u64;
        Ok(at)
    }

    /// The text put at `at`. Blocking.
    pub(super) fn get(&self, (offset, len): StagedText) -> Result<String> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0; len as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(staging_error)?;
        String::from_utf8(buf).map_err(|e| staging_error(std::io::Error::other(e)))
    }
}

fn staging_error(source: std::io::Error) -> crate::error::Error {
    crate::error::Error::Io {
        stage: super::STAGE,
        location: "the temporary file of changed records".into(),
        source,
    }
}

/// The `line_no` and `id` columns of record-model rows.
fn lines_and_ids(
    records: &RecordBatch,
) -> (&arrow::array::UInt64Array, &arrow::array::StringArray) {
    let column = |name| records.column_by_name(name).expect("record model");
    (
        column("line_no").as_primitive::<UInt64Type>(),
        column("id").as_string::<i32>(),
    )
}

/// Keeps up to `limit` changed and `limit` rejected rows per rule.
fn collect_samples(
    out: &mut Vec<RuleSample>,
    limit: usize,
    chain: &Chain,
    file: &LayerFile,
    records: &RecordBatch,
    applied: &crate::rules::exec::Applied,
) {
    let (lines, ids) = lines_and_ids(records);
    let mut add =
        |rule: usize, row: usize, change: Option<(String, String)>, reason: Option<String>| {
            let name = &chain.rules[rule].0.name;
            let is_change = change.is_some();
            let have = out
                .iter()
                .filter(|s| &s.rule == name && s.change.is_some() == is_change)
                .count();
            if have < limit {
                out.push(RuleSample {
                    rule: name.clone(),
                    source_file: file.origin.source_file.clone(),
                    line_no: lines.value(row),
                    id: ids.value(row).to_string(),
                    change,
                    reason,
                });
            }
        };
    for s in &applied.samples {
        add(
            s.rule,
            s.row,
            Some((s.before.clone(), s.after.clone())),
            None,
        );
    }
    for r in &applied.rejected {
        add(
            r.rule,
            r.row,
            None,
            Some(format!("{}: {}", r.code, r.reason)),
        );
    }
}

/// Keyed batches regrouped into batches of about `rows` rows.
fn regroup(keyed: Vec<RecordBatch>, rows: usize) -> Vec<RecordBatch> {
    let Some(schema) = keyed.first().map(|b| b.schema()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut group: Vec<RecordBatch> = Vec::new();
    let mut n = 0;
    for b in keyed {
        n += b.num_rows();
        group.push(b);
        if n >= rows {
            out.push(arrow::compute::concat_batches(&schema, &group).expect("same schema"));
            group.clear();
            n = 0;
        }
    }
    if !group.is_empty() {
        out.push(arrow::compute::concat_batches(&schema, &group).expect("same schema"));
    }
    out
}

fn without_lines(batch: RecordBatch, lines: &HashSet<u64>) -> RecordBatch {
    if lines.is_empty() {
        return batch;
    }
    let line = batch
        .column_by_name("line_no")
        .expect("keyed")
        .as_primitive::<UInt64Type>();
    let keep: arrow::array::BooleanArray = line
        .iter()
        .map(|l| Some(!l.is_some_and(|l| lines.contains(&l))))
        .collect();
    arrow::compute::filter_record_batch(&batch, &keep).expect("same length")
}

/// The rules of a run: each file's chain (its (tenant, source system)'s
/// rules folder, shared rules plus its type's) and whether the chains can
/// run inside pass 1.
pub(super) struct RunRules {
    pub chains: Vec<Vec<Arc<Rule>>>,
    /// No rule reads `keys` (once constant conditions are folded): the rules
    /// then run in pass 1 and nothing is read twice.
    pub inline: bool,
    /// The sets' names (`RuleSet::name`), for reports and `import_jobs`.
    pub sets: Vec<String>,
}

/// Loads every folder and plans its rules once, so that a broken rule stops
/// the run before any data is read.
pub(super) async fn chains_for(
    settings: &crate::settings::Settings,
    tenant: &str,
    files: &[LayerFile],
) -> Result<RunRules> {
    let mut sets: std::collections::BTreeMap<String, crate::rules::RuleSet> = Default::default();
    let mut chains = Vec::with_capacity(files.len());
    let mut inline = true;
    for f in files {
        let folder = crate::rules::folder_for(settings, tenant, f.origin.source_system.as_deref());
        if !sets.contains_key(folder) {
            let set = crate::rules::RuleSet::from_setting(folder)?;
            let session = RuleSession::new(&settings.curate.rule_params, Vec::new())?;
            for r in &set.rules {
                let plan = session.plan(r).await?;
                inline &= !session.reads_keys(&plan)?;
            }
            sets.insert(folder.to_string(), set);
        }
        chains.push(match f.file_type {
            Some(ty) => sets[folder].for_type(ty),
            None => Vec::new(),
        });
    }
    Ok(RunRules {
        chains,
        inline,
        sets: sets.values().map(|s| s.name()).collect(),
    })
}
