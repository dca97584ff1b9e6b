//! Downloading one output file of an export: streamed from the server into
//! the raw layer (a multipart upload above 8 MiB, never the whole file in
//! memory), gzip kept as sent, records (non-blank lines, as curate counts
//! them) counted on the way and checked against the manifest. The object appears only when complete; a broken transfer
//! is aborted and tried again from the start.
//!
//! An output file lands under a name it claims first
//! ([`crate::raw::landing`]), once
//! the first bytes tell whether it is gzip: its planned name when free, else
//! the next part number, so a second export of the same day never replaces
//! the first one's files. The claim carries the file's source key; a resumed
//! extraction that finds a claim of its file with the data object in place
//! counts that object's lines instead of downloading it again, and one whose
//! data is missing downloads into the claimed name.

use std::io::Write;
use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use url::Url;

use super::auth::Auth;
use super::http::{describe, error_text, shown, Http, Request};
use crate::error::{Error, Result};
use crate::layout::RawFileName;
use crate::raw::landing::{Claim, Partition};
use crate::report::Reporter;
use crate::storage::Root;

const STAGE: &str = "extract";
/// Above this, uploads go in parts.
const UPLOAD_BUFFER: usize = 8 << 20;

/// What a file of the manifest is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Output,
    Error,
    Deleted,
}

/// Where a file of the manifest lands (without `.gz`, added when the server
/// sends gzip).
#[derive(Debug, Clone)]
pub enum Target {
    /// An output file: a free raw file name, this one when it is free.
    Raw(RawFileName),
    /// An export's own file (error, deleted): a path in this extraction's
    /// own `_export/<run_id>/` folder, which nothing else writes.
    Export(Path),
}

/// A file to fetch: its URL and where it lands.
#[derive(Debug, Clone)]
pub struct Planned {
    pub kind: Kind,
    pub resource_type: String,
    pub url: Url,
    pub count: Option<u64>,
    pub target: Target,
    /// What names this file of this export across runs (recorded in its
    /// claim): the export's status URL and transactionTime, the file's place
    /// in the manifest and its URL, all without query strings, which may
    /// carry signatures.
    pub source: String,
}

/// The raw partition an export lands in, shared by its parallel downloads.
pub struct Landing<'a> {
    partition: tokio::sync::Mutex<Partition<'a>>,
    /// An earlier run of this extraction may have landed files: look for
    /// them before downloading.
    resumed: bool,
}

impl<'a> Landing<'a> {
    pub fn new(partition: Partition<'a>, resumed: bool) -> Self {
        Landing {
            partition: tokio::sync::Mutex::new(partition),
            resumed,
        }
    }
}

/// A file completely written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Done {
    pub kind: Kind,
    pub resource_type: String,
    pub url: String,
    /// Where it landed (a path in the raw root).
    pub target: String,
    /// Its records: non-blank lines.
    pub lines: u64,
    /// Bytes as stored (compressed, when the server sent gzip).
    pub bytes: u64,
    pub seconds: f64,
    /// Of `seconds`, the time spent waiting for the server's bytes and the
    /// time spent writing them.
    pub wait_seconds: f64,
    pub write_seconds: f64,
    /// Downloads it took; 0 when no run downloaded it since the last
    /// record (an earlier run's object, found by its claim).
    pub attempts: u32,
}

enum Failure {
    /// Broken connection, truncated body: try again.
    Retry(String),
    Fatal(Error),
}

