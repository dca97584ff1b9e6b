//! `--target healthlake`: one StartFHIRImportJob over the curated partition's
//! S3 prefix, into the tenant's own datastore.
//!
//! * The `ClientToken` is derived from the tenant, the date, the datastore and
//!   the curate run: importing the same curated files again (a retried run, a
//!   second `fhirflow import`) gives HealthLake the same token, and HealthLake
//!   answers with the job it already has instead of importing twice.
//! * The job name carries the date and the import's job id, never record data.
//! * HealthLake runs one import per datastore and queues the rest (status
//!   QUEUED / SUBMITTED): the job is polled with DescribeFHIRImportJob, backing
//!   off from `poll_initial_seconds` to `poll_max_seconds`, through every
//!   status until it ends. Throttling and 5xx answers are retried by the SDK.
//! * Once the job ends, its `manifest.json` and the files of its FAILURE folder
//!   are read back from the output S3 location: the counts go to
//!   `import_jobs`, each rejected resource to `import_errors` with its line.
//!
//! With `--no-wait` the stage records the submitted job and returns;
//! [`status`] (`fhirflow import status`) looks at it later and records the
//! outcome once the job has ended.

mod output;
mod rest;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_healthlake::types::{
    ImportJobProperties, InputDataConfig, JobStatus, OutputDataConfig, S3Configuration,
    ValidationLevel,
};
use aws_sdk_healthlake::Client;
use serde::{Deserialize, Serialize};

use self::output::{Answered, Published, Reconciled, Response};
use fhirflow::commit::{
    self,
    lease::{Lease, Take},
};
use fhirflow::curate::parse::key_and_scan;
use fhirflow::error::{Error, Result};
use fhirflow::import::ledger::{self, content_hash, Entry, Ledger, Verdict};
use fhirflow::import::{
    curated, job_row, metric_rows, Deletions, ImportReport, ImportRequest, TypeCounts, STAGE,
};
use fhirflow::layout::{ImportDate, TenantGuid};
use fhirflow::metadata::{self, ErrorRow};
use fhirflow::report::Reporter;
use fhirflow::settings::{ImportTarget, Settings};
use fhirflow::storage::{Lake, Root};

/// What a submitted import needs to be looked at again (saved in the
/// metadata layer; holds no credentials and no record data).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    job_id: String,
    curate_run: String,
    datastore_id: String,
    healthlake_job_id: String,
    client_token: String,
    input_uri: String,
    started_at: i64,
    /// The outcome was recorded in the metadata tables.
    recorded: bool,
    /// What the ledger let through (absent in states written before it).
    #[serde(default)]
    selection: Option<Selection>,
}

/// The curated records an import sends: all of them (`prefix` None: the
/// partition's own folder), or, when the ledger leaves some out, copies of
/// the others under a prefix of the job's own.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Selection {
    prefix: Option<String>,
    files: Vec<SentFile>,
}

/// One curated file's part in an import.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SentFile {
    name: String,
    resource_type: String,
    /// The curated lines sent, as runs `[first line, count]`: line k of the
    /// file HealthLake read is the k-th line they cover.
    lines: Vec<[u64; 2]>,
    sent: u64,
    unchanged: u64,
    stale: u64,
    bytes_not_sent: u64,
}

impl SentFile {
    /// The curated line that line `k` (1-based) of the sent file holds.
    fn curated_line(&self, k: u64) -> Option<u64> {
        let mut before = 0;
        for [first, count] in &self.lines {
            if k <= before + count {
                return Some(first + (k - before) - 1);
            }
            before += count;
        }
        None
    }
}

impl Selection {
    fn sent(&self) -> u64 {
        self.files.iter().map(|f| f.sent).sum()
    }
}

/// The ledger's name of a datastore.
fn ledger_target(datastore: &str) -> String {
    format!("healthlake-{datastore}")
}

