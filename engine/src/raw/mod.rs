//! The raw layer: NDJSON as the source sent it, and how it is read back.

pub mod lines;

use std::io::Read;

use object_store::ObjectMeta;

use crate::error::{Error, Result};
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
