//! One DataFusion session with every layer registered and the UDF library:
//!
//! | schema     | tables                                                    |
//! | ---------- | --------------------------------------------------------- |
//! | `raw`      | one per resource type present, e.g. `raw.patient`        |
//! | `curated`  | one per resource type of the committed partitions         |
//! | `metadata` | `import_jobs`, `import_errors`, `import_metrics` (each partition's latest run of each stage), and `…_history` (every run) |
//! | `lake`, `lake_history` | the local Iceberg lake (see [`lake_tables`])  |
//! | `view`     | each SQL-on-FHIR ViewDefinition of `[sql] views` over the curated layer ([`crate::views`]) |
//!
//! Raw and curated tables use the record model (partition columns included);
//! metadata tables read the Parquet files of committed runs only. Every
//! layer's files are found when a query scans a table, for the partitions
//! its filters allow ([`layer_tables`]). The same
//! tables also answer to the Glue catalog's names (`external_fhir_raw`,
//! `external_fhir_curated`, `fhir_import_metadata_<env>`), so a query written
//! for Athena runs here as it is.

pub mod lake_tables;
pub mod layer_tables;
pub mod ndjson_table;

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::catalog::{MemorySchemaProvider, Session, TableProvider};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::object_store::ObjectStoreUrl;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement;
use datafusion::sql::sqlparser::ast::{SetExpr, Statement as SqlStatement};

use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectMeta, ObjectStoreExt};

use crate::error::{Error, Result};
use crate::layout::MetadataTable;
use crate::metadata;
use crate::settings::Settings;
use crate::storage::{Lake, Root};
use layer_tables::{Kind, LayerSchema};

const STAGE: &str = "sql";

/// A session over `lake` with every layer and UDF registered.
pub async fn session(lake: &Lake, settings: &Settings) -> Result<SessionContext> {
    // Queries are parsed in the rules' dialect (see [`query`]).
    let mut ctx = SessionContext::new();
    for root in [&lake.raw, &lake.curated, &lake.metadata] {
        ctx.register_object_store(&root.store_url, root.store.clone());
    }
    fhirflow_udfs::register_all(&mut ctx).map_err(|e| Error::query(STAGE, "register UDFs", e))?;
    let catalog = ctx.catalog("datafusion").expect("default catalog");
    let glue_metadata = crate::catalog::metadata_database(&settings.glue.env);
    let glue = |schema: &str| match schema {
        "raw" => crate::catalog::RAW_DATABASE,
        "curated" => crate::catalog::CURATED_DATABASE,
        _ => glue_metadata.as_str(),
    };
    // raw, curated and metadata resolve their files when a query scans
    // them, and then only the partitions its filters can match; each answers
    // to its Glue name too, so a query written for Athena runs here as it is.
    for (kind, name) in [
        (Kind::Raw, "raw"),
        (Kind::Curated, "curated"),
        (Kind::Metadata, "metadata"),
    ] {
        let schema = Arc::new(LayerSchema::new(
            lake.clone(),
            settings.curate.clone(),
            kind,
        ));
        for n in [name, glue(name)] {
            catalog
                .register_schema(n, schema.clone())
                .map_err(|e| Error::query(STAGE, "register schema", e))?;
        }
    }
    for schema in ["lake", "lake_history"] {
        catalog
            .register_schema(schema, Arc::new(MemorySchemaProvider::new()))
            .map_err(|e| Error::query(STAGE, "register schema", e))?;
    }
    lake_tables::register(&ctx, lake).await?;
    crate::views::register(&ctx, &crate::views::load(&settings.sql.views)?).await?;
    Ok(ctx)
}

/// Runs `sql` in the rules' dialect ([`crate::rules::dialect`]), so that
/// a rule's SQL runs here as it is. The session is read-only: a statement
/// that would write or change it is refused before it is planned
/// ([`read_only`]), and the plan is checked again with DataFusion's
/// [`SQLOptions`] (no DDL, DML, `COPY` or session statements).
pub async fn query(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
    let q = |e| Error::query(STAGE, "query", e);
    let statement = crate::rules::dialect::parse(sql).map_err(q)?;
    read_only(&statement)?;
    let plan = ctx.state().statement_to_plan(statement).await.map_err(q)?;
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(&plan)
        .map_err(|e| {
            let why = match e {
                DataFusionError::Plan(m) => m,
                e => e.to_string(),
            };
            refused(&format!("this plan ({why})"))
        })?;
    ctx.execute_logical_plan(plan)
        .await
        .map_err(q)?
        .collect()
        .await
        .map_err(q)
}

/// Lets through only what reads: a query (`SELECT`, `WITH`, `VALUES`, set
/// operations), `DESCRIBE` and `EXPLAIN` of one. Everything else (`COPY`,
/// `INSERT`, `UPDATE`, `DELETE`, `CREATE`, `DROP`, `SET`, …) is a usage
/// error (exit code 2).
fn read_only(statement: &Statement) -> Result<()> {
    let reads = match statement {
        Statement::Statement(s) => match s.as_ref() {
            SqlStatement::Query(q) => !writes(&q.body),
            SqlStatement::ExplainTable { .. } => true,
            SqlStatement::Explain { statement, .. } => {
                return read_only(&Statement::Statement(statement.clone()))
            }
            _ => false,
        },
        Statement::Explain(e) => return read_only(&e.statement),
        Statement::CreateExternalTable(_) | Statement::CopyTo(_) | Statement::Reset(_) => false,
    };
    if reads {
        return Ok(());
    }
    let text = statement.to_string();
    let keyword = text.split_whitespace().next().unwrap_or("this");
    Err(refused(&format!(
        "a {} statement",
        keyword.to_ascii_uppercase()
    )))
}

