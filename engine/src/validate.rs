//! `fhirflow validate FILE|DIR...`: FHIR R4 validation of local files, with
//! no lake. NDJSON files (`.ndjson`, `.ndjson.gz`) are validated line by line;
//! `.json` files hold one resource (a Bundle is one resource, its entries
//! checked inside it). Folders are searched for both, recursively.
//!
//! Output: every finding with its file and line, then a summary per resource
//! type; `--format json` writes the same as one JSON document, streamed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use fhirflow_fhir::{Finding, Severity, Validator};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::raw::lines::{for_each_line, Line};

/// Resources at most this large are read from a `.json` file.
const MAX_JSON_FILE_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Counts per resource type.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct TypeCounts {
    pub resources: u64,
    pub valid: u64,
    pub invalid: u64,
    pub errors: u64,
    pub warnings: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub files: u64,
    pub total: TypeCounts,
    /// Lines that are not a resource of a known type are counted under "".
    pub by_type: BTreeMap<String, TypeCounts>,
}

/// Where findings go as they are found.
struct Sink<'w> {
    out: &'w mut dyn Write,
    format: Format,
    first: bool,
}

#[derive(Serialize)]
struct Row<'a> {
    file: &'a str,
    line: u64,
    resource_type: Option<&'a str>,
    id: Option<&'a str>,
    severity: &'a str,
    code: &'a str,
    location: &'a str,
    message: &'a str,
}

impl Sink<'_> {
    fn finding(&mut self, row: &Row<'_>) -> std::io::Result<()> {
        match self.format {
            Format::Text => {
                let at = if row.location.is_empty() {
                    String::new()
                } else {
                    format!(" at {}", row.location)
                };
                writeln!(
                    self.out,
                    "{}:{}: {} {}{at}: {}",
                    row.file, row.line, row.severity, row.code, row.message
                )
            }
            Format::Json => {
                let sep = if self.first { "" } else { "," };
                self.first = false;
                let json = serde_json::to_string(row).map_err(std::io::Error::other)?;
                writeln!(self.out, "{sep}{json}")
            }
        }
    }
}

/// Validates every file under `paths`, writing findings and the summary to
/// `out`. Errors are usage or I/O errors (exit code 2); invalid resources
/// are not errors here: see [`Summary::total`].
pub fn validate_paths(
    paths: &[PathBuf],
    validator: &Validator,
    max_line_bytes: usize,
    format: Format,
    out: &mut dyn Write,
) -> Result<Summary> {
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files)?;
    }
    if files.is_empty() {
        return Err(Error::Usage(
            "no .ndjson, .ndjson.gz or .json files in the given paths".into(),
        ));
    }
    let io = |e: std::io::Error| Error::Usage(format!("writing the output: {e}"));
    if format == Format::Json {
        writeln!(out, "{{\"findings\":[").map_err(io)?;
    }
    let mut sink = Sink {
        out,
        format,
        first: true,
    };
    let mut summary = Summary::default();
    for file in &files {
        summary.files += 1;
        validate_file(file, validator, max_line_bytes, &mut sink, &mut summary)?;
    }
    let out = sink.out;
    match format {
        Format::Json => {
            let s = serde_json::to_string(&summary).map_err(|e| Error::Usage(e.to_string()))?;
            writeln!(out, "],\"summary\":{s}}}").map_err(io)?;
        }
        Format::Text => print_summary(out, &summary).map_err(io)?,
    }
    Ok(summary)
}

fn collect(path: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?;
    if meta.is_file() {
        files.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() {
            collect(&p, files)?;
        } else if name.ends_with(".ndjson")
            || name.ends_with(".ndjson.gz")
            || name.ends_with(".json")
        {
            files.push(p);
        }
    }
    Ok(())
}

