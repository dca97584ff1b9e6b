//! The `fhirflow` command.
//!
//! Exit codes (the README lists them): 0 success; 1 a run failed; 2 bad
//! usage, configuration or partition value; 3 a curate run whose records did
//! not add up; 4 busy; 5 nothing to do.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use fhirflow::curate::{CurateReport, TypeSummary};
use fhirflow::layout::{ImportDate, SourceSystem, TenantGuid};
use fhirflow::report::Reporter;
use fhirflow::settings::{Overrides, Settings};
use fhirflow::storage::Lake;
use fhirflow::validate::Format as ValidateFormat;
use fhirflow::{Error, Result};
use serde_json::json;

mod cli_output;
mod view_cmd;

/// Carries FHIR R4 NDJSON through a multi-tenant lake: raw → curated → metadata.
#[derive(Parser)]
#[command(name = "fhirflow", version)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// Config file (default: ./fhirflow.toml when it exists).
    #[arg(help_heading = "Lake", long, global = true, env = "FHIRFLOW_CONFIG")]
    config: Option<PathBuf>,
    /// Root of every layer: a folder, or a URL (file:///…, s3://bucket/prefix, memory://).
    #[arg(help_heading = "Lake", long, global = true, env = "FHIRFLOW_LAKE")]
    lake: Option<String>,
    /// Root of the raw layer, when not the lake's.
    #[arg(help_heading = "Lake", long, global = true, env = "FHIRFLOW_RAW_ROOT")]
    raw_root: Option<String>,
    /// Root of the curated layer, when not the lake's.
    #[arg(
        help_heading = "Lake",
        long,
        global = true,
        env = "FHIRFLOW_CURATED_ROOT"
    )]
    curated_root: Option<String>,
    /// Root of the metadata layer, when not the lake's.
    #[arg(
        help_heading = "Lake",
        long,
        global = true,
        env = "FHIRFLOW_METADATA_ROOT"
    )]
    metadata_root: Option<String>,
    /// The system of the tenant label in meta.security.
    #[arg(
        help_heading = "Curation",
        long,
        global = true,
        env = "FHIRFLOW_TENANT_LABEL_SYSTEM"
    )]
    tenant_label_system: Option<String>,
    /// Reject lines longer than this many bytes.
    #[arg(
        help_heading = "Curation",
        long,
        global = true,
        env = "FHIRFLOW_MAX_LINE_BYTES"
    )]
    max_line_bytes: Option<usize>,
    /// Reject JSON nested deeper than this.
    #[arg(
        help_heading = "Curation",
        long,
        global = true,
        env = "FHIRFLOW_MAX_DEPTH"
    )]
    max_depth: Option<usize>,
    /// Split curated files into numbered parts above this many bytes.
    #[arg(
        help_heading = "Curation",
        long,
        global = true,
        env = "FHIRFLOW_PART_MAX_BYTES"
    )]
    part_max_bytes: Option<u64>,
    /// Files, or pieces of large files, processed at once (default: the
    /// number of cores).
    #[arg(
        help_heading = "Curation",
        long,
        global = true,
        env = "FHIRFLOW_CONCURRENCY"
    )]
    concurrency: Option<usize>,
    /// FHIR validation in curate: strict, structure-only (no value-set bindings) or off.
    #[arg(
        help_heading = "Curation",
        long,
        global = true,
        env = "FHIRFLOW_VALIDATION"
    )]
    validation: Option<fhirflow_fhir::Level>,
    /// The rules of curation step 3 for every file: a folder, `builtin` (the set inside
    /// the binary, the default) or `none`.
    #[arg(help_heading = "Curation", long, global = true, env = "FHIRFLOW_RULES")]
    rules: Option<String>,
    /// A value for rule_param(name, …) in the rules, as name=value (repeatable).
    #[arg(help_heading = "Curation", long = "rule-param", global = true, value_parser = parse_param)]
    rule_params: Vec<(String, String)>,
    /// Wait up to this many seconds for a partition another run is writing,
    /// instead of exiting at once with code 4 (busy).
    #[arg(
        help_heading = "Runs and logs",
        long,
        global = true,
        env = "FHIRFLOW_WAIT",
        value_name = "SECONDS"
    )]
    wait: Option<u64>,
    /// How long a partition lease lasts without renewal (default 60 s).
    #[arg(long, global = true, env = "FHIRFLOW_LEASE_TTL_SECONDS", hide = true)]
    lease_ttl_seconds: Option<u64>,
    /// Print only results and errors (and log only warnings).
    #[arg(help_heading = "Runs and logs", short, long, global = true)]
    quiet: bool,
    /// Also log debug lines (every phase, every retry, the SDKs' own).
    #[arg(
        help_heading = "Runs and logs",
        short,
        long,
        global = true,
        conflicts_with = "quiet"
    )]
    verbose: bool,
    /// Log lines on stderr as text, or as JSON lines (for CloudWatch Logs and other log pipelines).
    #[arg(help_heading = "Runs and logs", long, global = true, env = "FHIRFLOW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `--output`: what a command that does work prints on stdout.
#[derive(Args, Clone, Copy)]
struct Output {
    /// Print the summary as text, or as one JSON document (see the README).
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(Args)]
struct Partition {
    /// The tenant: a GUID such as 0f8fad5b-d9cb-469f-a165-70867728950e.
    #[arg(long)]
    tenant: TenantGuid,
    /// The import date, YYYY-MM-DD.
    #[arg(long)]
    date: ImportDate,
}

