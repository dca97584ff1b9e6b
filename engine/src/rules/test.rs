//! `fhirflow rules test`: each rule's sqllogictest file (`NAME.slt` beside
//! `NAME.sql`) run against the rule.
//!
//! In a test file:
//!
//! * `input` is a table with one text column, `resource`: insert the test's
//!   resources with `statement ok` / `INSERT INTO input VALUES ('{…}'), …`;
//! * `records` is `input` as the rule sees it in a run (the record model:
//!   keys read by curation's step 1, `line_no` the row's position from 1,
//!   tenant `00000000-0000-4000-8000-000000000000`, source system `test`,
//!   import date 2024-01-01), and `keys` its key columns;
//! * `rule` is the rule's own result over `records`;
//! * `outcome` is what the engine makes of it, one row per record:
//!   `line_no`, `id`, `outcome` (`kept`, `changed`, `rejected` or
//!   `dropped`), `reason` and the final `resource`;
//! * `SET rule_param.NAME = 'value'` sets a `rule_param` for what follows.
//!
//! A rule without a test file is reported, and fails the command.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, RecordBatch, StringArray, StringBuilder,
    TimestampMicrosecondBuilder, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::datasource::{MemTable, ViewTable};
use datafusion::prelude::SessionContext;
use sqllogictest::{DBOutput, DefaultColumnType};

use super::exec::{records_schema, Chain, RuleSession};
use super::{Rule, RuleSet};
use crate::curate::parse::key_line;
use crate::error::{Error, Result};

const TEST_TENANT: &str = "00000000-0000-4000-8000-000000000000";
/// 2024-01-01.
const TEST_DATE: i32 = 19723;

/// The results of `rules test`.
#[derive(Debug, Default)]
pub struct TestReport {
    pub passed: Vec<String>,
    /// (rule, what went wrong).
    pub failed: Vec<(String, String)>,
    /// Rules without a test file.
    pub untested: Vec<String>,
}

impl TestReport {
    pub fn ok(&self) -> bool {
        self.failed.is_empty() && self.untested.is_empty()
    }
}

/// The test file of a rule, for messages.
pub fn test_file(rule: &Rule) -> PathBuf {
    rule.path.with_extension("slt")
}

/// Runs the test file of every rule of `set`.
pub async fn test(set: &RuleSet, params: &BTreeMap<String, String>) -> Result<TestReport> {
    let mut report = TestReport::default();
    for rule in &set.rules {
        let Some(script) = &rule.test else {
            report.untested.push(rule.name.clone());
            continue;
        };
        let file = test_file(rule).display().to_string();
        let (rule2, params2) = (rule.clone(), params.clone());
        let mut runner = sqllogictest::Runner::new(move || {
            let (rule, params) = (rule2.clone(), params2.clone());
            async move { RuleDb::new(rule, params).map_err(DbError::from) }
        });
        // Types in `query` headers are documentation here; values decide.
        runner.with_column_validator(|_, _| true);
        let records = match sqllogictest::parse_with_name::<DefaultColumnType>(script, file) {
            Ok(records) => records,
            Err(e) => {
                report.failed.push((rule.name.clone(), e.to_string()));
                continue;
            }
        };
        match runner.run_multi_async(records).await {
            Ok(()) => report.passed.push(rule.name.clone()),
            Err(e) => report
                .failed
                .push((rule.name.clone(), e.display(false).to_string())),
        }
    }
    Ok(report)
}

/// One test file's database: `input` lives across statements; every query
/// runs in a fresh rule session built from the current `input`.
struct RuleDb {
    rule: Arc<Rule>,
    params: BTreeMap<String, String>,
    input: Arc<MemTable>,
    plain: SessionContext,
    file: String,
}

