//! The extract stage: a FHIR Bulk Data Access v2 client that lands a
//! tenant's export in the raw layer,
//! `raw/tenantGuid=…/source_system=…/import_date=…/<Type>[.NNN].ndjson[.gz]`,
//! with the export's own files beside it under `_export/<run_id>/` (the
//! manifest, the `error` files, the `deleted` files).
//!
//! An extraction is resumable. Its state lives in
//! `raw/tenantGuid=…/source_system=…/_extract/pending.json`: written at
//! kick-off (the status URL), again when the manifest arrives, and after each
//! file is completely written. Running the same extraction again after a
//! crash picks up from there: it polls the saved status URL instead of
//! starting a new export, and fetches only the files not yet written. A
//! different extraction of the same tenant and source system is refused
//! while one is pending (`--restart` abandons it). When the extraction
//! completes, the manifest's `transactionTime` goes to `_extract/last.json`,
//! the `_since` of the next `--incremental` run.
//!
//! Files land one by one, each appearing only when complete (an object
//! store put, or a completed multipart upload), and never in place of
//! another: each output file claims a free name first (its planned
//! `<Type>.ndjson`, else the next part number, see `raw::landing`), so a
//! second export of the same day keeps the first one's files, and an
//! export's own files go to a folder of its own, `_export/<run_id>/`. A file
//! that an interrupted run uploaded but had not yet recorded in
//! `pending.json` is found by its claim and not downloaded again.
//! `last.json` is written only once every file of the export has landed.

pub mod auth;
pub mod download;
pub mod export;
pub mod http;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use url::Url;

use self::auth::{Auth, Smart};
use self::download::{Done, Kind, Landing, Planned, Target};
use self::export::{Level, Manifest, Parameters, Polled};
use self::http::{shown, Http, Request};
use crate::commit;
use crate::error::{Error, Result};
use crate::layout::{ImportDate, SourceSystem, TenantGuid};
use crate::metadata::{self, JobRow, MetricRow};
use crate::raw::landing::Partition;
use crate::report::Reporter;
use crate::settings::Settings;
use crate::storage::Lake;

const STAGE: &str = "extract";
const PENDING: &str = "pending.json";
const LAST: &str = "last.json";

/// Where `_since` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// Everything.
    All,
    /// Changes since this FHIR instant.
    At(String),
    /// Changes since the last complete extraction of this tenant and source
    /// system (everything when there was none).
    Incremental,
}

/// What `fhirflow extract` was asked for.
#[derive(Debug, Clone)]
pub struct ExtractRequest {
    pub fhir_url: Url,
    pub tenant: TenantGuid,
    pub source_system: SourceSystem,
    /// The import date of a new extraction (a resumed one keeps its own).
    pub date: ImportDate,
    pub level: Level,
    pub types: Vec<String>,
    pub type_filters: Vec<String>,
    pub since: Since,
    /// Abandon a pending extraction of this tenant and source system.
    pub restart: bool,
}

impl ExtractRequest {
    /// Checks what a user typed: resource types, the `_since` instant, the
    /// group id.
    pub fn check(&self) -> Result<()> {
        for t in &self.types {
            if crate::fhir::resource_type(t).is_none() {
                return Err(Error::Usage(format!(
                    "--type: {t:?} is not an R4 resource type"
                )));
            }
        }
        for f in &self.type_filters {
            let ty = f.split('?').next().unwrap_or("");
            if crate::fhir::resource_type(ty).is_none() || !f.contains('?') {
                return Err(Error::Usage(format!(
                    "--type-filter: {f:?} is not <ResourceType>?<search parameters>"
                )));
            }
        }
        if let Since::At(s) = &self.since {
            if chrono::DateTime::parse_from_rfc3339(s).is_err() {
                return Err(Error::Usage(format!(
                    "--since: {s:?} is not a FHIR instant such as 2024-05-01T00:00:00Z"
                )));
            }
        }
        if let Level::Group(id) = &self.level {
            let ok = (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !ok {
                return Err(Error::Usage(format!("--group: {id:?} is not a FHIR id")));
            }
        }
        Ok(())
    }
}

/// The saved state of an extraction that has not completed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    /// The kick-off request (method, URL, body): what makes two runs the
    /// same extraction.
    request: String,
    status_url: String,
    run_id: String,
    import_date: String,
    started_at: i64,
    manifest: Option<serde_json::Value>,
    /// Completely written files, by URL.
    done: BTreeMap<String, Done>,
}