/// Whether a query body modifies data (`WITH … INSERT`, …).
fn writes(body: &SetExpr) -> bool {
    match body {
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => true,
        SetExpr::Query(q) => writes(&q.body),
        SetExpr::SetOperation { left, right, .. } => writes(left) || writes(right),
        _ => false,
    }
}

fn refused(what: &str) -> Error {
    Error::Usage(format!(
        "fhirflow sql is read-only: {what} is refused, nothing ran; give a query \
         (SELECT, WITH, VALUES, or DESCRIBE or EXPLAIN of one)"
    ))
}

/// A scan of the metadata Parquet files a commit lists. Each is looked up
/// once (its size is what the Parquet reader needs); one that is missing or
/// cannot be looked up fails the query naming it. DataFusion's listing
/// table is not used: it takes a file it cannot find for an empty folder and
/// leaves it out without a word.
pub(crate) async fn metadata_scan(
    state: &dyn Session,
    root: &Root,
    table: MetadataTable,
    files: &[object_store::path::Path],
    projection: Option<&Vec<usize>>,
    limit: Option<usize>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let schema = metadata::schema(table);
    let q = |e| Error::query(STAGE, format!("metadata.{}", table.name()), e);
    if files.is_empty() {
        let empty: Vec<RecordBatch> = Vec::new();
        let t = MemTable::try_new(schema, vec![empty]).map_err(q)?;
        return t.scan(state, projection, &[], limit).await.map_err(q);
    }
    let heads: Vec<_> = files
        .iter()
        .map(|path| head(root.clone(), path.clone()))
        .collect();
    let metas: Vec<ObjectMeta> = futures::stream::iter(heads)
        .buffered(16)
        .try_collect()
        .await?;
    let groups = state
        .config_options()
        .execution
        .target_partitions
        .clamp(1, metas.len());
    let mut files: Vec<Vec<PartitionedFile>> = vec![Vec::new(); groups];
    for (i, meta) in metas.into_iter().enumerate() {
        files[i % groups].push(PartitionedFile::from(meta));
    }
    let store = ObjectStoreUrl::parse(&root.store_url[..url::Position::BeforePath]).map_err(q)?;
    let config = FileScanConfigBuilder::new(store, Arc::new(ParquetSource::new(schema)))
        .with_file_groups(files.into_iter().map(FileGroup::new).collect())
        .with_projection_indices(projection.cloned())
        .map_err(q)?
        .with_limit(limit)
        .build();
    Ok(DataSourceExec::from_data_source(config))
}

/// The object at `path`, which a commit lists: missing is an error naming it.
async fn head(root: Root, path: object_store::path::Path) -> Result<ObjectMeta> {
    root.store.head(&path).await.map_err(|e| match e {
        object_store::Error::NotFound { .. } => Error::Corrupt {
            stage: STAGE,
            location: root.url_of(&path),
            detail: "the object is missing".into(),
        },
        e => Error::store(STAGE, root.url_of(&path), e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(sql: &str) -> Result<()> {
        read_only(&crate::rules::dialect::parse(sql).unwrap())
    }

    #[test]
    fn only_statements_that_read_pass() {
        for ok in [
            "SELECT 1",
            "WITH a AS (SELECT 1 AS x) SELECT x FROM a",
            "VALUES (1), (2)",
            "SELECT 1 UNION ALL SELECT 2",
            "DESCRIBE curated.patient",
            "EXPLAIN SELECT 1",
            "EXPLAIN ANALYZE SELECT 1",
        ] {
            check(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (refused, kind) in [
            ("COPY (SELECT 1) TO '/tmp/x.csv'", "COPY"),
            ("EXPLAIN ANALYZE COPY (SELECT 1) TO '/tmp/x.csv'", "COPY"),
            ("INSERT INTO t VALUES (1)", "INSERT"),
            ("WITH a AS (SELECT 1) INSERT INTO t SELECT * FROM a", "WITH"),
            ("UPDATE t SET x = 1", "UPDATE"),
            ("DELETE FROM t", "DELETE"),
            (
                "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/tmp/t/'",
                "CREATE",
            ),
            ("CREATE TABLE t AS SELECT 1", "CREATE"),
            ("CREATE VIEW v AS SELECT 1", "CREATE"),
            ("DROP TABLE t", "DROP"),
            ("SET datafusion.execution.batch_size = 1", "SET"),
            ("RESET datafusion.execution.batch_size", "RESET"),
        ] {
            let e = check(refused).expect_err(refused);
            assert_eq!(e.exit_code(), 2, "{refused}");
            assert!(
                e.to_string()
                    .contains(&format!("a {kind} statement is refused")),
                "{refused}: {e}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn query_refuses_a_copy_before_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            lake: "memory://".into(),
            ..Default::default()
        };
        let lake = Lake::open(&settings).unwrap();
        let ctx = session(&lake, &settings).await.unwrap();
        let target = dir.path().join("x.csv");
        let sql = format!(
            "COPY (SELECT 1 AS x) TO '{}' STORED AS CSV",
            target.display()
        );
        let e = query(&ctx, &sql).await.unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        assert!(!target.exists());
        assert_eq!(rows_of(&query(&ctx, "SELECT 1 AS x").await.unwrap()), 1);
    }

    fn rows_of(batches: &[RecordBatch]) -> usize {
        batches.iter().map(RecordBatch::num_rows).sum()
    }
}