/// Reads the pinned commit's files and judges each record by the ledger;
/// when some are left out, writes the others under the job's own prefix.
async fn select(
    lake: &Lake,
    settings: &Settings,
    req: &ImportRequest,
    curated: &fhirflow::import::Curated,
    datastore: &str,
    job_id: &str,
) -> Result<Selection> {
    let ledger = Ledger::load(lake, &req.tenant, &ledger_target(datastore)).await?;
    let date = req.date.days_since_epoch();
    let mut files = Vec::new();
    let mut sent = Vec::new();
    let mut kept: Vec<(String, Vec<u8>)> = Vec::new();
    for (ty, parts) in &curated.files {
        for part in parts {
            let data = commit::read_verified(&lake.curated, STAGE, part).await?;
            let name = part.name.clone().unwrap_or_default();
            let mut f = SentFile {
                name: name.clone(),
                resource_type: ty.to_string(),
                ..Default::default()
            };
            let mut out = Vec::new();
            for (n, line) in data.split(|&b| b == b'\n').enumerate() {
                if line.is_empty() {
                    continue;
                }
                let n = n as u64 + 1;
                let (keys, scan) = key_and_scan(line, Some(ty), settings.curate.max_depth, false)
                    .map_err(|r| {
                    Error::Import(format!(
                        "{} line {n}: {}",
                        lake.curated.url_of(&part.location()),
                        r.message
                    ))
                })?;
                let entry = Entry::of(&keys, date, content_hash(keys.text, &scan));
                match ledger.judge(&entry) {
                    Verdict::Send => {
                        sent.push(entry);
                        match f.lines.last_mut() {
                            Some([first, count]) if *first + *count == n => *count += 1,
                            _ => f.lines.push([n, 1]),
                        }
                        f.sent += 1;
                        out.extend_from_slice(line);
                        out.push(b'\n');
                    }
                    v => {
                        f.bytes_not_sent += line.len() as u64 + 1;
                        if v == Verdict::Stale {
                            f.stale += 1;
                        } else {
                            f.unchanged += 1;
                        }
                    }
                }
            }
            if f.sent > 0 {
                kept.push((name, out));
            }
            files.push(f);
        }
    }
    let pending = lake
        .metadata
        .paths
        .ledger_pending(&req.tenant, req.date, job_id);
    ledger::write_entries(lake, &pending, &sent).await?;
    if files.iter().all(|f| f.unchanged + f.stale == 0) {
        return Ok(Selection {
            prefix: None,
            files,
        });
    }
    let dir = lake
        .curated
        .paths
        .healthlake_import(&req.tenant, req.date, job_id);
    for (name, bytes) in kept {
        lake.curated
            .put(STAGE, &dir.clone().join(name.as_str()), bytes)
            .await?;
    }
    Ok(Selection {
        prefix: Some(format!("{}/", lake.curated.url_of(&dir))),
        files,
    })
}

/// The ledger entries of what the job imported: the entries [`select`]
/// kept for the records it sent (in the order of the selection's files and
/// lines), but those HealthLake failed. A state written before selections
/// kept none: the ledger then learns nothing from the job.
async fn imported_entries(
    lake: &Lake,
    req: &ImportRequest,
    state: &State,
    selection: &Selection,
    failed: &BTreeMap<String, std::collections::BTreeSet<u64>>,
) -> Result<Vec<Entry>> {
    let path = lake
        .metadata
        .paths
        .ledger_pending(&req.tenant, req.date, &state.job_id);
    let mut pending = ledger::read_entries(lake, &path).await?.into_iter();
    let mut entries = Vec::new();
    for f in &selection.files {
        let failed = failed.get(&f.name);
        for (k, e) in pending.by_ref().take(f.sent as usize).enumerate() {
            if !failed.is_some_and(|lines| lines.contains(&(k as u64 + 1))) {
                entries.push(e);
            }
        }
    }
    Ok(entries)
}

