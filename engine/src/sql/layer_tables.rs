//! The `raw`, `curated` and `metadata` schemas of a session, resolved lazily:
//! a table lists and reads objects only when a query scans it, and then only
//! the partitions that the query's filters on `tenant_guid`, `source_system`
//! and `import_date` (`=`, `IN`, joined by `AND`) can match. A query about one
//! partition costs the same in a lake of one partition or of thousands.
//!
//! Every resource type of FHIR R4 is a table of `raw` and `curated`, so a
//! query names a type that has no data yet and gets no rows rather than an
//! error; `metadata` has each table and its `_history`.

use std::any::Any;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;

use crate::commit::{self, PartitionFilter};
use crate::layout::{ImportDate, Layer, MetadataTable, SourceSystem, TenantGuid};
use crate::model::{schema, FileOrigin, Shape};
use crate::raw::LayerFile;
use crate::settings::CurateSettings;
use crate::storage::Lake;

use super::ndjson_table::{partition_pushdown, NdjsonTable, TableFile};

const STAGE: &str = "sql";

/// One of the three layer schemas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Raw,
    Curated,
    Metadata,
}

#[derive(Debug)]
pub struct LayerSchema {
    lake: Lake,
    limits: CurateSettings,
    kind: Kind,
}

impl LayerSchema {
    pub fn new(lake: Lake, limits: CurateSettings, kind: Kind) -> Self {
        LayerSchema { lake, limits, kind }
    }