/// Where `extract` (and `run`) pull from, and what.
#[derive(Args, Clone, Default)]
struct ExtractArgs {
    /// The FHIR server's base URL (default: [extract] fhir_url).
    #[arg(long, env = "FHIRFLOW_FHIR_URL")]
    fhir_url: Option<String>,
    /// Only resources changed since this instant (_since), e.g. 2024-05-01T00:00:00Z.
    #[arg(long, conflicts_with = "incremental")]
    since: Option<String>,
    /// Only resources changed since the last complete extraction of this tenant and
    /// source system (its manifest's transactionTime).
    #[arg(long)]
    incremental: bool,
    /// Resource types to export (_type), comma-separated or repeated.
    #[arg(long = "type", value_delimiter = ',')]
    types: Vec<String>,
    /// A search that narrows one type (_typeFilter), e.g. "Observation?status=final" (repeatable).
    #[arg(long = "type-filter")]
    type_filters: Vec<String>,
    /// Export one Group's members (Group/<id>/$export).
    #[arg(long, conflicts_with = "patient")]
    group: Option<String>,
    /// Export every patient's compartment (Patient/$export).
    #[arg(long)]
    patient: bool,
    /// Abandon a pending (interrupted) extraction of this tenant and source system and start anew.
    #[arg(long)]
    restart: bool,
    /// The static bearer token, from the environment only
    /// (FHIRFLOW_BEARER_TOKEN): never a flag value, which any user could read
    /// in the process list.
    #[arg(skip = std::env::var("FHIRFLOW_BEARER_TOKEN").ok().filter(|t| !t.is_empty()))]
    bearer_token: Option<String>,
    /// A file holding the FHIR server's static bearer token (its content,
    /// trimmed); or set FHIRFLOW_BEARER_TOKEN.
    #[arg(long, env = "FHIRFLOW_BEARER_TOKEN_FILE")]
    bearer_token_file: Option<PathBuf>,
    /// SMART Backend Services: the registered client id.
    #[arg(long, env = "FHIRFLOW_SMART_CLIENT_ID")]
    smart_client_id: Option<String>,
    /// SMART Backend Services: the private key (PEM or JWK file; RSA signs RS384, P-384 signs ES384).
    #[arg(long, env = "FHIRFLOW_SMART_PRIVATE_KEY")]
    smart_private_key: Option<PathBuf>,
    /// SMART Backend Services: the token endpoint (default: from .well-known/smart-configuration).
    #[arg(long, env = "FHIRFLOW_SMART_TOKEN_URL")]
    smart_token_url: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Pull a FHIR Bulk Data export ($export) from a FHIR server into the raw layer.
    ///
    /// Running the same command again after a crash or failure resumes the
    /// export instead of starting a new one.
    Extract {
        #[command(flatten)]
        from: ExtractArgs,
        /// The tenant GUID.
        #[arg(long)]
        tenant: TenantGuid,
        /// The source system, [A-Za-z0-9_-]{1,64}.
        #[arg(long)]
        source_system: SourceSystem,
        /// The import date, YYYY-MM-DD (default: today, UTC).
        #[arg(long)]
        date: Option<ImportDate>,
        #[command(flatten)]
        out: Output,
    },
    /// Land NDJSON files or folders in the raw layer.
    Ingest {
        /// Files named <Type>.ndjson or <Type>.NNN.ndjson (optionally .gz), or folders of them.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The tenant GUID.
        #[arg(long)]
        tenant: TenantGuid,
        /// The source system, [A-Za-z0-9_-]{1,64}.
        #[arg(long)]
        source_system: SourceSystem,
        /// The import date, YYYY-MM-DD (default: today, UTC).
        #[arg(long)]
        date: Option<ImportDate>,
        #[command(flatten)]
        out: Output,
    },
    /// Curate every raw file of one tenant and date into the curated layer.
    Curate {
        #[command(flatten)]
        partition: Partition,
        #[command(flatten)]
        out: Output,
    },
    /// Import one curated tenant and date into the local Iceberg lake (default) or HealthLake.
    ///
    /// A retried import never imports twice. `fhirflow import status` looks at a
    /// HealthLake job started with --no-wait.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Import {
        #[command(subcommand)]
        command: Option<ImportCommand>,
        #[command(flatten)]
        args: ImportArgs,
    },
    /// The AWS Glue Data Catalog over the lake's S3 layers.
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
    /// Run SQL over every layer (raw.<type>, curated.<type>, metadata.import_*, lake.<type>).
    Sql {
        /// The query.
        query: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Extract from a FHIR server (with --fhir-url) or ingest the given paths (if any),
    /// then curate, import and (on an S3 lake) sync the Glue catalog, with a summary.
    Run {
        /// Where to import (default: [import] target, `local`).
        #[arg(long, value_enum)]
        target: Option<fhirflow::settings::ImportTarget>,
        /// Stop after curate.
        #[arg(long)]
        no_import: bool,
        /// HealthLake: return once the import job is submitted.
        #[arg(long)]
        no_wait: bool,
        /// Files or folders to ingest first (instead of extracting).
        #[arg(conflicts_with = "ExtractArgs", requires = "source_system")]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        from: ExtractArgs,
        /// The tenant GUID.
        #[arg(long)]
        tenant: TenantGuid,
        /// The source system (required with paths or a FHIR server).
        #[arg(long)]
        source_system: Option<SourceSystem>,
        /// The import date, YYYY-MM-DD (default: today, UTC).
        #[arg(long)]
        date: Option<ImportDate>,
        #[command(flatten)]
        out: Output,
    },
    /// List what is pending (sources of the tenants file due for extraction, raw partitions
    /// not curated since their newest object, curated partitions not imported) as a plan of
    /// units in the lake, for `work` on many machines.
    Plan {
        /// Which units: extract, curate, import, or all of them.
        #[arg(long, value_enum, default_value_t = PlanStageArg::All)]
        stage: PlanStageArg,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<TenantGuid>,
        /// Only this import date.
        #[arg(long, conflicts_with = "since")]
        date: Option<ImportDate>,
        /// Only import dates from this one on.
        #[arg(long)]
        since: Option<ImportDate>,
        #[command(flatten)]
        out: Output,
    },
    /// Run one unit of a plan. Exit codes: 0 done, 10 skipped (done before), 4 busy (another
    /// worker holds the partition: retry later), 3 not conserved and 1 failed (do not retry).
    ///
    /// Prints CloudWatch Embedded Metric Format lines on stdout, then the summary.
    Work {
        /// The plan, as `plan` printed it (or its id).
        #[arg(long)]
        plan: String,
        /// The unit, from 0 (default: AWS_BATCH_JOB_ARRAY_INDEX, else JOB_COMPLETION_INDEX).
        #[arg(long)]
        index: Option<usize>,
        /// Exit 0, not 10, when the unit was done before (for runners, such as an AWS Batch
        /// array job, that count any other exit code as a failure).
        #[arg(long)]
        skipped_ok: bool,
        #[command(flatten)]
        out: Output,
    },
    /// Serve AWS Lambda invocations, one plan unit each (the custom runtime's `bootstrap`:
    /// started with no arguments where AWS_LAMBDA_RUNTIME_API is set, the binary does this).
    #[cfg(feature = "lambda")]
    #[command(hide = true)]
    Lambda,
    /// Validate FHIR R4 files: NDJSON line by line, .json as one resource or Bundle.
    ///
    /// Exit code 0 when every resource is valid, 1 when one is not, 2 for usage or I/O errors.
    Validate {
        /// Files (.ndjson, .ndjson.gz, .json) or folders of them.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Output: findings and a summary as text, or one JSON document.
        #[arg(long, value_enum, default_value_t = ValidateFormat::Text)]
        format: ValidateFormat,
    },
    /// Curation rules (SQL files; built into the binary unless --rules names a folder):
    /// check, test, dry-run, export.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// SQL-on-FHIR v2 ViewDefinitions: run one over a layer or files, check them, run
    /// conformance tests, write them for Athena. `fhirflow sql` has each view of
    /// [sql] views as view.<name>.
    View {
        #[command(subcommand)]
        command: view_cmd::ViewCommand,
    },
    /// Print the resolved settings (secrets masked).
    Config,
}