/// Downloads `file`, retrying broken transfers; or, in a resumed
/// extraction, takes the object an earlier run landed for it (`attempts`
/// 0: nothing was downloaded).
pub async fn download(
    http: &Http,
    root: &Root,
    landing: &Landing<'_>,
    file: &Planned,
    auth: Option<(&Auth, &Url)>,
    reporter: &dyn Reporter,
) -> Result<Done> {
    // Names claimed for this file whose data is not there yet: a download
    // goes to one of them rather than claim another.
    let mut claimed: Vec<RawFileName> = Vec::new();
    if landing.resumed {
        if let Some(done) = landed_before(root, landing, file, &mut claimed).await? {
            return Ok(done);
        }
    }
    let mut attempt = 0;
    loop {
        match once(http, root, landing, &mut claimed, file, auth, reporter).await {
            Ok(mut done) => {
                done.attempts = attempt + 1;
                return Ok(done);
            }
            Err(Failure::Retry(why)) if attempt < http.policy.retries => {
                let wait = http.policy.backoff(attempt);
                tracing::info!(
                    resource_type = %file.resource_type,
                    url = %super::http::shown(&file.url),
                    wait_seconds = wait.as_secs_f64(),
                    attempt = attempt + 1,
                    "downloading an output file failed ({why}); retrying after a backoff"
                );
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Err(Failure::Retry(why)) => {
                return Err(Error::Http {
                    what: format!("{} file", file.resource_type),
                    url: shown(&file.url),
                    message: format!("{why} (after {attempt} retries)"),
                })
            }
            Err(Failure::Fatal(e)) => return Err(e),
        }
    }
}

/// What an earlier run of this extraction landed for `file`: its object
/// when that is there (a run that stopped after the upload, before it
/// recorded the file), else the names it claimed, into `claimed`.
async fn landed_before(
    root: &Root,
    landing: &Landing<'_>,
    file: &Planned,
    claimed: &mut Vec<RawFileName>,
) -> Result<Option<Done>> {
    let started = Instant::now();
    let found: Option<(Path, bool)> = match &file.target {
        Target::Raw(_) => {
            let mut partition = landing.partition.lock().await;
            let mut found = None;
            for (name, stored) in partition.find_source(&file.source).await? {
                match stored {
                    Some(_) if found.is_none() => {
                        found = Some((partition.path_of(&name), name.is_gzip()))
                    }
                    Some(_) => {}
                    None => claimed.push(name),
                }
            }
            found
        }
        Target::Export(path) => {
            let mut found = None;
            for (p, gzip) in [
                (path.clone(), false),
                (Path::from(format!("{path}.gz")), true),
            ] {
                match root.store.head(&p).await {
                    Ok(_) => {
                        found = Some((p, gzip));
                        break;
                    }
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(Error::store(STAGE, root.url_of(&p), e)),
                }
            }
            found
        }
    };
    let Some((path, gzip)) = found else {
        return Ok(None);
    };
    let (lines, bytes) = count_object(root, &path, gzip).await?;
    if let Some(expected) = file.count.filter(|&c| c != lines) {
        return Err(Error::Http {
            what: format!("{} file", file.resource_type),
            url: shown(&file.url),
            message: format!(
                "an earlier run landed it as {} with {lines} records, but the manifest's count is {expected}",
                root.url_of(&path)
            ),
        });
    }
    Ok(Some(Done {
        kind: file.kind,
        resource_type: file.resource_type.clone(),
        url: file.url.to_string(),
        target: path.to_string(),
        lines,
        bytes,
        seconds: started.elapsed().as_secs_f64(),
        wait_seconds: 0.0,
        write_seconds: 0.0,
        attempts: 0,
    }))
}

/// The lines and bytes of a landed object, read back.
async fn count_object(root: &Root, path: &Path, gzip: bool) -> Result<(u64, u64)> {
    let store_err = |e| Error::store(STAGE, root.url_of(path), e);
    let mut stream = root.store.get(path).await.map_err(store_err)?.into_stream();
    let mut lines = LineCount::new(gzip);
    let mut bytes = 0u64;
    let bad = |e: std::io::Error| Error::Io {
        stage: STAGE,
        location: root.url_of(path),
        source: e,
    };
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(store_err)?;
        lines.feed(&chunk).map_err(bad)?;
        bytes += chunk.len() as u64;
    }
    Ok((lines.finish().map_err(bad)?, bytes))
}

/// The path `file` is written to: an export file's fixed one, or for an
/// output file a name claimed for it (reusing one an earlier attempt or run
/// claimed with the same compression).
async fn target_of(
    landing: &Landing<'_>,
    claimed: &mut Vec<RawFileName>,
    file: &Planned,
    gzip: bool,
) -> Result<Path> {
    match &file.target {
        Target::Export(path) if gzip => Ok(Path::from(format!("{path}.gz"))),
        Target::Export(path) => Ok(path.clone()),
        Target::Raw(planned) => {
            let mut partition = landing.partition.lock().await;
            if let Some(name) = claimed.iter().find(|n| n.is_gzip() == gzip) {
                return Ok(partition.path_of(name));
            }
            let wanted = if gzip {
                planned.with_gzip()
            } else {
                planned.clone()
            };
            let name = partition
                .claim(&wanted, Claim::new(file.source.clone(), None))
                .await?;
            claimed.push(name.clone());
            Ok(partition.path_of(&name))
        }
    }
}

