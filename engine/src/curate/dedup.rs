//! Curation step 4: runs `dedup.sql` over the key columns of every
//! accepted record and returns the duplicates.
//!
//! Memory is set by `curate.memory_limit_mb`, half for the key rows and half
//! for the query:
//! * the key rows gather in a [`KeyStore`] as pass 1 makes them; past its
//!   budget they go to an Arrow IPC stream (the stream format, as each
//!   file's batches have their own dictionaries) in a temporary folder, so their
//!   memory does not grow with the number of records;
//! * the query reads them as a stream ([`KeyStore`] is a table provider),
//!   in a DataFusion session whose memory pool has the other half (at least
//!   16 MiB, the working room its spilling needs): its aggregation and the
//!   sort behind its window spill to disk past it.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{SchemaRef, UInt64Type};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::Result as DfResult;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::model::{schema, Shape};

/// The key rows of a run: in memory up to a budget, then on disk.
pub struct KeyStore {
    budget: usize,
    inner: Mutex<Stored>,
}

#[derive(Default)]
struct Stored {
    memory: Vec<RecordBatch>,
    bytes: usize,
    /// The spill file, once the budget was passed.
    disk: Option<Spill>,
}

struct Spill {
    /// Removed with its file when the store is dropped.
    dir: tempfile::TempDir,
    writer: Option<StreamWriter<BufWriter<File>>>,
    rows: usize,
}

impl Spill {
    fn path_in(dir: &std::path::Path) -> std::path::PathBuf {
        dir.join("keys.arrow")
    }
    fn path(&self) -> std::path::PathBuf {
        Self::path_in(self.dir.path())
    }
}

fn spill_error(e: impl std::fmt::Display) -> Error {
    Error::query(
        "dedup",
        "spilling key rows",
        datafusion::error::DataFusionError::Execution(e.to_string()),
    )
}

impl KeyStore {
    /// A store that keeps up to `budget` bytes of key rows in memory.
    pub fn new(budget: usize) -> Self {
        KeyStore {
            budget,
            inner: Mutex::new(Stored::default()),
        }
    }

    /// The store of a run: half of `curate.memory_limit_mb`.
    pub fn for_settings(settings: &crate::settings::Settings) -> Self {
        KeyStore::new((settings.curate.memory_limit_mb << 20) / 2)
    }

    /// Adds key rows; past the budget, everything held so far goes to disk.
    /// Blocking (it may write): call from a blocking thread.
    pub fn push(&self, batches: Vec<RecordBatch>) -> Result<()> {
        let mut s = self.inner.lock().expect("not poisoned");
        for b in batches.into_iter().filter(|b| b.num_rows() > 0) {
            s.bytes += b.get_array_memory_size();
            s.memory.push(b);
        }
        if s.bytes <= self.budget {
            return Ok(());
        }
        if s.disk.is_none() {
            let dir = tempfile::Builder::new()
                .prefix("fhirflow-dedup-")
                .tempdir()
                .map_err(spill_error)?;
            let path = Spill::path_in(dir.path());
            let file = BufWriter::with_capacity(1 << 20, File::create(path).map_err(spill_error)?);
            let writer = StreamWriter::try_new(file, &schema(Shape::Keyed)).map_err(spill_error)?;
            s.disk = Some(Spill {
                dir,
                writer: Some(writer),
                rows: 0,
            });
        }
        let memory = std::mem::take(&mut s.memory);
        s.bytes = 0;
        let spill = s.disk.as_mut().expect("just made");
        let writer = spill.writer.as_mut().expect("open until finished");
        for b in &memory {
            writer.write(b).map_err(spill_error)?;
            spill.rows += b.num_rows();
        }
        Ok(())
    }

    /// Rows that went to disk.
    pub fn rows_on_disk(&self) -> usize {
        let s = self.inner.lock().expect("not poisoned");
        s.disk.as_ref().map_or(0, |d| d.rows)
    }

    /// Ends writing: the store can then be read (as a table).
    fn seal(&self) -> Result<()> {
        let mut s = self.inner.lock().expect("not poisoned");
        if let Some(spill) = s.disk.as_mut() {
            if let Some(mut w) = spill.writer.take() {
                w.finish().map_err(spill_error)?;
            }
        }
        Ok(())
    }
}

/// One read of the whole store, for each scan of `keyed` in the query.
#[derive(Debug)]
struct KeyStream(Arc<KeyStore>);

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyStore({} rows on disk)", self.rows_on_disk())
    }
}