#[derive(Args)]
struct ImportArgs {
    /// The tenant GUID.
    #[arg(long, required = true)]
    tenant: Option<TenantGuid>,
    /// The import date, YYYY-MM-DD.
    #[arg(long, required = true)]
    date: Option<ImportDate>,
    /// Where to import (default: [import] target, `local`).
    #[arg(long, value_enum)]
    target: Option<fhirflow::settings::ImportTarget>,
    /// HealthLake: return once the job is submitted (see `fhirflow import status`).
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    out: Output,
}

#[derive(Clone, Copy, ValueEnum)]
enum PlanStageArg {
    Extract,
    Curate,
    Import,
    All,
}

#[derive(Subcommand)]
enum ImportCommand {
    /// The HealthLake job of a tenant and date now; records its outcome once it has ended.
    Status {
        #[command(flatten)]
        partition: Partition,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Create or update, idempotently, the Glue databases, the tables of every layer and
    /// the partitions written since the last sync.
    Sync {
        /// The environment: the metadata database is fhir_import_metadata_<env>
        /// (default: [glue] env).
        #[arg(long, env = "FHIRFLOW_ENV")]
        env: Option<String>,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Plan every rule against the engine's schema without reading data.
    ///
    /// Exit code 0 when every rule plans, 1 when one does not.
    Check {
        /// The rules folder (default: --rules, else [curate] rules, else the built-in set).
        dir: Option<String>,
    },
    /// Run each rule's sqllogictest file (NAME.slt beside NAME.sql).
    ///
    /// Exit code 0 when every rule has a test and every test passes, 1 otherwise.
    Test {
        /// The rules folder (default: --rules, else [curate] rules, else the built-in set).
        dir: Option<String>,
    },
    /// Write the built-in rule set (rules, their tests, the analysts' guide) into a folder
    /// for editing; then run with --rules DIR or [curate] rules = "DIR".
    Export {
        /// The folder; created if missing. No file in it is overwritten.
        dir: PathBuf,
    },
    /// Dry run over one tenant and date: per rule, rows kept, rejected and changed, with samples. Writes nothing.
    Diff {
        #[command(flatten)]
        partition: Partition,
        /// Samples (changed and rejected rows) to show per rule and file.
        #[arg(long, default_value_t = 3)]
        samples: usize,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Csv,
    Json,
}

fn parse_param(text: &str) -> std::result::Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected name=value, got {text:?}")),
    }
}

fn main() -> ExitCode {
    // Lambda's custom runtime starts `bootstrap` with no arguments.
    let lambda = cfg!(feature = "lambda")
        && std::env::args_os().len() == 1
        && std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some();
    let cli = if lambda {
        Cli::parse_from(["fhirflow", "lambda"])
    } else {
        Cli::parse()
    };
    init_logs(&cli.global);
    fhirflow_aws::install();
    #[cfg(not(feature = "failpoints"))]
    if std::env::var_os("FHIRFLOW_FAILPOINT").is_some() {
        tracing::warn!(
            "FHIRFLOW_FAILPOINT is set, but this build has no failpoints (the tests build \
             with `cargo build --workspace --bins`, which turns the feature on)"
        );
    }
    let log_format = cli.global.log_format;
    let (command, output) = cli.command.name_and_output();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(run(cli, output == OutputFormat::Json));
    let code = match &result {
        Ok(_) => 0,
        Err(e) => e.exit_code(),
    };
    if let Err(Error::AlreadyDone(why)) = &result {
        eprintln!("fhirflow: skipped: {why}");
    } else if let Err(e) = &result {
        match log_format {
            LogFormat::Text => eprintln!("fhirflow: error: {}", error_text(e)),
            LogFormat::Json => tracing::error!(exit_code = code, "{}", error_text(e)),
        }
    }
    if output == OutputFormat::Json {
        let body = result.map_err(|e| error_text(&e));
        let doc = cli_output::document(command, code, body);
        println!("{doc}");
    }
    ExitCode::from(code)
}

impl From<PlanStageArg> for fhirflow::fleet::PlanStage {
    fn from(a: PlanStageArg) -> Self {
        match a {
            PlanStageArg::Extract => Self::Extract,
            PlanStageArg::Curate => Self::Curate,
            PlanStageArg::Import => Self::Import,
            PlanStageArg::All => Self::All,
        }
    }
}

/// One Lambda invocation: a unit (its summary), a plan (where it is: the
/// bucket and key a Distributed Map's ItemReader reads), or a catalog sync.
#[cfg(feature = "lambda")]
async fn lambda_event(
    lake: &Lake,
    settings: &Settings,
    bar: &Bar,
    event: fhirflow_lambda::Event,
) -> Result<serde_json::Value> {
    use fhirflow_lambda::{CommandEvent, Event};
    use serde_json::json;
    match event {
        Event::Work(w) => {
            let report = work_unit(lake, settings, &w.plan, w.index, bar).await?;
            Ok(json!({ "status": "done", "summary": cli_output::work(&report) }))
        }
        Event::Command(CommandEvent::Plan {
            stage,
            tenant,
            date,
            since,
        }) => {
            let bad =
                |what: &str, e: &dyn std::fmt::Display| Error::Usage(format!("plan: {what}: {e}"));
            let stage = match stage {
                Some(s) => PlanStageArg::from_str(&s, true).map_err(|e| bad("stage", &e))?,
                None => PlanStageArg::All,
            };
            let req = fhirflow::fleet::PlanRequest {
                stage: stage.into(),
                tenant: tenant.map(|t| t.parse()).transpose()?,
                date: date.map(|d| d.parse()).transpose()?,
                since: since.map(|d| d.parse()).transpose()?,
            };
            let report = fhirflow::fleet::plan(lake, settings, &req).await?;
            let (bucket, key) = match report
                .uri
                .strip_prefix("s3://")
                .and_then(|r| r.split_once('/'))
            {
                Some((b, k)) => (json!(b), json!(k)),
                None => (serde_json::Value::Null, serde_json::Value::Null),
            };
            let mut answer = cli_output::plan(&report);
            answer["status"] = json!("planned");
            answer["units"] = json!(report.units.len());
            answer["bucket"] = bucket;
            answer["key"] = key;
            Ok(answer)
        }
        Event::Command(CommandEvent::CatalogSync) => {
            let report = fhirflow_aws::glue::sync(lake, settings).await?;
            Ok(json!({ "status": "done", "catalog": cli_output::catalog(&report) }))
        }
    }
}

/// Runs unit `index` of `plan` and prints its CloudWatch EMF lines on
/// stdout (per-type counts when it ran, then the unit's own line, whatever
/// became of it).
async fn work_unit(
    lake: &Lake,
    settings: &Settings,
    plan: &str,
    index: usize,
    bar: &Bar,
) -> Result<fhirflow::fleet::WorkReport> {
    // CloudWatch takes no empty dimension value: a unit that cannot be
    // read is "unknown".
    let (stage, tenant, result) = match fhirflow::fleet::unit(lake, plan, index).await {
        Ok((id, unit)) => (
            unit.stage.name(),
            unit.tenant.clone(),
            fhirflow::fleet::work_on(lake, settings, &id, index, unit, bar).await,
        ),
        Err(e) => ("unknown", "unknown".to_string(), Err(e)),
    };
    let mut lines = match &result {
        Ok(w) => match &w.outcome {
            fhirflow::fleet::Outcome::Extracted(x) => fhirflow::emf::extract(x),
            fhirflow::fleet::Outcome::Curated(c) => fhirflow::emf::curate(c),
            fhirflow::fleet::Outcome::Imported(i) => i
                .iter()
                .flat_map(|i| fhirflow::emf::import(&tenant, i))
                .collect(),
        },
        Err(_) => Vec::new(),
    };
    let code = result.as_ref().map_or_else(|e| e.exit_code(), |_| 0);
    lines.push(fhirflow::emf::unit(stage, &tenant, code));
    for l in lines {
        println!("{l}");
    }
    result
}

/// An error with the sources its own text does not already show.
fn error_text(e: &Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(&format!("\n  caused by: {text}"));
        }
        source = s.source();
    }
    msg
}

