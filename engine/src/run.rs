//! `fhirflow run`: extract from a FHIR server or ingest local paths, then
//! curate the (tenant, date), import it, and, on an S3 lake, sync the Glue
//! catalog, with a summary of every stage.

use std::path::PathBuf;

use crate::catalog::SyncReport;
use crate::curate::{curate, CurateReport};
use crate::error::Result;
use crate::extract::{extract, ExtractReport, ExtractRequest};
use crate::import::{ImportReport, ImportRequest};
use crate::ingest::{ingest, IngestReport};
use crate::layout::{ImportDate, SourceSystem, TenantGuid};
use crate::report::Reporter;
use crate::settings::{ImportTarget, Settings};
use crate::storage::Lake;

/// What `run` does.
#[derive(Debug, Clone)]
pub struct RunPlan {
    pub paths: Vec<PathBuf>,
    /// Extract first (instead of ingesting paths).
    pub extract: Option<ExtractRequest>,
    pub tenant: TenantGuid,
    pub source_system: Option<SourceSystem>,
    pub date: ImportDate,
    /// Import after curate, into this target.
    pub import: Option<ImportTarget>,
    /// HealthLake: wait for the import job to end.
    pub wait: bool,
}

#[derive(Debug, Clone)]
pub struct RunReport {
    pub extract: Option<ExtractReport>,
    pub ingest: Option<IngestReport>,
    pub curate: CurateReport,
    pub import: Option<ImportReport>,
    /// The Glue sync (S3 lakes only: Glue describes S3 data).
    pub catalog: Option<SyncReport>,
}

pub async fn run(
    lake: &Lake,
    settings: &Settings,
    plan: &RunPlan,
    reporter: &dyn Reporter,
) -> Result<RunReport> {
    if plan.extract.is_some() && !plan.paths.is_empty() {
        return Err(crate::Error::Usage(
            "run: give either input paths or a FHIR server to extract from, not both".into(),
        ));
    }
    let extracted = match &plan.extract {
        Some(request) => Some(extract(lake, settings, request, reporter).await?),
        None => None,
    };
    // A resumed extraction keeps its own import date.
    let date = extracted.as_ref().map_or(plan.date, |x| x.date);
    let ingested = match (&plan.paths[..], &plan.source_system) {
        ([], _) => None,
        (paths, Some(system)) => Some(ingest(lake, paths, &plan.tenant, system, plan.date).await?),
        (_, None) => {
            return Err(crate::Error::Usage(
                "run: --source-system is required when input paths are given".into(),
            ))
        }
    };
    let curated = curate(lake, settings, &plan.tenant, date, reporter).await?;
    let imported = match plan.import {
        Some(target) => {
            let req = ImportRequest {
                tenant: plan.tenant.clone(),
                date,
                target,
                wait: plan.wait,
            };
            Some(crate::import::import(lake, settings, &req, reporter).await?)
        }
        None => None,
    };
    let catalog = if crate::catalog::on_s3(lake) {
        Some(crate::services::catalog()?.sync(lake, settings).await?)
    } else {
        None
    };
    Ok(RunReport {
        extract: extracted,
        ingest: ingested,
        curate: curated,
        import: imported,
        catalog,
    })
}
