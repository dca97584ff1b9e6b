//! The ingest stage: local NDJSON files or folders land in the raw layer,
//! byte for byte, at
//! `raw/tenantGuid=<guid>/source_system=<system>/import_date=<date>/<file name>`.
//!
//! The resource type comes from the file name (`<Type>.ndjson`,
//! `<Type>.NNN.ndjson`, optionally `.gz`). In a folder, files with other names
//! are skipped and listed; a file named explicitly must have such a name.
//! Nothing inside a file chooses where it is written.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};

use object_store::buffered::BufWriter;
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};
use crate::layout::{ImportDate, RawFileName, SourceSystem, TenantGuid};
use crate::storage::Lake;

const STAGE: &str = "ingest";

#[derive(Debug, Clone)]
pub struct IngestedFile {
    pub source: PathBuf,
    pub target: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct IngestReport {
    pub files: Vec<IngestedFile>,
    /// Files in the given folders whose names name no resource type.
    pub skipped: Vec<PathBuf>,
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
    for (name, source) in found {
        let target = root.paths.raw_file(tenant, system, date, &name);
        let io = |e: std::io::Error| Error::Io {
            stage: STAGE,
            location: source.display().to_string(),
            source: e,
        };
        let mut file = tokio::fs::File::open(&source).await.map_err(io)?;
        // The upload becomes visible only when complete (a single put, or a
        // multipart upload completed at the end), never half-written.
        let mut writer = BufWriter::with_capacity(root.store.clone(), target.clone(), 8 << 20);
        let bytes = tokio::io::copy(&mut file, &mut writer)
            .await
            .map_err(|e| Error::Io {
                stage: STAGE,
                location: root.url_of(&target),
                source: e,
            })?;
        writer.shutdown().await.map_err(|e| Error::Io {
            stage: STAGE,
            location: root.url_of(&target),
            source: e,
        })?;
        report.files.push(IngestedFile {
            source,
            target: root.url_of(&target),
            bytes,
        });
    }
    Ok(report)
}