/// Log lines go to stderr: fhirflow's own at info (warn with --quiet, debug
/// with --verbose), the object store's retries at info, everything else's
/// warnings (debug with --verbose). Never a record's contents or a secret:
/// the events name files, partitions, statuses and timings only.
fn init_logs(g: &Global) {
    use tracing::level_filters::LevelFilter;
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (ours, others) = match (g.quiet, g.verbose) {
        (true, _) => (LevelFilter::WARN, LevelFilter::WARN),
        (_, true) => (LevelFilter::DEBUG, LevelFilter::DEBUG),
        _ => (LevelFilter::INFO, LevelFilter::WARN),
    };
    let filter = Targets::new()
        .with_default(others)
        .with_target("fhirflow", ours)
        .with_target("object_store::client::retry", ours);
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let registry = tracing_subscriber::registry().with(filter);
    match g.log_format {
        LogFormat::Text => registry.with(layer).init(),
        LogFormat::Json => registry
            .with(layer.json().flatten_event(true).with_current_span(false))
            .init(),
    }
}

impl Command {
    /// The command's name in `--output json`, and its `--output`.
    fn name_and_output(&self) -> (&'static str, OutputFormat) {
        let text = OutputFormat::Text;
        match self {
            Command::Extract { out, .. } => ("extract", out.output),
            Command::Ingest { out, .. } => ("ingest", out.output),
            Command::Curate { out, .. } => ("curate", out.output),
            Command::Import {
                command: Some(ImportCommand::Status { out, .. }),
                ..
            } => ("import status", out.output),
            Command::Import { args, .. } => ("import", args.out.output),
            Command::Catalog {
                command: CatalogCommand::Sync { out, .. },
            } => ("catalog sync", out.output),
            Command::Run { out, .. } => ("run", out.output),
            Command::Plan { out, .. } => ("plan", out.output),
            Command::Work { out, .. } => ("work", out.output),
            #[cfg(feature = "lambda")]
            Command::Lambda => ("lambda", text),
            Command::Sql { .. } => ("sql", text),
            Command::Validate { .. } => ("validate", text),
            Command::Rules { .. } => ("rules", text),
            Command::View { .. } => ("view", text),
            Command::Config => ("config", text),
        }
    }
}

