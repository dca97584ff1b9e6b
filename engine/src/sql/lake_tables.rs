//! The local Iceberg lake in the SQL session:
//!
//! * `lake.<type>`: the current version of each resource per (tenant, id),
//!   in dedup's order: the highest versionId, then the latest lastUpdated,
//!   then the latest import date, then the latest import;
//! * `lake_history.<type>`: every row of the table's current snapshot, each
//!   version of a resource that was ever imported;
//! * `lake_snapshots`: every snapshot of every table, with the import job,
//!   tenant, date and curate run that made it;
//! * `lake_at('<type>', <snapshot id> | '<timestamp>')`: `lake.<type>` as it
//!   was at that snapshot, or at the last snapshot committed by that time
//!   (time travel).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::catalog::{TableFunctionImpl, TableProvider};
use datafusion::common::{plan_err, ScalarValue};
use datafusion::datasource::{provider_as_source, MemTable, ViewTable};
use datafusion::error::DataFusionError;
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::{col, lit, try_cast, ExprFunctionExt, LogicalPlanBuilder};
use datafusion::prelude::{Expr, SessionContext};
use iceberg::table::Table;
use iceberg_datafusion::IcebergStaticTableProvider;

use crate::error::{Error, Result};
use crate::lake::{LocalLake, COLUMNS, PROP_CURATE_RUN, PROP_DATE, PROP_JOB, PROP_TENANT};
use crate::storage::Lake;

const STAGE: &str = "sql";

/// Registers the lake's tables in `ctx` (nothing when the lake has no local
/// Iceberg catalog yet).
pub async fn register(ctx: &SessionContext, lake: &Lake) -> Result<()> {
    let Some(local) = LocalLake::open(&lake.metadata, false).await? else {
        return Ok(());
    };
    let tables: BTreeMap<String, Table> = local.tables().await?.into_iter().collect();
    let q = |what: String| move |e| Error::query(STAGE, what, e);
    for (name, table) in &tables {
        let all = IcebergStaticTableProvider::try_new_from_table(table.clone())
            .await
            .map_err(|e| Error::lake(STAGE, format!("lake.{name}"), e))?;
        let all: Arc<dyn TableProvider> = Arc::new(all);
        ctx.register_table(format!("lake_history.{name}").as_str(), all.clone())
            .map_err(q(format!("lake_history.{name}")))?;
        ctx.register_table(
            format!("lake.{name}").as_str(),
            current_view(all).map_err(q(format!("lake.{name}")))?,
        )
        .map_err(q(format!("lake.{name}")))?;
    }
    ctx.register_table(
        "lake_snapshots",
        snapshots(&tables).map_err(q("lake_snapshots".into()))?,
    )
    .map_err(q("lake_snapshots".into()))?;
    ctx.register_udtf("lake_at", Arc::new(LakeAt { tables }));
    Ok(())
}

/// The latest version per (tenant, id) of a table's rows.
/// `lake.<type>`: per (tenant, id), the version curation's dedup would keep
/// (`engine/src/curate/dedup.sql`, the same order): the highest
/// `meta.versionId` (as a number when it is one, else as text), then the
/// latest `meta.lastUpdated`, then the latest import date, then the latest
/// import. So a late re-send of an old version, imported after a newer one,
/// stays in the history and does not become current.
///
/// A deletion is a row whose `resource` is empty (a tombstone, written by
/// the import of a partition whose export deleted the resource): a version
/// imported no later than the tombstone is not current.
fn current_view(all: Arc<dyn TableProvider>) -> datafusion::error::Result<Arc<dyn TableProvider>> {
    let numeric_version = try_cast(col("version_id"), DataType::Decimal128(38, 0));
    let rank = row_number()
        .partition_by(vec![col("tenant_guid"), col("id")])
        .order_by(vec![
            numeric_version.sort(false, false),
            col("version_id").sort(false, false),
            col("last_updated").sort(false, false),
            col("import_date").sort(false, false),
            col("imported_at").sort(false, false),
            col("job_id").sort(false, false),
        ])
        .build()?
        .alias("__rank");
    let source = provider_as_source(all);
    let tombstones = LogicalPlanBuilder::scan("tomb", source.clone(), None)?
        .filter(col("resource").eq(lit("")))?
        .aggregate(
            vec![col("tenant_guid").alias("__t"), col("id").alias("__id")],
            vec![
                datafusion::functions_aggregate::expr_fn::max(col("imported_at"))
                    .alias("__deleted_at"),
            ],
        )?
        .build()?;
    let plan = LogicalPlanBuilder::scan("lake", source, None)?
        .filter(col("resource").not_eq(lit("")))?
        .window(vec![rank])?
        .filter(col("__rank").eq(lit(1u64)))?
        .join(
            tombstones,
            datafusion::logical_expr::JoinType::Left,
            (vec!["tenant_guid", "id"], vec!["__t", "__id"]),
            None,
        )?
        .filter(
            col("__deleted_at")
                .is_null()
                .or(col("__deleted_at").lt(col("imported_at"))),
        )?
        .project(COLUMNS.iter().map(|c| col(*c)))?
        .build()?;
    Ok(Arc::new(ViewTable::new(plan, None)))
}

