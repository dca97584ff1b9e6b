//! The names the AWS Glue Data Catalog gives the lake's layers, which
//! `fhirflow sql` uses locally too, and what a sync reports. The sync itself
//! talks to Glue, so it lives in the `fhirflow-aws` crate (reached through
//! [`crate::services::Catalog`]).

use crate::storage::Lake;

pub const RAW_DATABASE: &str = "external_fhir_raw";
pub const CURATED_DATABASE: &str = "external_fhir_curated";

/// The metadata database of an environment.
pub fn metadata_database(env: &str) -> String {
    format!("fhir_import_metadata_{env}")
}

/// What a sync did.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    pub databases: Vec<String>,
    pub tables_created: usize,
    pub tables_updated: usize,
    pub partitions_added: usize,
}

/// Whether every layer is on S3 (what Glue can describe).
pub fn on_s3(lake: &Lake) -> bool {
    [&lake.raw, &lake.curated, &lake.metadata]
        .iter()
        .all(|r| r.store_url.scheme() == "s3")
}
