//! The import stage: one committed curated partition (tenant, import date)
//! into its destination.
//!
//! * [`local`]: the local Iceberg lake ([`crate::lake`]), the default;
//! * AWS HealthLake, through StartFHIRImportJob: the `fhirflow-aws` crate,
//!   reached through [`crate::services::HealthLake`].
//!
//! Either way the stage holds the partition's lease (so no curate run
//! republishes it meanwhile), pins the partition's latest curate commit,
//! imports exactly the objects that commit lists, checked against their
//! sizes and checksums, and publishes an `import_jobs` row, an
//! `import_metrics` row per resource type and (HealthLake) an `import_errors`
//! row per resource HealthLake rejected, with the commit protocol of every
//! stage. A retried import never imports twice: the local lake recognises the
//! snapshots of the same curate run, HealthLake the same `ClientToken`.

pub mod ledger;
pub mod local;

use std::collections::BTreeMap;

use crate::commit::{self, CommitRecord};
use crate::error::{Error, Result};
use crate::layout::{ImportDate, TenantGuid};
use crate::metadata::{JobRow, MetricRow};
use crate::settings::ImportTarget;
use crate::storage::Lake;

pub const STAGE: &str = "import";

/// What to import and where.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    pub tenant: TenantGuid,
    pub date: ImportDate,
    pub target: ImportTarget,
    /// HealthLake: wait for the job to end (false: return once it is
    /// submitted; `fhirflow import status` looks later).
    pub wait: bool,
}

/// What an import did.
#[derive(Debug, Clone, Default)]
pub struct ImportReport {
    pub job_id: String,
    pub target: ImportTarget,
    /// The curate run whose files were imported.
    pub curate_run: String,
    /// `succeeded`, `already imported`, or HealthLake's job status.
    pub status: String,
    /// Resources sent.
    pub records_in: u64,
    /// Resources the destination took.
    pub records_out: u64,
    /// Resources the destination rejected (HealthLake), server errors
    /// included.
    pub records_rejected: u64,
    /// Of those, the ones HealthLake failed with a server error (worth a
    /// retry, not a fix of the data).
    pub records_server_error: u64,
    /// Curated records not sent: identical to the version the target holds,
    /// or older than it (the ledger, [`ledger`]).
    pub records_unchanged: u64,
    pub records_stale: u64,
    /// The bytes of the records not sent.
    pub bytes_not_sent: u64,
    /// The partition's deletions (an export's `deleted` files): read =
    /// applied + already absent + failed.
    pub deletions_read: u64,
    pub deletions_applied: u64,
    pub deletions_absent: u64,
    pub deletions_failed: u64,
    /// Resources sent, per type.
    pub by_type: BTreeMap<String, u64>,
    /// The local lake: the snapshot of each table.
    pub snapshots: BTreeMap<String, i64>,
    pub healthlake_job_id: Option<String>,
    pub message: Option<String>,
    pub seconds: f64,
}

/// The committed curated parts of a partition, by resource type.
pub struct Curated {
    pub record: CommitRecord,
    pub files: BTreeMap<&'static str, Vec<commit::Object>>,
}

impl Curated {
    /// The bytes of each resource type's parts, as the commit records them.
    pub fn bytes(&self) -> BTreeMap<String, u64> {
        self.files
            .iter()
            .map(|(ty, parts)| (ty.to_string(), parts.iter().map(|p| p.size).sum()))
            .collect()
    }

    /// The records of each resource type, as the commit records them (None
    /// for a commit written before parts carried their count).
    pub fn records(&self) -> BTreeMap<String, Option<u64>> {
        self.files
            .iter()
            .map(|(ty, parts)| (ty.to_string(), parts.iter().map(|p| p.records).sum()))
            .collect()
    }
}

/// One resource type's import: what curate published, what the destination
/// took and rejected.
#[derive(Debug, Clone, Copy, Default)]
pub struct TypeCounts {
    pub published: u64,
    pub imported: u64,
    pub rejected: u64,
    pub unchanged: u64,
    pub stale: u64,
    pub bytes: u64,
    pub deletions: Deletions,
}

/// One resource type's deletions in an import.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deletions {
    pub read: u64,
    pub applied: u64,
    pub absent: u64,
    pub failed: u64,
}

impl TypeCounts {
    /// DESIGN.md, "Conservation": curated = imported + rejected by the
    /// target + unchanged + stale; deletions read = applied + already
    /// absent + failed.
    pub fn conserved(&self) -> bool {
        let d = &self.deletions;
        self.published == self.imported + self.rejected + self.unchanged + self.stale
            && d.read == d.applied + d.absent + d.failed
    }
}