pub async fn import(
    lake: &Lake,
    settings: &Settings,
    req: &ImportRequest,
    reporter: &dyn Reporter,
) -> Result<ImportReport> {
    let started_at = chrono::Utc::now().timestamp_micros();
    let hl = &settings.healthlake;
    let datastore_id = hl.datastores.get(req.tenant.as_str()).ok_or_else(|| {
        Error::Config(format!(
            "no HealthLake datastore for tenant {}: add it to [healthlake.datastores]",
            req.tenant
        ))
    })?;
    for (name, v) in [
        ("healthlake.data_access_role_arn", &hl.data_access_role_arn),
        ("healthlake.output_s3_uri", &hl.output_s3_uri),
        ("healthlake.kms_key_id", &hl.kms_key_id),
    ] {
        if v.is_empty() {
            return Err(Error::Config(format!(
                "{name} is needed to import into HealthLake"
            )));
        }
    }
    if lake.curated.store_url.scheme() != "s3" {
        return Err(Error::Config(format!(
            "HealthLake imports from S3: the curated layer is at {}",
            lake.curated.store_url
        )));
    }
    // The partition stays leased while HealthLake reads it: from here until
    // the job ends, whichever run sees the end (this one, or `import status`).
    let previous = read_state(lake, &req.tenant, req.date).await?;
    // A lease that still names the last job (its outcome recorded, or not
    // yet) is this import's to take over.
    let settling = previous.as_ref().map(job_marker);
    let lease = commit::lease_partition(
        lake,
        settings,
        &req.tenant,
        req.date,
        STAGE,
        &uuid::Uuid::now_v7().to_string(),
        settling.as_deref().map_or(Take::Free, Take::SettlingJob),
    )
    .await?;
    let curated = match curated(lake, &req.tenant, req.date).await {
        Ok(c) => c,
        Err(e) => {
            let _ = lease.release().await;
            return Err(e);
        }
    };
    let input_uri = format!(
        "{}/",
        lake.curated
            .url_of(&lake.curated.paths.curated_partition(&req.tenant, req.date))
    );
    let client = client(settings).await;
    let state_path = lake.metadata.paths.import_state(&req.tenant, req.date);

    // The same curated files already went to HealthLake: look at that job.
    let state = match previous {
        Some(s)
            if s.curate_run == curated.record.run_id
                && s.datastore_id == *datastore_id
                && !s.healthlake_job_id.is_empty() =>
        {
            s
        }
        previous => {
            let client_token =
                client_token(&req.tenant, req.date, datastore_id, &curated.record.run_id);
            // A retry of an import that never heard HealthLake's answer
            // keeps its job id, client token and selection: HealthLake
            // answers the same token with the same job.
            let retry = previous.filter(|p| p.client_token == client_token);
            let (job_id, selection) = match retry {
                Some(p) => {
                    let selection = match p.selection {
                        Some(sel) => sel,
                        // Written before selections: it sent everything.
                        None => match whole(lake, &curated).await {
                            Ok(sel) => sel,
                            Err(e) => {
                                let _ = lease.release().await;
                                return Err(e);
                            }
                        },
                    };
                    (p.job_id, selection)
                }
                None => {
                    let id = uuid::Uuid::now_v7().to_string();
                    let sel = select(lake, settings, req, &curated, datastore_id, &id).await;
                    match sel {
                        Ok(sel) => (id, sel),
                        Err(e) => {
                            let _ = lease.release().await;
                            return Err(e);
                        }
                    }
                }
            };
            if selection.sent() == 0 {
                let report = nothing_to_send(
                    lake,
                    settings,
                    datastore_id,
                    req,
                    &lease,
                    &curated,
                    &selection,
                    &job_id,
                    started_at,
                    &input_uri,
                )
                .await;
                lease.release().await?;
                return report;
            }
            // HealthLake reads the whole prefix: the partition's must hold
            // exactly the pinned commit's parts. A run that died between its
            // commit and its mirror left it stale: this holder of the lease
            // finishes it.
            let ready = match selection.prefix {
                Some(_) => Ok(()),
                None => match commit::check_mirror(lake, &req.tenant, req.date, &curated.record)
                    .await
                {
                    Ok(()) => Ok(()),
                    Err(_) => commit::mirror(lake, &req.tenant, req.date, &curated.record).await,
                },
            };
            if let Err(e) = ready {
                let _ = lease.release().await;
                return Err(e);
            }
            let input_uri = selection.prefix.clone().unwrap_or(input_uri.clone());
            let mut s = State {
                job_id,
                curate_run: curated.record.run_id.clone(),
                datastore_id: datastore_id.clone(),
                healthlake_job_id: String::new(),
                client_token,
                input_uri: input_uri.clone(),
                started_at,
                recorded: false,
                selection: Some(selection),
            };
            // Saved, and the lease handed to the job-to-be, before the
            // request: a run killed once HealthLake has it leaves the
            // partition held until a retry learns the job.
            write_state(lake, &state_path, &s).await?;
            lease.note_job(&job_marker(&s)).await?;
            reporter.status(&format!(
                "starting a HealthLake import into datastore {datastore_id}"
            ));
            let started = client
                .start_fhir_import_job()
                .job_name(format!("fhirflow-{}-{}", req.date, &s.job_id[..18]))
                .input_data_config(InputDataConfig::S3Uri(input_uri.clone()))
                .job_output_data_config(OutputDataConfig::S3Configuration(
                    S3Configuration::builder()
                        .s3_uri(&hl.output_s3_uri)
                        .kms_key_id(&hl.kms_key_id)
                        .build()
                        .map_err(|e| Error::Config(format!("healthlake output: {e}")))?,
                ))
                .datastore_id(datastore_id)
                .data_access_role_arn(&hl.data_access_role_arn)
                .validation_level(ValidationLevel::from(hl.validation_level.as_str()))
                .client_token(&s.client_token)
                .send()
                .await
                .map_err(|e| crate::aws_error(STAGE, "StartFHIRImportJob", e))?;
            s.healthlake_job_id = started.job_id().to_string();
            write_state(lake, &state_path, &s).await?;
            lease.note_job(&s.healthlake_job_id).await?;
            s
        }
    };
    if state.recorded {
        let props = describe(&client, &state).await;
        lease.release().await?;
        let mut report = report_of(&state, &props?);
        report.status = "already imported".into();
        return Ok(report);
    }
    follow(
        lake, settings, &client, req, state, req.wait, reporter, lease,
    )
    .await
}

/// `fhirflow import status`: the partition's HealthLake job now; records the
/// outcome when the job has ended and it is not recorded yet.
pub async fn status(
    lake: &Lake,
    settings: &Settings,
    tenant: &TenantGuid,
    date: ImportDate,
) -> Result<ImportReport> {
    let state = read_state(lake, tenant, date).await?.ok_or_else(|| {
        Error::Import(format!(
            "no HealthLake import of tenant {tenant} date {date} to look at"
        ))
    })?;
    if state.healthlake_job_id.is_empty() {
        return Err(Error::Import(format!(
            "the HealthLake import of tenant {tenant} date {date} stopped before HealthLake \
             answered: run `fhirflow import` again (the same client token finds the same job)"
        )));
    }
    let client = client(settings).await;
    let req = ImportRequest {
        tenant: tenant.clone(),
        date,
        target: ImportTarget::Healthlake,
        wait: false,
    };
    let lease = commit::lease_partition(
        lake,
        settings,
        tenant,
        date,
        STAGE,
        &uuid::Uuid::now_v7().to_string(),
        Take::SettlingJob(&state.healthlake_job_id),
    )
    .await?;
    if state.recorded {
        // Recorded already; a run that died before it released the lease
        // left the job's claim on the partition: end it now.
        let props = describe(&client, &state).await;
        lease.release().await?;
        return Ok(report_of(&state, &props?));
    }
    follow(
        lake,
        settings,
        &client,
        &req,
        state,
        false,
        &fhirflow::report::Quiet,
        lease,
    )
    .await
}