impl RuleDb {
    fn new(rule: Arc<Rule>, params: BTreeMap<String, String>) -> Result<Self> {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "resource",
            DataType::Utf8,
            true,
        )]));
        let q = |e| Error::query("rules", "test input", e);
        let input = Arc::new(MemTable::try_new(schema, vec![Vec::new()]).map_err(q)?);
        let plain = SessionContext::new();
        plain.register_table("input", input.clone()).map_err(q)?;
        let file = test_file(&rule).display().to_string();
        Ok(RuleDb {
            rule,
            params,
            input,
            plain,
            file,
        })
    }

    /// `input` as record-model rows, keyed as curation's step 1 keys them.
    async fn records(&self) -> Result<RecordBatch> {
        let q = |e| Error::query("rules", "test input", e);
        let batches = self
            .plain
            .sql("SELECT resource FROM input")
            .await
            .map_err(q)?
            .collect()
            .await
            .map_err(q)?;
        let (mut types, mut ids, mut versions, mut texts) = (
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
        );
        let mut updated = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut n = 0u64;
        for b in &batches {
            let col =
                arrow::compute::cast(b.column(0), &DataType::Utf8).map_err(|e| q(e.into()))?;
            for text in col.as_string::<i32>().iter() {
                n += 1;
                let text = text.unwrap_or_default();
                let ty = self.rule.resource_type.or_else(|| {
                    let p: fhirflow_udfs::path::FhirPath = "resourceType".parse().ok()?;
                    let span = fhirflow_udfs::path::select(text, &p).into_iter().next()?;
                    let name = span.decoded(text)?;
                    fhirflow_fhir::RESOURCE_TYPES
                        .iter()
                        .copied()
                        .find(|t| *t == name)
                });
                let keys = key_line(text.as_bytes(), ty, 128, false).map_err(|r| Error::Rule {
                    file: self.file.clone(),
                    message: format!(
                        "input row {n} would be rejected before the rules: {}: {}",
                        r.code, r.message
                    ),
                })?;
                types.append_value(keys.resource_type);
                ids.append_value(&keys.id);
                versions.append_option(keys.version_id.as_deref());
                updated.append_option(keys.last_updated);
                texts.append_value(text);
            }
        }
        let n = n as usize;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![TEST_TENANT; n])),
            Arc::new(StringArray::from(vec!["test"; n])),
            Arc::new(Date32Array::from(vec![TEST_DATE; n])),
            Arc::new(StringArray::from(vec![self.file.as_str(); n])),
            Arc::new(UInt64Array::from_iter_values(1..=n as u64)),
            Arc::new(types.finish()),
            Arc::new(ids.finish()),
            Arc::new(versions.finish()),
            Arc::new(updated.finish()),
            Arc::new(texts.finish()),
        ];
        let schema = records_schema();
        let columns = columns
            .iter()
            .zip(schema.fields())
            .map(|(c, f)| arrow::compute::cast(c, f.data_type()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| q(e.into()))?;
        RecordBatch::try_new(schema, columns).map_err(|e| q(e.into()))
    }

    /// A session with `input`, `records`, `keys`, `rule` and `outcome`.
    async fn session(&self) -> Result<SessionContext> {
        let q = |e| Error::query("rules", "test session", e);
        let records = self.records().await?;
        let keys_cols: Vec<usize> = (0..records.num_columns() - 1).collect();
        let keys = records.project(&keys_cols).map_err(|e| q(e.into()))?;
        let session = RuleSession::new(&self.params, vec![keys.clone()])?;
        let ctx = session.ctx.clone();
        ctx.register_table("input", self.input.clone()).map_err(q)?;
        // `records` for the view: the batch itself, as a table.
        ctx.deregister_table("records").map_err(q)?;
        ctx.register_table(
            "records",
            Arc::new(MemTable::try_new(records_schema(), vec![vec![records.clone()]]).map_err(q)?),
        )
        .map_err(q)?;
        let plan = session.plan(&self.rule).await?;
        ctx.register_table(
            "rule",
            Arc::new(ViewTable::new(plan, Some(self.rule.sql.clone()))),
        )
        .map_err(q)?;
        // `outcome`: the engine's reading of the rule's result, from a
        // session of its own (the chain swaps `records` as it goes).
        let run = RuleSession::new(&self.params, vec![keys])?;
        let chain = Chain::plan(&run, std::slice::from_ref(&self.rule)).await?;
        let applied = chain.apply(&run, records.clone(), 0).await?;
        let outcome = outcome_batch(&records, &applied);
        ctx.register_table(
            "outcome",
            Arc::new(MemTable::try_new(outcome.schema(), vec![vec![outcome]]).map_err(q)?),
        )
        .map_err(q)?;
        Ok(ctx)
    }
}

