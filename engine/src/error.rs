//! The engine's error type. A bad *record* is never an error: it becomes an
//! `import_errors` row. These are the failures that stop a command.

use std::path::PathBuf;

/// Everything that can stop a fhirflow command, with where it happened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidPartition {
        what: &'static str,
        value: String,
        reason: &'static str,
    },

    #[error("configuration: {0}")]
    Config(String),

    #[error("config file {path}: {source}")]
    ConfigFile {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("input {path}: {reason}")]
    Input { path: PathBuf, reason: String },

    #[error("{stage}: object store {location}: {source}")]
    Store {
        stage: &'static str,
        location: String,
        #[source]
        source: object_store::Error,
    },

    #[error("{stage}: reading {location}: {source}")]
    Io {
        stage: &'static str,
        location: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{stage}: {context}: {source}")]
    Query {
        stage: &'static str,
        context: String,
        #[source]
        source: datafusion::error::DataFusionError,
    },

    #[error("{stage}: writing Parquet {location}: {source}")]
    Parquet {
        stage: &'static str,
        location: String,
        #[source]
        source: parquet::errors::ParquetError,
    },

    #[error("{stage}: {location} changed while the run read it ({detail})")]
    InputChanged {
        stage: &'static str,
        location: String,
        detail: String,
    },

    #[error(
        "curate tenant {tenant} date {date}: records do not add up: read {read} != \
         curated {curated} + rejected {rejected} + duplicates {duplicates}; nothing was published"
    )]
    Conservation {
        tenant: String,
        date: String,
        read: u64,
        curated: u64,
        rejected: u64,
        duplicates: u64,
    },

    /// Rejected records without their `import_errors` rows (exit code 3,
    /// like a run whose counts do not add up).
    #[error(
        "curate tenant {tenant} date {date}: {rejected} records were rejected but import_errors \
         holds rows for only {rows}; nothing was published"
    )]
    UnreportedRejections {
        tenant: String,
        date: String,
        rejected: u64,
        rows: u64,
    },

    /// An import whose destination's account of the records does not add
    /// up to what curate published (exit code 3). Its rows are published,
    /// marked not conserved.
    #[error(
        "import tenant {tenant} date {date}: records do not add up: {}",
        detail.join("; ")
    )]
    ImportNotConserved {
        tenant: String,
        date: String,
        detail: Vec<String>,
    },

    #[error("{0}")]
    Usage(String),

    /// The partition has no input for the command (no raw files to curate,
    /// nothing curated to import): exit code 5, nothing was written, so a
    /// nightly job can tell "nothing to do" from a mistake.
    #[error("{0}")]
    NothingToDo(String),

    /// A request of the extract stage that failed for good (after retries).
    #[error("extract: {what} {url}: {message}")]
    Http {
        what: String,
        url: String,
        message: String,
    },

    /// Authorization at the FHIR server's token endpoint failed. Never
    /// carries a token, key or assertion.
    #[error("extract: authorization at {endpoint}: {message}")]
    Auth { endpoint: String, message: String },

    /// A rule that cannot be read, planned or run, or that broke the rules'
    /// contract (see `rules`).
    #[error("rule {file}: {message}")]
    Rule { file: String, message: String },

    /// A ViewDefinition that cannot be read or checked, or a view that
    /// failed on a record (`file` then names the record).
    #[error("view {file}: {message}")]
    View { file: String, message: String },

    /// `fhirflow rules check` or `rules test` found problems (exit code 1).
    #[error("{0}")]
    RulesFailed(String),

    /// `fhirflow validate` found resources that are not valid (exit code 1).
    #[error("{invalid} of {resources} resources are not valid FHIR R4")]
    Invalid { invalid: u64, resources: u64 },

    /// The reader of a stream went away (a query's LIMIT was reached).
    #[error("cancelled: the consumer stopped reading")]
    Cancelled,

    /// An AWS call (Glue, HealthLake) that failed for good, after the SDK's
    /// retries. The message is the service's error code and text.
    #[error("{stage}: AWS {operation}: {message}")]
    Aws {
        stage: &'static str,
        operation: String,
        message: String,
    },

    /// The local lake's Iceberg catalog or tables.
    #[error("{stage}: lake {context}: {source}")]
    Lake {
        stage: &'static str,
        context: String,
        #[source]
        source: Box<iceberg::Error>,
    },

    /// An import that ran but did not succeed (a failed HealthLake job, nothing
    /// curated to import).
    #[error("import: {0}")]
    Import(String),

    /// The unit of a plan was done by another worker since it was planned
    /// (exit code 10): nothing to do, and nothing was written.
    #[error("{0}")]
    AlreadyDone(String),

    /// Another run holds the partition's lease (exit code 4): nothing was
    /// written; try again later.
    #[error("{stage}: {partition} is busy: {holder}")]
    Busy {
        stage: &'static str,
        partition: String,
        holder: String,
    },

    /// This run lost its partition lease (it was not renewed in time and
    /// another run took it over): the run stops before it commits anything.
    #[error("{stage}: lost the lease on {partition}: {detail}")]
    LeaseLost {
        stage: &'static str,
        partition: String,
        detail: String,
    },

    /// An object a commit lists is not what the commit says.
    #[error("{stage}: {location} does not match its commit: {detail}")]
    Corrupt {
        stage: &'static str,
        location: String,
        detail: String,
    },

    #[error("internal: task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn store(
        stage: &'static str,
        location: impl ToString,
        source: object_store::Error,
    ) -> Self {
        Error::Store {
            stage,
            location: location.to_string(),
            source,
        }
    }

    pub fn query(
        stage: &'static str,
        context: impl Into<String>,
        source: datafusion::error::DataFusionError,
    ) -> Self {
        Error::Query {
            stage,
            context: context.into(),
            source,
        }
    }

    pub(crate) fn lake(
        stage: &'static str,
        context: impl Into<String>,
        source: iceberg::Error,
    ) -> Self {
        Error::Lake {
            stage,
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// The process exit code documented in the README.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::InvalidPartition { .. }
            | Error::Usage(_)
            | Error::Config(_)
            | Error::ConfigFile { .. } => 2,
            Error::Conservation { .. }
            | Error::UnreportedRejections { .. }
            | Error::ImportNotConserved { .. } => 3,
            Error::Busy { .. } => 4,
            Error::NothingToDo(_) => 5,
            Error::AlreadyDone(_) => 10,
            _ => 1,
        }
    }
}