/// Settles the partition's HealthLake job if one holds its lease and has
/// ended (what `import status` does), so that a curate run after the job
/// need not wait for someone to look. Does nothing when no job holds it or
/// HealthLake is not configured for the tenant.
pub async fn settle(
    lake: &Lake,
    settings: &Settings,
    tenant: &TenantGuid,
    date: ImportDate,
) -> Result<()> {
    let (dir, _) = commit::partition_lease(lake, tenant, date);
    let held_by_job = commit::lease::current(&lake.metadata, &dir)
        .await?
        .is_some_and(|r| !r.released && r.healthlake_job_id.is_some());
    if held_by_job && settings.healthlake.datastores.contains_key(tenant.as_str()) {
        status(lake, settings, tenant, date).await?;
    }
    Ok(())
}

/// What the partition's lease names while this import's job holds it: the
/// job id, or before HealthLake has answered, the client token.
fn job_marker(s: &State) -> String {
    if s.healthlake_job_id.is_empty() {
        format!("pending:{}", s.client_token)
    } else {
        s.healthlake_job_id.clone()
    }
}

async fn client(settings: &Settings) -> Client {
    let hl = &settings.healthlake;
    let config = crate::sdk::sdk_config(
        settings,
        hl.endpoint.as_deref(),
        hl.region.as_deref(),
        hl.max_attempts,
    )
    .await;
    Client::from_conf(
        aws_sdk_healthlake::config::Builder::from(&config)
            .interceptor(crate::sdk::LogRetries)
            .build(),
    )
}

/// A token HealthLake accepts (`[a-zA-Z0-9-]{1,64}`) that only this partition,
/// datastore and curate run give.
fn client_token(
    tenant: &TenantGuid,
    date: ImportDate,
    datastore: &str,
    curate_run: &str,
) -> String {
    let h =
        xxhash_rust::xxh3::xxh3_128(format!("{tenant}|{date}|{datastore}|{curate_run}").as_bytes());
    format!("fhirflow-{h:032x}")
}

fn ended(status: &JobStatus) -> bool {
    matches!(
        status,
        JobStatus::Completed
            | JobStatus::CompletedWithErrors
            | JobStatus::Failed
            | JobStatus::CancelCompleted
            | JobStatus::CancelFailed
    )
}

async fn describe(client: &Client, state: &State) -> Result<ImportJobProperties> {
    let out = client
        .describe_fhir_import_job()
        .datastore_id(&state.datastore_id)
        .job_id(&state.healthlake_job_id)
        .send()
        .await
        .map_err(|e| crate::aws_error(STAGE, "DescribeFHIRImportJob", e))?;
    out.import_job_properties()
        .cloned()
        .ok_or_else(|| Error::Aws {
            stage: STAGE,
            operation: "DescribeFHIRImportJob".into(),
            message: "the answer has no ImportJobProperties".into(),
        })
}

fn report_of(state: &State, props: &ImportJobProperties) -> ImportReport {
    ImportReport {
        job_id: state.job_id.clone(),
        target: ImportTarget::Healthlake,
        curate_run: state.curate_run.clone(),
        status: props.job_status().as_str().to_string(),
        healthlake_job_id: Some(state.healthlake_job_id.clone()),
        message: props.message().map(str::to_string),
        ..Default::default()
    }
}