async fn once(
    http: &Http,
    root: &Root,
    landing: &Landing<'_>,
    claimed: &mut Vec<RawFileName>,
    file: &Planned,
    auth: Option<(&Auth, &Url)>,
    reporter: &dyn Reporter,
) -> Result<Done, Failure> {
    let started = Instant::now();
    let what = format!("{} file", file.resource_type);
    let req = Request::get(file.url.clone()).header("Accept", "application/fhir+ndjson");
    let mut resp = http.send(&what, &req, auth).await.map_err(Failure::Fatal)?;
    if !resp.status().is_success() {
        return Err(Failure::Fatal(Error::Http {
            what,
            url: shown(&file.url),
            message: error_text(resp).await,
        }));
    }
    let encoded_gzip = resp
        .headers()
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    let mut wait = started.elapsed();
    let mut write = Duration::ZERO;
    let broken = |e: reqwest::Error| Failure::Retry(describe(&e));

    let t = Instant::now();
    let first = resp.chunk().await.map_err(broken)?;
    wait += t.elapsed();
    let gzip = encoded_gzip || first.as_ref().is_some_and(|c| c.starts_with(&[0x1f, 0x8b]));
    let target = target_of(landing, claimed, file, gzip)
        .await
        .map_err(Failure::Fatal)?;
    let location = root.url_of(&target);
    let io = |e: std::io::Error| {
        Failure::Fatal(Error::Io {
            stage: STAGE,
            location: location.clone(),
            source: e,
        })
    };
    let mut writer = BufWriter::with_capacity(root.store.clone(), target.clone(), UPLOAD_BUFFER);
    let mut lines = LineCount::new(gzip);
    let mut bytes = 0u64;
    let mut chunk = first;
    let result: Result<(), Failure> = async {
        while let Some(c) = chunk {
            lines.feed(&c).map_err(|e| {
                Failure::Fatal(Error::Http {
                    what: what.clone(),
                    url: shown(&file.url),
                    message: format!("not valid gzip: {e}"),
                })
            })?;
            bytes += c.len() as u64;
            reporter.advance(c.len() as u64);
            let t = Instant::now();
            writer.write_all(&c).await.map_err(io)?;
            write += t.elapsed();
            let t = Instant::now();
            chunk = resp.chunk().await.map_err(broken)?;
            wait += t.elapsed();
        }
        Ok(())
    }
    .await;
    let counted = result.and_then(|()| {
        lines
            .finish()
            .map_err(|e| Failure::Retry(format!("the gzip stream ended early: {e}")))
    });
    let n = match counted {
        Ok(n) => n,
        Err(f) => {
            let _ = writer.abort().await;
            return Err(f);
        }
    };
    if let Some(expected) = file.count.filter(|&c| c != n) {
        let _ = writer.abort().await;
        return Err(Failure::Fatal(Error::Http {
            what,
            url: shown(&file.url),
            message: format!(
                "{n} records (non-blank lines), but the manifest's count is {expected}; the file was not kept"
            ),
        }));
    }
    let t = Instant::now();
    writer.shutdown().await.map_err(io)?;
    write += t.elapsed();
    Ok(Done {
        kind: file.kind,
        resource_type: file.resource_type.clone(),
        url: file.url.to_string(),
        target: target.to_string(),
        lines: n,
        bytes,
        seconds: started.elapsed().as_secs_f64(),
        wait_seconds: wait.as_secs_f64(),
        write_seconds: write.as_secs_f64(),
        attempts: 1,
    })
}

/// Counts the NDJSON records of plain or gzip bytes fed in chunks, as
/// curate reads them (`raw::lines`): a line is a record unless it is blank
/// (empty, or only spaces, tabs and `\r`), a UTF-8 byte order mark at the
/// start of the stream is not part of the first line, and a last line
/// without a newline counts too.
enum LineCount {
    Plain(Lines),
    Gzip(Box<flate2::write::MultiGzDecoder<Lines>>),
}

const BOM: &[u8; 3] = b"\xEF\xBB\xBF";

