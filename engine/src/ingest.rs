//! The ingest stage: local NDJSON files or folders land in the raw layer,
//! byte for byte, at
//! `raw/tenantGuid=<guid>/source_system=<system>/import_date=<date>/<file name>`.
//!
//! The resource type comes from the file name (`<Type>.ndjson`,
//! `<Type>.NNN.ndjson`, optionally `.gz`). In a folder, files with other names
//! are skipped and listed; a file named explicitly must have such a name.
//! Nothing inside a file chooses where it is written.
//!
//! The raw layer is append-only ([`crate::raw::landing`]): a file takes its
//! own name when that is free in the partition, else the next part number of
//! its type (`Patient.002.ndjson`), claimed with a create-only write before
//! the upload. A file whose bytes (xxh3-128 and size) the partition already
//! holds as a file of the same type is not written again: a retried ingest
//! lands nothing twice, and the report lists it as already landed.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path as FsPath, PathBuf};

use object_store::buffered::BufWriter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, Result};
use crate::layout::{ImportDate, RawFileName, SourceSystem, TenantGuid};
use crate::raw::landing::{self, Claim, Found, Partition};
use crate::storage::{Lake, Root};

const STAGE: &str = "ingest";
/// The source key of an ingested file's claim: ingest finds its earlier
/// landings by content, not by where a file came from.
const SOURCE: &str = "ingest";
/// Files up to this size land in one create-only put; larger ones in a
/// multipart upload (parts of this size), which takes no put mode.
const UPLOAD_BUFFER: usize = 8 << 20;

#[derive(Debug, Clone)]
pub struct IngestedFile {
    pub source: PathBuf,
    pub target: String,
    pub bytes: u64,
    /// The name was claimed by an earlier ingest of the same bytes that
    /// stopped before its upload; this one completed that landing.
    pub completed_earlier: bool,
}

#[derive(Debug, Clone, Default)]
pub struct IngestReport {
    pub files: Vec<IngestedFile>,
    /// Files in the given folders whose names name no resource type.
    pub skipped: Vec<PathBuf>,
    /// Files whose bytes the partition already held (a retried ingest):
    /// (local path, URL of the raw object that holds them). Nothing was
    /// written for them.
    pub already_landed: Vec<(PathBuf, String)>,
}

/// Finds the files to land: (raw file name, local path), sorted by name.
fn collect(paths: &[PathBuf], report: &mut IngestReport) -> Result<BTreeMap<RawFileName, PathBuf>> {
    let mut found: BTreeMap<RawFileName, PathBuf> = BTreeMap::new();
    let mut add = |name: RawFileName, path: PathBuf| -> Result<()> {
        if let Some(prev) = found.get(&name) {
            if prev != &path {
                return Err(Error::Input {
                    path,
                    reason: format!(
                        "same file name as {} (both would land as {})",
                        prev.display(),
                        name.as_str()
                    ),
                });
            }
        }
        found.insert(name, path);
        Ok(())
    };
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| Error::Input {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if meta.is_dir() {
            let mut stack = vec![path.clone()];
            while let Some(dir) = stack.pop() {
                let entries = std::fs::read_dir(&dir).map_err(|e| Error::Input {
                    path: dir.clone(),
                    reason: e.to_string(),
                })?;
                for entry in entries {
                    let entry = entry.map_err(|e| Error::Input {
                        path: dir.clone(),
                        reason: e.to_string(),
                    })?;
                    let p = entry.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else {
                        match file_name(&p).and_then(RawFileName::parse) {
                            Some(name) => add(name, p)?,
                            None => report.skipped.push(p),
                        }
                    }
                }
            }
        } else {
            let name = file_name(path).and_then(RawFileName::parse).ok_or_else(|| Error::Input {
                path: path.clone(),
                reason: "the name must be <ResourceType>.ndjson or <ResourceType>.<NNN>.ndjson, optionally .gz".into(),
            })?;
            add(name, path.clone())?;
        }
    }
    report.skipped.sort();
    Ok(found)
}

fn file_name(p: &FsPath) -> Option<&str> {
    p.file_name()?.to_str()
}