/// Polls the job (when `wait`) and records what is known: the outcome with
/// the job's output once it has ended, the status otherwise.
#[allow(clippy::too_many_arguments)]
async fn follow(
    lake: &Lake,
    settings: &Settings,
    client: &Client,
    req: &ImportRequest,
    mut state: State,
    wait: bool,
    reporter: &dyn Reporter,
    lease: Lease,
) -> Result<ImportReport> {
    let hl = &settings.healthlake;
    let clock = Instant::now();
    let mut pause = Duration::from_secs_f64(hl.poll_initial_seconds.max(0.01));
    let props = loop {
        let props = match describe(client, &state).await {
            Ok(p) => p,
            Err(e) => {
                // The job goes on without us: it keeps the partition.
                return Err(match lease.hand_to_job(&state.healthlake_job_id).await {
                    Ok(()) => e,
                    Err(lost) => Error::Import(format!("{e}; and the partition's lease: {lost}")),
                });
            }
        };
        let status = props.job_status();
        if ended(status) || !wait {
            break props;
        }
        if clock.elapsed().as_secs() >= hl.max_wait_seconds {
            break props;
        }
        reporter.status(&format!(
            "HealthLake job {} is {}",
            state.healthlake_job_id,
            status.as_str()
        ));
        tracing::info!(
            job = %state.healthlake_job_id,
            status = status.as_str(),
            wait_seconds = pause.as_secs_f64(),
            "HealthLake job running; looking again"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs_f64(hl.poll_max_seconds.max(0.01)));
    };
    let mut report = report_of(&state, &props);
    let output_uri = match props.job_output_data_config() {
        Some(OutputDataConfig::S3Configuration(c)) => c.s3_uri().to_string(),
        _ => hl.output_s3_uri.clone(),
    };
    let mut errors = Vec::new();
    let mut metrics = Vec::new();
    let mut mismatches = Vec::new();
    // The curate commit a completed job imported: what `plan` compares.
    let mut imported = None;
    if ended(props.job_status()) {
        let curated = curated(lake, &req.tenant, req.date).await?;
        if curated.record.run_id != state.curate_run {
            return Err(Error::Import(format!(
                "HealthLake job {} read curate run {}, but the partition's latest is {}: \
                 its outcome cannot be reconciled",
                state.healthlake_job_id, state.curate_run, curated.record.run_id
            )));
        }
        let selection = match &state.selection {
            Some(sel) => sel.clone(),
            None => whole(lake, &curated).await?,
        };
        let output =
            read_output(lake, settings, &state, &props, &output_uri, req, &selection).await?;
        let r = output.reconciled;
        errors = output.errors;
        let mut counts = type_counts(&selection, &r, &curated.bytes());
        fill_report(&mut report, &selection, &counts);
        report.records_server_error = r.total.server_error;
        // Deletions once the partition's records are in (not after a job
        // that failed: the partition is to be imported again first).
        let deleted = if matches!(
            props.job_status(),
            JobStatus::Completed | JobStatus::CompletedWithErrors
        ) {
            imported = Some(curated.record.sequence);
            let datastore = &state.datastore_id;
            apply_deletions(lake, settings, req, datastore, &curated, &state.job_id).await?
        } else {
            DeletionsDone::default()
        };
        add_deletions(&mut report, &mut counts, &deleted);
        // What HealthLake now holds, for the next import's ledger: what was
        // sent, but what failed.
        let mut failed: BTreeMap<String, std::collections::BTreeSet<u64>> = BTreeMap::new();
        for (name, a) in &output.answered {
            failed
                .entry(name.clone())
                .or_default()
                .extend(a.failures.iter().filter_map(Response::line));
        }
        let mut entries = imported_entries(lake, req, &state, &selection, &failed).await?;
        entries.extend(deleted.entries);
        errors.extend(deleted.errors);
        let target = ledger_target(&state.datastore_id);
        ledger::save(lake, &req.tenant, &target, &state.job_id, &entries).await?;
        report.seconds = (chrono::Utc::now().timestamp_micros() - state.started_at) as f64 / 1e6;
        metrics = metric_rows(req, &report, &counts);
        for m in &mut metrics {
            if r.unconserved.contains(&m.resource_type) {
                m.conserved = false;
            }
        }
        if r.total.server_error > 0 {
            report.message = Some(format!(
                "{} resources failed with a HealthLake server error: `fhirflow import` of a \
                 new curate run sends them again",
                r.total.server_error
            ));
        }
        mismatches = r.mismatches;
    } else if wait {
        report.message = Some(format!(
            "still {} after {}s; `fhirflow import status` looks later",
            props.job_status().as_str(),
            hl.max_wait_seconds
        ));
    }
    let mut job = job_row(
        req,
        &report,
        state.started_at,
        state.input_uri.clone(),
        output_uri,
    );
    job.healthlake_status = Some(props.job_status().as_str().to_string());
    job.status = match props.job_status() {
        _ if !mismatches.is_empty() => "not conserved".into(),
        JobStatus::Completed => "succeeded".into(),
        JobStatus::CompletedWithErrors => "succeeded with rejections".into(),
        s if ended(s) => "failed".into(),
        s => s.as_str().to_ascii_lowercase(),
    };
    let rows = metadata::StageRows {
        source_system: None,
        jobs: &[job],
        errors: &errors,
        metrics: &metrics,
    };
    let published = metadata::publish_stage_rows(
        lake,
        &lease,
        STAGE,
        &req.tenant,
        req.date,
        &state.job_id,
        rows,
        imported,
    )
    .await;
    if let Err(e) = published {
        return Err(match lease.hand_to_job(&state.healthlake_job_id).await {
            Ok(()) => e,
            Err(lost) => Error::Import(format!("{e}; and the partition's lease: {lost}")),
        });
    }
    if ended(props.job_status()) {
        state.recorded = true;
        let path = lake.metadata.paths.import_state(&req.tenant, req.date);
        write_state(lake, &path, &state).await?;
        lease.release().await?;
    } else {
        lease.hand_to_job(&state.healthlake_job_id).await?;
    }
    if matches!(
        props.job_status(),
        JobStatus::Failed | JobStatus::CancelCompleted | JobStatus::CancelFailed
    ) {
        return Err(Error::Import(format!(
            "HealthLake job {} ended {}: {}",
            state.healthlake_job_id,
            props.job_status().as_str(),
            props.message().unwrap_or("(no message)")
        )));
    }
    fhirflow::import::check_conserved(req, mismatches)?;
    Ok(report)
}

/// What applying a partition's deletions did.
#[derive(Default)]
struct DeletionsDone {
    per_type: BTreeMap<String, Deletions>,
    errors: Vec<ErrorRow>,
    /// For the ledger: what HealthLake no longer holds.
    entries: Vec<Entry>,
}

