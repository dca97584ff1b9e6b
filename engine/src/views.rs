//! SQL-on-FHIR v2 ViewDefinitions on DataFusion.
//!
//! A view is a table: [`ViewTable`] reads the `resource` column of a source
//! (a layer's table, or NDJSON files) and turns each batch into the view's
//! rows as it streams ([`ViewExec`], one output partition per input
//! partition, so files are evaluated in parallel). Filters, projections and
//! joins then work on it as on any table.
//!
//! Views come from a folder of `*.json` files, by default the set built
//! into the binary (the repository's `queries/views/`); `[sql] views`
//! names another folder, or `none`. Every `fhirflow sql` session registers
//! each as `view.<name>` over the curated layer.

use std::any::Any;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef, UInt64Type};
use async_trait::async_trait;
use datafusion::catalog::{MemorySchemaProvider, Session, TableProvider};
use datafusion::common::Result as DfResult;
use datafusion::datasource::TableType;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{col, lit, Expr, LogicalPlan};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    SendableRecordBatchStream,
};
use datafusion::prelude::SessionContext;
use fhirflow_views::{BatchBuilder, View, ViewError};
use futures::StreamExt;

use crate::error::{Error, Result};

/// The folder inside a rules folder (and the built-in set) that holds views.
pub const VIEWS_FOLDER: &str = "views";

/// A view and where it came from.
#[derive(Debug, Clone)]
pub struct NamedView {
    /// `view.<name>` in SQL: the file name without `.json`.
    pub name: String,
    /// For messages: the file's path (or `builtin:<version>/views/<file>`).
    pub file: String,
    pub text: String,
    pub view: Arc<View>,
}

/// A view error as `file:line:column: where: what`.
pub fn error(file: &str, text: &str, e: &ViewError) -> Error {
    let (line, column) = e.line_col(text);
    Error::View {
        file: format!("{file}:{line}:{column}"),
        message: e.to_string(),
    }
}

/// Reads and checks one ViewDefinition file's text.
pub fn parse(file: &str, text: &str) -> Result<View> {
    View::parse(text).map_err(|e| error(file, text, &e))
}

/// Reads a view file from disk.
pub fn read(path: &Path) -> Result<NamedView> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| Error::View {
        file: file.clone(),
        message: format!("cannot read it: {e}"),
    })?;
    named(file, view_name(path), text)
}

fn view_name(path: &Path) -> String {
    path.file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string()
}

fn named(file: String, name: String, text: String) -> Result<NamedView> {
    let mut view = parse(&file, &text)?;
    // Errors name the view: by its `name`, else by its file.
    if view.name.is_none() {
        view.name = Some(name.clone());
    }
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(Error::View {
            file,
            message: format!(
                "'{name}' cannot be a table name: name view files with letters, digits and _"
            ),
        });
    }
    Ok(NamedView {
        name,
        file,
        text,
        view: Arc::new(view),
    })
}

/// The built-in views (the repository's `queries/views/`).
pub fn builtin() -> Result<Vec<NamedView>> {
    let prefix = format!("{VIEWS_FOLDER}/");
    let mut out = Vec::new();
    for (name, text) in crate::rules::BUILTIN_FILES {
        let Some(file) = name.strip_prefix(&prefix) else {
            continue;
        };
        let Some(stem) = file.strip_suffix(".json") else {
            continue;
        };
        out.push(named(
            format!("{}/{name}", crate::rules::builtin_name()),
            stem.to_string(),
            text.to_string(),
        )?);
    }
    Ok(out)
}

/// The views `spec` names: `builtin`, `none`, or a folder of `*.json`.
pub fn load(spec: &str) -> Result<Vec<NamedView>> {
    match spec {
        crate::rules::BUILTIN => builtin(),
        crate::rules::NO_RULES => Ok(Vec::new()),
        dir => json_files(Path::new(dir))?
            .iter()
            .map(|p| read(p))
            .collect(),
    }
}

/// The `*.json` files of a folder, sorted.
pub fn json_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let unreadable = |e: std::io::Error| Error::Input {
        path: dir.to_path_buf(),
        reason: format!("cannot read the folder ({e})"),
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let p = entry.map_err(unreadable)?.path();
        if p.is_file() && p.extension().is_some_and(|x| x == "json") {
            paths.push(p);
        }
    }
    paths.sort();
    Ok(paths)
}

