//! Curation step 4: runs `dedup.sql` over the key columns of every
//! accepted record and returns the duplicates. The query gives the rows of
//! each repeated id together, survivor first; [`find_duplicates`] walks
//! them.
//!
//! Memory is set by `curate.memory_limit_mb`, half for the key rows and half
//! for the query:
//! * the key rows gather in a [`KeyStore`] as pass 1 makes them; past its
//!   budget they go to an Arrow IPC stream (the stream format, as each
//!   file's batches have their own dictionaries) in a temporary folder, so their
//!   memory does not grow with the number of records;
//! * the query reads them as a stream ([`KeyStore`] is a table provider),
//!   in a DataFusion session whose memory pool has the other half (at least
//!   16 MiB, the working room its spilling needs): its aggregation and its
//!   sort spill to disk past it.
//!
//! Most records are not duplicates, and the query's first step (`repeated`)
//! is to find the ids that occur more than once. So as the rows arrive the
//! store marks their `key_hash` in two fixed-size bit sets ([`Seen`]: seen
//! once, seen again), and the query is given only the rows whose hash may
//! be repeated. A key that is repeated always passes; a few that are not
//! pass too (their bit is shared) and `repeated` drops them, so the result
//! is the query's over every row, and its input is the duplicates and a
//! small fraction of the rest.

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
    seen: Seen,
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

/// Which key hashes were seen once and which again, in two bit sets of a
/// fixed size (a hash picks one bit of each): memory that does not grow
/// with the number of records. "Seen again" is never wrong for a repeated
/// key; as the sets fill, it also holds for more keys that are not.
#[derive(Default)]
struct Seen {
    once: Vec<u64>,
    again: Vec<u64>,
}

impl Seen {
    /// Bit sets of `bytes` each (a power of two, at least 8 KiB).
    fn with_bytes(bytes: usize) -> Seen {
        let words = (bytes.next_power_of_two().max(8 << 10)) / 8;
        Seen {
            once: vec![0; words],
            again: vec![0; words],
        }
    }

    fn slot(&self, hash: u64) -> (usize, u64) {
        let bit = hash as usize & (self.once.len() * 64 - 1);
        (bit / 64, 1 << (bit % 64))
    }

    fn mark(&mut self, hash: u64) {
        let (w, b) = self.slot(hash);
        if self.once[w] & b != 0 {
            self.again[w] |= b;
        } else {
            self.once[w] |= b;
        }
    }

    fn maybe_repeated(&self, hash: u64) -> bool {
        let (w, b) = self.slot(hash);
        self.again[w] & b != 0
    }

    fn mark_batch(&mut self, batch: &RecordBatch) {
        for h in key_hashes(batch).values() {
            self.mark(*h);
        }
    }

    /// The rows of `batch` whose key may be repeated.
    fn keep(&self, batch: &RecordBatch) -> DfResult<RecordBatch> {
        let keep: arrow::array::BooleanArray = key_hashes(batch)
            .values()
            .iter()
            .map(|h| Some(self.maybe_repeated(*h)))
            .collect();
        Ok(arrow::compute::filter_record_batch(batch, &keep)?)
    }
}

fn key_hashes(batch: &RecordBatch) -> &arrow::array::UInt64Array {
    static COLUMN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let i = *COLUMN.get_or_init(|| {
        schema(Shape::Keyed)
            .index_of("key_hash")
            .expect("keyed rows have key_hash")
    });
    batch.column(i).as_primitive::<UInt64Type>()
}

