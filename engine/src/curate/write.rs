//! Curation step 6, the curated NDJSON: one writer per resource type that
//! streams lines into the run's staging area and starts a new numbered part
//! before a file would pass the configured size (HealthLake's per-file limit).

use std::io::Write;

use object_store::buffered::BufWriter;
use tokio_util::io::SyncIoBridge;

use fhirflow_udfs::tenant_label::LabelEdit;

use crate::commit::Move;
use crate::error::{Error, Result};
use crate::layout::{ImportDate, Layer, TenantGuid};
use crate::metadata::ErrorRow;
use crate::storage::Root;

const STAGE: &str = "curate";
/// Upload buffer: large enough for few multipart requests on S3.
const BUFFER: usize = 8 << 20;

/// What pass 2 produced for one resource type.
#[derive(Debug)]
pub struct Written {
    pub resource_type: &'static str,
    pub curated: u64,
    pub bytes_out: u64,
    /// Raw bytes (as stored) of the type's files, for progress.
    pub bytes_in: u64,
    pub parts: Vec<Move>,
    pub errors: Vec<ErrorRow>,
    pub seconds: f64,
}

struct Part {
    /// Small writes (a line is three pieces) are gathered before they cross
    /// into the async upload buffer.
    writer: std::io::BufWriter<SyncIoBridge<BufWriter>>,
    staged: object_store::path::Path,
    bytes: u64,
}

pub struct PartWriter<'a> {
    root: &'a Root,
    tenant: &'a TenantGuid,
    date: ImportDate,
    run_id: &'a str,
    ty: &'static str,
    max_bytes: u64,
    current: Option<Part>,
    done: Vec<object_store::path::Path>,
    lines: u64,
    bytes: u64,
}

impl<'a> PartWriter<'a> {
    pub fn new(
        root: &'a Root,
        tenant: &'a TenantGuid,
        date: ImportDate,
        run_id: &'a str,
        ty: &'static str,
        max_bytes: u64,
    ) -> Self {
        PartWriter {
            root,
            tenant,
            date,
            run_id,
            ty,
            max_bytes,
            current: None,
            done: Vec::new(),
            lines: 0,
            bytes: 0,
        }
    }

    fn io_err(&self, path: &object_store::path::Path) -> impl Fn(std::io::Error) -> Error + '_ {
        let location = self.root.url_of(path);
        move |source| Error::Io {
            stage: STAGE,
            location: location.clone(),
            source,
        }
    }

    /// Appends one line, `src` with `edit` applied, and a newline.
    pub fn write_edited(&mut self, src: &str, edit: &LabelEdit<'_>) -> Result<()> {
        let len = edit.edited_len(src.len()) as u64 + 1;
        if self
            .current
            .as_ref()
            .is_some_and(|p| p.bytes > 0 && p.bytes + len > self.max_bytes)
        {
            self.close_part()?;
        }
        if self.current.is_none() {
            let n = self.done.len() + 1;
            let target = self
                .root
                .paths
                .curated_file(self.tenant, self.date, self.ty, Some(n));
            let staged = self.root.paths.staged(Layer::Curated, self.run_id, &target);
            let handle = tokio::runtime::Handle::current();
            let writer = BufWriter::with_capacity(self.root.store.clone(), staged.clone(), BUFFER);
            self.current = Some(Part {
                writer: std::io::BufWriter::with_capacity(
                    1 << 16,
                    SyncIoBridge::new_with_handle(writer, handle),
                ),
                staged,
                bytes: 0,
            });
        }
        let part = self.current.as_mut().expect("part open");
        let mut res = Ok(());
        edit.for_each_piece(src, |piece| {
            if res.is_ok() {
                res = part.writer.write_all(piece.as_bytes());
            }
        });
        if let Err(e) = res.and_then(|_| part.writer.write_all(b"\n")) {
            let staged = part.staged.clone();
            return Err(self.io_err(&staged)(e));
        }
        part.bytes += len;
        self.lines += 1;
        self.bytes += len;
        Ok(())
    }

    fn close_part(&mut self) -> Result<()> {
        if let Some(part) = self.current.take() {
            let mut bridge = part
                .writer
                .into_inner()
                .map_err(|e| self.io_err(&part.staged)(e.into_error()))?;
            bridge
                .shutdown()
                .map_err(|e| self.io_err(&part.staged)(e))?;
            self.done.push(part.staged);
        }
        Ok(())
    }

    /// Closes the last part. A type that fits in one part is named
    /// `<Type>-processed.ndjson`, otherwise parts are numbered from 001.
    pub fn finish(mut self) -> Result<Written> {
        self.close_part()?;
        let single = self.done.len() == 1;
        let parts = self
            .done
            .iter()
            .enumerate()
            .map(|(i, staged)| Move {
                staged: staged.clone(),
                target: self.root.paths.curated_file(
                    self.tenant,
                    self.date,
                    self.ty,
                    (!single).then_some(i + 1),
                ),
            })
            .collect();
        Ok(Written {
            resource_type: self.ty,
            curated: self.lines,
            bytes_out: self.bytes,
            bytes_in: 0,
            parts,
            errors: Vec::new(),
            seconds: 0.0,
        })
    }
}