/// A view over one source table. The source must have a `resource` column
/// (JSON text); `source_file` and `line_no`, when it has them, name the
/// record in errors.
#[derive(Debug)]
pub struct ViewTable {
    view: Arc<View>,
    schema: SchemaRef,
    /// The source's rows, already filtered (tenant, date) and projected.
    source: LogicalPlan,
}

impl ViewTable {
    /// `source` read through `view`; `filters` apply to the source (its
    /// partition columns: `tenant_guid`, `import_date`, ...).
    pub fn new(
        view: Arc<View>,
        source: datafusion::dataframe::DataFrame,
        filters: Vec<Expr>,
    ) -> Result<ViewTable> {
        let q = |e| Error::query("view", "source", e);
        let names: Vec<String> = source
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        if !names.iter().any(|n| n == "resource") {
            return Err(Error::Usage(
                "a view's source needs a `resource` column of JSON text".into(),
            ));
        }
        let mut df = source;
        for f in filters {
            df = df.filter(f).map_err(q)?;
        }
        if names.iter().any(|n| n == "error") {
            // Raw lines that are not JSON: their `error` says why; a view
            // reads the others.
            df = df.filter(col("error").is_null()).map_err(q)?;
        }
        let keep: Vec<Expr> = ["resource", "source_file", "line_no"]
            .into_iter()
            .filter(|c| names.iter().any(|n| n == c))
            .map(col)
            .collect();
        let df = df.select(keep).map_err(q)?;
        Ok(ViewTable {
            schema: fhirflow_views::batch::schema(&view),
            view,
            source: df.into_unoptimized_plan(),
        })
    }
}

#[async_trait]
impl TableProvider for ViewTable {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let input = state.create_physical_plan(&self.source).await?;
        let exec: Arc<dyn ExecutionPlan> = Arc::new(ViewExec::new(self.view.clone(), input)?);
        match projection {
            None => Ok(exec),
            Some(p) => {
                let exprs = p
                    .iter()
                    .map(|&i| {
                        let name = self.schema.field(i).name().clone();
                        let c = datafusion::physical_expr::expressions::Column::new(&name, i);
                        (
                            Arc::new(c) as Arc<dyn datafusion::physical_expr::PhysicalExpr>,
                            name,
                        )
                    })
                    .collect::<Vec<_>>();
                Ok(Arc::new(
                    datafusion::physical_plan::projection::ProjectionExec::try_new(exprs, exec)?,
                ))
            }
        }
    }
}

/// Resource text in, view rows out, batch by batch.
#[derive(Debug)]
pub struct ViewExec {
    view: Arc<View>,
    input: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
}

impl ViewExec {
    fn new(view: Arc<View>, input: Arc<dyn ExecutionPlan>) -> DfResult<ViewExec> {
        let schema = fhirflow_views::batch::schema(&view);
        let partitions = input.properties().output_partitioning().partition_count();
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(partitions),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(ViewExec {
            view,
            input,
            properties: Arc::new(properties),
        })
    }
}

impl DisplayAs for ViewExec {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "ViewExec: resource={}", self.view.resource)
    }
}

impl ExecutionPlan for ViewExec {
    fn name(&self) -> &'static str {
        "ViewExec"
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }
    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }
    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let input = children
            .into_iter()
            .next()
            .ok_or_else(|| DataFusionError::Internal("ViewExec takes one child".into()))?;
        Ok(Arc::new(ViewExec::new(self.view.clone(), input)?))
    }
    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let view = self.view.clone();
        let schema = self.properties.eq_properties.schema().clone();
        let mut builder = BatchBuilder::new(&view);
        let stream = self
            .input
            .execute(partition, context)?
            .map(move |batch| batch.and_then(|b| rows_of(&view, &mut builder, &b)));
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

