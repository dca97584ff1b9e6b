//! The raw layer: NDJSON as the source sent it, how it lands without
//! replacing anything ([`landing`]), and how it is read back.

pub mod landing;
pub mod lines;

use std::io::Read;
use std::sync::{Arc, Condvar, Mutex};

use object_store::ObjectMeta;

use crate::error::{Error, Result};
use crate::layout::{parse_partition, Layer, RawFileName};
use crate::raw::lines::{
    count_newlines, for_each_line, for_each_line_after, for_each_line_in, Line, LineTotals, Windows,
};
use crate::storage::Root;

/// One NDJSON object of a layer, with what its path says about it.
#[derive(Debug, Clone)]
pub struct LayerFile {
    pub meta: ObjectMeta,
    /// The resource type its name gives (None: the name gives none).
    pub file_type: Option<&'static str>,
    pub gzip: bool,
    pub origin: crate::model::FileOrigin,
    /// The byte range of the file this one reads, when the file is split
    /// ([`split`]); None: the whole file.
    pub piece: Option<Piece>,
}

impl LayerFile {
    /// The bytes this file (or piece) covers: for sizing work and progress.
    pub fn work_bytes(&self) -> u64 {
        match &self.piece {
            Some(p) => p.end - p.start,
            None => self.meta.size,
        }
    }
}

/// A byte range `[start, end)` of a raw file: its lines are those that
/// start inside it, so a line that straddles `end` is read to its end, and
/// the part of a line before `start` belongs to the piece before. The
/// pieces of one file share `counts`: each piece says how many lines it
/// owns as soon as it has read its bytes, so that every piece numbers its
/// lines exactly as one reader of the whole file would.
#[derive(Debug, Clone)]
pub struct Piece {
    pub index: usize,
    pub start: u64,
    pub end: u64,
    pub counts: Arc<LineCounts>,
}

/// How many lines each piece of a file owns, as the pieces find out.
#[derive(Debug)]
pub struct LineCounts {
    counts: Mutex<Vec<Count>>,
    changed: Condvar,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Count {
    Pending,
    Lines(u64),
    /// The piece failed before it could count: the pieces after it stop.
    Failed,
}

impl LineCounts {
    fn new(pieces: usize) -> Self {
        LineCounts {
            counts: Mutex::new(vec![Count::Pending; pieces]),
            changed: Condvar::new(),
        }
    }

    fn set(&self, piece: usize, count: Count) -> std::result::Result<(), String> {
        let mut counts = self.counts.lock().expect("not poisoned");
        match counts[piece] {
            Count::Pending | Count::Failed => counts[piece] = count,
            // Pass 2 counts again: the same bytes give the same count.
            Count::Lines(n) if count == Count::Lines(n) => {}
            Count::Lines(n) => return Err(format!("piece {piece} held {n} lines, now {count:?}")),
        }
        self.changed.notify_all();
        Ok(())
    }

    /// Lines before piece `piece`, once every earlier piece has counted
    /// (which each does before it waits for its own). None: one failed.
    fn lines_before(&self, piece: usize) -> Option<u64> {
        let mut counts = self.counts.lock().expect("not poisoned");
        loop {
            let mut sum = 0;
            let mut pending = false;
            for c in &counts[..piece] {
                match c {
                    Count::Lines(n) => sum += n,
                    Count::Pending => pending = true,
                    Count::Failed => return None,
                }
            }
            if !pending {
                return Some(sum);
            }
            counts = self.changed.wait(counts).expect("not poisoned");
        }
    }

    /// The line numbers piece `piece` owns, once every piece up to it has
    /// counted (after pass 1).
    pub fn lines_of(&self, piece: usize) -> std::ops::RangeInclusive<u64> {
        let counts = self.counts.lock().expect("not poisoned");
        let n = |c: &Count| match c {
            Count::Lines(n) => *n,
            _ => 0,
        };
        let before: u64 = counts[..piece].iter().map(n).sum();
        before + 1..=before + n(&counts[piece])
    }
}

/// Marks a piece failed unless it counted: pieces waiting on it then stop
/// instead of waiting forever (an error or a panic before the count).
struct CountGuard<'a> {
    piece: &'a Piece,
    counted: bool,
}

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        if !self.counted {
            let _ = self.piece.counts.set(self.piece.index, Count::Failed);
        }
    }
}

/// Splits every plain (not gzip) file larger than `range_bytes` into pieces
/// of about that size, in order, so that one large file keeps every core
/// busy. 0: no file is split. A gzip stream cannot be entered in the
/// middle, so compressed files stay whole.
pub fn split(files: Vec<LayerFile>, range_bytes: u64) -> Vec<LayerFile> {
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        if range_bytes == 0 || f.gzip || f.meta.size <= range_bytes {
            out.push(f);
            continue;
        }
        let n = f.meta.size.div_ceil(range_bytes);
        // Equal pieces (the last one smaller), so that the largest-first
        // scheduling of a run starts a file's pieces in order: a piece
        // waits only for pieces that started before it.
        let each = f.meta.size.div_ceil(n);
        let counts = Arc::new(LineCounts::new(n as usize));
        for i in 0..n {
            let mut piece = f.clone();
            piece.piece = Some(Piece {
                index: i as usize,
                start: i * each,
                end: ((i + 1) * each).min(f.meta.size),
                counts: counts.clone(),
            });
            out.push(piece);
        }
    }
    out
}

