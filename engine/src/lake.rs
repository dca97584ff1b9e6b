//! The local lake: Apache Iceberg tables, one per resource type, in a SQL
//! catalog on SQLite, inside the lake (`iceberg/catalog.db`,
//! `iceberg/warehouse/`). It is the embedded stand-in for HealthLake's own
//! Iceberg catalog: `fhirflow import --target local` appends a curated
//! partition to it, `fhirflow sql` reads it as `lake.<type>`.
//!
//! Each table is partitioned by tenant (identity) and holds the curated line
//! as it is plus the key columns. Rows are written through iceberg's own
//! Parquet writers in batches built from the table's schema, for one tenant's
//! partition key at a time, and committed with one `fast_append` per table and
//! import: one atomic snapshot whose summary names the import job, the tenant,
//! the date and the curate run it came from. A retried import finds that
//! snapshot and appends nothing twice.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Date32Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use iceberg::arrow::schema_to_arrow_schema;
use iceberg::io::LocalFsStorageFactory;
use iceberg::spec::{
    DataFileFormat, Literal, NestedField, PartitionKey, PrimitiveType, Schema, Struct, Transform,
    Type, UnboundPartitionSpec,
};
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::location_generator::{
    DefaultFileNameGenerator, DefaultLocationGenerator,
};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::{IcebergWriter, IcebergWriterBuilder};
use iceberg::{Catalog, CatalogBuilder, NamespaceIdent, TableCreation, TableIdent};
use iceberg_catalog_sql::{SqlBindStyle, SqlCatalog, SqlCatalogBuilder};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::curate::parse::Keys;
use crate::error::{Error, Result};
use crate::layout::{ImportDate, TenantGuid};
use crate::storage::Root;

const STAGE: &str = "import";
/// The Iceberg namespace of every table.
pub const NAMESPACE: &str = "fhir";
const CATALOG_NAME: &str = "fhirflow";

/// Snapshot summary keys that tie a snapshot to the import that made it.
pub const PROP_JOB: &str = "fhirflow.job-id";
pub const PROP_TENANT: &str = "fhirflow.tenant";
pub const PROP_DATE: &str = "fhirflow.import-date";
pub const PROP_CURATE_RUN: &str = "fhirflow.curate-run";
/// The curate run's records the import left out: identical to, or older
/// than, what the lake held (`import::ledger`).
pub const PROP_UNCHANGED: &str = "fhirflow.records-unchanged";
pub const PROP_STALE: &str = "fhirflow.records-stale";
/// Deletions the import applied (tombstone rows, counted in `added-records`
/// too) and those of resources the lake did not hold.
pub const PROP_DELETED: &str = "fhirflow.deletions-applied";
pub const PROP_ABSENT: &str = "fhirflow.deletions-absent";

/// The columns of every lake table, in order.
pub const COLUMNS: [&str; 9] = [
    "tenant_guid",
    "id",
    "resource_type",
    "version_id",
    "last_updated",
    "import_date",
    "job_id",
    "imported_at",
    "resource",
];

/// The local lake's catalog.
pub struct LocalLake {
    catalog: Arc<SqlCatalog>,
    namespace: NamespaceIdent,
}

/// What one import wrote into one table.
#[derive(Debug, Clone)]
pub struct Appended {
    pub resource_type: String,
    pub snapshot_id: i64,
    /// Resources appended (tombstones not counted).
    pub rows: u64,
    pub unchanged: u64,
    pub stale: u64,
    pub deleted: u64,
    pub absent: u64,
}

/// What an import left out of a table: records unchanged or stale, and
/// deletions of resources the lake did not hold.
#[derive(Debug, Clone, Copy, Default)]
pub struct LeftOut {
    pub unchanged: u64,
    pub stale: u64,
    pub absent: u64,
}

impl LocalLake {
    /// Why the local lake cannot live under `root`, if it cannot: its catalog
    /// is SQLite, which needs a file system.
    pub fn unsupported(root: &Root) -> Option<String> {
        (root.store_url.scheme() != "file").then(|| {
            format!(
                "the local lake needs a local lake root, not {}",
                root.store_url
            )
        })
    }

