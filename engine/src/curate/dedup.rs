//! Curation step 4: runs `dedup.sql` over the key columns of every
//! accepted record and returns the duplicates.
//!
//! The query runs in a DataFusion session with a memory limit: the sort
//! behind the window spills to disk past it, so dedup stays bounded too.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::UInt64Type;
use datafusion::datasource::MemTable;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::model::{schema, Shape};

/// The dedup query, shipped inside the binary so that curation does not
/// depend on where it runs from.
pub const DEDUP_SQL: &str = include_str!("dedup.sql");

/// Duplicates by source file: (line number, exact duplicate?).
pub type Duplicates = HashMap<String, Vec<(u64, bool)>>;

pub async fn find_duplicates(
    keyed: Vec<RecordBatch>,
    memory_limit_mb: usize,
) -> Result<Duplicates> {
    let stage = "dedup";
    let q = |context: &str| {
        let context = context.to_string();
        move |e| Error::query(stage, context, e)
    };
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(memory_limit_mb << 20, 1.0)
        .build_arc()
        .map_err(q("memory pool"))?;
    let config = SessionConfig::new()
        .with_target_partitions(std::thread::available_parallelism().map_or(2, |n| n.get()));
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    let table = MemTable::try_new(schema(Shape::Keyed), vec![keyed]).map_err(q("keyed table"))?;
    ctx.register_table("keyed", Arc::new(table))
        .map_err(q("keyed table"))?;
    let df = ctx.sql(DEDUP_SQL).await.map_err(q("dedup.sql"))?;
    let mut stream = df.execute_stream().await.map_err(q("dedup.sql"))?;
    let mut out: Duplicates = HashMap::new();
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(q("dedup.sql"))?;
        // source_file is dictionary encoded in `keyed`.
        let file = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8)
            .map_err(|e| Error::query(stage, "dedup.sql", e.into()))?;
        let file = file.as_string::<i32>();
        let line = batch.column(1).as_primitive::<UInt64Type>();
        let exact = batch.column(4).as_boolean();
        for i in 0..batch.num_rows() {
            out.entry(file.value(i).to_string())
                .or_default()
                .push((line.value(i), exact.value(i)));
        }
    }
    for lines in out.values_mut() {
        lines.sort_unstable();
    }
    Ok(out)
}