/// The raw files below `prefix` (a raw partition or a parent of some), sorted
/// by path. Only paths that are valid raw partitions count, so the claims in
/// a partition's `_landed/` folder and the extractor's own files under
/// `_export/` (a folder, not a `key=value` segment) are never data; names
/// starting with `_` or `.` are not resources either. A name that gives no resource type is
/// kept with `file_type: None`: curation rejects its lines rather than
/// ignore them.
pub async fn list_files(
    root: &Root,
    stage: &'static str,
    prefix: &object_store::path::Path,
) -> Result<Vec<LayerFile>> {
    let base = root.paths.layer(Layer::Raw);
    let mut files = Vec::new();
    for obj in root.list(stage, prefix).await? {
        let Some(p) = parse_partition(&base, &obj.location) else {
            continue;
        };
        let (Some(t), Some(system), Some(d)) = (&p.tenant, &p.source_system, p.date) else {
            continue;
        };
        if p.file_name.starts_with(['_', '.']) {
            continue;
        }
        let name = RawFileName::parse(&p.file_name);
        files.push(LayerFile {
            file_type: name.as_ref().map(|n| n.resource_type),
            gzip: p.file_name.ends_with(".gz"),
            origin: crate::model::FileOrigin {
                tenant: t.to_string(),
                source_system: Some(system.to_string()),
                import_date: d.days_since_epoch(),
                source_file: root.url_of(&obj.location),
            },
            meta: obj,
            piece: None,
        });
    }
    Ok(files)
}

/// The raw files of one tenant's partitions, sorted by path: of every source
/// system (or those of `systems`) and every date (or those of `dates`).
/// Lists only those folders, so the cost follows what is asked for, not the
/// tenant's whole history.
pub async fn tenant_files(
    root: &Root,
    stage: &'static str,
    tenant: &crate::layout::TenantGuid,
    systems: Option<&[crate::layout::SourceSystem]>,
    dates: Option<&[crate::layout::ImportDate]>,
) -> Result<Vec<LayerFile>> {
    let systems = match systems {
        Some(s) => s.to_vec(),
        None => root
            .list_dirs(stage, &root.paths.raw_tenant(tenant))
            .await?
            .iter()
            .filter_map(crate::layout::source_system_folder)
            .collect(),
    };
    let mut files = Vec::new();
    for s in &systems {
        match dates {
            Some(ds) => {
                for d in ds {
                    let p = root.paths.raw_partition(tenant, s, *d);
                    files.extend(list_files(root, stage, &p).await?);
                }
            }
            None => files.extend(list_files(root, stage, &root.paths.raw_source(tenant, s)).await?),
        }
    }
    files.sort_by(|a, b| a.meta.location.cmp(&b.meta.location));
    Ok(files)
}

/// Reads `file` (or its piece) line by line on the current (blocking)
/// thread.
pub fn read_lines(
    root: &Root,
    stage: &'static str,
    file: &LayerFile,
    max_line: usize,
    f: impl FnMut(u64, Line<'_>) -> Result<()>,
) -> Result<LineTotals> {
    let result = match (&file.piece, local_map(root, stage, file)?) {
        (Some(piece), mapped) => read_piece(root, stage, file, piece, mapped, max_line, f),
        (None, Some(mapped)) => for_each_line_in(&mapped, 0, mapped.size(), max_line, 0, f),
        (None, None) => {
            let reader = root.open_sync(stage, &file.meta)?;
            let reader: Box<dyn Read> = if file.gzip {
                Box::new(flate2::read::MultiGzDecoder::new(
                    std::io::BufReader::with_capacity(1 << 16, reader),
                ))
            } else {
                reader
            };
            for_each_line(reader, max_line, f)
        }
    };
    result.map_err(|e| match e {
        Error::Io { source, .. } => Error::Io {
            stage,
            location: root.url_of(&file.meta.location),
            source,
        },
        other => other,
    })
}

/// A local file, not compressed, mapped: read with no copy.
fn local_map(root: &Root, stage: &'static str, file: &LayerFile) -> Result<Option<MappedFile>> {
    if file.gzip {
        return Ok(None);
    }
    Ok(root.open_local(stage, &file.meta)?.map(|f| MappedFile {
        file: f,
        size: file.meta.size,
    }))
}

/// A local file read through memory maps of its pages in the page cache,
/// one window at a time: the lines' Arrow views point into the maps, so a
/// file's bytes are never copied on the way in.
pub struct MappedFile {
    file: std::fs::File,
    size: u64,
}

impl Windows for MappedFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn window(&self, offset: u64, len: usize) -> std::io::Result<arrow::buffer::Buffer> {
        // SAFETY: the map is only read, and lives as long as the buffer
        // that owns it. The lake's files are never changed in place: they
        // are written under a staging name and moved into place whole
        // (`Root::create_sync`), and a file that is removed keeps its pages
        // while mapped. Someone else truncating a raw file during a run
        // would end the process (SIGBUS), not change what it reports.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(len)
                .populate()
                .map(&self.file)?
        };
        let ptr = std::ptr::NonNull::from(&map[..]).cast::<u8>();
        // SAFETY: `ptr` is valid for `map.len()` bytes while `map` lives,
        // and the buffer owns `map`.
        Ok(unsafe { arrow::buffer::Buffer::from_custom_allocation(ptr, map.len(), Arc::new(map)) })
    }
}