/// Lands `paths` in the raw layer of (tenant, source system, date).
pub async fn ingest(
    lake: &Lake,
    paths: &[PathBuf],
    tenant: &TenantGuid,
    system: &SourceSystem,
    date: ImportDate,
) -> Result<IngestReport> {
    let mut report = IngestReport::default();
    let found = collect(paths, &mut report)?;
    if found.is_empty() {
        return Err(Error::Usage(format!(
            "no <ResourceType>[.NNN].ndjson[.gz] files in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let root = &lake.raw;
    let mut partition = Partition::read(root, STAGE, tenant, system, date).await?;
    for (name, source) in found {
        let (xxh3, size) = hash_file(&source).await?;
        let (target, completed_earlier) = match partition.find_content(&name, &xxh3, size).await? {
            Some(Found::Landed(earlier)) => {
                let url = root.url_of(&partition.path_of(&earlier));
                report.already_landed.push((source, url));
                continue;
            }
            Some(Found::Unfinished(earlier)) => (earlier, true),
            None => {
                let claim = Claim::new(SOURCE, Some((&xxh3, size)));
                (partition.claim(&name, claim).await?, false)
            }
        };
        let path = partition.path_of(&target);
        upload(root, &path, &source, &xxh3, size).await?;
        partition.landed(&target, size);
        report.files.push(IngestedFile {
            source,
            target: root.url_of(&path),
            bytes: size,
            completed_earlier,
        });
    }
    Ok(report)
}

fn io_error(location: impl ToString) -> impl Fn(std::io::Error) -> Error {
    let location = location.to_string();
    move |source| Error::Io {
        stage: STAGE,
        location: location.clone(),
        source,
    }
}

/// The xxh3-128 and size of a local file, streamed on a blocking thread.
async fn hash_file(path: &FsPath) -> Result<(String, u64)> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let io = io_error(path.display());
        let mut file = std::fs::File::open(&path).map_err(&io)?;
        let mut hasher = crate::commit::Checksum::default();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(&io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        Ok((hasher.hex(), size))
    })
    .await?
}

/// Writes `source` to `target`, a name this ingest claimed (or completes),
/// checking that the bytes are still the ones hashed: the claim records that
/// hash, and a file that changed meanwhile must not land under it.
async fn upload(
    root: &Root,
    target: &object_store::path::Path,
    source: &FsPath,
    xxh3: &str,
    size: u64,
) -> Result<()> {
    let changed = || Error::InputChanged {
        stage: STAGE,
        location: source.display().to_string(),
        detail: "its bytes changed between hashing and upload".into(),
    };
    if size <= UPLOAD_BUFFER as u64 {
        let bytes = tokio::fs::read(source)
            .await
            .map_err(io_error(source.display()))?;
        if crate::commit::Checksum::of(&bytes) != xxh3 {
            return Err(changed());
        }
        // Create-only even though the name is claimed: a concurrent retry
        // completing the same landing may have written it first, and then
        // the object must be these bytes, not be replaced.
        if !root.create(STAGE, target, bytes).await? {
            let (there, _) = landing::hash_object(root, STAGE, target).await?;
            if there != xxh3 {
                return Err(Error::store(
                    STAGE,
                    root.url_of(target),
                    object_store::Error::AlreadyExists {
                        path: target.to_string(),
                        source: "another object holds the name this ingest claimed".into(),
                    },
                ));
            }
        }
        return Ok(());
    }
    // The upload becomes visible only when complete (a multipart upload
    // completed at the end), never half-written.
    let mut file = tokio::fs::File::open(source)
        .await
        .map_err(io_error(source.display()))?;
    let mut writer = BufWriter::with_capacity(root.store.clone(), target.clone(), UPLOAD_BUFFER);
    let to_store = io_error(root.url_of(target));
    let mut hasher = crate::commit::Checksum::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                let _ = writer.abort().await;
                return Err(io_error(source.display())(e));
            }
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if let Err(e) = writer.write_all(&buf[..n]).await {
            let _ = writer.abort().await;
            return Err(to_store(e));
        }
    }
    if hasher.hex() != xxh3 {
        let _ = writer.abort().await;
        return Err(changed());
    }
    if let Err(e) = writer.shutdown().await {
        let _ = writer.abort().await;
        return Err(to_store(e));
    }
    Ok(())
}
