//! `raw.<type>` and `curated.<type>`: NDJSON files of a layer as a DataFusion
//! table in the record model, one partition per file, read in parallel.
//!
//! Raw tables show every non-blank line, including those curation rejects:
//! their `error` column says why, so analysts can look at bad input with SQL.

use std::any::Any;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};

use crate::curate::parse::key_line;
use crate::model::{schema, RowsBuilder, Shape};
use crate::raw::lines::Line;
use crate::raw::{read_lines, LayerFile};
use crate::settings::CurateSettings;
use crate::storage::Root;

/// The files of one resource type in one layer.
#[derive(Debug)]
pub struct NdjsonTable {
    inner: StreamingTable,
}

impl NdjsonTable {
    pub fn new(
        root: Root,
        shape: Shape,
        files: Vec<LayerFile>,
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
                }) as Arc<dyn PartitionStream>
            })
            .collect();
        Ok(NdjsonTable {
            inner: StreamingTable::try_new(schema, partitions)?,
        })
    }
}

#[async_trait]
impl TableProvider for NdjsonTable {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
    fn table_type(&self) -> TableType {
        TableType::Base
    }
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        self.inner.scan(state, projection, filters, limit).await
    }
}

#[derive(Debug)]
struct FilePartition {
    schema: SchemaRef,
    shape: Shape,
    root: Root,
    file: LayerFile,
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
            let mut rows = RowsBuilder::new(shape, file.origin.clone());
            let send = |rows: &mut RowsBuilder| -> crate::error::Result<()> {
                if tx.blocking_send(Ok(rows.finish())).is_err() {
                    // The consumer has gone (a LIMIT was reached): stop reading.
                    return Err(crate::error::Error::Cancelled);
                }
                Ok(())
            };
            let result = read_lines(&root, "sql", &file, max_line, |line_no, line| {
                match line {
                    Line::Text {
                        bytes,
                        last_unterminated,
                    } => {
                        match key_line(bytes, file.file_type, max_depth, last_unterminated) {
                            Ok(keys) => rows.push_keys(line_no, &keys),
                            Err(r) if shape == Shape::Raw => {
                                let text = String::from_utf8_lossy(bytes);
                                let ty = r.resource_type.as_deref().or(file.file_type);
                                let error = format!("{}: {}", r.code, r.message);
                                rows.push_rejected(
                                    line_no,
                                    ty,
                                    r.resource_id.as_deref(),
                                    &text,
                                    &error,
                                );
                            }
                            // A committed curated file holds only accepted lines.
                            Err(_) => {}
                        }
                    }
                    Line::TooLong { len } if shape == Shape::Raw => {
                        let error =
                            format!("LINE_TOO_LONG: the line has {len} bytes (limit {max_line})");
                        rows.push_rejected(line_no, file.file_type, None, "", &error);
                    }
                    Line::TooLong { .. } => {}
                }
                if rows.len() >= batch_rows {
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
                Err(crate::error::Error::Cancelled) => Ok(()),
                Err(e) => Err(DataFusionError::External(Box::new(e))),
            }
        });
        builder.build()
    }
}
