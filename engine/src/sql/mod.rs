//! One DataFusion session with every layer registered and the UDF library:
//!
//! | schema     | tables                                                    |
//! | ---------- | --------------------------------------------------------- |
//! | `raw`      | one per resource type present, e.g. `raw.patient`        |
//! | `curated`  | one per resource type of the committed partitions         |
//! | `metadata` | `import_jobs`, `import_errors`, `import_metrics` (each partition's latest run of each stage), and `…_history` (every run) |
//! | `lake`, `lake_history` | the local Iceberg lake (see [`lake_tables`])  |
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
use datafusion::catalog::{MemorySchemaProvider, TableProvider};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

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
    Ok(ctx)
}

/// Runs `sql` in the rules' dialect ([`crate::rules::dialect`]), so that
/// a rule's SQL runs here as it is.
pub async fn query(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
    let q = |e| Error::query(STAGE, "query", e);
    let plan = crate::rules::dialect::plan(&ctx.state(), sql)
        .await
        .map_err(q)?;
    ctx.execute_logical_plan(plan)
        .await
        .map_err(q)?
        .collect()
        .await
        .map_err(q)
}

fn metadata_table(
    root: &Root,
    table: MetadataTable,
    files: &[object_store::path::Path],
) -> Result<Arc<dyn TableProvider>> {
    let schema = metadata::schema(table);
    let q = |e| Error::query(STAGE, format!("metadata.{}", table.name()), e);
    if files.is_empty() {
        let empty: Vec<RecordBatch> = Vec::new();
        return Ok(Arc::new(MemTable::try_new(schema, vec![empty]).map_err(q)?));
    }
    let urls = files
        .iter()
        .map(|p| ListingTableUrl::parse(root.url_of(p)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(q)?;
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(schema);
    Ok(Arc::new(ListingTable::try_new(config).map_err(q)?))
}
