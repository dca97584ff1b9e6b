//! The AWS services beyond S3 that the stages call: HealthLake as an import
//! target and the Glue Data Catalog. Their clients live in their own crate,
//! `fhirflow-aws`, which builds on this one (as iceberg-rust keeps its
//! catalogs apart from its core), so the core engine and its tests build
//! without the AWS SDK. The stages reach them through these traits, whose
//! implementations the binary installs once at start ([`install`]); a build
//! without them answers a HealthLake import or a catalog sync with an error
//! that says so.

use std::sync::OnceLock;

use async_trait::async_trait;

use crate::catalog::SyncReport;
use crate::error::{Error, Result};
use crate::import::{ImportReport, ImportRequest};
use crate::layout::{ImportDate, TenantGuid};
use crate::report::Reporter;
use crate::settings::Settings;
use crate::storage::Lake;

/// AWS HealthLake as an import target.
#[async_trait]
pub trait HealthLake: Send + Sync {
    /// Imports one curated partition into the tenant's data store.
    async fn import(
        &self,
        lake: &Lake,
        settings: &Settings,
        req: &ImportRequest,
        reporter: &dyn Reporter,
    ) -> Result<ImportReport>;

    /// If an ended HealthLake job still holds the partition's lease, records
    /// its outcome and frees the lease; otherwise does nothing.
    async fn settle(
        &self,
        lake: &Lake,
        settings: &Settings,
        tenant: &TenantGuid,
        date: ImportDate,
    ) -> Result<()>;
}

/// The Glue Data Catalog over every layer.
#[async_trait]
pub trait Catalog: Send + Sync {
    /// Creates what is missing and updates what changed.
    async fn sync(&self, lake: &Lake, settings: &Settings) -> Result<SyncReport>;
}

/// The implementations a binary installs.
pub struct Services {
    pub healthlake: Box<dyn HealthLake>,
    pub catalog: Box<dyn Catalog>,
}

static INSTALLED: OnceLock<Services> = OnceLock::new();

/// Installs the services for the rest of the process; the first install
/// wins.
pub fn install(services: Services) {
    let _ = INSTALLED.set(services);
}

fn installed(what: &str) -> Result<&'static Services> {
    INSTALLED.get().ok_or_else(|| {
        Error::Config(format!(
            "{what} needs the AWS services, which this build of fhirflow does not install \
             (the fhirflow binary does: fhirflow_aws::install)"
        ))
    })
}

/// The installed HealthLake target.
pub fn healthlake() -> Result<&'static dyn HealthLake> {
    Ok(installed("a HealthLake import")?.healthlake.as_ref())
}

/// The installed Glue catalog.
pub fn catalog() -> Result<&'static dyn Catalog> {
    Ok(installed("a Glue catalog sync")?.catalog.as_ref())
}

/// Settles the partition's ended HealthLake job, if the services are
/// installed (without them no job of this process can hold the lease).
pub(crate) async fn settle(
    lake: &Lake,
    settings: &Settings,
    tenant: &TenantGuid,
    date: ImportDate,
) -> Result<()> {
    match INSTALLED.get() {
        Some(s) => s.healthlake.settle(lake, settings, tenant, date).await,
        None => Ok(()),
    }
}