/// Applies the curate commit's deletions through the FHIR REST API.
async fn apply_deletions(
    lake: &Lake,
    settings: &Settings,
    req: &ImportRequest,
    datastore: &str,
    curated: &fhirflow::import::Curated,
    job_id: &str,
) -> Result<DeletionsDone> {
    let deletions = fhirflow::curate::deletions::of_commit(lake, &curated.record.deletions).await?;
    let outcomes = rest::delete(settings, datastore, &deletions).await?;
    let source = curated
        .record
        .deletions
        .first()
        .map(|o| lake.curated.url_of(&o.location()))
        .unwrap_or_default();
    let date = req.date.days_since_epoch();
    let mut done = DeletionsDone::default();
    for (d, o) in deletions.iter().zip(outcomes) {
        let c = done.per_type.entry(d.resource_type.clone()).or_default();
        c.read += 1;
        match o {
            rest::Outcome::Deleted => c.applied += 1,
            rest::Outcome::Absent => c.absent += 1,
            rest::Outcome::Failed(why) => {
                c.failed += 1;
                done.errors.push(ErrorRow {
                    job_id: job_id.to_string(),
                    stage: STAGE.into(),
                    tenant_guid: req.tenant.to_string(),
                    import_date: date,
                    source_file: source.clone(),
                    line_no: None,
                    resource_type: Some(d.resource_type.clone()),
                    resource_id: Some(d.id.clone()),
                    error_code: "HEALTHLAKE_DELETE_FAILED".into(),
                    message: format!("DELETE {}/{}: {why}", d.resource_type, d.id),
                    location: None,
                    record: None,
                    rule: None,
                    warning: false,
                });
                continue;
            }
        }
        done.entries
            .push(Entry::deletion(&d.resource_type, &d.id, date));
    }
    Ok(done)
}

/// Adds the deletions' counts to the per-type counts and the report.
fn add_deletions(
    report: &mut ImportReport,
    counts: &mut BTreeMap<String, TypeCounts>,
    done: &DeletionsDone,
) {
    for (ty, d) in &done.per_type {
        counts.entry(ty.clone()).or_default().deletions = *d;
        report.deletions_read += d.read;
        report.deletions_applied += d.applied;
        report.deletions_absent += d.absent;
        report.deletions_failed += d.failed;
    }
}

/// Per type: what curate published (sent, unchanged, stale) and what
/// HealthLake did with what was sent.
fn type_counts(
    selection: &Selection,
    r: &Reconciled,
    bytes: &BTreeMap<String, u64>,
) -> BTreeMap<String, TypeCounts> {
    let mut counts: BTreeMap<String, TypeCounts> = BTreeMap::new();
    for f in &selection.files {
        let c = counts.entry(f.resource_type.clone()).or_default();
        c.published += f.sent + f.unchanged + f.stale;
        c.unchanged += f.unchanged;
        c.stale += f.stale;
    }
    for (ty, c) in counts.iter_mut() {
        if let Some(h) = r.by_type.get(ty) {
            c.imported = h.imported;
            c.rejected = h.customer_error + h.server_error;
        }
        c.bytes = bytes.get(ty).copied().unwrap_or(0);
    }
    counts
}

/// The report's totals from the per-type counts and the selection.
fn fill_report(
    report: &mut ImportReport,
    selection: &Selection,
    counts: &BTreeMap<String, TypeCounts>,
) {
    for (ty, c) in counts {
        report
            .by_type
            .insert(ty.clone(), c.published - c.unchanged - c.stale);
        report.records_in += c.published;
        report.records_out += c.imported;
        report.records_rejected += c.rejected;
        report.records_unchanged += c.unchanged;
        report.records_stale += c.stale;
    }
    report.bytes_not_sent = selection.files.iter().map(|f| f.bytes_not_sent).sum();
}

/// An import the ledger left nothing to send: no HealthLake job, and rows
/// that say why.
#[allow(clippy::too_many_arguments)]
async fn nothing_to_send(
    lake: &Lake,
    settings: &Settings,
    datastore: &str,
    req: &ImportRequest,
    lease: &Lease,
    curated: &fhirflow::import::Curated,
    selection: &Selection,
    job_id: &str,
    started_at: i64,
    input_uri: &str,
) -> Result<ImportReport> {
    let mut report = ImportReport {
        job_id: job_id.to_string(),
        target: ImportTarget::Healthlake,
        curate_run: curated.record.run_id.clone(),
        status: "nothing to send".into(),
        ..Default::default()
    };
    let mut counts = type_counts(selection, &Reconciled::default(), &curated.bytes());
    fill_report(&mut report, selection, &counts);
    let deleted = apply_deletions(lake, settings, req, datastore, curated, job_id).await?;
    add_deletions(&mut report, &mut counts, &deleted);
    let target = ledger_target(datastore);
    ledger::save(lake, &req.tenant, &target, job_id, &deleted.entries).await?;
    report.seconds = (chrono::Utc::now().timestamp_micros() - started_at) as f64 / 1e6;
    report.message = Some(format!(
        "HealthLake holds every curated record already: {} unchanged, {} stale; no import job",
        report.records_unchanged, report.records_stale
    ));
    let mut job = job_row(
        req,
        &report,
        started_at,
        input_uri.to_string(),
        String::new(),
    );
    job.status = "succeeded".into();
    let metrics = metric_rows(req, &report, &counts);
    let rows = metadata::StageRows {
        source_system: None,
        jobs: &[job],
        errors: &deleted.errors,
        metrics: &metrics,
    };
    metadata::publish_stage_rows(
        lake,
        lease,
        STAGE,
        &req.tenant,
        req.date,
        job_id,
        rows,
        Some(curated.record.sequence),
    )
    .await?;
    Ok(report)
}