pub async fn curated(lake: &Lake, tenant: &TenantGuid, date: ImportDate) -> Result<Curated> {
    let record = commit::latest_curate(lake, tenant, date)
        .await?
        .ok_or_else(|| {
            Error::NothingToDo(format!(
                "import: nothing curated for tenant {tenant} date {date}: run `fhirflow curate` first"
            ))
        })?;
    let mut files: BTreeMap<&'static str, Vec<commit::Object>> = BTreeMap::new();
    for (_, ty, o) in commit::named_parts(&record)? {
        files.entry(ty).or_default().push(o.clone());
    }
    Ok(Curated { record, files })
}

/// Imports one curated partition.
pub async fn import(
    lake: &Lake,
    settings: &crate::settings::Settings,
    req: &ImportRequest,
    reporter: &dyn crate::report::Reporter,
) -> Result<ImportReport> {
    // The ledger judges each record against what this tenant's imports sent
    // before; two at once would judge against the same ledger and could send
    // an older version after a newer one. So they take turns (the second
    // waits up to `[lease] wait_seconds`, then is Busy). A HealthLake job
    // submitted with `--no-wait` joins the ledger once it is settled.
    let healthlake = match req.target {
        ImportTarget::Local => None,
        ImportTarget::Healthlake => Some(crate::services::healthlake()?),
    };
    let run_id = uuid::Uuid::now_v7().to_string();
    let turn = commit::lease_imports(lake, settings, &req.tenant, STAGE, &run_id).await?;
    let result = match healthlake {
        None => local::import(lake, settings, req, reporter).await,
        Some(hl) => hl.import(lake, settings, req, reporter).await,
    };
    let released = turn.release().await;
    let report = result?;
    released?;
    Ok(report)
}

/// The `import_jobs` row of an import, with what every target fills in.
pub fn job_row(
    req: &ImportRequest,
    report: &ImportReport,
    started_at: i64,
    input_uri: String,
    output_uri: String,
) -> JobRow {
    JobRow {
        job_id: report.job_id.clone(),
        stage: STAGE.into(),
        tenant_guid: req.tenant.to_string(),
        source_system: None,
        import_date: req.date.days_since_epoch(),
        started_at,
        ended_at: chrono::Utc::now().timestamp_micros(),
        status: report.status.clone(),
        input_uri,
        output_uri,
        records_in: report.records_in,
        records_out: report.records_out,
        records_rejected: report.records_rejected,
        records_duplicate: 0,
        healthlake_job_id: report.healthlake_job_id.clone(),
        healthlake_status: None,
        message: report.message.clone(),
        engine_version: env!("CARGO_PKG_VERSION").into(),
        rule_set: None,
    }
}

/// Fails with exit code 3 when an import's account does not add up:
/// `detail` names each file or type that does not.
pub fn check_conserved(req: &ImportRequest, detail: Vec<String>) -> Result<()> {
    if detail.is_empty() {
        return Ok(());
    }
    Err(Error::ImportNotConserved {
        tenant: req.tenant.to_string(),
        date: req.date.to_string(),
        detail,
    })
}

/// One `import_metrics` row per resource type, `conserved` computed.
pub fn metric_rows(
    req: &ImportRequest,
    report: &ImportReport,
    counts: &BTreeMap<String, TypeCounts>,
) -> Vec<MetricRow> {
    let secs = report.seconds.max(1e-9);
    counts
        .iter()
        .map(|(ty, c)| MetricRow {
            job_id: report.job_id.clone(),
            stage: STAGE.into(),
            tenant_guid: req.tenant.to_string(),
            import_date: req.date.days_since_epoch(),
            resource_type: ty.clone(),
            records_in: c.published,
            records_out: c.imported,
            records_rejected: c.rejected,
            records_unchanged: c.unchanged,
            records_stale: c.stale,
            deletions_read: c.deletions.read,
            deletions_applied: c.deletions.applied,
            deletions_absent: c.deletions.absent,
            deletions_failed: c.deletions.failed,
            bytes_in: c.bytes,
            bytes_out: c.bytes,
            elapsed_seconds: report.seconds,
            records_per_second: c.published as f64 / secs,
            mb_per_second: c.bytes as f64 / 1e6 / secs,
            conserved: c.conserved(),
            ..Default::default()
        })
        .collect()
}