/// Runs the command; with `json`, prints nothing itself and returns its
/// summary for the `--output json` document.
async fn run(cli: Cli, json: bool) -> Result<serde_json::Value> {
    let g = &cli.global;
    let from = match &cli.command {
        Command::Extract { from, .. } | Command::Run { from, .. } => Some(from.clone()),
        _ => None,
    };
    let f = from.unwrap_or_default();
    let import_target = match &cli.command {
        Command::Import { args, .. } => args.target,
        Command::Run { target, .. } => *target,
        _ => None,
    };
    let glue_env = match &cli.command {
        Command::Catalog {
            command: CatalogCommand::Sync { env, .. },
        } => env.clone(),
        // Lambda starts the binary with no flags: the variable `--env` reads.
        #[cfg(feature = "lambda")]
        Command::Lambda => std::env::var("FHIRFLOW_ENV").ok().filter(|e| !e.is_empty()),
        _ => None,
    };
    let overrides = Overrides {
        lake: g.lake.clone(),
        raw_root: g.raw_root.clone(),
        curated_root: g.curated_root.clone(),
        metadata_root: g.metadata_root.clone(),
        tenant_label_system: g.tenant_label_system.clone(),
        max_line_bytes: g.max_line_bytes,
        max_depth: g.max_depth,
        part_max_bytes: g.part_max_bytes,
        concurrency: g.concurrency,
        validation: g.validation,
        rules: g.rules.clone(),
        rule_params: g.rule_params.clone(),
        fhir_url: f.fhir_url.clone(),
        bearer_token: f.bearer_token.clone(),
        bearer_token_file: f.bearer_token_file.clone(),
        smart_client_id: f.smart_client_id.clone(),
        smart_private_key: f.smart_private_key.clone(),
        smart_token_url: f.smart_token_url.clone(),
        import_target,
        glue_env,
        lease_wait_seconds: g.wait,
        lease_ttl_seconds: g.lease_ttl_seconds,
    };
    // A config file on S3 (how a Lambda function or a Batch job gets the
    // deployment's): fetched with the AWS chain's credentials and region.
    let settings = match g.config.as_deref().and_then(|p| p.to_str()) {
        Some(url) if url.contains("://") => {
            let text = fhirflow::storage::read_url(url, &Default::default()).await?;
            let text = String::from_utf8(text)
                .map_err(|_| Error::Config(format!("config file {url}: not UTF-8")))?;
            let base = Settings::from_text(&text, std::path::Path::new(url))?;
            Settings::resolve_from(base, &overrides)?
        }
        _ => Settings::resolve(g.config.as_deref(), &overrides)?,
    };
    if let Command::Config = cli.command {
        print!("{}", settings.to_masked_toml());
        return Ok(serde_json::Value::Null);
    }
    if let Command::Validate { paths, format } = &cli.command {
        return validate(&settings, paths, *format).map(|()| serde_json::Value::Null);
    }
    if let Command::Rules {
        command: RulesCommand::Check { dir } | RulesCommand::Test { dir },
    } = &cli.command
    {
        let dir = dir.as_deref().unwrap_or(&settings.curate.rules);
        let set = fhirflow::rules::RuleSet::from_setting(dir)?;
        return rules_check_or_test(&cli.command, &set, &settings)
            .await
            .map(|()| serde_json::Value::Null);
    }
    if let Command::Rules {
        command: RulesCommand::Export { dir },
    } = &cli.command
    {
        let written = fhirflow::rules::export_builtin(dir)?;
        if !g.quiet {
            println!(
                "wrote the rule set {} ({} files) to {}; use it with --rules {}",
                fhirflow::rules::builtin_name(),
                written.len(),
                dir.display(),
                dir.display()
            );
        }
        return Ok(serde_json::Value::Null);
    }
    if let Command::View { command } = cli.command {
        return view_cmd::run(command, &settings, g.quiet)
            .await
            .map(|()| serde_json::Value::Null);
    }
    let lake = Lake::open(&settings)?;
    let bar = Bar::new(g.quiet || json);
    // With --output json, nothing but the document goes to stdout.
    let quiet = g.quiet || json;
    let summary = match cli.command {
        Command::Config | Command::Validate { .. } | Command::View { .. } => {
            unreachable!("handled above")
        }
        Command::Rules {
            command: RulesCommand::Diff { partition, samples },
        } => {
            let dry = fhirflow::curate::dry_run_rules(
                &lake,
                &settings,
                &partition.tenant,
                partition.date,
                samples,
            )
            .await?;
            print!("{}", fhirflow::rules::diff::render(&dry));
            serde_json::Value::Null
        }
        Command::Rules { .. } => unreachable!("handled above"),
        Command::Ingest {
            paths,
            tenant,
            source_system,
            date,
            ..
        } => {
            let date = date.unwrap_or_else(ImportDate::today);
            let report =
                fhirflow::ingest::ingest(&lake, &paths, &tenant, &source_system, date).await?;
            print_ingest(&report, quiet);
            json!({ "ingest": cli_output::ingest(&report) })
        }
        Command::Extract {
            from,
            tenant,
            source_system,
            date,
            ..
        } => {
            let request = extract_request(&settings, &from, tenant, source_system, date)?
                .ok_or_else(|| {
                    Error::Usage("extract: give --fhir-url (or [extract] fhir_url)".into())
                })?;
            let report = fhirflow::extract::extract(&lake, &settings, &request, &bar).await?;
            print_extract(&report, quiet);
            json!({ "extract": cli_output::extract(&report) })
        }
        Command::Curate { partition, .. } => {
            let report =
                fhirflow::curate::curate(&lake, &settings, &partition.tenant, partition.date, &bar)
                    .await?;
            print_summary(&report, json);
            json!({ "curate": cli_output::curate(&report) })
        }
        Command::Import {
            command: Some(ImportCommand::Status { partition, .. }),
            ..
        } => {
            let report = fhirflow_aws::healthlake::status(
                &lake,
                &settings,
                &partition.tenant,
                partition.date,
            )
            .await?;
            print_import(&report, quiet);
            json!({ "import": cli_output::import(&report) })
        }
        Command::Import {
            command: None,
            args,
        } => {
            let (Some(tenant), Some(date)) = (args.tenant, args.date) else {
                unreachable!("the parser requires --tenant and --date");
            };
            let req = fhirflow::import::ImportRequest {
                tenant,
                date,
                target: settings.import.target,
                wait: !args.no_wait,
            };
            let report = fhirflow::import::import(&lake, &settings, &req, &bar).await?;
            print_import(&report, quiet);
            json!({ "import": cli_output::import(&report) })
        }
        Command::Catalog {
            command: CatalogCommand::Sync { .. },
        } => {
            let report = fhirflow_aws::glue::sync(&lake, &settings).await?;
            print_catalog(&report, quiet);
            json!({ "catalog": cli_output::catalog(&report) })
        }
        Command::Run {
            paths,
            from,
            tenant,
            source_system,
            date,
            target: _,
            no_import,
            no_wait,
            ..
        } => {
            let extract = match (&source_system, paths.is_empty()) {
                (Some(system), true) => {
                    extract_request(&settings, &from, tenant.clone(), system.clone(), date)?
                }
                (None, true) if settings.extract.fhir_url.is_some() => {
                    return Err(Error::Usage(
                        "run: extracting from the FHIR server needs --source-system".into(),
                    ));
                }
                _ => None,
            };
            let plan = fhirflow::run::RunPlan {
                paths,
                extract,
                tenant,
                source_system,
                date: date.unwrap_or_else(ImportDate::today),
                import: (!no_import).then_some(settings.import.target),
                wait: !no_wait,
            };
            let report = fhirflow::run::run(&lake, &settings, &plan, &bar).await?;
            if let Some(x) = &report.extract {
                print_extract(x, quiet);
            }
            if let Some(i) = &report.ingest {
                print_ingest(i, quiet);
            }
            print_summary(&report.curate, json);
            if let Some(i) = &report.import {
                print_import(i, quiet);
            }
            match &report.catalog {
                Some(c) => print_catalog(c, quiet),
                None if !quiet => println!(
                    "catalog: the lake is local; `fhirflow sql` shows the Glue names over it"
                ),
                None => {}
            }
            cli_output::run(&report)
        }
        Command::Plan {
            stage,
            tenant,
            date,
            since,
            ..
        } => {
            let req = fhirflow::fleet::PlanRequest {
                stage: stage.into(),
                tenant,
                date,
                since,
            };
            let report = fhirflow::fleet::plan(&lake, &settings, &req).await?;
            if !quiet {
                println!(
                    "plan: {} units ({} bytes) at {}",
                    report.units.len(),
                    report.bytes,
                    report.uri
                );
            }
            cli_output::plan(&report)
        }
        Command::Work {
            plan,
            index,
            skipped_ok,
            ..
        } => {
            let index = fhirflow::fleet::worker_index(index)?;
            let report = match work_unit(&lake, &settings, &plan, index, &bar).await {
                Err(Error::AlreadyDone(why)) if skipped_ok => {
                    eprintln!("fhirflow: skipped: {why}");
                    return Ok(serde_json::json!({ "work": { "index": index, "skipped": why } }));
                }
                other => other?,
            };
            match &report.outcome {
                fhirflow::fleet::Outcome::Extracted(x) => print_extract(x, quiet),
                fhirflow::fleet::Outcome::Curated(c) => print_summary(c, json),
                fhirflow::fleet::Outcome::Imported(i) => {
                    i.iter().for_each(|i| print_import(i, quiet))
                }
            }
            cli_output::work(&report)
        }
        #[cfg(feature = "lambda")]
        Command::Lambda => {
            let (lake, settings) = (&lake, &settings);
            let bar = Bar::new(true);
            let bar = &bar;
            fhirflow_lambda::serve(|event| async move {
                match lambda_event(lake, settings, bar, event).await {
                    Ok(answer) => Ok(answer),
                    Err(Error::AlreadyDone(why)) => {
                        Ok(serde_json::json!({ "status": "skipped", "reason": why }))
                    }
                    Err(e) => Err(fhirflow_lambda::Failure {
                        error_type: match e.exit_code() {
                            4 => fhirflow_lambda::BUSY,
                            3 => fhirflow_lambda::NOT_CONSERVED,
                            _ => fhirflow_lambda::FAILED,
                        },
                        message: error_text(&e),
                    }),
                }
            })
            .await
            .map_err(|e| Error::Usage(format!("lambda: the runtime stopped: {e}")))?;
            serde_json::Value::Null
        }
        Command::Sql { query, format } => {
            let ctx = fhirflow::sql::session(&lake, &settings).await?;
            let batches = fhirflow::sql::query(&ctx, &query).await?;
            let out = std::io::stdout();
            let mut out = out.lock();
            let w = |e: arrow::error::ArrowError| Error::Usage(format!("writing the result: {e}"));
            match format {
                Format::Table => {
                    let table = arrow::util::pretty::pretty_format_batches(&batches).map_err(w)?;
                    writeln!(out, "{table}").ok();
                }
                Format::Csv => {
                    let mut writer = arrow::csv::Writer::new(&mut out);
                    for b in &batches {
                        writer.write(b).map_err(w)?;
                    }
                }
                Format::Json => {
                    let mut writer = arrow::json::LineDelimitedWriter::new(&mut out);
                    for b in &batches {
                        writer.write(b).map_err(w)?;
                    }
                    writer.finish().map_err(w)?;
                }
            }
            serde_json::Value::Null
        }
    };
    Ok(summary)
}

