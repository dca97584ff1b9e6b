//! fhirflow: a batch engine that carries FHIR R4 NDJSON from external sources
//! through a multi-tenant lake (raw → curated → metadata) toward HealthLake.
//!
//! The modules follow the flow:
//!
//! * [`extract`]: a FHIR Bulk Data `$export` lands in the raw layer;
//! * [`ingest`]: local NDJSON files land in the raw layer;
//! * [`raw`]: reading raw NDJSON line by line;
//! * [`curate`]: parse and key, dedup, label, write (DESIGN.md's steps);
//! * [`rules`]: step 3, the analysts' SQL rules;
//! * [`import`]: a curated partition into the local Iceberg [`lake`] or
//!   AWS HealthLake ([`services::HealthLake`]);
//! * [`catalog`]: the names of the AWS Glue Data Catalog over every layer;
//! * [`services`]: how the stages reach HealthLake and Glue, whose clients
//!   are the `fhirflow-aws` crate;
//! * [`commit`]: the commit log and the partition lease every write goes through;
//! * [`metadata`]: `import_jobs`, `import_errors`, `import_metrics`;
//! * [`sql`]: one DataFusion session over every layer;
//! * [`views`]: SQL-on-FHIR v2 ViewDefinitions as DataFusion tables.
//!
//! [`layout`] is the one place that builds object paths; [`storage`] opens
//! layer roots; [`settings`] resolves configuration.

pub mod catalog;
pub mod commit;
pub mod curate;
pub mod emf;
pub mod error;
pub mod extract;
pub mod fhir;
pub mod fleet;
pub mod import;
pub mod ingest;
pub mod lake;
pub mod layout;
pub mod metadata;
pub mod model;
pub mod raw;
pub mod report;
pub mod rules;
pub mod run;
pub mod services;
pub mod settings;
pub mod sql;
pub mod storage;
pub mod validate;
pub mod views;

pub use error::{Error, Result};