    /// Opens the lake's catalog; `create` makes it when missing, otherwise a
    /// lake that has none gives `None`. The layer root must be a local folder
    /// ([`LocalLake::unsupported`]).
    pub async fn open(root: &Root, create: bool) -> Result<Option<LocalLake>> {
        if let Some(why) = Self::unsupported(root) {
            if !create {
                return Ok(None);
            }
            return Err(Error::Config(format!(
                "{why}; import into HealthLake (--target healthlake) from an S3 lake, \
                 or stop after curate (--no-import)"
            )));
        }
        let dir = std::path::PathBuf::from(format!("/{}", root.paths.iceberg()));
        let db = dir.join("catalog.db");
        if !create && !db.is_file() {
            return Ok(None);
        }
        let warehouse = dir.join("warehouse");
        std::fs::create_dir_all(&warehouse).map_err(|e| Error::Io {
            stage: STAGE,
            location: warehouse.display().to_string(),
            source: e,
        })?;
        let props = HashMap::from([
            (
                "uri".to_string(),
                format!("sqlite:{}?mode=rwc", db.display()),
            ),
            (
                "warehouse".to_string(),
                format!("file://{}", warehouse.display()),
            ),
            (
                "sql_bind_style".to_string(),
                SqlBindStyle::QMark.to_string(),
            ),
            // One writer at a time; SQLite serialises anyway.
            ("pool.max-connections".to_string(), "1".to_string()),
        ]);
        let catalog = SqlCatalogBuilder::default()
            .with_storage_factory(Arc::new(LocalFsStorageFactory))
            .load(CATALOG_NAME, props)
            .await
            .map_err(|e| Error::lake(STAGE, format!("open catalog {}", db.display()), e))?;
        let namespace = NamespaceIdent::new(NAMESPACE.to_string());
        let exists = catalog
            .namespace_exists(&namespace)
            .await
            .map_err(|e| Error::lake(STAGE, "namespace", e))?;
        if !exists {
            catalog
                .create_namespace(&namespace, HashMap::new())
                .await
                .map_err(|e| Error::lake(STAGE, "create namespace", e))?;
        }
        Ok(Some(LocalLake {
            catalog: Arc::new(catalog),
            namespace,
        }))
    }

