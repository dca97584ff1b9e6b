//! `fhirflow view`: run, check and test SQL-on-FHIR v2 ViewDefinitions, and
//! write them for Athena.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Subcommand, ValueEnum};
use fhirflow::settings::Settings;
use fhirflow::storage::Lake;
use fhirflow::views::{self, Layer, NamedView, ViewTable};
use fhirflow::{Error, Result};
use futures::StreamExt;

#[derive(Subcommand)]
pub enum ViewCommand {
    /// Run a ViewDefinition over a layer or NDJSON files and print or write its rows.
    Run {
        /// A ViewDefinition file, or the name of a view of [sql] views (e.g. patient_demographics).
        view: String,
        /// What to read: raw, curated (default), lake, lake-history, or NDJSON files and
        /// folders (repeat --over for several).
        #[arg(long)]
        over: Vec<String>,
        /// Only this tenant's rows (layers only).
        #[arg(long)]
        tenant: Option<String>,
        /// Only this import date, YYYY-MM-DD (layers only).
        #[arg(long)]
        date: Option<String>,
        #[arg(long, value_enum, default_value_t = ViewFormat::Table)]
        format: ViewFormat,
        /// Write to this file instead of stdout (written whole or not at all).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Check ViewDefinitions (structure, FHIRPath syntax, element names and types against
    /// FHIR R4, column names) without reading data; errors give file, line and column.
    ///
    /// Exit code 0 when every view is valid, 1 otherwise.
    Check {
        /// Files or folders (default: the views of [sql] views).
        paths: Vec<PathBuf>,
    },
    /// Run SQL-on-FHIR v2 conformance test files (the official suite's format) and write
    /// the suite's test_report.json.
    ///
    /// Exit code 0 when every test passes, 1 otherwise.
    Test {
        /// A test file or a folder of them.
        dir: PathBuf,
        /// Where to write the report.
        #[arg(long, default_value = "test_report.json")]
        report: PathBuf,
    },
    /// Write a ViewDefinition as an Athena (Trino) CREATE OR REPLACE VIEW.
    Athena {
        view: String,
        /// The Glue database the view is created in and reads from.
        #[arg(long)]
        database: String,
        /// What the view reads: fhirflow's curated tables (external_fhir_curated) or
        /// HealthLake's Iceberg tables.
        #[arg(long, value_enum, default_value_t = AthenaSource::Curated)]
        source: AthenaSource,
    },
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum ViewFormat {
    Table,
    Csv,
    Json,
    Parquet,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum AthenaSource {
    Curated,
    Healthlake,
}

/// A view given by file or by name.
fn find(spec: &str, settings: &Settings) -> Result<NamedView> {
    let path = Path::new(spec);
    if path.exists() {
        return views::read(path);
    }
    let known = views::load(&settings.sql.views)?;
    let names: Vec<String> = known.iter().map(|v| v.name.clone()).collect();
    known.into_iter().find(|v| v.name == spec).ok_or_else(|| {
        Error::Usage(format!(
            "{spec}: no such file, and no view of that name in [sql] views ({})",
            names.join(", ")
        ))
    })
}

pub async fn run(command: ViewCommand, settings: &Settings, quiet: bool) -> Result<()> {
    match command {
        ViewCommand::Run {
            view,
            over,
            tenant,
            date,
            format,
            output,
        } => {
            let v = find(&view, settings)?;
            let layer = match over.as_slice() {
                [] => Some(Layer::Curated),
                [one] => Layer::from_str(one, true).ok(),
                _ => None,
            };
            // Files need no lake: a bare session plans the view over them.
            let ctx = match layer {
                Some(_) => fhirflow::sql::session(&Lake::open(settings)?, settings).await?,
                None => datafusion::prelude::SessionContext::new(),
            };
            let table = match layer {
                Some(layer) => {
                    views::over_layer(
                        &ctx,
                        v.view.clone(),
                        layer,
                        tenant.as_deref(),
                        date.as_deref(),
                    )
                    .await?
                }
                None => {
                    if tenant.is_some() || date.is_some() {
                        return Err(Error::Usage(
                            "--tenant and --date select partitions of a layer, not files".into(),
                        ));
                    }
                    let paths: Vec<PathBuf> = over.iter().map(PathBuf::from).collect();
                    ViewTable::new(
                        v.view.clone(),
                        views::files_source(&ctx, &paths)?,
                        Vec::new(),
                    )?
                }
            };
            let df = ctx
                .read_table(Arc::new(table))
                .map_err(|e| Error::query("view", "run", e))?;
            write(df, format, output.as_deref()).await
        }
        ViewCommand::Check { paths } => {
            let checked: Vec<Result<NamedView>> = if paths.is_empty() {
                match views::load(&settings.sql.views) {
                    Ok(all) => all.into_iter().map(Ok).collect(),
                    Err(e) => vec![Err(e)],
                }
            } else {
                let mut files = Vec::new();
                for p in &paths {
                    if p.is_dir() {
                        files.extend(views::json_files(p)?);
                    } else {
                        files.push(p.clone());
                    }
                }
                files.iter().map(|f| views::read(f)).collect()
            };
            let mut failed = 0;
            for c in &checked {
                match c {
                    Ok(v) => {
                        for w in &v.view.warnings {
                            let (line, col) = w.line_col(&v.text);
                            println!("warning {}:{line}:{col}: {w}", v.file);
                        }
                        if !quiet {
                            let cols: Vec<String> = v
                                .view
                                .columns
                                .iter()
                                .map(|c| {
                                    format!(
                                        "{} {:?}{}",
                                        c.name,
                                        c.kind,
                                        if c.collection { "[]" } else { "" }
                                    )
                                })
                                .collect();
                            println!("ok {} ({}): {}", v.file, v.view.resource, cols.join(", "));
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        println!("error {e}");
                    }
                }
            }
            if failed > 0 {
                return Err(Error::View {
                    file: format!("{failed} of {}", checked.len()),
                    message: "views are not valid".into(),
                });
            }
            Ok(())
        }
        ViewCommand::Test { dir, report } => {
            let files = if dir.is_dir() {
                views::json_files(&dir)?
            } else {
                vec![dir.clone()]
            };
            let mut results = Vec::new();
            let (mut passed, mut total) = (0, 0);
            for f in &files {
                let outcomes = fhirflow_views::suite::run_file(f).map_err(|e| Error::Input {
                    path: f.clone(),
                    reason: e,
                })?;
                let ok = outcomes.iter().filter(|o| o.passed).count();
                passed += ok;
                total += outcomes.len();
                let name = f
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .to_string();
                if !quiet {
                    println!("{name}: {ok} of {} passed", outcomes.len());
                }
                for o in outcomes.iter().filter(|o| !o.passed) {
                    println!("  FAIL {}: {}", o.name, o.reason.as_deref().unwrap_or(""));
                }
                results.push((name, outcomes));
            }
            let doc = fhirflow_views::suite::report(&results);
            let text = serde_json::to_string_pretty(&doc).expect("a JSON value");
            write_whole(&report, text.as_bytes())?;
            println!(
                "{passed} of {total} tests passed; report: {}",
                report.display()
            );
            if passed < total {
                return Err(Error::View {
                    file: dir.display().to_string(),
                    message: format!("{} of {total} tests failed", total - passed),
                });
            }
            Ok(())
        }
        ViewCommand::Athena {
            view,
            database,
            source,
        } => {
            let v = find(&view, settings)?;
            let target = match source {
                AthenaSource::Curated => fhirflow_views::athena::Source::Curated,
                AthenaSource::Healthlake => fhirflow_views::athena::Source::HealthLake,
            };
            let sql = fhirflow_views::athena::create_view(&v.view, &v.name, &database, target);
            for note in &sql.notes {
                eprintln!("note: {note}");
            }
            println!("{}", sql.text);
            Ok(())
        }
    }
}

/// `bytes` to `path` through a temporary file beside it, renamed into place.
fn write_whole(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e: std::io::Error| Error::Input {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    persist(tmp, path)
}

/// Renames a finished temporary file into place, with the mode a file the
/// user wrote would have (temporary files start private: 0600).
fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    let io = |e: std::io::Error| Error::Input {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644)).map_err(io)?;
    }
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// The view's rows to stdout or a file, streamed (but for the table format,
/// which needs every row to size its columns).
async fn write(
    df: datafusion::dataframe::DataFrame,
    format: ViewFormat,
    output: Option<&Path>,
) -> Result<()> {
    let q = |e| Error::query("view", "run", e);
    let w = |e: arrow::error::ArrowError| Error::Usage(format!("writing the result: {e}"));
    let schema = Arc::new(df.schema().as_arrow().clone());
    let mut stream = df.execute_stream().await.map_err(q)?;
    let (mut sink, tmp): (Box<dyn Write + Send>, Option<tempfile::NamedTempFile>) = match output {
        None => (Box::new(std::io::stdout()), None),
        Some(p) => {
            let dir = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::Input {
                path: p.to_path_buf(),
                reason: e.to_string(),
            })?;
            let file = tmp.reopen().map_err(|e| Error::Input {
                path: p.to_path_buf(),
                reason: e.to_string(),
            })?;
            (Box::new(std::io::BufWriter::new(file)), Some(tmp))
        }
    };
    match format {
        ViewFormat::Table => {
            let mut batches = Vec::new();
            while let Some(b) = stream.next().await {
                batches.push(b.map_err(q)?);
            }
            let table = arrow::util::pretty::pretty_format_batches(&batches).map_err(w)?;
            writeln!(sink, "{table}").map_err(|e| w(e.into()))?;
        }
        ViewFormat::Csv => {
            let mut batches = 0;
            {
                let mut writer = arrow::csv::Writer::new(&mut sink);
                while let Some(b) = stream.next().await {
                    writer.write(&b.map_err(q)?).map_err(w)?;
                    batches += 1;
                }
            }
            if batches == 0 {
                // No batch: the header alone still says what the columns are
                // (the writer writes it with its first batch).
                let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                writeln!(sink, "{}", names.join(",")).map_err(|e| w(e.into()))?;
            }
        }
        ViewFormat::Json => {
            let mut writer = arrow::json::LineDelimitedWriter::new(&mut sink);
            while let Some(b) = stream.next().await {
                writer.write(&b.map_err(q)?).map_err(w)?;
            }
            writer.finish().map_err(w)?;
        }
        ViewFormat::Parquet => {
            let mut writer = parquet::arrow::ArrowWriter::try_new(&mut sink, schema, None)
                .map_err(|e| Error::Usage(format!("writing Parquet: {e}")))?;
            while let Some(b) = stream.next().await {
                writer
                    .write(&b.map_err(q)?)
                    .map_err(|e| Error::Usage(format!("writing Parquet: {e}")))?;
            }
            writer
                .close()
                .map_err(|e| Error::Usage(format!("writing Parquet: {e}")))?;
        }
    }
    sink.flush().map_err(|e| w(e.into()))?;
    drop(sink);
    if let (Some(tmp), Some(path)) = (tmp, output) {
        persist(tmp, path)?;
    }
    Ok(())
}