fn outcome_batch(records: &RecordBatch, applied: &super::exec::Applied) -> RecordBatch {
    let n = records.num_rows();
    let ids = records
        .column_by_name("id")
        .expect("model")
        .as_string::<i32>();
    let texts = records
        .column_by_name("resource")
        .expect("model")
        .as_string_view();
    let mut outcome = vec!["kept"; n];
    let mut reason: Vec<Option<String>> = vec![None; n];
    let mut text: Vec<Option<String>> = (0..n).map(|i| Some(texts.value(i).to_string())).collect();
    for (row, new) in &applied.changed {
        outcome[*row] = "changed";
        text[*row] = Some(new.clone());
    }
    for r in &applied.rejected {
        outcome[r.row] = if r.code == "RULE_DROPPED" {
            "dropped"
        } else {
            "rejected"
        };
        reason[r.row] = Some(r.reason.clone());
        text[r.row] = None;
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("line_no", DataType::UInt64, false),
        Field::new("id", DataType::Utf8, true),
        Field::new("outcome", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, true),
        Field::new("resource", DataType::Utf8, true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(UInt64Array::from_iter_values(1..=n as u64)),
            Arc::new((0..n).map(|i| Some(ids.value(i))).collect::<StringArray>()),
            Arc::new(StringArray::from(outcome)),
            Arc::new(StringArray::from(reason)),
            Arc::new(StringArray::from(text)),
        ],
    )
    .expect("outcome columns")
}

/// Errors shown by sqllogictest.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct DbError(String);

impl From<Error> for DbError {
    fn from(e: Error) -> Self {
        DbError(e.to_string())
    }
}

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for RuleDb {
    type Error = DbError;
    type ColumnType = DefaultColumnType;

    async fn run(
        &mut self,
        sql: &str,
    ) -> std::result::Result<DBOutput<DefaultColumnType>, DbError> {
        let trimmed = sql.trim().trim_end_matches(';');
        if let Some(rest) = trimmed
            .strip_prefix("SET rule_param.")
            .or_else(|| trimmed.strip_prefix("set rule_param."))
        {
            let (name, value) = rest.split_once('=').ok_or_else(|| {
                DbError(format!(
                    "expected SET rule_param.NAME = 'value', got {trimmed}"
                ))
            })?;
            let value = value.trim().trim_matches('\'');
            self.params
                .insert(name.trim().to_string(), value.to_string());
            return Ok(DBOutput::StatementComplete(0));
        }
        let is_query = {
            let head = trimmed.trim_start().to_ascii_lowercase();
            head.starts_with("select") || head.starts_with("with") || head.starts_with("(")
        };
        let ctx = if is_query {
            self.session().await?
        } else {
            self.plain.clone()
        };
        let err = |e: datafusion::error::DataFusionError| DbError(e.strip_backtrace());
        let plan = super::dialect::plan(&ctx.state(), sql).await.map_err(err)?;
        let batches = ctx
            .execute_logical_plan(plan)
            .await
            .map_err(err)?
            .collect()
            .await
            .map_err(err)?;
        if !is_query {
            return Ok(DBOutput::StatementComplete(0));
        }
        let opts = FormatOptions::default().with_null("NULL");
        let mut rows = Vec::new();
        let mut types = Vec::new();
        for b in &batches {
            types = b
                .schema()
                .fields()
                .iter()
                .map(|f| column_type(f.data_type()))
                .collect();
            let fmts: Vec<_> = b
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| DbError(e.to_string()))?;
            for i in 0..b.num_rows() {
                rows.push(
                    fmts.iter()
                        .zip(b.columns())
                        .map(|(f, c)| {
                            let v = f.value(i).to_string();
                            if v.is_empty() && c.is_valid(i) {
                                "(empty)".into()
                            } else {
                                v
                            }
                        })
                        .collect(),
                );
            }
        }
        Ok(DBOutput::Rows { types, rows })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "fhirflow"
    }
}

fn column_type(t: &DataType) -> DefaultColumnType {
    if t.is_integer() {
        DefaultColumnType::Integer
    } else if t.is_floating() || matches!(t, DataType::Decimal128(..) | DataType::Decimal256(..)) {
        DefaultColumnType::FloatingPoint
    } else {
        DefaultColumnType::Text
    }
}
