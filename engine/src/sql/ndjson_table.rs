//! `raw.<type>` and `curated.<type>`: NDJSON files of a layer as a DataFusion
//! table in the record model, one partition per file, read in parallel.
//!
//! Filters on the partition columns (`tenant_guid`, `source_system`,
//! `import_date`: equality, `IN`, joined by `AND`) skip files whose path says
//! they cannot match.
//!
//! Raw tables show every non-blank line, including those curation rejects:
//! their `error` column says why, so analysts can look at bad input with SQL.
//!
//! Curated tables read the parts a commit lists, and nothing is left out
//! quietly: a part that is missing, a line that no longer parses (or is over
//! the line limit), and a part whose bytes are not those of its commit (size
//! and xxh3-128, checked once the part has been read to its end) each fail
//! the query naming the object (and the line).

use std::any::Any;
use std::io::Read;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};

use crate::commit::Checksum;
use crate::curate::parse::key_line;
use crate::error::{Error, Result};
use crate::layout::ImportDate;
use crate::model::{schema, FileOrigin, RowsBuilder, Shape};
use crate::raw::lines::{for_each_line, Line, LineTotals};
use crate::raw::{read_lines, LayerFile};
use crate::settings::CurateSettings;
use crate::storage::Root;

const STAGE: &str = "sql";

/// The most resource text a batch holds before it is sent.
const BATCH_TEXT_BYTES: usize = 1 << 20;

/// One file of a table: a raw file as listed, or a committed curated part
/// with the checksum its commit gives.
#[derive(Debug, Clone)]
pub struct TableFile {
    pub file: LayerFile,
    /// xxh3-128 (hex) of the whole object, from its commit.
    pub xxh3: Option<String>,
}

/// The files of one resource type in one layer.
#[derive(Debug)]
pub struct NdjsonTable {
    schema: SchemaRef,
    partitions: Vec<Arc<FilePartition>>,
}

impl NdjsonTable {
    pub fn new(
        root: Root,
        shape: Shape,
        files: Vec<TableFile>,
        limits: &CurateSettings,
    ) -> DfResult<Self> {
        let schema = schema(shape);
        let partitions = files
            .into_iter()
            .map(|file| {
                Arc::new(FilePartition {
                    schema: schema.clone(),
                    shape,
                    root: root.clone(),
                    file,
                    max_line: limits.max_line_bytes,
                    max_depth: limits.max_depth,
                    batch_rows: limits.batch_rows,
                })
            })
            .collect();
        Ok(NdjsonTable { schema, partitions })
    }
}

/// The partition columns, known from each file's path.
const PARTITION_COLUMNS: [&str; 3] = ["tenant_guid", "source_system", "import_date"];

/// Whether `e` is a filter on partition columns that [`may_match`] can use.
fn is_partition_filter(e: &Expr) -> bool {
    match e {
        Expr::BinaryExpr(b) if b.op == Operator::And => {
            is_partition_filter(&b.left) && is_partition_filter(&b.right)
        }
        Expr::BinaryExpr(b) if b.op == Operator::Eq => {
            matches!((&*b.left, &*b.right), (Expr::Column(c), Expr::Literal(..)) | (Expr::Literal(..), Expr::Column(c))
                if PARTITION_COLUMNS.contains(&c.name.as_str()))
        }
        Expr::InList(l) if !l.negated => {
            matches!(&*l.expr, Expr::Column(c) if PARTITION_COLUMNS.contains(&c.name.as_str()))
                && l.list.iter().all(|v| matches!(v, Expr::Literal(..)))
        }
        _ => false,
    }
}

/// Filters on partition columns prune files (Inexact: DataFusion still
/// applies them to the rows, so pruning only has to be safe); others are not
/// pushed down.
pub(super) fn partition_pushdown(filters: &[&Expr]) -> Vec<TableProviderFilterPushDown> {
    filters
        .iter()
        .map(|f| {
            if is_partition_filter(f) {
                TableProviderFilterPushDown::Inexact
            } else {
                TableProviderFilterPushDown::Unsupported
            }
        })
        .collect()
}

