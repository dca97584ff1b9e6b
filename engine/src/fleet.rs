//! A night's work as units, for many machines: `fhirflow plan` lists what is
//! pending and writes it as an immutable plan; `fhirflow work --plan … --index N`
//! runs unit N on whichever machine an existing engine (AWS Batch array
//! jobs, Step Functions' Distributed Map, Kubernetes Indexed Jobs) starts it.
//!
//! * A plan is JSON Lines, one [`Unit`] per line, at
//!   `metadata/_plans/<plan id>.jsonl` (written with a conditional create and
//!   never changed; the id is a time-ordered UUID).
//! * Pending means: a tenant and source system of the tenants file
//!   (`[fleet] tenants`) whose last complete extraction began longer ago
//!   than its schedule allows (or that has none, or one pending) is an
//!   `extract` unit; a (tenant, date) with a raw object its latest curate
//!   run did not read (or that has none) is a `curate` unit (the raw layer
//!   is append-only: a new landing is a new object); a tenant with curate commits no import has imported is one
//!   `import` unit, its dates in order: the import's ledger judges each
//!   record against what earlier dates sent, so one worker takes a tenant's
//!   dates oldest first, as one machine would (HealthLake runs one import
//!   job per Region at a time, so this costs no import throughput).
//!   Re-planning after a partial night lists only what is left.
//! * A unit is idempotent. Its done marker, `metadata/_plans/<plan id>/done/<N>.json`,
//!   is created once; a worker that finds it skips. A curate unit carries the
//!   partition's latest curate commit at planning time: a worker that, holding
//!   the partition lease, finds a later one skips (another worker did it), so
//!   duplicated or retried workers curate a partition once. An import is
//!   "already imported" when its curate commit was imported.

use std::collections::BTreeMap;

use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::curate::CurateReport;
use crate::error::{Error, Result};
use crate::extract::{ExtractReport, ExtractRequest};
use crate::import::{ImportReport, ImportRequest};
use crate::lake::LocalLake;
use crate::layout::{ImportDate, Layer, SourceSystem, TenantGuid};
use crate::report::Reporter;
use crate::settings::Settings;
use crate::storage::Lake;

const STAGE: &str = "plan";

/// What a unit does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitStage {
    /// Extract the tenant and source system from its FHIR server: an
    /// incremental Bulk Data export (everything, the first time), landed
    /// under the unit's date.
    Extract,
    /// Curate the (tenant, date): every source system's raw files.
    Curate,
    /// Import the tenant's dates' latest curate commits into `[import]
    /// target`, oldest date first.
    Import,
}

impl UnitStage {
    /// Its name in a plan, and the `stage` of its metrics.
    pub fn name(self) -> &'static str {
        match self {
            UnitStage::Extract => "extract",
            UnitStage::Curate => "curate",
            UnitStage::Import => "import",
        }
    }
}

/// Where a unit is meant to run: its raw size against `[fleet] lambda_max_mb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runner {
    Lambda,
    Batch,
}

/// One line of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unit {
    pub stage: UnitStage,
    /// The tenant GUID and import dates, as `--tenant` and `--date` take
    /// them: one date for a curate unit, in order for an import unit.
    pub tenant: String,
    pub dates: Vec<String>,
    /// Extract units: the source system and its FHIR server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_url: Option<String>,
    /// Extract units: the environment variable that holds this server's
    /// bearer token (its name; never the token), when it has its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// The raw bytes of its partitions (every source system).
    pub raw_bytes: u64,
    pub runner: Runner,
    /// The partition's latest curate commit when planned (curate units).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
}

impl Unit {
    /// A unit of one (tenant, date).
    fn partition(
        stage: UnitStage,
        tenant: &TenantGuid,
        date: ImportDate,
        raw_bytes: u64,
        runner: impl Fn(u64) -> Runner,
    ) -> Unit {
        Unit {
            stage,
            tenant: tenant.to_string(),
            dates: vec![date.to_string()],
            source_system: None,
            fhir_url: None,
            token_env: None,
            raw_bytes,
            runner: runner(raw_bytes),
            after: None,
        }
    }
}

/// Which units `plan` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanStage {
    Extract,
    Curate,
    Import,
    All,
}

/// What `plan` looks at.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub stage: PlanStage,
    pub tenant: Option<TenantGuid>,
    /// One date, or every date from `since` on.
    pub date: Option<ImportDate>,
    pub since: Option<ImportDate>,
}

