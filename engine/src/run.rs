//! `fhirflow run`: ingest (when given paths), then curate every (tenant,
//! date) touched, and a summary per resource type.

use std::path::PathBuf;

use crate::curate::{curate, CurateReport};
use crate::error::Result;
use crate::ingest::{ingest, IngestReport};
use crate::layout::{ImportDate, SourceSystem, TenantGuid};
use crate::report::Reporter;
use crate::settings::Settings;
use crate::storage::Lake;

/// What `run` does.
#[derive(Debug, Clone)]
pub struct RunPlan {
    pub paths: Vec<PathBuf>,
    pub tenant: TenantGuid,
    pub source_system: Option<SourceSystem>,
    pub date: ImportDate,
}

#[derive(Debug, Clone)]
pub struct RunReport {
    pub ingest: Option<IngestReport>,
    pub curate: CurateReport,
}

pub async fn run(
    lake: &Lake,
    settings: &Settings,
    plan: &RunPlan,
    reporter: &dyn Reporter,
) -> Result<RunReport> {
    let ingested = match (&plan.paths[..], &plan.source_system) {
        ([], _) => None,
        (paths, Some(system)) => Some(ingest(lake, paths, &plan.tenant, system, plan.date).await?),
        (_, None) => {
            return Err(crate::Error::Usage(
                "run: --source-system is required when input paths are given".into(),
            ))
        }
    };
    let curated = curate(lake, settings, &plan.tenant, plan.date, reporter).await?;
    Ok(RunReport {
        ingest: ingested,
        curate: curated,
    })
}