async fn rules_check_or_test(
    command: &Command,
    set: &fhirflow::rules::RuleSet,
    settings: &Settings,
) -> Result<()> {
    let params = &settings.curate.rule_params;
    if let Command::Rules {
        command: RulesCommand::Check { .. },
    } = command
    {
        let problems = fhirflow::rules::check::check(set, params).await?;
        for p in &problems {
            println!("{}: {}", p.file, p.message);
        }
        return match problems.len() {
            0 => {
                println!("{} rules in {}: all plan", set.rules.len(), set.describe());
                Ok(())
            }
            n => Err(Error::RulesFailed(format!(
                "{n} problems in {}",
                set.describe()
            ))),
        };
    }
    let report = fhirflow::rules::test::test(set, params).await?;
    for name in &report.passed {
        println!("ok       {name}");
    }
    for name in &report.untested {
        println!("NO TEST  {name} (add {})", name.replace(".sql", ".slt"));
    }
    for (name, why) in &report.failed {
        println!("FAILED   {name}\n{why}");
    }
    println!(
        "rules test: {} passed, {} failed, {} without a test",
        report.passed.len(),
        report.failed.len(),
        report.untested.len()
    );
    if report.ok() {
        Ok(())
    } else {
        Err(Error::RulesFailed(format!(
            "rule tests failed in {}",
            set.describe()
        )))
    }
}

