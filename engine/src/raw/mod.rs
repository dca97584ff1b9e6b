//! The raw layer: NDJSON as the source sent it, how it lands without
//! replacing anything ([`landing`]), and how it is read back.

pub mod landing;
pub mod lines;

use std::io::Read;

use object_store::ObjectMeta;

use crate::error::{Error, Result};
use crate::layout::{parse_partition, Layer, RawFileName};
use crate::raw::lines::{for_each_line, Line, LineTotals};
use crate::storage::Root;

/// One NDJSON object of a layer, with what its path says about it.
#[derive(Debug, Clone)]
pub struct LayerFile {
    pub meta: ObjectMeta,
    /// The resource type its name gives (None: the name gives none).
    pub file_type: Option<&'static str>,
    pub gzip: bool,
    pub origin: crate::model::FileOrigin,
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

/// Reads `file` line by line on the current (blocking) thread.
pub fn read_lines(
    root: &Root,
    stage: &'static str,
    file: &LayerFile,
    max_line: usize,
    f: impl FnMut(u64, Line<'_>) -> Result<()>,
) -> Result<LineTotals> {
    let reader = root.open_sync(stage, &file.meta)?;
    let reader: Box<dyn Read> = if file.gzip {
        Box::new(flate2::read::MultiGzDecoder::new(
            std::io::BufReader::with_capacity(1 << 16, reader),
        ))
    } else {
        reader
    };
    for_each_line(reader, max_line, f).map_err(|e| match e {
        Error::Io { source, .. } => Error::Io {
            stage,
            location: root.url_of(&file.meta.location),
            source,
        },
        other => other,
    })
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