async fn read_state(lake: &Lake, tenant: &TenantGuid, date: ImportDate) -> Result<Option<State>> {
    let path = lake.metadata.paths.import_state(tenant, date);
    let Some(bytes) = lake.metadata.get_bytes(STAGE, &path).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::Input {
            path: lake.metadata.url_of(&path).into(),
            reason: e.to_string(),
        })
}

async fn write_state(lake: &Lake, path: &object_store::path::Path, state: &State) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(state).expect("state serialises");
    lake.metadata.put(STAGE, path, bytes).await
}

/// What the job's output says, reconciled with the curated files.
struct Output {
    reconciled: Reconciled,
    errors: Vec<ErrorRow>,
    /// The job's answers per file, by name.
    answered: BTreeMap<String, Answered>,
}

/// Reads the job's manifest and its SUCCESS and FAILURE files, and
/// reconciles them with the curated files the job was given.
async fn read_output(
    lake: &Lake,
    settings: &Settings,
    state: &State,
    props: &ImportJobProperties,
    output_uri: &str,
    req: &ImportRequest,
    selection: &Selection,
) -> Result<Output> {
    let folder = output::job_folder(output_uri, &state.datastore_id, &state.healthlake_job_id);
    let root = Root::open(&folder, &settings.s3)?;
    let mut manifest = None;
    for name in output::MANIFEST_NAMES {
        let path = root.paths.prefix.clone().join(name);
        if let Some(bytes) = root.get_bytes(STAGE, &path).await? {
            let m = output::parse_manifest(&bytes).map_err(|reason| Error::Input {
                path: root.url_of(&path).into(),
                reason,
            })?;
            manifest = Some(m);
            break;
        }
    }
    // The files the job was given (the prefix holds none for a file the
    // ledger left wholly out).
    let sent: Vec<&SentFile> = selection.files.iter().filter(|f| f.sent > 0).collect();
    let published: Vec<Published> = sent
        .iter()
        .map(|f| Published {
            name: f.name.clone(),
            resource_type: f.resource_type.clone(),
            records: f.sent,
        })
        .collect();
    let Some(manifest) = manifest else {
        if props.job_status() == &JobStatus::Failed {
            // A job that failed before it read anything writes no manifest:
            // nothing was imported, its metrics say so (not conserved), and
            // the job's failure is the import's error.
            let none = output::Manifest {
                number_of_resources_scanned: published.iter().map(|p| p.records).sum(),
                ..Default::default()
            };
            let mut reconciled = output::reconcile(&published, &BTreeMap::new(), true, &none);
            reconciled.mismatches.clear();
            reconciled.unconserved.clear();
            return Ok(Output {
                reconciled,
                errors: Vec::new(),
                answered: BTreeMap::new(),
            });
        }
        return Err(Error::Import(format!(
            "HealthLake job {} ended {} but wrote no manifest.json in {folder}",
            state.healthlake_job_id,
            props.job_status().as_str(),
        )));
    };
    let success_uri = manifest.success_output.as_ref().map_or_else(
        || format!("{folder}SUCCESS/"),
        |s| s.success_output_s3_uri.clone(),
    );
    let failure_uri = manifest.failure_output.as_ref().map_or_else(
        || format!("{folder}FAILURE/"),
        |f| f.failure_output_s3_uri.clone(),
    );
    let mut answered: BTreeMap<String, Answered> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut have_success = false;
    for (uri, failures) in [(success_uri, false), (failure_uri, true)] {
        let froot = Root::open(&uri, &settings.s3)?;
        for obj in froot.list(STAGE, &froot.paths.prefix).await? {
            let Some(data) = froot.get_bytes(STAGE, &obj.location).await? else {
                continue;
            };
            let url = froot.url_of(&obj.location);
            let name = obj.location.filename().unwrap_or_default();
            if !published.iter().any(|p| p.name == name) {
                problems.push(format!("{url}: answers for a file the import did not send"));
                continue;
            }
            have_success |= !failures;
            let entry = answered.entry(name.to_string()).or_default();
            for (i, line) in data
                .split(|&b| b == b'\n')
                .enumerate()
                .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
            {
                if !failures {
                    entry.successes += 1;
                    continue;
                }
                match output::parse_response(line) {
                    Ok(r) => entry.failures.push(r),
                    Err(reason) => problems.push(format!(
                        "{url} line {}: not a HealthLake response line: {reason}",
                        i + 1
                    )),
                }
            }
        }
    }
    let mut reconciled = output::reconcile(&published, &answered, have_success, &manifest);
    reconciled.mismatches.extend(problems);
    let mut errors = Vec::new();
    let visible = lake.curated.paths.curated_partition(&req.tenant, req.date);
    let read = Root::open(&state.input_uri, &settings.s3)?;
    for (file, sent) in published.iter().zip(sent) {
        let Some(a) = answered.get(&file.name).filter(|a| !a.failures.is_empty()) else {
            continue;
        };
        // The lines HealthLake read, and the curated file they came from.
        let text = read
            .get_bytes(STAGE, &read.paths.prefix.clone().join(file.name.as_str()))
            .await?
            .unwrap_or_default();
        let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
        let source_file = lake
            .curated
            .url_of(&visible.clone().join(file.name.as_str()));
        for f in &a.failures {
            let line = f.line().and_then(|n| lines.get(n as usize - 1).copied());
            let curated_line = f.line().and_then(|n| sent.curated_line(n));
            errors.push(failure_row(
                f,
                file,
                line,
                (&source_file, curated_line),
                req,
                &state.job_id,
                settings,
            ));
        }
    }
    Ok(Output {
        reconciled,
        errors,
        answered,
    })
}