/// `_extract/last.json`: the last complete extraction.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Last {
    transaction_time: String,
    run_id: String,
    import_date: String,
    request: String,
}

/// What an extraction did.
#[derive(Debug, Clone)]
pub struct ExtractReport {
    pub run_id: String,
    pub tenant: TenantGuid,
    pub source_system: SourceSystem,
    pub date: ImportDate,
    /// The extraction continued one a crash or failure left pending.
    pub resumed: bool,
    pub transaction_time: String,
    /// Every file of the manifest, in manifest order.
    pub files: Vec<Done>,
    /// Of `files`, those written by an earlier (interrupted) run.
    pub reused: usize,
    pub seconds: f64,
    /// Time from kick-off until the manifest (the server preparing the
    /// export), in this run.
    pub export_wait_seconds: f64,
    /// Wall time of the downloads.
    pub download_seconds: f64,
    /// Summed over the files downloaded in this run: time waiting for the
    /// server's bytes, and time writing them to the raw layer.
    pub server_wait_seconds: f64,
    pub write_seconds: f64,
    /// Why the status URL could not be deleted, if it could not.
    pub delete_warning: Option<String>,
}

impl ExtractReport {
    pub fn resources(&self) -> u64 {
        self.files
            .iter()
            .filter(|f| f.kind == Kind::Output)
            .map(|f| f.lines)
            .sum()
    }
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
    /// Per resource type: files, resources, bytes (output files only).
    pub fn by_type(&self) -> BTreeMap<&str, (u64, u64, u64)> {
        let mut out: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
        for f in self.files.iter().filter(|f| f.kind == Kind::Output) {
            let e = out.entry(f.resource_type.as_str()).or_default();
            e.0 += 1;
            e.1 += f.lines;
            e.2 += f.bytes;
        }
        out
    }
}

/// Where the extractions of a tenant and source system stand, for planning.
#[derive(Debug, Clone, Default)]
pub struct Standing {
    /// The run id of the last complete extraction.
    pub last_run: Option<String>,
    /// An extraction was started and has not completed (the next run of it
    /// resumes it).
    pub pending: bool,
}

pub async fn standing(lake: &Lake, tenant: &TenantGuid, system: &SourceSystem) -> Result<Standing> {
    let root = &lake.raw;
    let last_path = root.paths.extract_state(tenant, system, LAST);
    let last_run = read_last(root, &last_path).await?.map(|l| l.run_id);
    let pending_path = root.paths.extract_state(tenant, system, PENDING);
    let pending = root.get_bytes(STAGE, &pending_path).await?.is_some();
    Ok(Standing { last_run, pending })
}

async fn read_last(
    root: &crate::storage::Root,
    path: &object_store::path::Path,
) -> Result<Option<Last>> {
    let Some(b) = root.get_bytes(STAGE, path).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&b)
        .map(Some)
        .map_err(|e| Error::Input {
            path: root.url_of(path).into(),
            reason: e.to_string(),
        })
}

fn auth_for(settings: &Settings) -> Result<Auth> {
    let x = &settings.extract;
    Ok(match (&x.smart, &x.bearer_token, &x.bearer_token_file) {
        (Some(smart), _, _) => Auth::Smart(Box::new(Smart::new(smart)?)),
        (None, Some(token), _) => Auth::Bearer(token.clone()),
        (None, None, Some(path)) => Auth::Bearer(auth::token_from_file(path)?),
        (None, None, None) => Auth::None,
    })
}

fn request_identity(req: &Request) -> String {
    let body = req
        .body
        .as_ref()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    format!("{} {} {body}", req.method, req.url)
}