/// A written plan.
#[derive(Debug, Clone)]
pub struct PlanReport {
    pub id: String,
    pub uri: String,
    pub bytes: u64,
    pub units: Vec<Unit>,
    /// Why units that are pending were not planned (the plan can run none of
    /// them), if any were left out.
    pub left_out: Option<String>,
}

/// One entry of the tenants file: a tenant's source system, its FHIR
/// server, and how often to extract it.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantSource {
    pub tenant: TenantGuid,
    pub source_system: SourceSystem,
    pub fhir_url: url::Url,
    /// Extract when the last complete extraction began at least this many
    /// hours ago, less a tenth (a nightly run that starts a little earlier
    /// than the night before still extracts).
    pub every_hours: u32,
    /// The environment variable holding this server's bearer token (an AWS
    /// Batch job definition's `secrets` put a Secrets Manager value there);
    /// without one, `[extract]`'s credentials.
    pub token_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceEntry {
    tenant: String,
    source_system: String,
    fhir_url: String,
    #[serde(default = "daily")]
    every_hours: u32,
    #[serde(default)]
    token_env: Option<String>,
}

fn daily() -> u32 {
    24
}

/// The tenants file: TOML, one `[[tenant]]` table per tenant and source
/// system.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    #[serde(default)]
    tenant: Vec<SourceEntry>,
}

/// Reads the tenants file `location`: a local path, or a URL of any store
/// the lake can be on.
pub async fn read_tenants(location: &str, settings: &Settings) -> Result<Vec<TenantSource>> {
    let text = crate::storage::read_url(location, &settings.s3)
        .await
        .map_err(|e| Error::Config(format!("[fleet] tenants: {e}")))?;
    let text = String::from_utf8(text)
        .map_err(|_| Error::Config(format!("[fleet] tenants {location}: not UTF-8")))?;
    let file: TenantsFile = toml::from_str(&text).map_err(|e| Error::ConfigFile {
        path: location.into(),
        source: Box::new(e),
    })?;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (n, e) in file.tenant.into_iter().enumerate() {
        let bad = |what: String| {
            Error::Config(format!(
                "[fleet] tenants {location}: [[tenant]] number {}: {what}",
                n + 1
            ))
        };
        let source = TenantSource {
            tenant: e.tenant.parse().map_err(|x: Error| bad(x.to_string()))?,
            source_system: e
                .source_system
                .parse()
                .map_err(|x: Error| bad(x.to_string()))?,
            fhir_url: url::Url::parse(&e.fhir_url).map_err(|x| bad(format!("fhir_url: {x}")))?,
            every_hours: e.every_hours.max(1),
            token_env: e.token_env.clone().filter(|v| !v.is_empty()),
        };
        if !seen.insert((e.tenant, e.source_system)) {
            return Err(bad(format!(
                "tenant {} source system {} is listed twice",
                source.tenant, source.source_system
            )));
        }
        out.push(source);
    }
    Ok(out)
}

/// The tenants file's sources whose extraction is due at `now` (µs).
async fn due_extracts(
    lake: &Lake,
    settings: &Settings,
    req: &PlanRequest,
    now: i64,
) -> Result<Vec<Unit>> {
    let Some(location) = &settings.fleet.tenants else {
        return Ok(Vec::new());
    };
    let mut units = Vec::new();
    for t in read_tenants(location, settings).await? {
        if req.tenant.as_ref().is_some_and(|w| *w != t.tenant) {
            continue;
        }
        let standing = crate::extract::standing(lake, &t.tenant, &t.source_system).await?;
        let interval = i64::from(t.every_hours) * 3_600_000_000;
        let due = standing.pending
            || standing
                .last_run
                .as_deref()
                .is_none_or(|r| now - run_start(r) >= interval - interval / 10);
        if due {
            units.push(Unit {
                stage: UnitStage::Extract,
                tenant: t.tenant.to_string(),
                dates: vec![req.date.unwrap_or_else(ImportDate::today).to_string()],
                source_system: Some(t.source_system.to_string()),
                fhir_url: Some(t.fhir_url.to_string()),
                token_env: t.token_env.clone(),
                raw_bytes: 0,
                // An export waits on its server for as long as it takes,
                // past Lambda's 15 minutes.
                runner: Runner::Batch,
                after: None,
            });
        }
    }
    Ok(units)
}