#[derive(Default)]
struct Lines {
    records: u64,
    /// The current line has a byte that is not blank.
    in_record: bool,
    /// Bytes of a byte order mark matched at the start of the stream; past
    /// the start once this is 3, or `bom_done`.
    bom: usize,
    bom_done: bool,
}

fn blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r')
}

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len();
        let mut rest = buf;
        while !self.bom_done {
            let Some((&b, tail)) = rest.split_first() else {
                return Ok(n);
            };
            if b == BOM[self.bom] {
                self.bom += 1;
                self.bom_done = self.bom == BOM.len();
                rest = tail;
            } else {
                // Not a byte order mark: what matched of it is text.
                self.in_record |= self.bom > 0;
                self.bom_done = true;
            }
        }
        // Only the start of each line is looked at, up to its first byte
        // that is not blank (in NDJSON, its first byte).
        while !rest.is_empty() {
            let end = memchr::memchr(b'\n', rest);
            let line = &rest[..end.unwrap_or(rest.len())];
            if !self.in_record {
                self.in_record = line.iter().any(|&b| !blank(b));
            }
            match end {
                Some(i) => {
                    self.records += u64::from(std::mem::take(&mut self.in_record));
                    rest = &rest[i + 1..];
                }
                None => break,
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn total(&self) -> u64 {
        // A stream that ended inside what could have been a byte order mark
        // has those bytes as its text.
        self.records + u64::from(self.in_record || (!self.bom_done && self.bom > 0))
    }
}

impl LineCount {
    fn new(gzip: bool) -> Self {
        if gzip {
            LineCount::Gzip(Box::new(flate2::write::MultiGzDecoder::new(
                Lines::default(),
            )))
        } else {
            LineCount::Plain(Lines::default())
        }
    }

    fn feed(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            LineCount::Plain(l) => l.write_all(buf),
            LineCount::Gzip(d) => d.write_all(buf),
        }
    }

    fn finish(self) -> std::io::Result<u64> {
        match self {
            LineCount::Plain(l) => Ok(l.total()),
            LineCount::Gzip(d) => Ok(d.finish()?.total()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_lines_plain_and_gzip() {
        let text = b"{\"a\":1}\n{\"a\":2}\n{\"a\":3}";
        let mut c = LineCount::new(false);
        for part in text.chunks(4) {
            c.feed(part).unwrap();
        }
        assert_eq!(c.finish().unwrap(), 3);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"x\ny\n").unwrap();
        let bytes = gz.finish().unwrap();
        let mut c = LineCount::new(true);
        for part in bytes.chunks(3) {
            c.feed(part).unwrap();
        }
        assert_eq!(c.finish().unwrap(), 2);
        let mut c = LineCount::new(true);
        c.feed(&bytes[..bytes.len() - 4]).unwrap();
        assert!(c.finish().is_err(), "a truncated gzip stream is noticed");
        assert_eq!(LineCount::new(false).finish().unwrap(), 0);
    }

    fn records(text: &[u8], chunk: usize) -> u64 {
        let mut c = LineCount::new(false);
        for part in text.chunks(chunk) {
            c.feed(part).unwrap();
        }
        c.finish().unwrap()
    }

    #[test]
    fn blank_lines_are_not_records_as_in_curate() {
        let cases: [(&[u8], u64); 11] = [
            (b"{\"a\":1}\n\n{\"a\":2}\n", 2),
            (b"{\"a\":1}\n \t\r\n{\"a\":2}", 2),
            (b"\n\n\n", 0),
            (b"  ", 0),
            (b"{}\r\n{}\r\n\r\n", 2),
            (b"\xEF\xBB\xBF{}\n{}\n", 2),
            (b"\xEF\xBB\xBF\n{}\n", 1),
            (b"\xEF\xBB\xBF", 0),
            (b"\xEF\xBB", 1),
            (b"\xEF{}\n", 1),
            (b"{}\n\xEF\xBB\xBF\n", 2),
        ];
        for (text, want) in cases {
            for chunk in [1, 2, 3, 64] {
                assert_eq!(records(text, chunk), want, "{text:?} in chunks of {chunk}");
            }
            // The same count as curate's reader.
            let mut curate = 0u64;
            crate::raw::lines::for_each_line(text, 1 << 20, |_, _| {
                curate += 1;
                Ok::<(), std::io::Error>(())
            })
            .unwrap();
            assert_eq!(curate, want, "curate counts {text:?} the same");
        }
    }
}