/// A selection of every curated record (for a state written before
/// selections), counted from the objects where the commit has no counts.
async fn whole(lake: &Lake, curated: &fhirflow::import::Curated) -> Result<Selection> {
    let mut files = Vec::new();
    for (ty, parts) in &curated.files {
        for part in parts {
            let records = match part.records {
                Some(n) => n,
                None => {
                    let bytes = lake
                        .curated
                        .get_bytes(STAGE, &part.location())
                        .await?
                        .unwrap_or_default();
                    memchr::memchr_iter(b'\n', &bytes).count() as u64
                }
            };
            files.push(SentFile {
                name: part.name.clone().unwrap_or_default(),
                resource_type: ty.to_string(),
                lines: vec![[1, records]],
                sent: records,
                ..Default::default()
            });
        }
    }
    Ok(Selection {
        prefix: None,
        files,
    })
}

/// One resource HealthLake did not take, as an `import_errors` row: the
/// curated file and line, the id read from that line, and the
/// OperationOutcome's issues.
fn failure_row(
    f: &Response,
    file: &Published,
    line: Option<&[u8]>,
    (source_file, curated_line): (&str, Option<u64>),
    req: &ImportRequest,
    job_id: &str,
    settings: &Settings,
) -> ErrorRow {
    #[derive(Deserialize)]
    struct Head {
        id: Option<String>,
    }
    let id = line
        .and_then(|l| serde_json::from_slice::<Head>(l).ok())
        .and_then(|h| h.id);
    let first = f.issues.first();
    let error_code = if f.server_error() {
        "HEALTHLAKE_SERVER_ERROR".to_string()
    } else {
        format!(
            "HEALTHLAKE_{}",
            first
                .map_or("REJECTED", |i| i.code.as_str())
                .to_ascii_uppercase()
                .replace('-', "_")
        )
    };
    let mut message: Vec<String> = f
        .issues
        .iter()
        .map(|i| match &i.diagnostics {
            Some(d) => format!("{}: {d}", i.code),
            None => i.code.clone(),
        })
        .collect();
    message.push(format!("status {}", f.status));
    let cap = settings.curate.error_record_max_bytes;
    let record = line.filter(|_| cap > 0).map(|l| {
        let mut end = l.len().min(cap);
        // Cut before a UTF-8 continuation byte, not inside a character.
        while end > 0 && end < l.len() && l[end] & 0xC0 == 0x80 {
            end -= 1;
        }
        String::from_utf8_lossy(&l[..end]).into_owned()
    });
    ErrorRow {
        job_id: job_id.to_string(),
        stage: STAGE.into(),
        tenant_guid: req.tenant.to_string(),
        import_date: req.date.days_since_epoch(),
        source_file: source_file.to_string(),
        line_no: curated_line,
        resource_type: Some(file.resource_type.clone()),
        resource_id: id,
        error_code,
        message: message.join("; "),
        location: first.and_then(|i| i.location.clone()),
        record,
        rule: None,
        warning: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sent_line_maps_back_to_its_curated_line() {
        let f = SentFile {
            lines: vec![[2, 3], [9, 1], [20, 2]],
            ..Default::default()
        };
        let back: Vec<Option<u64>> = (1..=7).map(|k| f.curated_line(k)).collect();
        assert_eq!(
            back,
            vec![Some(2), Some(3), Some(4), Some(9), Some(20), Some(21), None]
        );
    }

    #[test]
    fn client_tokens_are_stable_and_valid() {
        let t: TenantGuid = "0f8fad5b-d9cb-469f-a165-70867728950e".parse().unwrap();
        let d: ImportDate = "2024-05-01".parse().unwrap();
        let a = client_token(&t, d, "ds1", "run1");
        assert_eq!(a, client_token(&t, d, "ds1", "run1"));
        assert_ne!(a, client_token(&t, d, "ds1", "run2"));
        assert!(a.len() <= 64 && a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    }
}