/// The lines of one piece: its lines are counted and the count published;
/// then, once the pieces before it have counted, its lines are handed on
/// with their numbers in the file. The line that straddles the piece's end
/// is read on from the bytes after it, up to its newline. A local file is
/// read through `mapped`; another store's piece is read whole (one ranged
/// GET of at most the piece's size).
fn read_piece(
    root: &Root,
    stage: &'static str,
    file: &LayerFile,
    piece: &Piece,
    mapped: Option<MappedFile>,
    max_line: usize,
    f: impl FnMut(u64, Line<'_>) -> Result<()>,
) -> Result<LineTotals> {
    let mut guard = CountGuard {
        piece,
        counted: false,
    };
    // One byte before the piece says whether a line starts at its start.
    let from = piece.start.saturating_sub(1);
    let src: Box<dyn Windows> = match mapped {
        Some(m) => Box::new(m),
        None => {
            let bytes = root.read_range_sync(stage, &file.meta, from..piece.end)?;
            Box::new(Fetched {
                offset: from,
                bytes: arrow::buffer::Buffer::from(bytes),
            })
        }
    };
    let starts_line = piece.start == 0 || src.window(from, 1)?[0] == b'\n';
    // Lines that start in the piece: the first, then one after every
    // newline but the piece's last byte (a line starting at `end` is the
    // next piece's).
    let first = if starts_line {
        Some(piece.start)
    } else {
        find_newline(src.as_ref(), piece.start..piece.end)?.map(|i| i + 1)
    }
    .filter(|&i| i < piece.end);
    let owned = match first {
        Some(i) => 1 + count_newlines(src.as_ref(), i..piece.end - 1)?,
        None => 0,
    };
    let changed = |detail: String| Error::InputChanged {
        stage,
        location: root.url_of(&file.meta.location),
        detail,
    };
    piece
        .counts
        .set(piece.index, Count::Lines(owned))
        .map_err(changed)?;
    guard.counted = true;
    let before = piece
        .counts
        .lines_before(piece.index)
        .ok_or_else(|| changed("an earlier piece of the file could not be read".into()))?;
    let Some(first) = first else {
        return Ok(LineTotals::default());
    };
    if src.size() == file.meta.size {
        return for_each_line_in(src.as_ref(), first, piece.end, max_line, before, f);
    }
    // Fetched bytes end at the piece's end: a line that straddles it is
    // read on from the store.
    let body = src.window(first, (piece.end - first) as usize)?;
    let straddles = piece.end < file.meta.size && body.last() != Some(&b'\n');
    let reader: Box<dyn Read> = if straddles {
        let rest = root.open_sync_from(stage, &file.meta, piece.end)?;
        Box::new(body.as_slice().chain(ToNewline {
            inner: rest,
            done: false,
        }))
    } else {
        Box::new(body.as_slice())
    };
    for_each_line_after(reader, max_line, before, f)
}

/// Bytes `offset..` of a file, fetched from a store.
struct Fetched {
    offset: u64,
    bytes: arrow::buffer::Buffer,
}

impl Windows for Fetched {
    fn size(&self) -> u64 {
        self.offset + self.bytes.len() as u64
    }

    fn window(&self, offset: u64, len: usize) -> std::io::Result<arrow::buffer::Buffer> {
        Ok(self
            .bytes
            .slice_with_length((offset - self.offset) as usize, len))
    }
}

/// The first newline of `src` in `range`.
fn find_newline(src: &dyn Windows, range: std::ops::Range<u64>) -> std::io::Result<Option<u64>> {
    let mut at = range.start;
    while at < range.end {
        let n = (range.end - at).min(lines::WINDOW as u64) as usize;
        if let Some(i) = memchr::memchr(b'\n', &src.window(at, n)?) {
            return Ok(Some(at + i as u64));
        }
        at += n as u64;
    }
    Ok(None)
}

/// Reads up to and including the first newline of `inner`.
struct ToNewline<R> {
    inner: R,
    done: bool,
}

impl<R: Read> Read for ToNewline<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if let Some(i) = memchr::memchr(b'\n', &buf[..n]) {
            self.done = true;
            return Ok(i + 1);
        }
        Ok(n)
    }
}

impl From<std::io::Error> for Error {
    fn from(source: std::io::Error) -> Self {
        Error::Io {
            stage: "read",
            location: String::new(),
            source,
        }
    }
}