fn snapshots(
    tables: &BTreeMap<String, Table>,
) -> datafusion::error::Result<Arc<dyn TableProvider>> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("table_name", DataType::Utf8, false),
        Field::new("snapshot_id", DataType::Int64, false),
        Field::new(
            "committed_at",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("job_id", DataType::Utf8, true),
        Field::new("tenant_guid", DataType::Utf8, true),
        Field::new("import_date", DataType::Utf8, true),
        Field::new("curate_run", DataType::Utf8, true),
        Field::new("added_records", DataType::Int64, true),
    ]));
    let (mut name, mut id, mut at, mut job, mut tenant, mut date, mut run, mut added) = (
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
    );
    for (n, t) in tables {
        let mut snaps: Vec<_> = t.metadata().snapshots().collect();
        snaps.sort_by_key(|s| (s.timestamp_ms(), s.sequence_number()));
        for s in snaps {
            let p = &s.summary().additional_properties;
            name.push(n.clone());
            id.push(s.snapshot_id());
            at.push(s.timestamp_ms());
            job.push(p.get(PROP_JOB).cloned());
            tenant.push(p.get(PROP_TENANT).cloned());
            date.push(p.get(PROP_DATE).cloned());
            run.push(p.get(PROP_CURATE_RUN).cloned());
            added.push(p.get("added-records").and_then(|v| v.parse::<i64>().ok()));
        }
    }
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(name)),
            Arc::new(Int64Array::from(id)),
            Arc::new(TimestampMillisecondArray::from(at).with_timezone("UTC")),
            Arc::new(StringArray::from(job)),
            Arc::new(StringArray::from(tenant)),
            Arc::new(StringArray::from(date)),
            Arc::new(StringArray::from(run)),
            Arc::new(Int64Array::from(added)),
        ],
    )?;
    Ok(Arc::new(MemTable::try_new(schema, vec![vec![batch]])?))
}

/// `lake_at(type, snapshot id | timestamp)`.
#[derive(Debug)]
struct LakeAt {
    tables: BTreeMap<String, Table>,
}

impl TableFunctionImpl for LakeAt {
    fn call(&self, args: &[Expr]) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let literal = |e: &Expr| match e {
            Expr::Literal(v, _) => Some(v.clone()),
            _ => None,
        };
        let (Some(ScalarValue::Utf8(Some(ty))), Some(at)) = (
            args.first().and_then(literal),
            args.get(1).and_then(literal),
        ) else {
            return plan_err!(
                "lake_at('<type>', <snapshot id> | '<timestamp>'): give a resource type and a snapshot id or a time"
            );
        };
        let name = ty.to_ascii_lowercase();
        let Some(table) = self.tables.get(&name) else {
            return plan_err!("lake_at: the lake has no table {name}");
        };
        let snapshot_id = match at {
            ScalarValue::Int64(Some(id)) => id,
            ScalarValue::Utf8(Some(text)) => {
                let ms = parse_time(&text).ok_or_else(|| {
                    DataFusionError::Plan(format!(
                        "lake_at: {text:?} is neither a snapshot id nor a time such as 2024-05-01T12:00:00Z"
                    ))
                })?;
                match table
                    .metadata()
                    .snapshots()
                    .filter(|s| s.timestamp_ms() <= ms)
                    .max_by_key(|s| (s.timestamp_ms(), s.sequence_number()))
                {
                    Some(s) => s.snapshot_id(),
                    None => {
                        return plan_err!("lake_at: {name} has no snapshot at or before {text}")
                    }
                }
            }
            other => return plan_err!("lake_at: {other} is neither a snapshot id nor a time"),
        };
        // The constructor does no I/O: it only looks the snapshot up.
        let provider = futures::executor::block_on(
            IcebergStaticTableProvider::try_new_from_table_snapshot(table.clone(), snapshot_id),
        )
        .map_err(|e| DataFusionError::Plan(format!("lake_at: {e}")))?;
        current_view(Arc::new(provider))
    }
}

/// RFC 3339, or `YYYY-MM-DD[ HH:MM:SS]` in UTC, as Unix milliseconds.
fn parse_time(text: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_millis());
    }
    let naive = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .or_else(|| {
            chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(23, 59, 59))
        })?;
    Some(naive.and_utc().timestamp_millis())
}
