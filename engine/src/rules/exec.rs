//! Running a chain of rules over a batch of records.
//!
//! Each rule is planned once per session, down to its physical plan (parse,
//! bind, optimize, plan), and that plan is executed once per batch against
//! `records`, a table whose rows are swapped before each step: its scan reads
//! the rows of the moment when it runs, not when it was planned. Between
//! steps the engine reads the rule's output: which rows came back (by
//! `line_no`), which carry a `reject_reason`, which have new text.
//!
//! Re-running a physical plan is what DataFusion's recursive queries do: each
//! run starts from [`reset_plan_states`] (a join forgets the build side it
//! loaded), and dynamic filters, which that reset cannot clear, are off.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt32Array};
use arrow::datatypes::{DataType, SchemaRef, UInt64Type};
use async_trait::async_trait;
use datafusion::catalog::{Session as CatalogSession, TableProvider};
use datafusion::common::Result as DfResult;
use datafusion::datasource::{MemTable, TableType};
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{reset_plan_states, Boundedness, EmissionType};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    SendableRecordBatchStream,
};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;

use super::Rule;
use crate::error::{Error, Result};
use crate::model::{schema, Shape};

/// The columns of `records`: the record model (the columns that are the
/// same for a whole file dictionary encoded).
pub fn records_schema() -> SchemaRef {
    schema(Shape::Rules)
}

/// The columns of `keys`: the keyed rows without their hashes.
pub fn keys_schema() -> SchemaRef {
    let keyed = schema(Shape::Keyed);
    Arc::new(keyed.project(&keys_columns()).expect("columns exist"))
}

fn keys_columns() -> Vec<usize> {
    let keyed = schema(Shape::Keyed);
    (0..keyed.fields().len())
        .filter(|&i| !keyed.field(i).name().ends_with("_hash"))
        .collect()
}

/// Keyed batches (what dedup reads) as `keys` rows.
pub fn keys_from_keyed(keyed: &[RecordBatch]) -> Vec<RecordBatch> {
    let cols = keys_columns();
    keyed
        .iter()
        .map(|b| {
            b.project(&cols)
                .expect("keyed batches have the keyed schema")
        })
        .collect()
}

/// `records`: whatever rows the current step reads.
#[derive(Debug)]
struct StepTable {
    rows: Arc<Mutex<Vec<RecordBatch>>>,
}

#[async_trait]
impl TableProvider for StepTable {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn schema(&self) -> SchemaRef {
        records_schema()
    }
    fn table_type(&self) -> TableType {
        TableType::Base
    }
    async fn scan(
        &self,
        _state: &dyn CatalogSession,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        // Filters and limits are not pushed down (the defaults say so), so
        // the plan above this scan applies them.
        Ok(Arc::new(StepScan::new(
            self.rows.clone(),
            projection.cloned(),
        )?))
    }
}

/// The scan of `records`: whatever rows the table holds when it executes.
#[derive(Debug)]
struct StepScan {
    rows: Arc<Mutex<Vec<RecordBatch>>>,
    projection: Option<Vec<usize>>,
    properties: Arc<PlanProperties>,
}

impl StepScan {
    fn new(rows: Arc<Mutex<Vec<RecordBatch>>>, projection: Option<Vec<usize>>) -> DfResult<Self> {
        let full = records_schema();
        let schema = match &projection {
            Some(p) => Arc::new(full.project(p)?),
            None => full,
        };
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(StepScan {
            rows,
            projection,
            properties: Arc::new(properties),
        })
    }
}

impl DisplayAs for StepScan {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "StepScan: projection={:?}", self.projection)
    }
}

impl ExecutionPlan for StepScan {
    fn name(&self) -> &'static str {
        "StepScan"
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }
    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }
    fn with_new_children(
        self: Arc<Self>,
        _: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }
    fn execute(
        &self,
        _partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let rows = self.rows.lock().expect("not poisoned").clone();
        let stream = MemoryStream::try_new(rows, records_schema(), self.projection.clone())?;
        Ok(Box::pin(stream))
    }
}