impl KeyStore {
    /// A store that keeps up to `budget` bytes of key rows in memory (its
    /// [`Seen`] sets take a sixteenth of it besides, at most 8 MiB).
    pub fn new(budget: usize) -> Self {
        KeyStore {
            budget,
            inner: Mutex::new(Stored {
                seen: Seen::with_bytes((budget / 32).min(4 << 20)),
                ..Stored::default()
            }),
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
            s.seen.mark_batch(&b);
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
        let store = self.0.clone();
        let keep = move |b: DfResult<RecordBatch>| {
            b.and_then(|b| store.inner.lock().expect("not poisoned").seen.keep(&b))
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
        let stream = futures::stream::iter(memory.into_iter().map(Ok))
            .chain(disk)
            .map(keep);
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

/// The first row of an id in dedup.sql's order, and the id.
struct Survivor {
    tenant: String,
    resource_type: Option<String>,
    id: Option<String>,
    file: String,
    line: u64,
    hash: u64,
    system: Option<String>,
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
    // The current id's survivor, as the rows come by.
    let mut current: Option<Survivor> = None;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(q("dedup.sql"))?;
        // The per-file columns are dictionary encoded in `keyed`.
        let utf8 = |c: usize| {
            arrow::compute::cast(batch.column(c), &arrow::datatypes::DataType::Utf8)
                .map_err(|e| Error::query(stage, "dedup.sql", e.into()))
        };
        let (tenant, ty, id, file, system) = (utf8(0)?, utf8(1)?, utf8(2)?, utf8(3)?, utf8(6)?);
        let (tenant, ty, id, file, system) = (
            tenant.as_string::<i32>(),
            ty.as_string::<i32>(),
            id.as_string::<i32>(),
            file.as_string::<i32>(),
            system.as_string::<i32>(),
        );
        let line = batch.column(4).as_primitive::<UInt64Type>();
        let hash = batch.column(5).as_primitive::<UInt64Type>();
        let opt = |a: &arrow::array::StringArray, i: usize| {
            (!a.is_null(i)).then(|| a.value(i).to_string())
        };
        for i in 0..batch.num_rows() {
            let same_id = current.as_ref().is_some_and(|s| {
                s.tenant == tenant.value(i)
                    && s.resource_type.as_deref() == (!ty.is_null(i)).then(|| ty.value(i))
                    && s.id.as_deref() == (!id.is_null(i)).then(|| id.value(i))
            });
            if !same_id {
                // The id's first row: its survivor.
                current = Some(Survivor {
                    tenant: tenant.value(i).to_string(),
                    resource_type: opt(ty, i),
                    id: opt(id, i),
                    file: file.value(i).to_string(),
                    line: line.value(i),
                    hash: hash.value(i),
                    system: opt(system, i),
                });
                continue;
            }
            let survivor = current.as_ref().expect("same id");
            let exact = hash.value(i) == survivor.hash;
            let system = opt(system, i);
            let collision = (!exact && system != survivor.system).then(|| Collision {
                resource_type: survivor.resource_type.clone().unwrap_or_default(),
                id: survivor.id.clone().unwrap_or_default(),
                source_system: system,
                survivor_system: survivor.system.clone(),
                survivor_file: survivor.file.clone(),
                survivor_line: survivor.line,
            });
            out.entry(file.value(i).to_string())
                .or_default()
                .push(Duplicate {
                    line: line.value(i),
                    exact,
                    collision,
                });
        }
    }
    for lines in out.values_mut() {
        lines.sort_unstable();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_key_always_passes_and_few_others_do() {
        let mut seen = Seen::with_bytes(64 << 10);
        let hash = |i: u64| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes());
        // 20,000 keys once, 1,000 of them a second time.
        for i in 0..20_000 {
            seen.mark(hash(i));
        }
        for i in 0..1_000 {
            seen.mark(hash(i * 20));
        }
        assert!((0..1_000).all(|i| seen.maybe_repeated(hash(i * 20))));
        let passing = (0..20_000)
            .filter(|i| i % 20 != 0)
            .filter(|i| seen.maybe_repeated(hash(*i)))
            .count();
        // 512 Ki bits, 20 k keys: about 4 % of the once-bits are shared.
        assert!(
            passing < 20_000 / 10,
            "{passing} keys pass that are not repeated"
        );
    }
}
