//! `fhirflow catalog sync`: the AWS Glue Data Catalog over the lake's S3
//! layers, so that Athena queries them under the same names `fhirflow sql`
//! uses locally.
//!
//! | database                      | tables                                           |
//! | ----------------------------- | ------------------------------------------------ |
//! | `external_fhir_raw`           | one per resource type (NDJSON, JSON SerDe)        |
//! | `external_fhir_curated`       | one per resource type (NDJSON, JSON SerDe)        |
//! | `fhir_import_metadata_<env>`  | `import_jobs`, `import_errors`, `import_metrics` |
//!
//! The raw and curated layers keep every resource type of a partition in one
//! folder, and the metadata layer may hold a killed run's files until the next
//! run cleans them. So a Glue partition does not point at a layer folder: it
//! points at a folder of the catalog (`metadata/_catalog/…`) holding a
//! `symlink.txt` (Hive's SymlinkTextInputFormat, which Athena reads) that
//! lists exactly the partition's files of that type, of committed runs only.
//!
//! A sync creates what is missing and updates what changed, so running it
//! again is harmless; the partitions registered are remembered
//! (`metadata/_catalog/<env>.json`) and only new ones are sent to Glue.

use std::collections::{BTreeMap, BTreeSet};

use arrow::datatypes::DataType;
use aws_sdk_glue::types::{
    Column, DatabaseInput, PartitionInput, SerDeInfo, StorageDescriptor, TableInput,
};
use aws_sdk_glue::Client;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use fhirflow::catalog::{metadata_database, on_s3, SyncReport, CURATED_DATABASE, RAW_DATABASE};
use fhirflow::error::{Error, Result};
use fhirflow::layout::{parse_partition, Layer, MetadataTable, RawFileName};
use fhirflow::storage::{Lake, Root};

const STAGE: &str = "catalog";
const SYMLINK_INPUT: &str = "org.apache.hadoop.hive.ql.io.SymlinkTextInputFormat";
const TEXT_OUTPUT: &str = "org.apache.hadoop.hive.ql.io.HiveIgnoreKeyTextOutputFormat";
const JSON_SERDE: &str = "org.openx.data.jsonserde.JsonSerDe";
const PARQUET_SERDE: &str = "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe";
const PARQUET_OUTPUT: &str = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat";