/// Runs (or resumes) an extraction, holding the (tenant, source system)
/// lease: a second extraction of the same source waits or exits busy.
pub async fn extract(
    lake: &Lake,
    settings: &Settings,
    request: &ExtractRequest,
    reporter: &dyn Reporter,
) -> Result<ExtractReport> {
    request.check()?;
    // Before the lease: a token file that cannot be read is a configuration
    // error that writes nothing.
    let auth = auth_for(settings)?;
    let lease = crate::commit::lease_source(
        lake,
        settings,
        &request.tenant,
        &request.source_system,
        STAGE,
        &uuid::Uuid::now_v7().to_string(),
    )
    .await?;
    let result = extract_leased(lake, settings, request, &auth, reporter, &lease).await;
    // The run's own error first; a failed release (the lease then lapses
    // after its time to live) is an error of a run that otherwise worked.
    let released = lease.release().await;
    let report = result?;
    released?;
    Ok(report)
}

async fn extract_leased(
    lake: &Lake,
    settings: &Settings,
    request: &ExtractRequest,
    auth: &Auth,
    reporter: &dyn Reporter,
    lease: &crate::commit::lease::Lease,
) -> Result<ExtractReport> {
    let started = Instant::now();
    let x = &settings.extract;
    let base = &request.fhir_url;
    let http = Http::new(base, x)?;
    let with_auth = Some((auth, base));
    let root = &lake.raw;
    let (tenant, system) = (&request.tenant, &request.source_system);
    let pending_path = root.paths.extract_state(tenant, system, PENDING);
    let last_path = root.paths.extract_state(tenant, system, LAST);

    let since = match &request.since {
        Since::All => None,
        Since::At(s) => Some(s.clone()),
        Since::Incremental => read_last(root, &last_path)
            .await?
            .map(|l| l.transaction_time),
    };
    let params = Parameters {
        types: request.types.clone(),
        type_filters: request.type_filters.clone(),
        since,
    };
    let kickoff = export::kickoff_request(base, &request.level, &params, x.kickoff_method);
    let identity = request_identity(&kickoff);

    let saved: Option<Pending> = match root.get_bytes(STAGE, &pending_path).await? {
        Some(b) => Some(serde_json::from_slice(&b).map_err(|e| Error::Input {
            path: root.url_of(&pending_path).into(),
            reason: format!("unreadable extraction state ({e}); delete it to start over"),
        })?),
        None => None,
    };
    let saved = match saved {
        Some(p) if request.restart => {
            // Best effort: tell the server the old export is no longer wanted.
            if let Ok(url) = Url::parse(&p.status_url) {
                let _ = http
                    .send("export cancel", &Request::delete(url), with_auth)
                    .await;
            }
            root.delete(STAGE, &pending_path).await?;
            None
        }
        Some(p) if p.request != identity => {
            return Err(Error::Usage(format!(
                "another extraction of tenant {tenant} source system {system} is pending \
                 (run {}, import date {}): run the same command again to resume it, or add \
                 --restart to abandon it",
                p.run_id, p.import_date
            )))
        }
        other => other,
    };
    let resumed = saved.is_some();
    let mut pending = match saved {
        Some(p) => p,
        None => {
            reporter.status("export: kick-off");
            let status_url = export::kickoff(&http, &kickoff, with_auth).await?;
            let p = Pending {
                request: identity,
                status_url: status_url.to_string(),
                run_id: uuid::Uuid::now_v7().to_string(),
                import_date: request.date.to_string(),
                started_at: chrono::Utc::now().timestamp_micros(),
                manifest: None,
                done: BTreeMap::new(),
            };
            save(lake, &pending_path, &p).await?;
            commit::failpoint("extract-after-kickoff");
            p
        }
    };
    let date: ImportDate = pending.import_date.parse()?;
    let status_url = Url::parse(&pending.status_url).map_err(|e| Error::Input {
        path: root.url_of(&pending_path).into(),
        reason: format!("status URL: {e}"),
    })?;

    let poll_started = Instant::now();
    let manifest: Manifest = match &pending.manifest {
        Some(m) => serde_json::from_value(m.clone()).map_err(|e| Error::Input {
            path: root.url_of(&pending_path).into(),
            reason: format!("saved manifest: {e}"),
        })?,
        None => {
            let polled = export::poll(
                &http,
                &status_url,
                with_auth,
                Duration::from_secs(x.poll_interval_seconds),
                Duration::from_secs(x.max_export_wait_seconds),
                reporter,
            )
            .await?;
            match polled {
                Polled::Complete(m, raw) => {
                    pending.manifest = Some(raw);
                    save(lake, &pending_path, &pending).await?;
                    m
                }
                Polled::Gone(why) => {
                    return Err(Error::Http {
                        what: "export status".into(),
                        url: shown(&status_url),
                        message: format!(
                            "the server no longer knows this export ({why}); add --restart to start a new one"
                        ),
                    })
                }
            }
        }
    };
    let export_wait_seconds = poll_started.elapsed().as_secs_f64();

    // Plan every file's target and source key, in manifest order (the key
    // is how a resumed run finds what an earlier one landed).
    let plan = plan_files(lake, tenant, system, date, &pending, &manifest)?;
    // A manifest that points anywhere it may not is refused as a whole,
    // before any file is fetched.
    for p in &plan {
        http.check(&format!("{} file", p.resource_type), &p.url)
            .map_err(|e| match e {
                Error::Http { what, url, message } => Error::Http {
                    what,
                    url,
                    message: format!(
                        "{message} (a file URL of the export manifest; the export stays \
                         pending: run again once the host is allowed, or add --restart)"
                    ),
                },
                other => other,
            })?;
    }
    let file_auth = if manifest.requires_access_token {
        with_auth
    } else {
        None
    };
    let todo: Vec<&Planned> = plan
        .iter()
        .filter(|p| !pending.done.contains_key(p.url.as_str()))
        .collect();
    let earlier: std::collections::BTreeSet<String> = pending.done.keys().cloned().collect();
    reporter.start("extract", 0);
    reporter.status(&format!("downloading {} files", todo.len()));
    let download_started = Instant::now();
    let landing = Landing::new(
        Partition::read(root, STAGE, tenant, system, date).await?,
        resumed,
    );
    let state = Mutex::new(pending);
    let results: Vec<Result<()>> = futures::stream::iter(todo)
        .map(|file| {
            let (http, state, pending_path, landing) = (&http, &state, &pending_path, &landing);
            async move {
                let done =
                    download::download(http, root, landing, file, file_auth, reporter).await?;
                if done.attempts > 0 {
                    commit::failpoint("extract-after-upload");
                }
                let snapshot = {
                    let mut s = state.lock().expect("state not poisoned");
                    s.done.insert(file.url.to_string(), done);
                    s.clone()
                };
                save(lake, pending_path, &snapshot).await?;
                commit::failpoint("extract-after-file");
                Ok(())
            }
        })
        .buffer_unordered(x.parallel_downloads)
        .collect()
        .await;
    reporter.finish();
    let download_seconds = download_started.elapsed().as_secs_f64();
    let pending = state.into_inner().expect("state not poisoned");
    // The other downloads ran to their end: what they wrote is saved for
    // the next run. Report the first failure.
    results.into_iter().collect::<Result<Vec<()>>>()?;

    // Every file of the export has landed before anything below (the
    // manifest, the metadata, the next `_since`) is written.
    let files: Vec<Done> = plan
        .iter()
        .map(|p| {
            pending
                .done
                .get(p.url.as_str())
                .cloned()
                .ok_or_else(|| Error::Http {
                    what: format!("{} file", p.resource_type),
                    url: shown(&p.url),
                    message: "not landed; run the same command again to resume".into(),
                })
        })
        .collect::<Result<_>>()?;
    // Files this run did not download: recorded by an earlier run, or found
    // landed by their claims.
    let reused = files
        .iter()
        .filter(|f| earlier.contains(&f.url) || f.attempts == 0)
        .count();
    let fresh = files.iter().filter(|f| !earlier.contains(&f.url));
    let (server_wait_seconds, write_seconds) = fresh.fold((0.0, 0.0), |(w, wr), f| {
        (w + f.wait_seconds, wr + f.write_seconds)
    });

    // The manifest beside the data, then the next `_since`.
    let manifest_path =
        root.paths
            .export_run_file(tenant, system, date, &pending.run_id, "manifest.json");
    let manifest_json = pending
        .manifest
        .clone()
        .expect("manifest saved before downloads");
    // Create-only: a resumed run may find it written already (the same
    // manifest, saved in `pending.json`), and raw objects are never replaced.
    root.create(
        STAGE,
        &manifest_path,
        serde_json::to_vec_pretty(&manifest_json).expect("JSON serialises"),
    )
    .await?;
    let mut report = ExtractReport {
        run_id: pending.run_id.clone(),
        tenant: tenant.clone(),
        source_system: system.clone(),
        date,
        resumed,
        transaction_time: manifest.transaction_time.clone(),
        files,
        reused,
        seconds: started.elapsed().as_secs_f64(),
        export_wait_seconds,
        download_seconds,
        server_wait_seconds,
        write_seconds,
        delete_warning: None,
    };
    write_metadata(lake, lease, request, &kickoff, &pending, &report, &manifest).await?;
    let last = Last {
        transaction_time: manifest.transaction_time.clone(),
        run_id: pending.run_id.clone(),
        import_date: pending.import_date.clone(),
        request: pending.request.clone(),
    };
    root.put(
        STAGE,
        &last_path,
        serde_json::to_vec_pretty(&last).expect("JSON serialises"),
    )
    .await?;
    if x.delete_when_done {
        let resp = http
            .send(
                "export delete",
                &Request::delete(status_url.clone()),
                with_auth,
            )
            .await;
        report.delete_warning = match resp {
            Ok(r) if r.status().is_success() || r.status().as_u16() == 404 => None,
            Ok(r) => Some(http::error_text(r).await),
            Err(e) => Some(e.to_string()),
        };
    }
    root.delete(STAGE, &pending_path).await?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn save(lake: &Lake, path: &object_store::path::Path, p: &Pending) -> Result<()> {
    lake.raw
        .put(
            STAGE,
            path,
            serde_json::to_vec_pretty(p).expect("JSON serialises"),
        )
        .await
}

/// A URL as a claim may record it: no query string or fragment (signed
/// file URLs carry their signature there) and no user information.
fn without_query(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

/// Targets for every file of the manifest: data files named
/// `<Type>.ndjson` (or `<Type>.NNN.ndjson` when a type has several) when
/// those names are free in the partition, error and deleted files under
/// `_export/<run_id>/error/` and `_export/<run_id>/deleted/`.
fn plan_files(
    lake: &Lake,
    tenant: &TenantGuid,
    system: &SourceSystem,
    date: ImportDate,
    pending: &Pending,
    manifest: &Manifest,
) -> Result<Vec<Planned>> {
    let paths = &lake.raw.paths;
    let run = pending.run_id.as_str();
    let export = match Url::parse(&pending.status_url) {
        Ok(u) => without_query(&u),
        Err(_) => pending.run_id.clone(),
    };
    let export = format!("export {export} at {}", manifest.transaction_time);
    let mut plan = Vec::new();
    let groups = [
        (Kind::Output, &manifest.output),
        (Kind::Error, &manifest.error),
        (Kind::Deleted, &manifest.deleted),
    ];
    for (kind, files) in groups {
        let mut per_type: BTreeMap<&str, usize> = BTreeMap::new();
        for f in files.iter() {
            *per_type.entry(f.resource_type.as_str()).or_default() += 1;
        }
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (index, f) in files.iter().enumerate() {
            let ty = crate::fhir::resource_type(&f.resource_type).ok_or_else(|| Error::Http {
                what: "export manifest".into(),
                url: manifest.request.clone(),
                message: format!(
                    "an output file of type {:?}, not an R4 resource type",
                    f.resource_type
                ),
            })?;
            let n = seen.entry(ty).or_default();
            *n += 1;
            let name = if per_type[ty] == 1 {
                format!("{ty}.ndjson")
            } else {
                format!("{ty}.{n:03}.ndjson")
            };
            let target = match kind {
                Kind::Output => Target::Raw(
                    crate::layout::RawFileName::parse(&name).expect("a valid raw file name"),
                ),
                Kind::Error => Target::Export(paths.export_run_file(
                    tenant,
                    system,
                    date,
                    run,
                    &format!("error/{name}"),
                )),
                Kind::Deleted => Target::Export(paths.export_run_file(
                    tenant,
                    system,
                    date,
                    run,
                    &format!("deleted/{name}"),
                )),
            };
            let url = Url::parse(&f.url).map_err(|e| Error::Http {
                what: "export manifest".into(),
                url: manifest.request.clone(),
                message: format!("file URL {:?}: {e}", f.url),
            })?;
            let kind_name = match kind {
                Kind::Output => "output",
                Kind::Error => "error",
                Kind::Deleted => "deleted",
            };
            plan.push(Planned {
                kind,
                resource_type: ty.to_string(),
                source: format!("{export}: {kind_name}[{index}] {}", without_query(&url)),
                url,
                count: f.count,
                target,
            });
        }
    }
    Ok(plan)
}

/// The run's `import_jobs` row and its `import_metrics` rows (one per
/// resource type), published as the extract stage's commit.
async fn write_metadata(
    lake: &Lake,
    lease: &crate::commit::lease::Lease,
    request: &ExtractRequest,
    kickoff: &Request,
    pending: &Pending,
    report: &ExtractReport,
    manifest: &Manifest,
) -> Result<()> {
    let (tenant, date, run) = (&request.tenant, report.date, &pending.run_id);
    let by_type = report.by_type();
    let expected: u64 = manifest.output.iter().map(|f| f.count.unwrap_or(0)).sum();
    let counted = manifest.output.iter().all(|f| f.count.is_some());
    let resources = report.resources();
    let errors = report
        .files
        .iter()
        .filter(|f| f.kind == Kind::Error)
        .count();
    let deleted = report
        .files
        .iter()
        .filter(|f| f.kind == Kind::Deleted)
        .count();
    let job = JobRow {
        job_id: run.clone(),
        stage: STAGE.into(),
        tenant_guid: tenant.to_string(),
        source_system: Some(report.source_system.to_string()),
        import_date: date.days_since_epoch(),
        started_at: pending.started_at,
        ended_at: chrono::Utc::now().timestamp_micros(),
        status: "succeeded".into(),
        input_uri: shown(&kickoff.url),
        output_uri: lake.raw.url_of(&lake.raw.paths.raw_partition(
            tenant,
            &report.source_system,
            date,
        )),
        records_in: if counted { expected } else { resources },
        records_out: resources,
        records_rejected: 0,
        records_duplicate: 0,
        healthlake_job_id: None,
        healthlake_status: None,
        message: Some(format!(
            "{} data files, {errors} error files, {deleted} deleted files; transactionTime {}{}",
            by_type.values().map(|v| v.0).sum::<u64>(),
            report.transaction_time,
            if report.resumed { "; resumed" } else { "" }
        )),
        engine_version: env!("CARGO_PKG_VERSION").into(),
        rule_set: None,
    };
    let metrics: Vec<MetricRow> = by_type
        .iter()
        .map(|(ty, &(files, lines, bytes))| {
            let secs: f64 = report
                .files
                .iter()
                .filter(|f| f.kind == Kind::Output && f.resource_type == *ty)
                .map(|f| f.seconds)
                .sum();
            let expected: Option<u64> = manifest
                .output
                .iter()
                .filter(|f| f.resource_type == *ty)
                .map(|f| f.count)
                .sum();
            MetricRow {
                job_id: run.clone(),
                stage: STAGE.into(),
                tenant_guid: tenant.to_string(),
                import_date: date.days_since_epoch(),
                resource_type: ty.to_string(),
                records_in: expected.unwrap_or(lines),
                records_out: lines,
                bytes_in: bytes,
                bytes_out: bytes,
                files: Some(files),
                elapsed_seconds: secs,
                records_per_second: lines as f64 / secs.max(1e-9),
                mb_per_second: bytes as f64 / 1e6 / secs.max(1e-9),
                conserved: expected.is_none_or(|e| e == lines),
                ..Default::default()
            }
        })
        .collect();
    let system = request.source_system.to_string();
    let rows = metadata::StageRows {
        source_system: Some(&system),
        jobs: &[job],
        errors: &[],
        metrics: &metrics,
    };
    metadata::publish_stage_rows(lake, lease, STAGE, tenant, date, run, rows, None)
        .await
        .map(|_| ())
}