/// What one partition holds, for planning.
#[derive(Default)]
struct Partition {
    raw_bytes: u64,
    /// Microseconds since the epoch of its newest raw object.
    newest_raw: i64,
    /// Its raw objects' paths.
    files: Vec<String>,
}

/// The pending units: extract, then curate, then import, each in (tenant,
/// date) order; and why some were left out, if any were.
async fn pending(
    lake: &Lake,
    settings: &Settings,
    req: &PlanRequest,
) -> Result<(Vec<Unit>, Option<String>)> {
    let extract = match req.stage {
        PlanStage::Extract | PlanStage::All => {
            due_extracts(lake, settings, req, chrono::Utc::now().timestamp_micros()).await?
        }
        _ => Vec::new(),
    };
    if req.stage == PlanStage::Extract {
        return Ok((extract, None));
    }
    let raw = &lake.raw;
    let mut partitions: BTreeMap<(TenantGuid, ImportDate), Partition> = BTreeMap::new();
    let prefix = match &req.tenant {
        Some(t) => raw.paths.raw_tenant(t),
        None => raw.paths.layer(Layer::Raw),
    };
    for f in crate::raw::list_files(raw, STAGE, &prefix).await? {
        let Some(date) = ImportDate::from_days_since_epoch(f.origin.import_date) else {
            continue;
        };
        let wanted = req.date.is_none_or(|d| d == date) && req.since.is_none_or(|s| date >= s);
        if !wanted {
            continue;
        }
        let tenant: TenantGuid = f.origin.tenant.parse()?;
        let p = partitions.entry((tenant, date)).or_default();
        p.raw_bytes += f.meta.size;
        p.newest_raw = p.newest_raw.max(f.meta.last_modified.timestamp_micros());
        p.files.push(f.meta.location.to_string());
    }
    let lambda_max = settings.fleet.lambda_max_mb << 20;
    let runner = |raw_bytes| {
        if raw_bytes <= lambda_max {
            Runner::Lambda
        } else {
            Runner::Batch
        }
    };
    // A HealthLake import waits for its job, which can take longer than
    // Lambda's 15 minutes whatever the unit's size.
    let import_runner = |raw_bytes| match settings.import.target {
        crate::settings::ImportTarget::Healthlake => Runner::Batch,
        crate::settings::ImportTarget::Local => runner(raw_bytes),
    };
    let mut curate = Vec::new();
    let mut import: Vec<Unit> = Vec::new();
    for ((tenant, date), p) in partitions {
        let log = crate::commit::log(lake, &tenant, date).await?;
        let latest_curate = log.iter().rev().find(|r| r.stage == crate::commit::CURATE);
        let imported = log
            .iter()
            .rev()
            .find(|r| r.stage == crate::import::STAGE)
            .and_then(|r| r.imported);
        // A curate run lists the raw objects it read; an older commit that
        // does not is compared by time (its start against the newest
        // object's LastModified, two clocks).
        let curated_since_raw = latest_curate.is_some_and(|r| {
            if r.raw_inputs.is_empty() {
                run_start(&r.run_id) >= p.newest_raw
            } else {
                let read: std::collections::HashSet<&str> =
                    r.raw_inputs.iter().map(String::as_str).collect();
                p.files.iter().all(|f| read.contains(f.as_str()))
            }
        });
        if !curated_since_raw {
            let mut unit = Unit::partition(UnitStage::Curate, &tenant, date, p.raw_bytes, runner);
            unit.after = latest_curate.map(|r| r.sequence);
            curate.push(unit);
        } else if latest_curate.map(|r| r.sequence) != imported {
            match import.last_mut() {
                Some(u) if u.tenant == tenant.to_string() => {
                    u.dates.push(date.to_string());
                    u.raw_bytes += p.raw_bytes;
                    u.runner = import_runner(u.raw_bytes);
                }
                _ => import.push(Unit::partition(
                    UnitStage::Import,
                    &tenant,
                    date,
                    p.raw_bytes,
                    import_runner,
                )),
            }
        }
    }
    // Import units the local lake could only fail (it is not on a file
    // system) are left out, and the plan says why.
    let mut left_out = None;
    let local = settings.import.target == crate::settings::ImportTarget::Local;
    if let Some(why) = LocalLake::unsupported(&lake.metadata).filter(|_| local) {
        if !import.is_empty() && req.stage != PlanStage::Curate {
            left_out = Some(format!(
                "{} import unit(s) left out: {why}; set [import] target = \"healthlake\" \
                 for an S3 lake",
                import.len()
            ));
        }
        import.clear();
    }
    let units = match req.stage {
        PlanStage::Extract => unreachable!("returned above"),
        PlanStage::Curate => curate,
        PlanStage::Import => import,
        PlanStage::All => extract.into_iter().chain(curate).chain(import).collect(),
    };
    Ok((units, left_out))
}