/// A DataFusion session for rules: the UDF library, `rule_param` values,
/// `keys`, and `records` for the step at hand. One per worker thread.
pub struct RuleSession {
    pub ctx: SessionContext,
    records: Arc<StepTable>,
}

impl RuleSession {
    pub fn new(params: &BTreeMap<String, String>, keys: Vec<RecordBatch>) -> Result<Self> {
        let q = |e| Error::query("rules", "rule session", e);
        // One partition: the batches are small and files already run in
        // parallel. Spans let errors point at a line and column.
        let config = SessionConfig::new()
            .with_target_partitions(1)
            .set_bool("datafusion.sql_parser.collect_spans", true)
            .set_bool("datafusion.optimizer.enable_dynamic_filter_pushdown", false);
        let mut ctx = SessionContext::new_with_config(config);
        fhirflow_udfs::register_with_params(&mut ctx, params.clone()).map_err(q)?;
        let records = Arc::new(StepTable {
            rows: Arc::new(Mutex::new(Vec::new())),
        });
        ctx.register_table("records", records.clone()).map_err(q)?;
        let schema = keys.first().map_or_else(keys_schema, |b| b.schema());
        let keys = MemTable::try_new(schema, vec![keys]).map_err(q)?;
        ctx.register_table("keys", Arc::new(keys)).map_err(q)?;
        Ok(RuleSession { ctx, records })
    }

    /// Parses and plans `rule`, and checks that its output has what the
    /// engine reads. Errors name the file and, where DataFusion knows it, the
    /// line and column.
    pub async fn plan(&self, rule: &Rule) -> Result<LogicalPlan> {
        let state = self.ctx.state();
        let statement = super::dialect::parse(&rule.sql).map_err(|e| rule_error(rule, e))?;
        let is_query =
            matches!(&statement, Statement::Statement(s) if matches!(**s, SqlStatement::Query(_)));
        if !is_query {
            return Err(Error::Rule {
                file: rule.path.display().to_string(),
                message: "a rule is one SELECT (or WITH … SELECT) statement".into(),
            });
        }
        let plan = state
            .statement_to_plan(statement)
            .await
            .map_err(|e| rule_error(rule, e))?;
        let out = plan.schema();
        let problem = |message: String| {
            Err(Error::Rule {
                file: rule.path.display().to_string(),
                message,
            })
        };
        let is_text = |t: &DataType| {
            matches!(
                t,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null
            )
        };
        match out.field_with_unqualified_name("line_no") {
            Ok(f) if f.data_type().is_integer() => {}
            Ok(f) => return problem(format!("line_no must stay an integer, not {}", f.data_type())),
            Err(_) => return problem("the result has no line_no column: return the rows with their line_no (SELECT * keeps it)".into()),
        }
        match out.field_with_unqualified_name("resource") {
            Ok(f) if is_text(f.data_type()) => {}
            Ok(f) => return problem(format!("resource must be text, not {}", f.data_type())),
            Err(_) => {
                return problem(
                    "the result has no resource column: return it (SELECT * keeps it)".into(),
                )
            }
        }
        if let Ok(f) = out.field_with_unqualified_name("reject_reason") {
            if !is_text(f.data_type()) {
                return problem(format!("reject_reason must be text, not {}", f.data_type()));
            }
        }
        Ok(plan)
    }

    /// Whether `plan`, once optimized, reads `keys` (a branch that a
    /// constant `rule_param` condition disables does not count).
    pub fn reads_keys(&self, plan: &LogicalPlan) -> Result<bool> {
        use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
        let optimized = self
            .ctx
            .state()
            .optimize(plan)
            .map_err(|e| Error::query("rules", "optimize", e))?;
        let mut reads = false;
        optimized
            .apply(|node| {
                if let LogicalPlan::TableScan(scan) = node {
                    reads |= scan.table_name.table() == "keys";
                }
                Ok(TreeNodeRecursion::Continue)
            })
            .map_err(|e| Error::query("rules", "optimize", e))?;
        Ok(reads)
    }