impl PartitionStream for KeyStream {
    fn schema(&self) -> &SchemaRef {
        static SCHEMA: std::sync::OnceLock<SchemaRef> = std::sync::OnceLock::new();
        SCHEMA.get_or_init(|| schema(Shape::Keyed))
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let (memory, path) = {
            let s = self.0.inner.lock().expect("not poisoned");
            (s.memory.clone(), s.disk.as_ref().map(Spill::path))
        };
        // The spilled batches, read one at a time on a blocking thread.
        let (tx, rx) = tokio::sync::mpsc::channel::<DfResult<RecordBatch>>(2);
        if let Some(path) = path {
            tokio::task::spawn_blocking(move || {
                let reader = File::open(&path)
                    .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))
                    .and_then(|f| {
                        Ok(StreamReader::try_new(
                            std::io::BufReader::with_capacity(1 << 20, f),
                            None,
                        )?)
                    });
                match reader {
                    Ok(reader) => {
                        for b in reader {
                            if tx.blocking_send(b.map_err(Into::into)).is_err() {
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                    }
                }
            });
        } else {
            drop(tx);
        }
        let disk = tokio_stream_of(rx);
        let stream = futures::stream::iter(memory.into_iter().map(Ok)).chain(disk);
        Box::pin(RecordBatchStreamAdapter::new(self.schema().clone(), stream))
    }
}

fn tokio_stream_of<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The dedup query, shipped inside the binary so that curation does not
/// depend on where it runs from.
pub const DEDUP_SQL: &str = include_str!("dedup.sql");

/// Duplicates by source file, by line number.
pub type Duplicates = HashMap<String, Vec<Duplicate>>;

/// One duplicate record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duplicate {
    pub line: u64,
    /// Byte-identical to its survivor.
    pub exact: bool,
    /// Another source system's record under the same id, with other content.
    pub collision: Option<Collision>,
}

/// What an id collision names: the two sources and the survivor's place.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Collision {
    pub resource_type: String,
    pub id: String,
    pub source_system: Option<String>,
    pub survivor_system: Option<String>,
    pub survivor_file: String,
    pub survivor_line: u64,
}

/// The least the dedup query's pool holds, in MiB. DataFusion's aggregation
/// spills by sorting its state in memory first (up to twice the state), and
/// with one aggregation and one sort per core a pool of a few MiB can leave
/// no room for that sort: the query then fails instead of spilling.
const QUERY_MEMORY_FLOOR_MB: usize = 16;

/// The dedup query's memory pool: the other half of `curate.memory_limit_mb`,
/// and at least [`QUERY_MEMORY_FLOOR_MB`].
pub fn query_memory_mb(settings: &crate::settings::Settings) -> usize {
    (settings.curate.memory_limit_mb / 2).max(QUERY_MEMORY_FLOOR_MB)
}

/// The duplicates among the rows of `keys`. `memory_limit_mb` is the
/// query's memory pool (the store's budget is apart).
pub async fn find_duplicates(keys: Arc<KeyStore>, memory_limit_mb: usize) -> Result<Duplicates> {
    let stage = "dedup";
    let q = |context: &str| {
        let context = context.to_string();
        move |e| Error::query(stage, context, e)
    };
    {
        let keys = keys.clone();
        tokio::task::spawn_blocking(move || keys.seal()).await??;
    }
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(memory_limit_mb << 20, 1.0)
        .build_arc()
        .map_err(q("memory pool"))?;
    let partitions = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Each sort keeps back this much to merge what it spilled (DataFusion's
    // default, 10 MB, is more than a small pool holds for two sorts).
    let merge_reserve = ((memory_limit_mb << 20) / (4 * partitions)).min(10 << 20);
    let config = SessionConfig::new()
        .with_target_partitions(partitions)
        .set_usize(
            "datafusion.execution.sort_spill_reservation_bytes",
            merge_reserve,
        );
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    let stream: Arc<dyn PartitionStream> = Arc::new(KeyStream(keys));
    let table =
        StreamingTable::try_new(schema(Shape::Keyed), vec![stream]).map_err(q("keyed table"))?;
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
        let text = |c: usize| {
            arrow::compute::cast(batch.column(c), &arrow::datatypes::DataType::Utf8)
                .map_err(|e| Error::query(stage, "dedup.sql", e.into()))
        };
        let (ty, id) = (text(2)?, text(3)?);
        let (ty, id) = (ty.as_string::<i32>(), id.as_string::<i32>());
        let collision = batch.column(5).as_boolean();
        let (system, survivor_system, survivor_file) = (text(6)?, text(7)?, text(8)?);
        let (system, survivor_system, survivor_file) = (
            system.as_string::<i32>(),
            survivor_system.as_string::<i32>(),
            survivor_file.as_string::<i32>(),
        );
        let survivor_line = batch.column(9).as_primitive::<UInt64Type>();
        let opt = |a: &arrow::array::StringArray, i: usize| {
            (!a.is_null(i)).then(|| a.value(i).to_string())
        };
        for i in 0..batch.num_rows() {
            let collision = collision.value(i).then(|| Collision {
                resource_type: ty.value(i).to_string(),
                id: id.value(i).to_string(),
                source_system: opt(system, i),
                survivor_system: opt(survivor_system, i),
                survivor_file: survivor_file.value(i).to_string(),
                survivor_line: survivor_line.value(i),
            });
            out.entry(file.value(i).to_string())
                .or_default()
                .push(Duplicate {
                    line: line.value(i),
                    exact: exact.value(i),
                    collision,
                });
        }
    }
    for lines in out.values_mut() {
        lines.sort_unstable();
    }
    Ok(out)
}