/// When a run began: its id is a time-ordered (v7) UUID. An id that is not
/// one counts as the epoch, so its partition is planned again.
fn run_start(run_id: &str) -> i64 {
    uuid::Uuid::parse_str(run_id)
        .ok()
        .and_then(|u| u.get_timestamp())
        .map_or(0, |t| {
            let (secs, nanos) = t.to_unix();
            secs as i64 * 1_000_000 + i64::from(nanos / 1000)
        })
}

fn plan_path(lake: &Lake, id: &str) -> Path {
    lake.metadata
        .paths
        .layer(Layer::Metadata)
        .join("_plans")
        .join(format!("{id}.jsonl"))
}

fn done_path(lake: &Lake, id: &str, index: usize) -> Path {
    lake.metadata
        .paths
        .layer(Layer::Metadata)
        .join("_plans")
        .join(id)
        .join("done")
        .join(format!("{index:06}.json"))
}

/// Lists what is pending and writes it as a new plan (an empty plan too:
/// it says there was nothing to do).
pub async fn plan(lake: &Lake, settings: &Settings, req: &PlanRequest) -> Result<PlanReport> {
    let (units, left_out) = pending(lake, settings, req).await?;
    if let Some(why) = &left_out {
        tracing::warn!("plan: {why}");
    }
    let mut text = Vec::new();
    for u in &units {
        serde_json::to_writer(&mut text, u).expect("a unit serialises");
        text.push(b'\n');
    }
    let id = uuid::Uuid::now_v7().to_string();
    let path = plan_path(lake, &id);
    let bytes = text.len() as u64;
    if !lake.metadata.create(STAGE, &path, text).await? {
        return Err(Error::Corrupt {
            stage: STAGE,
            location: lake.metadata.url_of(&path),
            detail: "a plan with this new id exists already".into(),
        });
    }
    Ok(PlanReport {
        uri: lake.metadata.url_of(&path),
        id,
        bytes,
        units,
        left_out,
    })
}

/// A plan's id from its URI (as `plan` printed it), a local path ending in
/// its file name, or its bare id. A URI must be this lake's; the plan is
/// always read from this lake's plans folder.
fn plan_id(lake: &Lake, plan: &str) -> Result<String> {
    let name = plan.rsplit('/').next().unwrap_or(plan);
    let id = name.strip_suffix(".jsonl").unwrap_or(name);
    let ok = uuid::Uuid::parse_str(id).is_ok()
        && (!plan.contains("://") || lake.metadata.url_of(&plan_path(lake, id)) == plan);
    if !ok {
        let example = lake.metadata.url_of(&plan_path(lake, "ID"));
        return Err(Error::Usage(format!(
            "work: {plan} is not a plan of this lake (its plans are {}<ID>.jsonl)",
            example.strip_suffix("ID.jsonl").unwrap_or(&example)
        )));
    }
    Ok(id.to_string())
}

/// What a worker did.
#[derive(Debug, Clone)]
pub enum Outcome {
    Extracted(ExtractReport),
    Curated(CurateReport),
    /// Each date's import, oldest first; dates imported before are left out.
    Imported(Vec<ImportReport>),
}

#[derive(Debug, Clone)]
pub struct WorkReport {
    pub plan: String,
    pub index: usize,
    pub unit: Unit,
    pub outcome: Outcome,
}

/// Reads a plan: its id and its units.
pub async fn units(lake: &Lake, plan: &str) -> Result<(String, Vec<Unit>)> {
    let id = plan_id(lake, plan)?;
    let path = plan_path(lake, &id);
    let location = lake.metadata.url_of(&path);
    let text = lake
        .metadata
        .get_bytes(STAGE, &path)
        .await?
        .ok_or_else(|| Error::Usage(format!("work: no plan at {location}")))?;
    let units = text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(n, line)| {
            serde_json::from_slice(line).map_err(|e| Error::Corrupt {
                stage: STAGE,
                location: format!("{location}, line {}", n + 1),
                detail: format!("not a unit: {e}"),
            })
        })
        .collect::<Result<Vec<Unit>>>()?;
    Ok((id, units))
}