/// The view's rows for one batch of the source.
fn rows_of(view: &View, builder: &mut BatchBuilder, batch: &RecordBatch) -> DfResult<RecordBatch> {
    let column = |name: &str| {
        batch
            .schema()
            .index_of(name)
            .ok()
            .map(|i| batch.column(i).clone())
    };
    let resource = column("resource").ok_or_else(|| {
        DataFusionError::Internal("the view's source has no resource column".into())
    })?;
    let resource = arrow::compute::cast(&resource, &DataType::Utf8)?;
    let resource = resource.as_string::<i32>();
    let file = column("source_file")
        .map(|f| arrow::compute::cast(&f, &DataType::Utf8))
        .transpose()?;
    let line = column("line_no");
    for i in 0..batch.num_rows() {
        if resource.is_null(i) {
            continue;
        }
        let mut push = |row: Vec<fhirflow_views::Cell>| builder.push(&row);
        if let Err(e) = view.rows(resource.value(i), &mut push) {
            let at = match (&file, &line) {
                (Some(f), Some(l)) => format!(
                    "{} line {}",
                    f.as_string::<i32>().value(i),
                    l.as_primitive::<UInt64Type>().value(i)
                ),
                _ => format!("row {i} of a batch"),
            };
            return Err(DataFusionError::Execution(format!(
                "view {}: {at}: {e}",
                view.name.as_deref().unwrap_or(view.resource)
            )));
        }
    }
    Ok(builder.finish()?)
}

/// Which layer a view reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layer {
    Raw,
    Curated,
    /// The local lake's current version of each resource.
    Lake,
    /// Every version the local lake ever imported.
    LakeHistory,
}

impl Layer {
    pub fn schema(self) -> &'static str {
        match self {
            Layer::Raw => "raw",
            Layer::Curated => "curated",
            Layer::Lake => "lake",
            Layer::LakeHistory => "lake_history",
        }
    }
}

/// `view` over `layer` of the session, filtered to a tenant and date when
/// given. A layer without the view's type gives no rows.
pub async fn over_layer(
    ctx: &SessionContext,
    view: Arc<View>,
    layer: Layer,
    tenant: Option<&str>,
    date: Option<&str>,
) -> Result<ViewTable> {
    let table = format!("{}.{}", layer.schema(), view.resource.to_ascii_lowercase());
    let q = |e| Error::query("view", format!("source {table}"), e);
    let source = match ctx.table(table.as_str()).await {
        Ok(df) => df,
        Err(_) => empty_source(ctx).map_err(q)?,
    };
    let mut filters = Vec::new();
    if let Some(t) = tenant {
        filters.push(col("tenant_guid").eq(lit(t.to_string())));
    }
    if let Some(d) = date {
        let d: crate::layout::ImportDate = d.parse()?;
        let days = datafusion::common::ScalarValue::Date32(Some(d.days_since_epoch()));
        filters.push(col("import_date").eq(lit(days)));
    }
    ViewTable::new(view, source, filters)
}

fn empty_source(ctx: &SessionContext) -> DfResult<datafusion::dataframe::DataFrame> {
    ctx.read_batch(RecordBatch::try_new(
        Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("resource", DataType::Utf8, true),
        ])),
        vec![Arc::new(arrow::array::StringArray::from(
            Vec::<Option<&str>>::new(),
        ))],
    )?)
}

/// Registers `view.<name>` for each view, over the curated layer.
pub async fn register(ctx: &SessionContext, views: &[NamedView]) -> Result<()> {
    let q = |e| Error::query("sql", "register views", e);
    let catalog = ctx.catalog("datafusion").expect("default catalog");
    catalog
        .register_schema("view", Arc::new(MemorySchemaProvider::new()))
        .map_err(q)?;
    for v in views {
        let table = over_layer(ctx, v.view.clone(), Layer::Curated, None, None).await?;
        ctx.register_table(format!("view.{}", v.name).as_str(), Arc::new(table))
            .map_err(q)?;
    }
    Ok(())
}