/// One Glue table and its partitions: partition values → the files.
struct TableSpec {
    database: String,
    name: String,
    columns: Vec<(String, String)>,
    partition_keys: Vec<&'static str>,
    parquet: bool,
    partitions: BTreeMap<Vec<String>, Vec<String>>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SyncState {
    /// "database.table" → registered partition values.
    registered: BTreeMap<String, BTreeSet<Vec<String>>>,
}

pub async fn sync(lake: &Lake, settings: &fhirflow::settings::Settings) -> Result<SyncReport> {
    if !on_s3(lake) {
        return Err(Error::Config(
            "catalog sync: Glue describes S3 data, and this lake is not on s3:// \
             (locally, `fhirflow sql` already shows the same names)"
                .into(),
        ));
    }
    let env = &settings.glue.env;
    let g = &settings.glue;
    let config =
        crate::sdk::sdk_config(settings, g.endpoint.as_deref(), g.region.as_deref(), 8).await;
    let client = Client::from_conf(
        aws_sdk_glue::config::Builder::from(&config)
            .interceptor(crate::sdk::LogRetries)
            .build(),
    );
    let mut report = SyncReport::default();
    let meta_db = metadata_database(env);
    for db in [RAW_DATABASE, CURATED_DATABASE, meta_db.as_str()] {
        ensure_database(&client, g.catalog_id.as_deref(), db).await?;
        report.databases.push(db.to_string());
    }

    let specs = table_specs(lake, &meta_db).await?;
    let state_path = lake
        .metadata
        .paths
        .layer(Layer::Metadata)
        .join("_catalog")
        .join(format!("{env}.json"));
    let mut state: SyncState = match lake.metadata.get_bytes(STAGE, &state_path).await? {
        Some(b) => serde_json::from_slice(&b).map_err(|e| Error::Corrupt {
            stage: STAGE,
            location: lake.metadata.url_of(&state_path),
            detail: format!(
                "not a catalog sync state ({e}); delete it to register every partition again"
            ),
        })?,
        None => SyncState::default(),
    };
    for spec in &specs {
        let location = symlink_dir(&lake.metadata, &spec.database, &spec.name, &[]);
        let input = table_input(spec, &lake.metadata.url_of(&location))?;
        let exists = client
            .get_table()
            .set_catalog_id(g.catalog_id.clone())
            .database_name(&spec.database)
            .name(&spec.name)
            .send()
            .await;
        match exists {
            Ok(_) => {
                client
                    .update_table()
                    .set_catalog_id(g.catalog_id.clone())
                    .database_name(&spec.database)
                    .table_input(input)
                    .send()
                    .await
                    .map_err(|e| {
                        crate::aws_error(
                            STAGE,
                            format!("UpdateTable {}.{}", spec.database, spec.name),
                            e,
                        )
                    })?;
                report.tables_updated += 1;
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_entity_not_found_exception()) =>
            {
                client
                    .create_table()
                    .set_catalog_id(g.catalog_id.clone())
                    .database_name(&spec.database)
                    .table_input(input)
                    .send()
                    .await
                    .map_err(|e| {
                        crate::aws_error(
                            STAGE,
                            format!("CreateTable {}.{}", spec.database, spec.name),
                            e,
                        )
                    })?;
                report.tables_created += 1;
            }
            Err(e) => {
                return Err(crate::aws_error(
                    STAGE,
                    format!("GetTable {}.{}", spec.database, spec.name),
                    e,
                ))
            }
        }

        // The symlink files: rewritten when the partition's files changed.
        let key = format!("{}.{}", spec.database, spec.name);
        let mut new = Vec::new();
        for (values, files) in &spec.partitions {
            let dir = symlink_dir(
                &lake.metadata,
                &spec.database,
                &spec.name,
                &pairs(spec, values),
            );
            let path = dir.clone().join("symlink.txt");
            let text = files.iter().map(|f| format!("{f}\n")).collect::<String>();
            let old = lake.metadata.get_bytes(STAGE, &path).await?;
            if old.as_deref() != Some(text.as_bytes()) {
                lake.metadata.put(STAGE, &path, text.into_bytes()).await?;
            }
            let known = state
                .registered
                .get(&key)
                .is_some_and(|s| s.contains(values));
            if !known {
                new.push((values.clone(), lake.metadata.url_of(&dir) + "/"));
            }
        }
        for chunk in new.chunks(100) {
            let inputs = chunk
                .iter()
                .map(|(values, location)| {
                    PartitionInput::builder()
                        .set_values(Some(values.clone()))
                        .storage_descriptor(storage(spec, location, Vec::new()))
                        .build()
                })
                .collect::<Vec<_>>();
            let out = client
                .batch_create_partition()
                .set_catalog_id(g.catalog_id.clone())
                .database_name(&spec.database)
                .table_name(&spec.name)
                .set_partition_input_list(Some(inputs))
                .send()
                .await
                .map_err(|e| crate::aws_error(STAGE, format!("BatchCreatePartition {key}"), e))?;
            let mut failed = BTreeSet::new();
            for err in out.errors() {
                let already = err
                    .error_detail()
                    .and_then(|d| d.error_code())
                    .is_some_and(|c| c == "AlreadyExistsException");
                if !already {
                    failed.insert(err.partition_values().to_vec());
                    let detail = err.error_detail();
                    return Err(Error::Aws {
                        stage: STAGE,
                        operation: format!("BatchCreatePartition {key}"),
                        message: format!(
                            "partition {:?}: {}: {}",
                            err.partition_values(),
                            detail.and_then(|d| d.error_code()).unwrap_or("error"),
                            detail.and_then(|d| d.error_message()).unwrap_or("")
                        ),
                    });
                }
            }
            let set = state.registered.entry(key.clone()).or_default();
            for (values, _) in chunk {
                if !failed.contains(values) {
                    set.insert(values.clone());
                    report.partitions_added += 1;
                }
            }
        }
    }
    let bytes = serde_json::to_vec_pretty(&state).expect("state serialises");
    lake.metadata.put(STAGE, &state_path, bytes).await?;
    Ok(report)
}

async fn ensure_database(client: &Client, catalog_id: Option<&str>, name: &str) -> Result<()> {
    let got = client
        .get_database()
        .set_catalog_id(catalog_id.map(str::to_string))
        .name(name)
        .send()
        .await;
    match got {
        Ok(_) => Ok(()),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_entity_not_found_exception()) =>
        {
            let input = DatabaseInput::builder()
                .name(name)
                .description("FHIR data of fhirflow's lake")
                .build()
                .map_err(|e| Error::Config(format!("Glue database {name}: {e}")))?;
            match client
                .create_database()
                .set_catalog_id(catalog_id.map(str::to_string))
                .database_input(input)
                .send()
                .await
            {
                Ok(_) => Ok(()),
                // Another sync made it in between.
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_already_exists_exception()) =>
                {
                    Ok(())
                }
                Err(e) => Err(crate::aws_error(STAGE, format!("CreateDatabase {name}"), e)),
            }
        }
        Err(e) => Err(crate::aws_error(STAGE, format!("GetDatabase {name}"), e)),
    }
}