fn validate(settings: &Settings, paths: &[PathBuf], format: ValidateFormat) -> Result<()> {
    let level = match settings.curate.validation {
        fhirflow_fhir::Level::Off => fhirflow_fhir::Level::Strict,
        level => level,
    };
    let validator = fhirflow_fhir::Validator::new(level, settings.curate.max_depth);
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let summary = fhirflow::validate::validate_paths(
        paths,
        &validator,
        settings.curate.max_line_bytes,
        format,
        &mut out,
    )?;
    out.flush()
        .map_err(|e| Error::Usage(format!("writing the output: {e}")))?;
    match summary.total.invalid {
        0 => Ok(()),
        invalid => Err(Error::Invalid {
            invalid,
            resources: summary.total.resources,
        }),
    }
}

/// The extraction `from` asks for, or None when no FHIR URL is known.
fn extract_request(
    settings: &Settings,
    from: &ExtractArgs,
    tenant: TenantGuid,
    source_system: SourceSystem,
    date: Option<ImportDate>,
) -> Result<Option<fhirflow::extract::ExtractRequest>> {
    use fhirflow::extract::{export::Level, ExtractRequest, Since};
    let Some(url) = &settings.extract.fhir_url else {
        return Ok(None);
    };
    let fhir_url =
        url::Url::parse(url).map_err(|e| Error::Usage(format!("--fhir-url {url:?}: {e}")))?;
    let level = match (&from.group, from.patient) {
        (Some(g), _) => Level::Group(g.clone()),
        (None, true) => Level::Patient,
        (None, false) => Level::System,
    };
    let since = match (&from.since, from.incremental) {
        (Some(s), _) => Since::At(s.clone()),
        (None, true) => Since::Incremental,
        (None, false) => Since::All,
    };
    Ok(Some(ExtractRequest {
        fhir_url,
        tenant,
        source_system,
        date: date.unwrap_or_else(ImportDate::today),
        level,
        types: from.types.clone(),
        type_filters: from.type_filters.clone(),
        since,
        restart: from.restart,
    }))
}

fn print_extract(r: &fhirflow::extract::ExtractReport, quiet: bool) {
    if quiet {
        return;
    }
    let resumed = if r.resumed {
        format!(", resumed; {} files were already written", r.reused)
    } else {
        String::new()
    };
    println!(
        "extracted tenant {} source system {} date {} (run {}) in {:.2} s{resumed}",
        r.tenant, r.source_system, r.date, r.run_id, r.seconds
    );
    println!(
        "{:<28} {:>6} {:>10} {:>12}",
        "resource type", "files", "resources", "MB"
    );
    for (ty, (files, lines, bytes)) in r.by_type() {
        println!(
            "{ty:<28} {files:>6} {lines:>10} {:>12.2}",
            bytes as f64 / 1e6
        );
    }
    let secs = r.download_seconds.max(1e-9);
    println!(
        "{:<28} {:>6} {:>10} {:>12.2}",
        "total",
        r.files.len(),
        r.resources(),
        r.bytes() as f64 / 1e6
    );
    println!(
        "export prepared in {:.2} s; downloads {:.2} s ({:.0} resources/s, {:.1} MB/s); transactionTime {}",
        r.export_wait_seconds,
        r.download_seconds,
        r.resources() as f64 / secs,
        r.bytes() as f64 / 1e6 / secs,
        r.transaction_time
    );
    println!(
        "of the downloads' time per file: waiting for the server {:.2} s, writing {:.2} s",
        r.server_wait_seconds, r.write_seconds
    );
    if let Some(w) = &r.delete_warning {
        println!("warning: the export's status URL could not be deleted: {w}");
    }
}

