//! fhirflow's AWS services beyond S3, apart from the core engine so that it
//! builds and tests without the AWS SDK:
//!
//! * [`glue`]: `fhirflow catalog sync`, the Glue Data Catalog over every layer;
//! * [`healthlake`]: AWS HealthLake as an import target (StartFHIRImportJob,
//!   its output read back and reconciled, deletions through the FHIR REST API);
//! * [`sdk`]: the SDK configuration every client shares.
//!
//! The core's stages reach them through `fhirflow::services`; [`install`]
//! puts them there, once, at the start of a process.

pub mod glue;
pub mod healthlake;
pub mod sdk;

use async_trait::async_trait;
use fhirflow::catalog::SyncReport;
use fhirflow::import::{ImportReport, ImportRequest};
use fhirflow::layout::{ImportDate, TenantGuid};
use fhirflow::report::Reporter;
use fhirflow::services::{self, Services};
use fhirflow::settings::Settings;
use fhirflow::storage::Lake;
use fhirflow::{Error, Result};

/// Installs the Glue catalog and the HealthLake target in the core engine.
pub fn install() {
    services::install(Services {
        healthlake: Box::new(HealthLake),
        catalog: Box::new(Glue),
    });
}

struct HealthLake;

#[async_trait]
impl services::HealthLake for HealthLake {
    async fn import(
        &self,
        lake: &Lake,
        settings: &Settings,
        req: &ImportRequest,
        reporter: &dyn Reporter,
    ) -> Result<ImportReport> {
        healthlake::import(lake, settings, req, reporter).await
    }

    async fn settle(
        &self,
        lake: &Lake,
        settings: &Settings,
        tenant: &TenantGuid,
        date: ImportDate,
    ) -> Result<()> {
        healthlake::settle(lake, settings, tenant, date).await
    }
}

struct Glue;

#[async_trait]
impl services::Catalog for Glue {
    async fn sync(&self, lake: &Lake, settings: &Settings) -> Result<SyncReport> {
        glue::sync(lake, settings).await
    }
}

/// An AWS SDK error with the service's code and message (the SDK's own
/// Display says only "service error").
pub(crate) fn aws_error<E, R>(
    stage: &'static str,
    operation: impl Into<String>,
    err: aws_smithy_runtime_api::client::result::SdkError<E, R>,
) -> Error
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_smithy_types::error::display::DisplayErrorContext;
    let message = match err.as_service_error() {
        Some(e) => format!(
            "{}: {}",
            e.code().unwrap_or("error"),
            e.message().unwrap_or("(no message)")
        ),
        None => DisplayErrorContext(&err).to_string(),
    };
    Error::Aws {
        stage,
        operation: operation.into(),
        message,
    }
}