    fn lookup(&self, name: &str) -> Option<Target> {
        match self.kind {
            Kind::Metadata => {
                let (base, history) = match name.strip_suffix("_history") {
                    Some(b) => (b, true),
                    None => (name, false),
                };
                MetadataTable::ALL
                    .into_iter()
                    .find(|t| t.name() == base)
                    .map(|t| Target::Metadata(t, history))
            }
            Kind::Raw | Kind::Curated => crate::fhir::RESOURCE_TYPES
                .iter()
                .find(|t| t.eq_ignore_ascii_case(name))
                .map(|t| Target::Resources(t)),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Target {
    Resources(&'static str),
    Metadata(MetadataTable, bool),
}

#[async_trait]
impl SchemaProvider for LayerSchema {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn table_names(&self) -> Vec<String> {
        match self.kind {
            Kind::Metadata => MetadataTable::ALL
                .into_iter()
                .flat_map(|t| [t.name().to_string(), format!("{}_history", t.name())])
                .collect(),
            _ => crate::fhir::RESOURCE_TYPES
                .iter()
                .map(|t| t.to_ascii_lowercase())
                .collect(),
        }
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        Ok(self.lookup(name).map(|target| {
            Arc::new(LazyTable {
                lake: self.lake.clone(),
                limits: self.limits.clone(),
                kind: self.kind,
                target,
            }) as Arc<dyn TableProvider>
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.lookup(name).is_some()
    }
}

/// One table, whose files are found at scan time.
#[derive(Debug)]
struct LazyTable {
    lake: Lake,
    limits: CurateSettings,
    kind: Kind,
    target: Target,
}

impl LazyTable {
    fn shape(&self) -> Shape {
        if self.kind == Kind::Raw {
            Shape::Raw
        } else {
            Shape::Curated
        }
    }
}

#[async_trait]
impl TableProvider for LazyTable {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn schema(&self) -> SchemaRef {
        match self.target {
            Target::Metadata(t, _) => crate::metadata::schema(t),
            Target::Resources(_) => schema(self.shape()),
        }
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(partition_pushdown(filters))
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let wanted = Wanted::from_filters(filters);
        let external = |e: crate::error::Error| DataFusionError::External(Box::new(e));
        match self.target {
            Target::Metadata(table, history) => {
                let v = commit::visible(&self.lake, &wanted.partitions())
                    .await
                    .map_err(external)?;
                let files = if history {
                    &v.metadata_history[table.name()]
                } else {
                    &v.metadata[table.name()]
                };
                super::metadata_scan(state, &self.lake.metadata, table, files, projection, limit)
                    .await
                    .map_err(external)
            }
            Target::Resources(ty) => {
                let (root, files) = match self.kind {
                    Kind::Raw => (
                        self.lake.raw.clone(),
                        raw_files(&self.lake, ty, &wanted).await,
                    ),
                    _ => (
                        self.lake.curated.clone(),
                        curated_files(&self.lake, ty, &wanted).await,
                    ),
                };
                let files = files.map_err(external)?;
                NdjsonTable::new(root, self.shape(), files, &self.limits)?
                    .scan(state, projection, filters, limit)
                    .await
            }
        }
    }
}

/// The partition values a query's filters pin (None: any).
#[derive(Debug, Default)]
struct Wanted {
    tenants: Option<Vec<TenantGuid>>,
    systems: Option<Vec<SourceSystem>>,
    dates: Option<Vec<ImportDate>>,
}

impl Wanted {
    /// Reads `column = literal` and `column IN (literals)` from the filters
    /// (each filter is one conjunct; `AND` inside one is followed too). A
    /// literal that is not a valid partition value matches nothing here, as
    /// it matches no path.
    fn from_filters(filters: &[Expr]) -> Wanted {
        let mut w = Wanted::default();
        for f in filters {
            w.add(f);
        }
        w
    }

    fn add(&mut self, e: &Expr) {
        let (column, values): (&str, Vec<&ScalarValue>) = match e {
            Expr::BinaryExpr(b) if b.op == Operator::And => {
                self.add(&b.left);
                self.add(&b.right);
                return;
            }
            Expr::BinaryExpr(b) if b.op == Operator::Eq => match (&*b.left, &*b.right) {
                (Expr::Column(c), Expr::Literal(v, _)) | (Expr::Literal(v, _), Expr::Column(c)) => {
                    (c.name.as_str(), vec![v])
                }
                _ => return,
            },
            Expr::InList(l) if !l.negated => match &*l.expr {
                Expr::Column(c) => {
                    let vs: Option<Vec<&ScalarValue>> = l
                        .list
                        .iter()
                        .map(|v| match v {
                            Expr::Literal(v, _) => Some(v),
                            _ => None,
                        })
                        .collect();
                    match vs {
                        Some(vs) => (c.name.as_str(), vs),
                        None => return,
                    }
                }
                _ => return,
            },
            _ => return,
        };
        let text = |v: &ScalarValue| match v {
            ScalarValue::Utf8(Some(s))
            | ScalarValue::Utf8View(Some(s))
            | ScalarValue::LargeUtf8(Some(s)) => Some(s.clone()),
            _ => None,
        };
        fn narrow<T: PartialEq>(slot: &mut Option<Vec<T>>, new: Vec<T>) {
            *slot = Some(match slot.take() {
                None => new,
                Some(old) => old.into_iter().filter(|v| new.contains(v)).collect(),
            });
        }
        match column {
            "tenant_guid" => {
                let Some(ts) = values.iter().map(|v| text(v)).collect::<Option<Vec<_>>>() else {
                    return;
                };
                narrow(
                    &mut self.tenants,
                    ts.iter().filter_map(|t| t.parse().ok()).collect(),
                );
            }
            "source_system" => {
                let Some(ss) = values.iter().map(|v| text(v)).collect::<Option<Vec<_>>>() else {
                    return;
                };
                narrow(
                    &mut self.systems,
                    ss.iter().filter_map(|s| s.parse().ok()).collect(),
                );
            }
            "import_date" => {
                let ds: Option<Vec<ImportDate>> = values
                    .iter()
                    .map(|v| match v {
                        ScalarValue::Date32(Some(d)) => ImportDate::from_days_since_epoch(*d),
                        v => text(v).and_then(|t| t.parse().ok()),
                    })
                    .collect();
                if let Some(ds) = ds {
                    narrow(&mut self.dates, ds);
                }
            }
            _ => {}
        }
    }

    fn partitions(&self) -> PartitionFilter {
        PartitionFilter {
            tenants: self.tenants.clone(),
            dates: self.dates.clone(),
        }
    }
}

/// The raw files of `ty` in the partitions `w` allows, listing only those.
async fn raw_files(lake: &Lake, ty: &str, w: &Wanted) -> crate::error::Result<Vec<TableFile>> {
    let root = &lake.raw;
    let files = match &w.tenants {
        None => crate::raw::list_files(root, STAGE, &root.paths.layer(Layer::Raw)).await?,
        Some(tenants) => {
            let mut files = Vec::new();
            for t in tenants {
                let found = crate::raw::tenant_files(
                    root,
                    STAGE,
                    t,
                    w.systems.as_deref(),
                    w.dates.as_deref(),
                )
                .await?;
                files.extend(found);
            }
            files
        }
    };
    Ok(files
        .into_iter()
        .filter(|f| f.file_type == Some(ty))
        .map(|file| TableFile { file, xxh3: None })
        .collect())
}

/// The committed curated parts of `ty` in the partitions `w` allows, from
/// their commit logs only (sizes and checksums from the records: no HEADs;
/// a part that is missing or changed fails the scan that reads it).
async fn curated_files(lake: &Lake, ty: &str, w: &Wanted) -> crate::error::Result<Vec<TableFile>> {
    let v = commit::visible(lake, &w.partitions()).await?;
    Ok(v.curated
        .into_iter()
        .filter(|p| p.resource_type == ty)
        .map(|part| TableFile {
            file: LayerFile {
                file_type: Some(part.resource_type),
                gzip: false,
                origin: FileOrigin {
                    tenant: part.tenant.to_string(),
                    source_system: None,
                    import_date: part.date.days_since_epoch(),
                    source_file: lake.curated.url_of(&part.object.location()),
                },
                meta: part.object.meta(),
                piece: None,
            },
            xxh3: Some(part.object.xxh3),
        })
        .collect())
}