/// Reads unit `index` of a plan.
pub async fn unit(lake: &Lake, plan: &str, index: usize) -> Result<(String, Unit)> {
    let (id, mut units) = units(lake, plan).await?;
    if index >= units.len() {
        return Err(Error::Usage(format!(
            "work: the plan {plan} has {} units; there is no unit {index}",
            units.len()
        )));
    }
    Ok((id, units.swap_remove(index)))
}

/// Runs unit `index` of `plan`. A unit done before (by this or another
/// worker) is [`Error::AlreadyDone`]; a partition another worker holds is
/// [`Error::Busy`]: retry later.
pub async fn work(
    lake: &Lake,
    settings: &Settings,
    plan: &str,
    index: usize,
    reporter: &dyn Reporter,
) -> Result<WorkReport> {
    let (id, unit) = unit(lake, plan, index).await?;
    work_on(lake, settings, &id, index, unit, reporter).await
}

/// [`work`] on unit `index` of plan `id`, read already (by [`unit`]).
pub async fn work_on(
    lake: &Lake,
    settings: &Settings,
    id: &str,
    index: usize,
    unit: Unit,
    reporter: &dyn Reporter,
) -> Result<WorkReport> {
    let id = id.to_string();
    let tenant: TenantGuid = unit.tenant.parse()?;
    let dates = unit
        .dates
        .iter()
        .map(|d| d.parse())
        .collect::<Result<Vec<ImportDate>>>()?;
    let done = done_path(lake, &id, index);
    if lake.metadata.get_bytes(STAGE, &done).await?.is_some() {
        return Err(Error::AlreadyDone(format!(
            "work: unit {index} of plan {id} is done ({})",
            lake.metadata.url_of(&done)
        )));
    }
    let outcome = match unit.stage {
        UnitStage::Curate => match dates[..] {
            [date] => {
                crate::curate::curate_planned(lake, settings, &tenant, date, reporter, unit.after)
                    .await
                    .map(Outcome::Curated)
            }
            _ => Err(Error::Corrupt {
                stage: STAGE,
                location: format!(
                    "{}, unit {index}",
                    lake.metadata.url_of(&plan_path(lake, &id))
                ),
                detail: "a curate unit names one date".into(),
            }),
        },
        UnitStage::Import => import_dates(lake, settings, tenant, &dates, reporter).await,
        UnitStage::Extract => {
            extract_unit(lake, settings, &id, &unit, tenant, &dates, reporter).await
        }
    };
    let marker = |how: &str| {
        serde_json::to_vec(&serde_json::json!({
            "plan": id,
            "index": index,
            "unit": unit,
            "outcome": how,
            "finished_at": chrono::Utc::now().to_rfc3339(),
        }))
        .expect("a marker serialises")
    };
    match outcome {
        Ok(outcome) => {
            lake.metadata.create(STAGE, &done, marker("done")).await?;
            Ok(WorkReport {
                plan: lake.metadata.url_of(&plan_path(lake, &id)),
                index,
                unit,
                outcome,
            })
        }
        Err(Error::AlreadyDone(why)) => {
            lake.metadata
                .create(STAGE, &done, marker("skipped"))
                .await?;
            Err(Error::AlreadyDone(why))
        }
        Err(e) => Err(e),
    }
}