    /// Every table: resource type (as named in the catalog, lower case) and
    /// the table at its current snapshot.
    pub async fn tables(&self) -> Result<Vec<(String, Table)>> {
        let idents = self
            .catalog
            .list_tables(&self.namespace)
            .await
            .map_err(|e| Error::lake(STAGE, "list tables", e))?;
        let mut out = Vec::new();
        for ident in idents {
            let t = self
                .catalog
                .load_table(&ident)
                .await
                .map_err(|e| Error::lake(STAGE, format!("load {}", ident.name()), e))?;
            out.push((ident.name().to_string(), t));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn table(&self, resource_type: &str) -> Result<Table> {
        let ident = TableIdent::new(self.namespace.clone(), resource_type.to_ascii_lowercase());
        let exists = self
            .catalog
            .table_exists(&ident)
            .await
            .map_err(|e| Error::lake(STAGE, format!("table {}", ident.name()), e))?;
        if exists {
            return self
                .catalog
                .load_table(&ident)
                .await
                .map_err(|e| Error::lake(STAGE, format!("load {}", ident.name()), e));
        }
        let schema = table_schema().map_err(|e| Error::lake(STAGE, "schema", e))?;
        let spec = UnboundPartitionSpec::builder()
            .add_partition_field(1, "tenant_guid", Transform::Identity)
            .map_err(|e| Error::lake(STAGE, "partition spec", e))?
            .build();
        let creation = TableCreation::builder()
            .name(ident.name().to_string())
            .schema(schema)
            .partition_spec(spec)
            .properties([(
                "write.parquet.compression-codec".to_string(),
                "snappy".to_string(),
            )])
            .build();
        self.catalog
            .create_table(&self.namespace, creation)
            .await
            .map_err(|e| Error::lake(STAGE, format!("create {}", ident.name()), e))
    }

    /// The snapshot a previous import of this curate run made in the
    /// resource type's table, if any.
    pub async fn already_imported(
        &self,
        resource_type: &str,
        tenant: &TenantGuid,
        curate_run: &str,
    ) -> Result<Option<Appended>> {
        let table = self.table(resource_type).await?;
        let found = table.metadata().snapshots().find(|s| {
            let p = &s.summary().additional_properties;
            p.get(PROP_CURATE_RUN).map(String::as_str) == Some(curate_run)
                && p.get(PROP_TENANT).map(String::as_str) == Some(tenant.as_str())
        });
        Ok(found.map(|s| {
            let p = &s.summary().additional_properties;
            let count = |k: &str| p.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            Appended {
                resource_type: resource_type.to_string(),
                snapshot_id: s.snapshot_id(),
                rows: count("added-records").saturating_sub(count(PROP_DELETED)),
                unchanged: count(PROP_UNCHANGED),
                stale: count(PROP_STALE),
                deleted: count(PROP_DELETED),
                absent: count(PROP_ABSENT),
            }
        }))
    }

    /// Starts appending one resource type of one curated partition: rows are
    /// written as they come, and become visible at [`Appender::commit`].
    pub async fn appender(&self, resource_type: &str, import: &ImportRun) -> Result<Appender> {
        let table = self.table(resource_type).await?;
        let name = table.identifier().name().to_string();
        let err = |what: &str, e| Error::lake(STAGE, format!("{name}: {what}"), e);
        let metadata = table.metadata();
        let schema = metadata.current_schema().clone();
        let arrow_schema = Arc::new(schema_to_arrow_schema(&schema).map_err(|e| err("schema", e))?);
        // Every row of an import has the import's tenant: one partition key.
        let key = PartitionKey::new(
            metadata.default_partition_spec().as_ref().clone(),
            schema.clone(),
            Struct::from_iter([Some(Literal::string(import.tenant.as_str()))]),
        );
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let rolling = RollingFileWriterBuilder::new_with_default_file_size(
            ParquetWriterBuilder::new(props, schema),
            table.file_io().clone(),
            DefaultLocationGenerator::new(metadata).map_err(|e| err("location", e))?,
            DefaultFileNameGenerator::new(import.job_id.to_string(), None, DataFileFormat::Parquet),
        );
        let writer = DataFileWriterBuilder::new(rolling)
            .build(Some(key))
            .await
            .map_err(|e| err("writer", e))?;
        Ok(Appender {
            catalog: self.catalog.clone(),
            table,
            writer: Box::new(writer),
            schema: arrow_schema,
            batch: Batch::new(import.batch_rows),
            batch_rows: import.batch_rows.max(1),
            rows: 0,
            deletions: 0,
            resource_type: resource_type.to_string(),
            fixed: Fixed {
                tenant: import.tenant.to_string(),
                date: import.date.days_since_epoch(),
                job_id: import.job_id.to_string(),
                imported_at: import.imported_at_micros,
            },
            summary: HashMap::from([
                (PROP_JOB.to_string(), import.job_id.to_string()),
                (PROP_TENANT.to_string(), import.tenant.to_string()),
                (PROP_DATE.to_string(), import.date.to_string()),
                (PROP_CURATE_RUN.to_string(), import.curate_run.to_string()),
            ]),
        })
    }
}

/// The import an append belongs to.
pub struct ImportRun {
    pub tenant: TenantGuid,
    pub date: ImportDate,
    pub job_id: String,
    pub curate_run: String,
    pub imported_at_micros: i64,
    pub batch_rows: usize,
}

/// Rows of one resource type on their way into one snapshot.
pub struct Appender {
    catalog: Arc<SqlCatalog>,
    table: Table,
    writer: Box<dyn IcebergWriter>,
    schema: arrow::datatypes::SchemaRef,
    batch: Batch,
    batch_rows: usize,
    rows: u64,
    deletions: u64,
    resource_type: String,
    fixed: Fixed,
    summary: HashMap<String, String>,
}

impl Appender {
    fn err(&self, what: &str, e: iceberg::Error) -> Error {
        Error::lake(
            STAGE,
            format!("{}: {what}", self.table.identifier().name()),
            e,
        )
    }

    /// Adds the tombstone of resource `id`: a row with an empty `resource`
    /// and no version, which hides every version imported up to it from
    /// `lake.<type>` (`sql::lake_tables`) and stays in the history.
    pub async fn push_deletion(&mut self, id: &str) -> Result<()> {
        let resource_type = self.resource_type.clone();
        let row = Keys {
            text: "",
            resource_type: crate::fhir::resource_type(&resource_type).unwrap_or("Resource"),
            id: id.into(),
            version_id: None,
            last_updated: None,
        };
        self.batch.push(&self.fixed, &resource_type, &row);
        self.deletions += 1;
        if self.batch.len >= self.batch_rows {
            self.flush().await?;
        }
        Ok(())
    }

    /// Adds one curated resource (its text and the keys curation read).
    pub async fn push(&mut self, row: &Keys<'_>) -> Result<()> {
        self.batch.push(&self.fixed, &self.resource_type, row);
        self.rows += 1;
        if self.batch.len >= self.batch_rows {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        let b = self
            .batch
            .finish(&self.schema)
            .map_err(|e| self.err("batch", e))?;
        let written = self.writer.write(b).await;
        written.map_err(|e| self.err("write", e))
    }

    /// Closes the data files and commits them as one snapshot (with no data
    /// file when every record was left out: the snapshot still records the
    /// curate run and what was left out).
    pub async fn commit(mut self, left_out: LeftOut) -> Result<Appended> {
        for (k, v) in [
            (PROP_UNCHANGED, left_out.unchanged),
            (PROP_STALE, left_out.stale),
            (PROP_DELETED, self.deletions),
            (PROP_ABSENT, left_out.absent),
        ] {
            self.summary.insert(k.to_string(), v.to_string());
        }
        if self.batch.len > 0 {
            self.flush().await?;
        }
        let closed = self.writer.close().await;
        let files = closed.map_err(|e| self.err("close", e))?;
        let tx = Transaction::new(&self.table);
        let tx = tx
            .fast_append()
            .add_data_files(files)
            .set_snapshot_properties(std::mem::take(&mut self.summary))
            .apply(tx)
            .map_err(|e| self.err("append", e))?;
        let committed = tx.commit(self.catalog.as_ref()).await;
        let table = committed.map_err(|e| self.err("commit", e))?;
        let snapshot_id = table
            .metadata()
            .current_snapshot()
            .map(|s| s.snapshot_id())
            .unwrap_or_default();
        Ok(Appended {
            resource_type: self.resource_type,
            snapshot_id,
            rows: self.rows,
            unchanged: left_out.unchanged,
            stale: left_out.stale,
            deleted: self.deletions,
            absent: left_out.absent,
        })
    }
}

/// The Iceberg schema of every lake table (field ids 1..=9 in [`COLUMNS`]
/// order; `tenant_guid` is the partition source).
fn table_schema() -> iceberg::Result<Schema> {
    use PrimitiveType as P;
    let t = |p| Type::Primitive(p);
    Schema::builder()
        .with_fields(vec![
            NestedField::required(1, COLUMNS[0], t(P::String)).into(),
            NestedField::required(2, COLUMNS[1], t(P::String)).into(),
            NestedField::required(3, COLUMNS[2], t(P::String)).into(),
            NestedField::optional(4, COLUMNS[3], t(P::String)).into(),
            NestedField::optional(5, COLUMNS[4], t(P::Timestamptz)).into(),
            NestedField::required(6, COLUMNS[5], t(P::Date)).into(),
            NestedField::required(7, COLUMNS[6], t(P::String)).into(),
            NestedField::required(8, COLUMNS[7], t(P::Timestamptz)).into(),
            NestedField::required(9, COLUMNS[8], t(P::String)).into(),
        ])
        .build()
}

/// The values every row of one append shares.
struct Fixed {
    tenant: String,
    date: i32,
    job_id: String,
    imported_at: i64,
}

/// Column builders for one batch, in [`COLUMNS`] order.
struct Batch {
    len: usize,
    tenant: StringBuilder,
    id: StringBuilder,
    resource_type: StringBuilder,
    version_id: StringBuilder,
    last_updated: TimestampMicrosecondBuilder,
    import_date: Date32Builder,
    job_id: StringBuilder,
    imported_at: TimestampMicrosecondBuilder,
    resource: StringBuilder,
}

impl Batch {
    fn new(capacity: usize) -> Self {
        Batch {
            len: 0,
            tenant: StringBuilder::with_capacity(capacity, capacity * 36),
            id: StringBuilder::with_capacity(capacity, capacity * 36),
            resource_type: StringBuilder::new(),
            version_id: StringBuilder::new(),
            last_updated: TimestampMicrosecondBuilder::with_capacity(capacity),
            import_date: Date32Builder::with_capacity(capacity),
            job_id: StringBuilder::new(),
            imported_at: TimestampMicrosecondBuilder::with_capacity(capacity),
            resource: StringBuilder::new(),
        }
    }

    fn push(&mut self, fixed: &Fixed, resource_type: &str, row: &Keys) {
        self.len += 1;
        self.tenant.append_value(&fixed.tenant);
        self.id.append_value(&row.id);
        self.resource_type.append_value(resource_type);
        self.version_id.append_option(row.version_id.as_deref());
        self.last_updated.append_option(row.last_updated);
        self.import_date.append_value(fixed.date);
        self.job_id.append_value(&fixed.job_id);
        self.imported_at.append_value(fixed.imported_at);
        self.resource.append_value(row.text);
    }

    /// The batch in exactly the table's Arrow schema (field ids and
    /// time zones included), and the builders emptied.
    fn finish(&mut self, schema: &arrow::datatypes::SchemaRef) -> iceberg::Result<RecordBatch> {
        let utc = |b: &mut TimestampMicrosecondBuilder| -> ArrayRef {
            Arc::new(b.finish().with_timezone("+00:00"))
        };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.tenant.finish()),
            Arc::new(self.id.finish()),
            Arc::new(self.resource_type.finish()),
            Arc::new(self.version_id.finish()),
            utc(&mut self.last_updated),
            Arc::new(self.import_date.finish()),
            Arc::new(self.job_id.finish()),
            utc(&mut self.imported_at),
            Arc::new(self.resource.finish()),
        ];
        self.len = 0;
        RecordBatch::try_new(schema.clone(), columns).map_err(|e| {
            iceberg::Error::new(iceberg::ErrorKind::DataInvalid, "lake batch").with_source(e)
        })
    }
}