/// NDJSON files on local disk (plain or `.gz`), or folders of them, as a
/// view source: `resource`, `source_file`, `line_no`, one partition per file.
pub fn files_source(
    ctx: &SessionContext,
    paths: &[PathBuf],
) -> Result<datafusion::dataframe::DataFrame> {
    let mut files = Vec::new();
    for p in paths {
        collect_files(p, &mut files)?;
    }
    if files.is_empty() {
        return Err(Error::Usage(
            "no NDJSON files in the given paths (*.ndjson, *.ndjson.gz, *.json)".into(),
        ));
    }
    let schema = files_schema();
    let partitions: Vec<Arc<dyn datafusion::physical_plan::streaming::PartitionStream>> = files
        .into_iter()
        .map(|path| {
            Arc::new(FileLines {
                path,
                schema: schema.clone(),
            }) as _
        })
        .collect();
    let table = datafusion::catalog::streaming::StreamingTable::try_new(schema, partitions)
        .map_err(|e| Error::query("view", "files", e))?;
    ctx.read_table(Arc::new(table))
        .map_err(|e| Error::query("view", "files", e))
}

fn files_schema() -> SchemaRef {
    use arrow::datatypes::Field;
    Arc::new(arrow::datatypes::Schema::new(vec![
        Field::new("resource", DataType::Utf8, false),
        Field::new("source_file", DataType::Utf8, false),
        Field::new("line_no", DataType::UInt64, false),
    ]))
}

fn collect_files(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let input = |reason: String| Error::Input {
        path: p.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(p).map_err(|e| input(e.to_string()))?;
    if meta.is_dir() {
        let mut entries = Vec::new();
        for e in std::fs::read_dir(p).map_err(|e| input(e.to_string()))? {
            entries.push(e.map_err(|e| input(e.to_string()))?.path());
        }
        entries.sort();
        for e in entries {
            let name = e
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            if e.is_dir()
                || [".ndjson", ".ndjson.gz", ".json"]
                    .iter()
                    .any(|x| name.ends_with(x))
            {
                collect_files(&e, out)?;
            }
        }
    } else {
        out.push(p.to_path_buf());
    }
    Ok(())
}

/// A batch of a file's lines: at most this many lines or bytes of text
/// (with two batches queued per file, memory stays about a MB per file).
const BATCH_LINES: usize = 8192;
const BATCH_BYTES: usize = 512 << 10;

#[derive(Debug)]
struct FileLines {
    path: PathBuf,
    schema: SchemaRef,
}

impl datafusion::physical_plan::streaming::PartitionStream for FileLines {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        use std::io::BufRead;
        let mut builder = datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder::new(
            self.schema.clone(),
            2,
        );
        let tx = builder.tx();
        let (path, schema) = (self.path.clone(), self.schema.clone());
        builder.spawn_blocking(move || {
            let name = path.display().to_string();
            let fail = |e: std::io::Error| DataFusionError::Execution(format!("{name}: {e}"));
            let file = std::fs::File::open(&path).map_err(fail)?;
            let reader: Box<dyn std::io::Read> = if name.ends_with(".gz") {
                Box::new(flate2::read::MultiGzDecoder::new(file))
            } else {
                Box::new(file)
            };
            let reader = std::io::BufReader::with_capacity(1 << 20, reader);
            let (mut texts, mut lines) = (Vec::new(), Vec::new());
            let mut bytes = 0;
            let send = |texts: &mut Vec<String>, lines: &mut Vec<u64>| -> DfResult<bool> {
                let n = texts.len();
                let batch = RecordBatch::try_new(
                    schema.clone(),
                    vec![
                        Arc::new(arrow::array::StringArray::from(std::mem::take(texts))),
                        Arc::new(arrow::array::StringArray::from(vec![name.as_str(); n])),
                        Arc::new(arrow::array::UInt64Array::from(std::mem::take(lines))),
                    ],
                )?;
                Ok(tx.blocking_send(Ok(batch)).is_ok())
            };
            for (i, line) in reader.lines().enumerate() {
                let line = line.map_err(fail)?;
                let text = line.trim_start_matches('\u{feff}').trim();
                if text.is_empty() {
                    continue;
                }
                bytes += text.len();
                texts.push(text.to_string());
                lines.push(i as u64 + 1);
                if texts.len() == BATCH_LINES || bytes >= BATCH_BYTES {
                    bytes = 0;
                    if !send(&mut texts, &mut lines)? {
                        return Ok(());
                    }
                }
            }
            if !texts.is_empty() {
                send(&mut texts, &mut lines)?;
            }
            Ok(())
        });
        builder.build()
    }
}