/// False only when no row of a file from `origin` can pass `e`.
fn may_match(e: &Expr, origin: &FileOrigin) -> bool {
    let equals = |column: &str, v: &ScalarValue| -> bool {
        let text = match v {
            ScalarValue::Utf8(Some(s))
            | ScalarValue::Utf8View(Some(s))
            | ScalarValue::LargeUtf8(Some(s)) => Some(s.as_str()),
            _ => None,
        };
        match column {
            "tenant_guid" => text.is_none_or(|t| t.eq_ignore_ascii_case(&origin.tenant)),
            "source_system" => text.is_none_or(|t| Some(t) == origin.source_system.as_deref()),
            "import_date" => match v {
                ScalarValue::Date32(Some(d)) => *d == origin.import_date,
                _ => match text.map(|t| t.parse::<ImportDate>()) {
                    Some(Ok(d)) => d.days_since_epoch() == origin.import_date,
                    _ => true,
                },
            },
            _ => true,
        }
    };
    match e {
        Expr::BinaryExpr(b) if b.op == Operator::And => {
            may_match(&b.left, origin) && may_match(&b.right, origin)
        }
        Expr::BinaryExpr(b) if b.op == Operator::Eq => match (&*b.left, &*b.right) {
            (Expr::Column(c), Expr::Literal(v, _)) | (Expr::Literal(v, _), Expr::Column(c)) => {
                equals(&c.name, v)
            }
            _ => true,
        },
        Expr::InList(l) if !l.negated => match &*l.expr {
            Expr::Column(c) => l.list.iter().any(|v| match v {
                Expr::Literal(v, _) => equals(&c.name, v),
                _ => true,
            }),
            _ => true,
        },
        _ => true,
    }
}

#[async_trait]
impl TableProvider for NdjsonTable {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn table_type(&self) -> TableType {
        TableType::Base
    }
    /// Filters on partition columns prune files; DataFusion still applies
    /// them to the rows (Inexact), so pruning only has to be safe.
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
        let files: Vec<Arc<dyn PartitionStream>> = self
            .partitions
            .iter()
            .filter(|p| filters.iter().all(|f| may_match(f, &p.file.file.origin)))
            .map(|p| p.clone() as Arc<dyn PartitionStream>)
            .collect();
        StreamingTable::try_new(self.schema.clone(), files)?
            .scan(state, projection, &[], limit)
            .await
    }
}

#[derive(Debug)]
struct FilePartition {
    schema: SchemaRef,
    shape: Shape,
    root: Root,
    file: TableFile,
    max_line: usize,
    max_depth: usize,
    batch_rows: usize,
}