/// `metadata/_catalog/<database>/<table>/<k=v>/…`.
fn symlink_dir(root: &Root, database: &str, table: &str, pairs: &[(String, String)]) -> Path {
    let mut p = root
        .paths
        .layer(Layer::Metadata)
        .join("_catalog")
        .join(database)
        .join(table);
    for (k, v) in pairs {
        p = p.join(format!("{k}={v}"));
    }
    p
}

fn pairs(spec: &TableSpec, values: &[String]) -> Vec<(String, String)> {
    spec.partition_keys
        .iter()
        .zip(values)
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn storage(spec: &TableSpec, location: &str, columns: Vec<Column>) -> StorageDescriptor {
    let serde = if spec.parquet {
        SerDeInfo::builder()
            .serialization_library(PARQUET_SERDE)
            .build()
    } else {
        SerDeInfo::builder()
            .serialization_library(JSON_SERDE)
            .parameters("case.insensitive", "true")
            // A raw line that is not JSON is a NULL row, not a failed query.
            .parameters("ignore.malformed.json", "true")
            .build()
    };
    StorageDescriptor::builder()
        .set_columns((!columns.is_empty()).then_some(columns))
        .location(location)
        .input_format(SYMLINK_INPUT)
        .output_format(if spec.parquet {
            PARQUET_OUTPUT
        } else {
            TEXT_OUTPUT
        })
        .serde_info(serde)
        .build()
}

fn column(name: &str, ty: &str) -> Result<Column> {
    Column::builder()
        .name(name)
        .r#type(ty)
        .build()
        .map_err(|e| Error::Config(format!("Glue column {name}: {e}")))
}

fn table_input(spec: &TableSpec, location: &str) -> Result<TableInput> {
    let columns = spec
        .columns
        .iter()
        .map(|(n, t)| column(n, t))
        .collect::<Result<Vec<_>>>()?;
    let keys = spec
        .partition_keys
        .iter()
        .map(|k| column(k, "string"))
        .collect::<Result<Vec<_>>>()?;
    TableInput::builder()
        .name(&spec.name)
        .table_type("EXTERNAL_TABLE")
        .parameters(
            "classification",
            if spec.parquet { "parquet" } else { "json" },
        )
        .parameters("EXTERNAL", "TRUE")
        .parameters(
            "fhirflow.layout",
            "symlink partitions under metadata/_catalog",
        )
        .set_partition_keys(Some(keys))
        .storage_descriptor(storage(spec, location, columns))
        .build()
        .map_err(|e| Error::Config(format!("Glue table {}: {e}", spec.name)))
}

/// The columns of a resource type's table: its top-level elements (as
/// strings: Athena's JSON SerDe gives objects and arrays as their JSON text,
/// ready for `json_extract`).
fn resource_columns(resource_type: &str) -> Vec<(String, String)> {
    let mut seen = BTreeSet::new();
    let mut out = vec![("resourcetype".to_string(), "string".to_string())];
    seen.insert("resourcetype".to_string());
    if let Some(t) = fhirflow_fhir::model_types::resource_type_id(resource_type.as_bytes()) {
        for e in fhirflow_fhir::model::TYPES[t as usize].elems {
            let name = e.key.to_ascii_lowercase();
            if !e.key.starts_with('_') && seen.insert(name.clone()) {
                out.push((name, "string".into()));
            }
        }
    }
    out
}

fn hive_type(t: &DataType) -> &'static str {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "string",
        DataType::Boolean => "boolean",
        DataType::Float32 | DataType::Float64 => "double",
        DataType::Date32 | DataType::Date64 => "date",
        DataType::Timestamp(..) => "timestamp",
        DataType::Int8 | DataType::Int16 | DataType::Int32 => "int",
        _ => "bigint",
    }
}

