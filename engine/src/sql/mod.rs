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
//! metadata tables read the Parquet files of committed runs only. The same
//! tables also answer to the Glue catalog's names (`external_fhir_raw`,
//! `external_fhir_curated`, `fhir_import_metadata_<env>`), so a query written
//! for Athena runs here as it is.

pub mod lake_tables;
pub mod ndjson_table;

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::catalog::{MemorySchemaProvider, TableProvider};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

use crate::commit;
use crate::error::{Error, Result};
use crate::layout::{Layer, MetadataTable};
use crate::metadata;
use crate::model::{FileOrigin, Shape};
use crate::raw::LayerFile;
use crate::settings::Settings;
use crate::storage::{Lake, Root};
use ndjson_table::NdjsonTable;

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
    for schema in [
        "raw",
        "curated",
        "metadata",
        "lake",
        "lake_history",
        glue("raw"),
        glue("curated"),
        glue("metadata"),
    ] {
        catalog
            .register_schema(schema, Arc::new(MemorySchemaProvider::new()))
            .map_err(|e| Error::query(STAGE, "register schema", e))?;
    }
    // `schema.table`, and the same table under the schema's Glue name.
    let register = |name: String, table: Arc<dyn TableProvider>| {
        let (schema, t) = name.split_once('.').expect("schema.table");
        for full in [name.clone(), format!("{}.{t}", glue(schema))] {
            ctx.register_table(full.as_str(), table.clone())
                .map_err(|e| Error::query(STAGE, format!("register {full}"), e))?;
        }
        Ok::<(), Error>(())
    };

    // raw: every raw file whose name gives a resource type.
    let mut raw: BTreeMap<&'static str, Vec<LayerFile>> = BTreeMap::new();
    for file in crate::raw::list_files(&lake.raw, STAGE, &lake.raw.paths.layer(Layer::Raw)).await? {
        if let Some(ty) = file.file_type {
            raw.entry(ty).or_default().push(file);
        }
    }
    for (ty, files) in raw {
        let t = NdjsonTable::new(lake.raw.clone(), Shape::Raw, files, &settings.curate)
            .map_err(|e| Error::query(STAGE, "raw table", e))?;
        register(format!("raw.{}", ty.to_ascii_lowercase()), Arc::new(t))?;
    }

    // curated and metadata: only what committed runs published, resolved
    // through each partition's commit log (sizes from the records: no HEADs).
    let visible = commit::visible(lake, &commit::PartitionFilter::default()).await?;
    let mut curated: BTreeMap<&'static str, Vec<LayerFile>> = BTreeMap::new();
    for part in &visible.curated {
        curated.entry(part.resource_type).or_default().push(LayerFile {
            file_type: Some(part.resource_type),
            gzip: false,
            origin: FileOrigin {
                tenant: part.tenant.to_string(),
                source_system: None,
                import_date: part.date.days_since_epoch(),
                source_file: lake.curated.url_of(&part.object.location()),
            },
            meta: part.object.meta(),
        });
    }
    for (ty, files) in curated {
        let t = NdjsonTable::new(
            lake.curated.clone(),
            Shape::Curated,
            files,
            &settings.curate,
        )
        .map_err(|e| Error::query(STAGE, "curated table", e))?;
        register(format!("curated.{}", ty.to_ascii_lowercase()), Arc::new(t))?;
    }
    // `metadata.<table>`: each partition's latest run of each stage;
    // `metadata.<table>_history`: every committed run.
    for table in MetadataTable::ALL {
        for (suffix, files) in [
            ("", &visible.metadata[table.name()]),
            ("_history", &visible.metadata_history[table.name()]),
        ] {
            let provider = metadata_table(&lake.metadata, table, files)?;
            register(format!("metadata.{}{suffix}", table.name()), provider)?;
        }
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