/// Extracts the unit's source system, incrementally, under its date. An
/// extraction completed since the plan was written means another worker
/// did it; a pending one (a killed worker's) is resumed.
async fn extract_unit(
    lake: &Lake,
    settings: &Settings,
    plan: &str,
    unit: &Unit,
    tenant: TenantGuid,
    dates: &[ImportDate],
    reporter: &dyn Reporter,
) -> Result<Outcome> {
    let bad = |detail: &str| Error::Corrupt {
        stage: STAGE,
        location: lake.metadata.url_of(&plan_path(lake, plan)),
        detail: detail.into(),
    };
    let (Some(system), Some(url), [date]) = (&unit.source_system, &unit.fhir_url, dates) else {
        return Err(bad(
            "an extract unit names a source system, a FHIR URL and one date",
        ));
    };
    let system: SourceSystem = system.parse()?;
    let fhir_url = url::Url::parse(url).map_err(|e| bad(&format!("fhir_url: {e}")))?;
    let standing = crate::extract::standing(lake, &tenant, &system).await?;
    if !standing.pending
        && standing
            .last_run
            .as_deref()
            .is_some_and(|r| run_start(r) >= run_start(plan))
    {
        return Err(Error::AlreadyDone(format!(
            "extract: tenant {tenant} source system {system} was extracted since the plan was written"
        )));
    }
    let request = ExtractRequest {
        fhir_url,
        tenant,
        source_system: system,
        date: *date,
        level: crate::extract::export::Level::System,
        types: Vec::new(),
        type_filters: Vec::new(),
        since: crate::extract::Since::Incremental,
        restart: false,
    };
    let own;
    let settings = match &unit.token_env {
        Some(var) => {
            let token = std::env::var(var).ok().filter(|t| !t.trim().is_empty()).ok_or_else(|| {
                Error::Config(format!(
                    "extract: tenant {} source system {} takes its token from {var}, which is not set",
                    request.tenant, request.source_system
                ))
            })?;
            let mut s = settings.clone();
            s.extract.bearer_token = Some(token.trim().to_string());
            s.extract.bearer_token_file = None;
            s.extract.smart = None;
            own = s;
            &own
        }
        None => settings,
    };
    crate::extract::extract(lake, settings, &request, reporter)
        .await
        .map(Outcome::Extracted)
}

/// Imports a tenant's dates in order. A date imported since the plan was
/// written is left out; when every date was, the unit is done already. A
/// failed date stops the unit: the dates before it stay imported, and a
/// retry takes up from it.
async fn import_dates(
    lake: &Lake,
    settings: &Settings,
    tenant: TenantGuid,
    dates: &[ImportDate],
    reporter: &dyn Reporter,
) -> Result<Outcome> {
    let mut reports = Vec::new();
    for &date in dates {
        let req = ImportRequest {
            tenant: tenant.clone(),
            date,
            target: settings.import.target,
            wait: true,
        };
        let r = crate::import::import(lake, settings, &req, reporter).await?;
        if r.status != "already imported" {
            reports.push(r);
        }
    }
    if reports.is_empty() {
        return Err(Error::AlreadyDone(format!(
            "import: every date of tenant {tenant} in this unit was imported since it was planned"
        )));
    }
    Ok(Outcome::Imported(reports))
}

/// The unit index of this worker: `--index`, else AWS Batch's array index,
/// else a Kubernetes Indexed Job's completion index.
pub fn worker_index(given: Option<usize>) -> Result<usize> {
    if let Some(n) = given {
        return Ok(n);
    }
    for var in ["AWS_BATCH_JOB_ARRAY_INDEX", "JOB_COMPLETION_INDEX"] {
        if let Ok(v) = std::env::var(var) {
            return v
                .trim()
                .parse()
                .map_err(|_| Error::Usage(format!("work: {var}={v:?} is not a unit index")));
        }
    }
    Err(Error::Usage(
        "work: give --index, or run as an AWS Batch array child (AWS_BATCH_JOB_ARRAY_INDEX) \
         or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX)"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_starts_when_its_v7_id_says() {
        let before = chrono::Utc::now().timestamp_micros();
        let id = uuid::Uuid::now_v7().to_string();
        let at = run_start(&id);
        assert!(at >= before - 1000 && at <= chrono::Utc::now().timestamp_micros());
        assert_eq!(run_start("not-a-uuid"), 0);
    }

    #[test]
    fn units_read_back_as_written() {
        let u = Unit {
            stage: UnitStage::Curate,
            tenant: "0f8fad5b-d9cb-469f-a165-70867728950e".into(),
            dates: vec!["2026-12-01".into()],
            source_system: None,
            fhir_url: None,
            token_env: None,
            raw_bytes: 12,
            runner: Runner::Lambda,
            after: Some(3),
        };
        let line = serde_json::to_string(&u).unwrap();
        assert_eq!(
            line,
            r#"{"stage":"curate","tenant":"0f8fad5b-d9cb-469f-a165-70867728950e","dates":["2026-12-01"],"raw_bytes":12,"runner":"lambda","after":3}"#
        );
        assert_eq!(serde_json::from_str::<Unit>(&line).unwrap(), u);
        for stage in [UnitStage::Extract, UnitStage::Curate, UnitStage::Import] {
            assert_eq!(serde_json::to_value(stage).unwrap(), stage.name());
        }
    }
}