fn validate_file(
    path: &Path,
    validator: &Validator,
    max_line_bytes: usize,
    sink: &mut Sink<'_>,
    summary: &mut Summary,
) -> Result<()> {
    let name = path.display().to_string();
    let read_err = |e: std::io::Error| Error::Usage(format!("{name}: {e}"));
    let file = std::fs::File::open(path).map_err(read_err)?;
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if file_name.ends_with(".json") {
        let mut text = Vec::new();
        file.take(MAX_JSON_FILE_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_JSON_FILE_BYTES {
            let message = format!("the file is larger than {MAX_JSON_FILE_BYTES} bytes");
            return report(
                sink,
                summary,
                &name,
                1,
                None,
                None,
                &[error("TOO_LARGE", message)],
            );
        }
        return one(&name, 1, &text, None, validator, sink, summary);
    }
    // <Type>.ndjson or <Type>.NNN.ndjson: lines should be of that type.
    let expected = file_name
        .split('.')
        .next()
        .and_then(fhirflow_fhir::resource_type);
    let reader: Box<dyn Read> = if file_name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    // The curate stage's bounded line splitter: a too-long line is never held
    // whole; blank lines, a BOM and CRLF are handled the same way.
    for_each_line(reader, max_line_bytes, |n, line| match line {
        Line::Text { bytes, .. } => one(&name, n, bytes, expected, validator, sink, summary),
        Line::TooLong { len } => {
            let message =
                format!("the line has {len} bytes, more than the limit of {max_line_bytes}");
            report(
                sink,
                summary,
                &name,
                n,
                None,
                None,
                &[error("LINE_TOO_LONG", message)],
            )
        }
    })
    .map_err(|e| match e {
        Error::Io { source, .. } => read_err(source),
        other => other,
    })?;
    Ok(())
}

fn error(code: &'static str, message: String) -> Finding {
    Finding {
        severity: Severity::Error,
        code,
        message,
        location: String::new(),
    }
}

fn one(
    file: &str,
    line: u64,
    bytes: &[u8],
    expected: Option<&str>,
    validator: &Validator,
    sink: &mut Sink<'_>,
    summary: &mut Summary,
) -> Result<()> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        let f = error("INVALID_UTF8", "the text is not valid UTF-8".into());
        return report(sink, summary, file, line, None, None, &[f]);
    };
    let o = validator.outcome(text, expected);
    report(
        sink,
        summary,
        file,
        line,
        o.resource_type,
        o.id.as_deref(),
        &o.findings,
    )
}

fn report(
    sink: &mut Sink<'_>,
    summary: &mut Summary,
    file: &str,
    line: u64,
    resource_type: Option<&str>,
    id: Option<&str>,
    findings: &[Finding],
) -> Result<()> {
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count() as u64;
    let warnings = findings.len() as u64 - errors;
    for counts in [
        &mut summary.total,
        summary
            .by_type
            .entry(resource_type.unwrap_or("").to_string())
            .or_default(),
    ] {
        counts.resources += 1;
        if errors == 0 {
            counts.valid += 1;
        } else {
            counts.invalid += 1;
        }
        counts.errors += errors;
        counts.warnings += warnings;
    }
    for f in findings {
        let row = Row {
            file,
            line,
            resource_type,
            id,
            severity: f.severity.as_str(),
            code: f.code,
            location: &f.location,
            message: &f.message,
        };
        sink.finding(&row)
            .map_err(|e| Error::Usage(format!("writing the output: {e}")))?;
    }
    Ok(())
}

fn print_summary(out: &mut dyn Write, s: &Summary) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<28} {:>10} {:>10} {:>10} {:>8} {:>9}",
        "resource type", "resources", "valid", "invalid", "errors", "warnings"
    )?;
    let row = |out: &mut dyn Write, name: &str, c: &TypeCounts| {
        writeln!(
            out,
            "{:<28} {:>10} {:>10} {:>10} {:>8} {:>9}",
            name, c.resources, c.valid, c.invalid, c.errors, c.warnings
        )
    };
    for (ty, c) in &s.by_type {
        row(
            out,
            if ty.is_empty() {
                "(not a resource)"
            } else {
                ty
            },
            c,
        )?;
    }
    row(out, "total", &s.total)?;
    writeln!(
        out,
        "{} of {} resources in {} files are valid FHIR R4",
        s.total.valid, s.total.resources, s.files
    )
}