    /// `rule`'s physical plan, made once and run per batch by [`Self::run`].
    pub async fn physical(&self, rule: &Rule) -> Result<Arc<dyn ExecutionPlan>> {
        let logical = self.plan(rule).await?;
        self.ctx
            .state()
            .create_physical_plan(&logical)
            .await
            .map_err(|e| rule_error(rule, e))
    }

    /// Runs `plan` over `rows`.
    async fn run(
        &self,
        rule: &Rule,
        plan: &Arc<dyn ExecutionPlan>,
        rows: RecordBatch,
    ) -> Result<Vec<RecordBatch>> {
        *self.records.rows.lock().expect("not poisoned") = vec![rows];
        let out = async {
            let plan = reset_plan_states(plan.clone())?;
            datafusion::physical_plan::collect(plan, self.ctx.task_ctx()).await
        }
        .await
        .map_err(|e| rule_error(rule, e));
        self.records.rows.lock().expect("not poisoned").clear();
        out
    }
}

fn rule_error(rule: &Rule, e: DataFusionError) -> Error {
    let at = e
        .diagnostic()
        .and_then(|d| d.span)
        .map(|s| format!("line {}, column {}: ", s.start.line, s.start.column))
        .unwrap_or_default();
    Error::Rule {
        file: rule.path.display().to_string(),
        message: format!("{at}{}", e.strip_backtrace()),
    }
}

/// What one rule did to one batch (or, summed, to a run).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RuleCounts {
    pub rows_in: u64,
    pub kept: u64,
    pub rejected: u64,
    /// Kept rows whose text the rule changed.
    pub changed: u64,
    /// Time spent running the rule.
    pub seconds: f64,
}

impl RuleCounts {
    pub fn add(&mut self, o: &RuleCounts) {
        self.rows_in += o.rows_in;
        self.kept += o.kept;
        self.rejected += o.rejected;
        self.changed += o.changed;
        self.seconds += o.seconds;
    }
}

/// A row a rule rejected or dropped.
#[derive(Debug, Clone)]
pub struct RuleReject {
    /// The row's index in the batch given to [`Chain::apply`].
    pub row: usize,
    /// The rule's index in the chain.
    pub rule: usize,
    /// RULE_REJECTED or RULE_DROPPED.
    pub code: &'static str,
    pub reason: String,
}

/// A row a rule changed, for the dry run.
#[derive(Debug, Clone)]
pub struct Sample {
    pub rule: usize,
    pub row: usize,
    pub before: String,
    pub after: String,
}

/// What a chain did to one batch.
#[derive(Debug, Default)]
pub struct Applied {
    pub rejected: Vec<RuleReject>,
    /// Surviving rows whose final text differs from the input: (row, text).
    pub changed: Vec<(usize, String)>,
    /// Per rule of the chain.
    pub counts: Vec<RuleCounts>,
    pub samples: Vec<Sample>,
}

/// The planned rules for one resource type.
pub struct Chain {
    pub rules: Vec<(Arc<Rule>, Arc<dyn ExecutionPlan>)>,
}