impl PartitionStream for FilePartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let mut builder = RecordBatchReceiverStreamBuilder::new(self.schema.clone(), 2);
        let tx = builder.tx();
        let (root, file, shape) = (self.root.clone(), self.file.clone(), self.shape);
        let (max_line, max_depth, batch_rows) = (self.max_line, self.max_depth, self.batch_rows);
        builder.spawn_blocking(move || {
            let mut rows = RowsBuilder::new(shape, file.file.origin.clone());
            let send = |rows: &mut RowsBuilder| -> crate::error::Result<()> {
                if tx.blocking_send(Ok(rows.finish())).is_err() {
                    // The consumer has gone (a LIMIT was reached): stop reading.
                    return Err(Error::Cancelled);
                }
                Ok(())
            };
            let file_type = file.file.file_type;
            let location = &file.file.origin.source_file;
            // A committed curated part holds only lines that curation
            // accepted: one that is not is a damaged part, not a record.
            let damaged = |line_no: u64, detail: String| Error::Corrupt {
                stage: STAGE,
                location: location.clone(),
                detail: format!("line {line_no} {detail}"),
            };
            let result = read_file(&root, &file, max_line, |line_no, line| {
                match line {
                    Line::Text {
                        bytes,
                        last_unterminated,
                        ..
                    } => match key_line(bytes, file_type, max_depth, last_unterminated) {
                        Ok(keys) => rows.push_keys(line_no, &keys),
                        Err(r) if shape == Shape::Raw => {
                            let text = String::from_utf8_lossy(bytes);
                            let ty = r.resource_type.as_deref().or(file_type);
                            let error = format!("{}: {}", r.code, r.message);
                            rows.push_rejected(
                                line_no,
                                ty,
                                r.resource_id.as_deref(),
                                &text,
                                &error,
                            );
                        }
                        Err(r) => {
                            return Err(damaged(
                                line_no,
                                format!("is not a curated resource ({}: {})", r.code, r.message),
                            ))
                        }
                    },
                    Line::TooLong { len } if shape == Shape::Raw => {
                        let error =
                            format!("LINE_TOO_LONG: the line has {len} bytes (limit {max_line})");
                        rows.push_rejected(line_no, file_type, None, "", &error);
                    }
                    Line::TooLong { len } => {
                        return Err(damaged(
                            line_no,
                            format!(
                                "has {len} bytes, over the line limit of {max_line} \
                                 (raise it with --max-line-bytes to read it)"
                            ),
                        ))
                    }
                }
                // By rows, and by size: a batch of large resources stays a
                // few MB however many files are read at once.
                if rows.len() >= batch_rows || rows.text_bytes() >= BATCH_TEXT_BYTES {
                    send(&mut rows)?;
                }
                Ok(())
            });
            match result {
                Ok(_) => {
                    if !rows.is_empty() {
                        let _ = send(&mut rows);
                    }
                    Ok(())
                }
                Err(Error::Cancelled) => Ok(()),
                Err(e) => Err(DataFusionError::External(Box::new(e))),
            }
        });
        builder.build()
    }
}

/// Reads `file` line by line on the current (blocking) thread. A curated
/// part (one with a checksum) is checked against its commit: a missing
/// object, another size or, once it has been read to its end, another
/// checksum is [`Error::Corrupt`] naming it.
fn read_file(
    root: &Root,
    file: &TableFile,
    max_line: usize,
    f: impl FnMut(u64, Line<'_>) -> Result<()>,
) -> Result<LineTotals> {
    let Some(expected) = &file.xxh3 else {
        return read_lines(root, STAGE, &file.file, max_line, f);
    };
    let meta = &file.file.meta;
    let location = root.url_of(&meta.location);
    let corrupt = |detail: String| Error::Corrupt {
        stage: STAGE,
        location: location.clone(),
        detail,
    };
    let reader = root.open_sync(STAGE, meta).map_err(|e| match e {
        Error::Store {
            source: object_store::Error::NotFound { .. },
            ..
        } => corrupt("the object is missing".into()),
        Error::InputChanged { detail, .. } => corrupt(detail),
        e => e,
    })?;
    let mut reader = Hashing {
        inner: reader,
        sum: Checksum::default(),
    };
    let totals = for_each_line(&mut reader, max_line, f).map_err(|e| match e {
        Error::Io { source, .. } => Error::Io {
            stage: STAGE,
            location: location.clone(),
            source,
        },
        other => other,
    })?;
    let sum = reader.sum.hex();
    if totals.bytes != meta.size || sum != *expected {
        return Err(corrupt(format!(
            "{} bytes with checksum {sum}, the commit says {} bytes with {expected}",
            totals.bytes, meta.size
        )));
    }
    Ok(totals)
}

/// A reader that takes the checksum of what passes through it.
struct Hashing<R> {
    inner: R,
    sum: Checksum,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sum.update(&buf[..n]);
        Ok(n)
    }
}