/// Every table the lake's committed files describe.
async fn table_specs(lake: &Lake, meta_db: &str) -> Result<Vec<TableSpec>> {
    let mut specs = Vec::new();

    // raw: every file whose name gives a resource type.
    let mut raw: BTreeMap<&'static str, BTreeMap<Vec<String>, Vec<String>>> = BTreeMap::new();
    let rbase = lake.raw.paths.layer(Layer::Raw);
    for obj in lake.raw.list(STAGE, &rbase).await? {
        let Some(p) = parse_partition(&rbase, &obj.location) else {
            continue;
        };
        let (Some(t), Some(s), Some(d)) = (&p.tenant, &p.source_system, p.date) else {
            continue;
        };
        let Some(name) = RawFileName::parse(&p.file_name) else {
            continue;
        };
        raw.entry(name.resource_type)
            .or_default()
            .entry(vec![t.to_string(), s.to_string(), d.to_string()])
            .or_default()
            .push(lake.raw.url_of(&obj.location));
    }
    for (ty, partitions) in raw {
        specs.push(TableSpec {
            database: RAW_DATABASE.into(),
            name: ty.to_ascii_lowercase(),
            columns: resource_columns(ty),
            partition_keys: vec!["tenant_guid", "source_system", "import_date"],
            parquet: false,
            partitions,
        });
    }

    // curated and metadata: what committed runs published.
    let visible =
        fhirflow::commit::visible(lake, &fhirflow::commit::PartitionFilter::default()).await?;
    let mut curated: BTreeMap<&'static str, BTreeMap<Vec<String>, Vec<String>>> = BTreeMap::new();
    // Athena reads the visible folder's names (stable across re-curates,
    // while a run's own parts are removed two commits later).
    let folder =
        |p: &fhirflow::commit::CuratedPart| lake.curated.paths.curated_partition(&p.tenant, p.date);
    for part in &visible.curated {
        let name = part
            .object
            .name
            .as_deref()
            .expect("visible parts have names");
        curated
            .entry(part.resource_type)
            .or_default()
            .entry(vec![part.tenant.to_string(), part.date.to_string()])
            .or_default()
            .push(lake.curated.url_of(&folder(part).join(name)));
    }
    for (ty, partitions) in curated {
        specs.push(TableSpec {
            database: CURATED_DATABASE.into(),
            name: ty.to_ascii_lowercase(),
            columns: resource_columns(ty),
            partition_keys: vec!["tenant_guid", "import_date"],
            parquet: false,
            partitions,
        });
    }
    let mbase = lake.metadata.paths.layer(Layer::Metadata);
    // `<table>`: each partition's latest run of each stage; `<table>_history`: every run.
    for (table, suffix) in MetadataTable::ALL
        .into_iter()
        .flat_map(|t| [(t, ""), (t, "_history")])
    {
        let mut partitions: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
        let tbase = mbase.clone().join(table.name());
        let files = if suffix.is_empty() {
            &visible.metadata[table.name()]
        } else {
            &visible.metadata_history[table.name()]
        };
        for path in files {
            let Some(p) = parse_partition(&tbase, path) else {
                continue;
            };
            if let (Some(t), Some(d)) = (&p.tenant, p.date) {
                partitions
                    .entry(vec![t.to_string(), d.to_string()])
                    .or_default()
                    .push(lake.metadata.url_of(path));
            }
        }
        // The partition keys are the files' tenant_guid and import_date
        // columns: Glue keeps them as keys only.
        let columns = fhirflow::metadata::schema(table)
            .fields()
            .iter()
            .filter(|f| !matches!(f.name().as_str(), "tenant_guid" | "import_date"))
            .map(|f| (f.name().clone(), hive_type(f.data_type()).to_string()))
            .collect();
        specs.push(TableSpec {
            database: meta_db.to_string(),
            name: format!("{}{suffix}", table.name()),
            columns,
            partition_keys: vec!["tenant_guid", "import_date"],
            parquet: true,
            partitions,
        });
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_tables_have_the_type_elements_once() {
        let cols = resource_columns("Observation");
        let names: Vec<&str> = cols.iter().map(|c| c.0.as_str()).collect();
        assert!(
            names.contains(&"id") && names.contains(&"status") && names.contains(&"valuequantity")
        );
        let unique: BTreeSet<&&str> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
        assert!(!names.iter().any(|n| n.starts_with('_')));
    }
}