impl Chain {
    pub async fn plan(session: &RuleSession, rules: &[Arc<Rule>]) -> Result<Chain> {
        let mut planned = Vec::with_capacity(rules.len());
        for r in rules {
            planned.push((r.clone(), session.physical(r).await?));
        }
        Ok(Chain { rules: planned })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Runs every rule in order over `input` (record-model rows with
    /// distinct line numbers, ascending). `samples`: how many changed rows
    /// to keep per rule for the dry run.
    pub async fn apply(
        &self,
        session: &RuleSession,
        input: RecordBatch,
        samples: usize,
    ) -> Result<Applied> {
        let mut out = Applied {
            counts: vec![RuleCounts::default(); self.rules.len()],
            ..Default::default()
        };
        let resource_col = input.schema().index_of("resource").expect("record model");
        let line_col = input.schema().index_of("line_no").expect("record model");
        let mut current = input.clone();
        // For each row of `current`: its row in `input`.
        let mut origin: Vec<usize> = (0..input.num_rows()).collect();
        for (ri, (rule, plan)) in self.rules.iter().enumerate() {
            if current.num_rows() == 0 {
                break;
            }
            let counts = &mut out.counts[ri];
            counts.rows_in = current.num_rows() as u64;
            let lines = current
                .column(line_col)
                .as_primitive::<UInt64Type>()
                .clone();
            let started = std::time::Instant::now();
            let result = session.run(rule, plan, current.clone()).await?;
            if passed_through(&result, &current, line_col, resource_col) {
                counts.kept = counts.rows_in;
                counts.seconds = started.elapsed().as_secs_f64();
                continue;
            }
            let texts = current.column(resource_col).as_string_view().clone();
            let broken = |message: String| Error::Rule {
                file: rule.path.display().to_string(),
                message,
            };
            let mut fate: Vec<Fate> = vec![Fate::Missing; current.num_rows()];
            for batch in &result {
                let cast = |name: &str, to: &DataType| -> Result<Option<ArrayRef>> {
                    match batch.column_by_name(name) {
                        Some(c) => arrow::compute::cast(c, to)
                            .map(Some)
                            .map_err(|e| broken(format!("column {name}: {e}"))),
                        None => Ok(None),
                    }
                };
                let line = cast("line_no", &DataType::UInt64)?.expect("checked when planned");
                let line = line.as_primitive::<UInt64Type>();
                // Views of the input's text when the rule passed it through
                // (a Utf8 result is cast to views of its own buffer).
                let text = cast("resource", &DataType::Utf8View)?.expect("checked when planned");
                let text = text.as_string_view();
                let reason = cast("reject_reason", &DataType::Utf8)?;
                let reason = reason.as_ref().map(|r| r.as_string::<i32>());
                for i in 0..batch.num_rows() {
                    let n = line.value(i);
                    let Ok(pos) = lines.values().binary_search(&n) else {
                        return Err(broken(format!(
                            "returned line_no {n}, which was not among its input rows (line_no must be returned unchanged)"
                        )));
                    };
                    if fate[pos] != Fate::Missing {
                        return Err(broken(format!(
                            "returned line_no {n} twice (a join that matches a row more than once?)"
                        )));
                    }
                    if let Some(r) = reason.filter(|r| r.is_valid(i)) {
                        out.rejected.push(RuleReject {
                            row: origin[pos],
                            rule: ri,
                            code: "RULE_REJECTED",
                            reason: r.value(i).to_string(),
                        });
                        counts.rejected += 1;
                        fate[pos] = Fate::Rejected;
                        continue;
                    }
                    if text.is_null(i) {
                        return Err(broken(format!("returned a NULL resource for line {n}")));
                    }
                    let (new, old) = (text.value(i), texts.value(pos));
                    // A column passed through holds the same bytes: no need
                    // to compare them.
                    let same_bytes =
                        std::ptr::eq(new.as_ptr(), old.as_ptr()) && new.len() == old.len();
                    let changed = !same_bytes && new != old;
                    if changed {
                        counts.changed += 1;
                        if out.samples.iter().filter(|s| s.rule == ri).count() < samples {
                            out.samples.push(Sample {
                                rule: ri,
                                row: origin[pos],
                                before: texts.value(pos).to_string(),
                                after: new.to_string(),
                            });
                        }
                    }
                    counts.kept += 1;
                    fate[pos] = Fate::Kept(changed.then(|| new.to_string()));
                }
            }
            // Rows the rule did not return: dropped, never silently.
            for (pos, f) in fate.iter().enumerate() {
                if *f == Fate::Missing {
                    out.rejected.push(RuleReject {
                        row: origin[pos],
                        rule: ri,
                        code: "RULE_DROPPED",
                        reason: format!(
                            "the rule did not return the row (line {})",
                            lines.value(pos)
                        ),
                    });
                    counts.rejected += 1;
                }
            }
            current = next_rows(&current, resource_col, &fate);
            out.counts[ri].seconds = started.elapsed().as_secs_f64();
            origin = fate
                .iter()
                .enumerate()
                .filter(|(_, f)| matches!(f, Fate::Kept(_)))
                .map(|(pos, _)| origin[pos])
                .collect();
        }
        // The survivors' final text, where it differs from the input's.
        let before = input.column(resource_col).as_string_view();
        let after = current.column(resource_col).as_string_view();
        for (pos, &row) in origin.iter().enumerate() {
            let (a, b) = (after.value(pos), before.value(row));
            if !std::ptr::eq(a.as_ptr(), b.as_ptr()) && a != b {
                out.changed.push((row, after.value(pos).to_string()));
            }
        }
        Ok(out)
    }
}

/// Whether a rule's `result` is `current` as it was: one batch whose
/// `line_no` and `resource` are `current`'s own arrays (a rule that changes
/// nothing passes its columns through) with no `reject_reason` set. Then
/// every row is kept unchanged, with no need to look at each.
fn passed_through(
    result: &[RecordBatch],
    current: &RecordBatch,
    line_col: usize,
    resource_col: usize,
) -> bool {
    let [batch] = result else {
        return false;
    };
    let same = |name: &str, col: usize| {
        batch
            .column_by_name(name)
            .is_some_and(|c| c.to_data().ptr_eq(&current.column(col).to_data()))
    };
    same("line_no", line_col)
        && same("resource", resource_col)
        && batch
            .column_by_name("reject_reason")
            .is_none_or(|r| r.logical_null_count() == r.len())
}

/// What one rule did with one row.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    /// Not returned: dropped.
    Missing,
    Rejected,
    /// Returned without a reason, with its new text if it changed.
    Kept(Option<String>),
}

/// The rows that go on to the next rule, with their new text.
fn next_rows(current: &RecordBatch, resource_col: usize, fate: &[Fate]) -> RecordBatch {
    let all_kept = fate.iter().all(|f| *f == Fate::Kept(None));
    if all_kept {
        return current.clone();
    }
    let keep: Vec<u32> = fate
        .iter()
        .enumerate()
        .filter(|(_, f)| matches!(f, Fate::Kept(_)))
        .map(|(i, _)| i as u32)
        .collect();
    let indices = UInt32Array::from(keep.clone());
    let mut columns: Vec<ArrayRef> = current
        .columns()
        .iter()
        .map(|c| arrow::compute::take(c, &indices, None).expect("indices in range"))
        .collect();
    if fate.iter().any(|f| matches!(f, Fate::Kept(Some(_)))) {
        let new = keep
            .iter()
            .enumerate()
            .filter_map(|(row, &i)| match &fate[i as usize] {
                Fate::Kept(Some(new)) => Some((row, new.as_str())),
                _ => None,
            });
        let texts = fhirflow_udfs::replace_views(columns[resource_col].as_string_view(), new, None);
        columns[resource_col] = Arc::new(texts);
    }
    RecordBatch::try_new(current.schema(), columns).expect("same schema")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curate::parse::key_line;
    use crate::model::{rules_batch, FileOrigin, RowsBuilder};

    /// Record-model and keyed rows of Patient lines `(line_no, id)`.
    fn rows(lines: &[(u64, &str)]) -> (RecordBatch, RecordBatch) {
        let origin = FileOrigin {
            tenant: "t".into(),
            source_system: Some("s".into()),
            import_date: 0,
            source_file: "Patient.ndjson".into(),
        };
        let mut keyed = RowsBuilder::new(Shape::Keyed, origin);
        let texts: Vec<String> = lines
            .iter()
            .map(|(_, id)| format!(r#"{{"resourceType":"Patient","id":"{id}"}}"#))
            .collect();
        for ((n, _), text) in lines.iter().zip(&texts) {
            let k = key_line(text.as_bytes(), Some("Patient"), 64, false).unwrap();
            keyed.push_keys(*n, &k);
        }
        let keyed = keyed.finish();
        let texts = arrow::array::StringViewArray::from_iter_values(&texts);
        (rules_batch(&keyed, texts), keyed)
    }

    fn rule(name: &str, sql: &str) -> Arc<Rule> {
        Arc::new(Rule {
            name: name.into(),
            path: name.into(),
            resource_type: None,
            sql: sql.into(),
            test: None,
        })
    }

    /// A plan made once runs over each batch as if planned for it: joins
    /// forget the rows of the batch before (records on either side), and
    /// `keys` is read whole every time.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_chain_planned_once_sees_each_batch_afresh() {
        let (first, k1) = rows(&[(1, "a"), (2, "b"), (3, "c")]);
        let (second, k2) = rows(&[(4, "c"), (5, "d")]);
        let keys = keys_from_keyed(&[k1, k2]);
        let session = RuleSession::new(&BTreeMap::new(), keys).unwrap();
        let rules = [
            // records joined with themselves: a build side of this batch.
            rule(
                "self.sql",
                "SELECT a.* FROM records a JOIN records b ON a.line_no = b.line_no",
            ),
            // records joined with keys: ids seen more than once are rejected.
            rule(
                "keys.sql",
                "SELECT r.*, CASE WHEN k.n > 1 THEN 'seen ' || k.n || ' times' END AS reject_reason \
                 FROM records r JOIN (SELECT id, count(*) AS n FROM keys GROUP BY id) k ON r.id = k.id",
            ),
        ];
        let chain = Chain::plan(&session, &rules).await.unwrap();
        let run = |batch: RecordBatch| chain.apply(&session, batch, 0);
        for round in 0..3 {
            let a = run(first.clone()).await.unwrap();
            let rejected: Vec<usize> = a.rejected.iter().map(|r| r.row).collect();
            assert_eq!(
                rejected,
                [2],
                "round {round}: c, the third row of the first batch"
            );
            assert_eq!(a.counts[0].kept, 3);
            let b = run(second.clone()).await.unwrap();
            let rejected: Vec<(usize, &str)> = b
                .rejected
                .iter()
                .map(|r| (r.row, r.reason.as_str()))
                .collect();
            assert_eq!(rejected, [(0, "seen 2 times")], "round {round}");
            assert_eq!((b.counts[0].rows_in, b.counts[0].kept), (2, 2));
        }
    }

    /// Rules that return their input as it was are read without a look at
    /// each row; an edit between them is still seen, and only where it
    /// changed the text.
    #[tokio::test(flavor = "multi_thread")]
    async fn passed_through_rows_and_an_edit_between() {
        let (batch, keyed) = rows(&[(1, "a"), (2, "b"), (3, "c")]);
        let session = RuleSession::new(&BTreeMap::new(), keys_from_keyed(&[keyed])).unwrap();
        let rules = [
            rule("all.sql", "SELECT * FROM records"),
            rule(
                "no_reason.sql",
                "SELECT *, CASE WHEN id = 'zz' THEN 'never' END AS reject_reason FROM records",
            ),
            rule(
                "edit.sql",
                "SELECT * REPLACE (CASE WHEN id = 'b' THEN fhir_set(resource, 'active', 'true') \
                 ELSE resource END AS resource) FROM records",
            ),
            rule("all_again.sql", "SELECT * FROM records"),
        ];
        let chain = Chain::plan(&session, &rules).await.unwrap();
        let applied = chain.apply(&session, batch, 1).await.unwrap();
        assert!(applied.rejected.is_empty());
        for c in &applied.counts {
            assert_eq!((c.rows_in, c.kept, c.rejected), (3, 3, 0));
        }
        let changed: Vec<u64> = applied.counts.iter().map(|c| c.changed).collect();
        assert_eq!(changed, [0, 0, 1, 0]);
        assert_eq!(
            applied.changed,
            [(
                1,
                r#"{"resourceType":"Patient","id":"b","active":true}"#.to_string()
            )]
        );
    }
}