fn print_import(r: &fhirflow::import::ImportReport, quiet: bool) {
    if quiet {
        return;
    }
    let target = match r.target {
        fhirflow::settings::ImportTarget::Local => "the local lake",
        fhirflow::settings::ImportTarget::Healthlake => "HealthLake",
    };
    println!(
        "imported into {target} (job {}, curate run {}) in {:.2} s: {}",
        r.job_id, r.curate_run, r.seconds, r.status
    );
    if let Some(id) = &r.healthlake_job_id {
        println!(
            "HealthLake job {id}: {} sent, {} imported, {} rejected ({} of them server errors)",
            r.records_in, r.records_out, r.records_rejected, r.records_server_error
        );
    }
    if r.records_unchanged + r.records_stale > 0 {
        println!(
            "not sent: {} unchanged, {} stale ({:.1} MB): the target holds them or newer versions",
            r.records_unchanged,
            r.records_stale,
            r.bytes_not_sent as f64 / 1e6
        );
    }
    if r.deletions_read > 0 {
        println!(
            "deletions: {} read, {} applied, {} already absent, {} failed",
            r.deletions_read, r.deletions_applied, r.deletions_absent, r.deletions_failed
        );
    }
    for (ty, n) in &r.by_type {
        match r.snapshots.get(ty) {
            Some(snap) => println!("{ty:<28} {n:>10}  snapshot {snap}"),
            None => println!("{ty:<28}"),
        }
    }
    if let Some(m) = &r.message {
        println!("{m}");
    }
    if r.records_rejected > 0 {
        println!(
            "rejected by HealthLake: fhirflow sql \"SELECT source_file, line_no, error_code, message FROM metadata.import_errors WHERE job_id = '{}'\"",
            r.job_id
        );
    }
}

fn print_catalog(r: &fhirflow::catalog::SyncReport, quiet: bool) {
    if quiet {
        return;
    }
    println!(
        "Glue catalog: databases {}; {} tables created, {} updated; {} partitions registered",
        r.databases.join(", "),
        r.tables_created,
        r.tables_updated,
        r.partitions_added
    );
}

fn print_ingest(report: &fhirflow::ingest::IngestReport, quiet: bool) {
    if quiet {
        return;
    }
    let bytes: u64 = report.files.iter().map(|f| f.bytes).sum();
    println!(
        "ingested {} files ({:.1} MB)",
        report.files.len(),
        bytes as f64 / 1e6
    );
    for s in &report.skipped {
        println!("  skipped {} (not <Type>[.NNN].ndjson[.gz])", s.display());
    }
    for f in &report.files {
        let own_name = f.source.file_name().and_then(|n| n.to_str());
        if f.completed_earlier {
            println!(
                "  {} completed the earlier landing {}",
                f.source.display(),
                f.target
            );
        } else if !own_name.is_some_and(|n| f.target.ends_with(&format!("/{n}"))) {
            println!("  {} landed as {}", f.source.display(), f.target);
        }
    }
    for (source, landed) in &report.already_landed {
        println!("  skipped {}: already landed as {landed}", source.display());
    }
}

/// The curate table: the run's result, printed even with --quiet (not
/// with --output json).
fn print_summary(r: &CurateReport, json: bool) {
    if json {
        return;
    }
    println!(
        "curated tenant {} date {} (run {}, rules {}) in {:.2} s",
        r.tenant, r.date, r.run_id, r.rule_set, r.seconds
    );
    println!(
        "{:<28} {:>10} {:>10} {:>9} {:>11} {:>9}",
        "resource type", "in", "curated", "rejected", "duplicates", "MB/s"
    );
    let row = |s: &TypeSummary, secs: f64| {
        println!(
            "{:<28} {:>10} {:>10} {:>9} {:>11} {:>9.1}",
            s.resource_type,
            s.records_in,
            s.curated,
            s.rejected,
            s.duplicates,
            s.bytes_in as f64 / 1e6 / secs.max(1e-9)
        );
    };
    for s in &r.types {
        row(s, s.seconds);
    }
    row(&r.total, r.seconds);
    if r.total.rejected > 0 {
        println!(
            "rejected records: fhirflow sql \"SELECT source_file, line_no, error_code, message FROM metadata.import_errors WHERE job_id = '{}'\"",
            r.run_id
        );
    }
}

/// A progress bar on a terminal; nothing otherwise.
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    fn new(quiet: bool) -> Self {
        if quiet || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        // Hidden until `start` knows the size of the work.
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(0),
            indicatif::ProgressDrawTarget::hidden(),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        Bar(Some(bar))
    }
}

impl Reporter for Bar {
    fn status(&self, message: &str) {
        if let Some(b) = &self.0 {
            b.set_message(message.to_string());
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            b.tick();
        }
    }
    fn start(&self, stage: &str, total_bytes: u64) {
        if let Some(b) = &self.0 {
            b.set_message(stage.to_string());
            b.set_length(total_bytes);
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
    }
    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.0 {
            b.inc(bytes);
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}
