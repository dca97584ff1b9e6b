//! Curation step 6, the curated NDJSON. Pass 2 writes each raw file's
//! surviving lines as one or more immutable parts of the run
//! (`curated/_runs/<partition>/<run>/`, see `commit`), starting a new part
//! before one would pass the configured size (HealthLake's per-file limit),
//! with each part's size and checksum taken on the way. Writing per raw file
//! lets both cores work whatever the mix of resource types; [`name_parts`]
//! then gives the parts of each type their visible names in raw file order,
//! so the output does not depend on timing.

use std::io::Write;

use fhirflow_udfs::tenant_label::{LabelEdit, TenantLabeller};
use object_store::path::Path;

use crate::commit::{Object, Summing};
use crate::error::{Error, Result};
use crate::layout::{ImportDate, TenantGuid};
use crate::storage::{ObjectWriter, Root};

const STAGE: &str = "curate";
/// Upload buffer: large enough for few multipart requests on S3.
const UPLOAD_BUFFER: usize = 8 << 20;
/// Multipart chunks in flight per part: object_store's default (8) holds up to
/// 64 MB per writer; two keep the disk or network busy at an eighth of that.
const UPLOADS_IN_FLIGHT: usize = 2;
/// Small writes (a line is up to three pieces) are gathered before they cross
/// into the async upload buffer.
const LINE_BUFFER: usize = 1 << 16;

struct Part {
    /// The checksum is taken below the line buffer, as it hands on 64 KiB
    /// blocks: per piece of a line it cost as much as the rest of pass 2's
    /// copying.
    writer: std::io::BufWriter<Summing<ObjectWriter>>,
    staged: Path,
    bytes: u64,
    lines: u64,
}

/// Writes the curated lines of one raw file.
pub struct PartWriter<'a> {
    root: &'a Root,
    tenant: &'a TenantGuid,
    date: ImportDate,
    run_id: &'a str,
    ty: &'static str,
    /// Makes staged names unique per raw file: its index in the run.
    file_index: usize,
    max_bytes: u64,
    current: Option<Part>,
    done: Vec<Object>,
    pub lines: u64,
    pub bytes: u64,
}

impl<'a> PartWriter<'a> {
    pub fn new(
        root: &'a Root,
        tenant: &'a TenantGuid,
        date: ImportDate,
        run_id: &'a str,
        ty: &'static str,
        file_index: usize,
        max_bytes: u64,
    ) -> Self {
        PartWriter {
            root,
            tenant,
            date,
            run_id,
            ty,
            file_index,
            max_bytes,
            current: None,
            done: Vec::new(),
            lines: 0,
            bytes: 0,
        }
    }

    fn io_err(&self, path: &Path) -> impl Fn(std::io::Error) -> Error {
        let location = self.root.url_of(path);
        move |source| Error::Io {
            stage: STAGE,
            location: location.clone(),
            source,
        }
    }

    /// Appends `src` with `edit` applied, and a newline.
    pub fn write(&mut self, labeller: &TenantLabeller, src: &str, edit: &LabelEdit) -> Result<()> {
        let len = labeller.edited_len(src.len(), edit) as u64 + 1;
        if self
            .current
            .as_ref()
            .is_some_and(|p| p.bytes > 0 && p.bytes + len > self.max_bytes)
        {
            self.close_part()?;
        }
        if self.current.is_none() {
            // The run's own name; the visible one is given by `name_parts`.
            let name = format!(
                "{}-processed.f{:06}.{:03}.ndjson",
                self.ty,
                self.file_index,
                self.done.len() + 1
            );
            let staged =
                self.root
                    .paths
                    .curated_run_part(self.tenant, self.date, self.run_id, &name);
            let object = self
                .root
                .create_sync(STAGE, &staged, UPLOAD_BUFFER, UPLOADS_IN_FLIGHT)?;
            self.current = Some(Part {
                writer: std::io::BufWriter::with_capacity(LINE_BUFFER, Summing::new(object)),
                staged,
                bytes: 0,
                lines: 0,
            });
        }
        let part = self.current.as_mut().expect("part open");
        let mut res = Ok(());
        labeller.for_each_piece(src, edit, |piece| {
            if res.is_ok() {
                res = part.writer.write_all(piece.as_bytes());
            }
        });
        if let Err(e) = res.and_then(|_| part.writer.write_all(b"\n")) {
            let staged = part.staged.clone();
            return Err(self.io_err(&staged)(e));
        }
        part.bytes += len;
        part.lines += 1;
        self.lines += 1;
        self.bytes += len;
        Ok(())
    }

    fn close_part(&mut self) -> Result<()> {
        if let Some(part) = self.current.take() {
            let err = self.io_err(&part.staged);
            let summing = part.writer.into_inner().map_err(|e| err(e.into_error()))?;
            let (writer, mut object) = summing.into_parts(&part.staged);
            writer.complete().map_err(err)?;
            object.records = Some(part.lines);
            self.done.push(object);
        }
        Ok(())
    }

    /// Closes the last part; the parts, in order.
    pub fn finish(mut self) -> Result<Vec<Object>> {
        self.close_part()?;
        Ok(std::mem::take(&mut self.done))
    }
}

impl Drop for PartWriter<'_> {
    /// A pass that failed leaves its open part unfinished: abort its upload
    /// (the writer lives on a blocking thread, where that may block). The
    /// parts it closed are the run's objects, which the failed run discards.
    fn drop(&mut self) {
        if let Some(part) = self.current.take() {
            let (summing, _) = part.writer.into_parts();
            let (writer, _) = summing.into_parts(&part.staged);
            writer.abort(&self.root.url_of(&part.staged));
        }
    }
}

/// Visible names for the parts of one resource type, given in raw file
/// order: `<Type>-processed.ndjson` when there is one part, otherwise
/// `<Type>-processed.001.ndjson`, `.002`, … .
pub fn name_parts(
    root: &Root,
    tenant: &TenantGuid,
    date: ImportDate,
    ty: &str,
    parts: Vec<Object>,
) -> Vec<Object> {
    let single = parts.len() == 1;
    parts
        .into_iter()
        .enumerate()
        .map(|(i, mut part)| {
            let visible = root
                .paths
                .curated_file(tenant, date, ty, (!single).then_some(i + 1));
            part.name = visible.filename().map(str::to_string);
            part
        })
        .collect()
}
