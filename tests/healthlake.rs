//! A stand-in for AWS HealthLake's import API, for the tests: no emulator
//! exists. It speaks the service's protocol (awsJson1_0: `POST /` with
//! `X-Amz-Target: HealthLake.<Operation>`, JSON bodies, errors as `__type` and
//! `message` with status 400), so the real aws-sdk-healthlake client drives it.
//!
//! Operations: StartFHIRImportJob, DescribeFHIRImportJob, ListFHIRImportJobs,
//! DescribeFHIRDatastore; and the datastore's FHIR REST API for deletions
//! (`DELETE …/r4/<Type>/<id>`, a batch Bundle of DELETE entries), which
//! answers only requests that carry a SigV4 signature. Like the service (AWS HealthLake Developer Guide,
//! "Importing FHIR data", "Manifest JSON file"; API Reference,
//! StartFHIRImportJob, ImportJobProperties, JobProgressReport) it
//! * answers a repeated `ClientToken` with the job it already has;
//! * runs one import job at a time in the Region (the quota is per Region,
//!   not per datastore), the others QUEUED, first in first out;
//! * reads every object under the input S3 URI (from the S3 stand-in, moto),
//!   checks each line (valid JSON, a `resourceType`, an `id` matching
//!   `[A-Za-z0-9\-\.]{1,64}`; and, except at `ValidationLevel` `minimal`,
//!   no empty strings, arrays or objects, which `minimal` stores with a
//!   `validation-issue` extension instead), stores what passes;
//! * writes under `<output S3Uri>/<datastore>-FHIR_IMPORT-<job>/` the
//!   manifest with the documented fields, and per input file a `SUCCESS/` and
//!   (when something failed) a `FAILURE/` file of the same name, one JSON line
//!   per resource: `{"lineId":N,"UpdateResourceResponse":{"jsonBlob":…,
//!   "statusCode":…}}`, the FAILURE line's blob an OperationOutcome;
//!   Describe's output S3Uri has that folder appended;
//! * ends a job COMPLETED, COMPLETED_WITH_ERRORS when some resources failed,
//!   or FAILED (a data access role that is not the datastore's; no input).
//!
//! `lineId` is taken here to be the 1-based line of the input file: the
//! service's documentation shows the field but not its origin.
//!
//! Faults for the tests: `throttle(n)` answers the next n requests with
//! ThrottlingException; `set_work_time` makes each job take that long;
//! `server_errors(n)` fails the next n valid resources with status 500;
//! `lose_server_errors(n)` counts the next n valid resources as server
//! errors in the manifest but writes no output line for them (output that
//! does not add up).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub name: String,
    pub datastore: String,
    pub status: String,
    pub input: String,
    pub output: String,
    pub kms: String,
    pub role: String,
    pub client_token: String,
    pub submit: f64,
    pub end: Option<f64>,
    pub message: Option<String>,
    pub validation_level: String,
    pub scanned: u64,
    pub imported: u64,
    pub rejected: u64,
    pub server_errors: u64,
    pub files: u64,
    pub megabytes: f64,
}

#[derive(Default)]
struct State {
    jobs: Vec<Job>,
    /// datastore id → its data access role.
    datastores: BTreeMap<String, String>,
    /// datastore → resourceType/id → resource text.
    stored: HashMap<String, BTreeMap<String, String>>,
    throttle: usize,
    throttled: usize,
    requests: Vec<String>,
    work_time: Duration,
    faults: Faults,
    /// `manifest.json`, as documented, or `Manifest.json`, as some users
    /// report.
    manifest_name: &'static str,
    /// The size of each batch Bundle received, and each DELETE URL in it.
    batches: Vec<usize>,
    deleted_urls: Vec<String>,
}

/// Faults the next jobs meet.
#[derive(Default, Clone, Copy)]
struct Faults {
    server_errors: usize,
    lost_server_errors: usize,
    failed_deletes: usize,
}

pub struct HealthLake {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
}

impl HealthLake {
    /// Starts the stand-in on a free loopback port, reading and writing S3
    /// through `s3_endpoint` (moto). `datastores`: id → data access role ARN.
    pub fn start(s3_endpoint: &str, datastores: &[(&str, &str)]) -> HealthLake {
        let state = Arc::new(Mutex::new(State {
            datastores: datastores
                .iter()
                .map(|(d, r)| (d.to_string(), r.to_string()))
                .collect(),
            work_time: Duration::from_millis(100),
            manifest_name: "manifest.json",
            ..Default::default()
        }));
        let (shared, worker_state) = (state.clone(), state.clone());
        let addr = crate::serve_loopback(
            move |req| handle(req, shared.clone()),
            work(worker_state, s3_endpoint.to_string()),
        );
        HealthLake { addr, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Settings that import `tenant` into `datastore` of this stand-in with
    /// `role`, the job output going to `s3://hl-output/jobs` (a bucket the
    /// test creates), polling fast.
    pub fn configure(
        &self,
        s: &mut fhirflow::settings::Settings,
        tenant: &str,
        datastore: &str,
        role: &str,
    ) {
        let h = &mut s.healthlake;
        h.datastores.insert(tenant.into(), datastore.into());
        h.data_access_role_arn = role.into();
        h.output_s3_uri = "s3://hl-output/jobs".into();
        h.kms_key_id = "arn:aws:kms:us-east-1:123456789012:key/test".into();
        h.endpoint = Some(self.endpoint());
        h.poll_initial_seconds = 0.05;
        h.poll_max_seconds = 0.2;
    }

    pub fn throttle(&self, n: usize) {
        self.state.lock().unwrap().throttle = n;
    }

    pub fn throttled(&self) -> usize {
        self.state.lock().unwrap().throttled
    }

    pub fn set_work_time(&self, d: Duration) {
        self.state.lock().unwrap().work_time = d;
    }

    /// The next `n` deletions fail with status 500.
    pub fn fail_deletes(&self, n: usize) {
        self.state.lock().unwrap().faults.failed_deletes = n;
    }

    /// The size of each batch Bundle of deletions received.
    pub fn batches(&self) -> Vec<usize> {
        self.state.lock().unwrap().batches.clone()
    }

    /// Stores a resource as an import would have.
    pub fn hold(&self, datastore: &str, key: &str, text: &str) {
        self.state
            .lock()
            .unwrap()
            .stored
            .entry(datastore.to_string())
            .or_default()
            .insert(key.to_string(), text.to_string());
    }

    /// Names the manifests of the next jobs `Manifest.json`.
    pub fn capitalised_manifest(&self) {
        self.state.lock().unwrap().manifest_name = "Manifest.json";
    }

    /// The next `n` resources that would be stored fail with status 500.
    pub fn server_errors(&self, n: usize) {
        self.state.lock().unwrap().faults.server_errors = n;
    }

    /// The next `n` resources that would be stored are counted as server
    /// errors in the manifest, with no SUCCESS or FAILURE line.
    pub fn lose_server_errors(&self, n: usize) {
        self.state.lock().unwrap().faults.lost_server_errors = n;
    }

    pub fn jobs(&self) -> Vec<Job> {
        self.state.lock().unwrap().jobs.clone()
    }

    /// The operations called, in order.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The resources a datastore holds: "Type/id" → text.
    pub fn stored(&self, datastore: &str) -> BTreeMap<String, String> {
        self.state
            .lock()
            .unwrap()
            .stored
            .get(datastore)
            .cloned()
            .unwrap_or_default()
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn reply(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", "application/x-amz-json-1.0")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn error(kind: &str, message: &str) -> Response<Full<Bytes>> {
    reply(400, json!({ "__type": kind, "message": message }))
}

/// The job's output folder: `<output S3Uri>/<datastore>-FHIR_IMPORT-<job>/`.
fn output_folder(j: &Job) -> String {
    format!(
        "{}/{}-FHIR_IMPORT-{}/",
        j.output.trim_end_matches('/'),
        j.datastore,
        j.id
    )
}

fn properties(j: &Job) -> Value {
    let mut p = json!({
        "JobId": j.id,
        "JobName": j.name,
        "JobStatus": j.status,
        "SubmitTime": j.submit,
        "DatastoreId": j.datastore,
        "InputDataConfig": { "S3Uri": j.input },
        "JobOutputDataConfig": { "S3Configuration": { "S3Uri": output_folder(j), "KmsKeyId": j.kms } },
        "DataAccessRoleArn": j.role,
        "ValidationLevel": j.validation_level,
        "JobProgressReport": {
            "TotalNumberOfScannedFiles": j.files,
            "TotalSizeOfScannedFilesInMB": j.megabytes,
            "TotalNumberOfImportedFiles": j.files,
            "TotalNumberOfResourcesScanned": j.scanned,
            "TotalNumberOfResourcesImported": j.imported,
            "TotalNumberOfResourcesWithCustomerError": j.rejected,
            "TotalNumberOfFilesReadWithCustomerError": 0,
            "Throughput": 0.0,
        },
    });
    if let Some(e) = j.end {
        p["EndTime"] = json!(e);
    }
    if let Some(m) = &j.message {
        p["Message"] = json!(m);
    }
    p
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path().starts_with("/datastore/") {
        return Ok(fhir_rest(req, state).await);
    }
    let target = req
        .headers()
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let Some(op) = target.strip_prefix("HealthLake.") else {
        return Ok(error("UnknownOperationException", "no X-Amz-Target"));
    };
    let Ok(input) = serde_json::from_slice::<Value>(&body) else {
        return Ok(error("SerializationException", "the body is not JSON"));
    };
    let mut s = state.lock().unwrap();
    s.requests.push(op.to_string());
    if s.throttle > 0 {
        s.throttle -= 1;
        s.throttled += 1;
        return Ok(error("ThrottlingException", "Rate exceeded"));
    }
    let text = |k: &str| input.get(k).and_then(Value::as_str).map(str::to_string);
    let datastore = text("DatastoreId").unwrap_or_default();
    if !s.datastores.contains_key(&datastore) {
        return Ok(error(
            "ResourceNotFoundException",
            &format!("Datastore {datastore} not found"),
        ));
    }
    Ok(match op {
        "StartFHIRImportJob" => {
            let token = text("ClientToken").unwrap_or_default();
            if let Some(j) = s
                .jobs
                .iter()
                .find(|j| !token.is_empty() && j.client_token == token)
            {
                return Ok(reply(
                    200,
                    json!({ "JobId": j.id, "JobStatus": j.status, "DatastoreId": j.datastore }),
                ));
            }
            let (Some(input_uri), Some(out)) = (
                input
                    .pointer("/InputDataConfig/S3Uri")
                    .and_then(Value::as_str),
                input.pointer("/JobOutputDataConfig/S3Configuration"),
            ) else {
                return Ok(error(
                    "ValidationException",
                    "InputDataConfig and JobOutputDataConfig are required",
                ));
            };
            let level = text("ValidationLevel").unwrap_or_else(|| "strict".into());
            if !["strict", "structure-only", "minimal"].contains(&level.as_str()) {
                return Ok(error(
                    "ValidationException",
                    &format!("ValidationLevel {level} is not strict, structure-only or minimal"),
                ));
            }
            let id = format!("{:032x}", s.jobs.len() as u128 + 0x5eed_0000);
            // One import job at a time in the Region: later ones wait in line.
            let waiting = s
                .jobs
                .iter()
                .any(|j| ["SUBMITTED", "QUEUED", "IN_PROGRESS"].contains(&j.status.as_str()));
            let status = if waiting { "QUEUED" } else { "SUBMITTED" };
            let job = Job {
                id: id.clone(),
                name: text("JobName").unwrap_or_default(),
                datastore: datastore.clone(),
                status: status.into(),
                input: input_uri.to_string(),
                output: out
                    .get("S3Uri")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                kms: out
                    .get("KmsKeyId")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                role: text("DataAccessRoleArn").unwrap_or_default(),
                client_token: token,
                submit: now(),
                end: None,
                message: None,
                validation_level: level,
                scanned: 0,
                imported: 0,
                rejected: 0,
                server_errors: 0,
                files: 0,
                megabytes: 0.0,
            };
            s.jobs.push(job);
            reply(
                200,
                json!({ "JobId": id, "JobStatus": status, "DatastoreId": datastore }),
            )
        }
        "DescribeFHIRImportJob" => {
            let id = text("JobId").unwrap_or_default();
            match s
                .jobs
                .iter()
                .find(|j| j.id == id && j.datastore == datastore)
            {
                Some(j) => reply(200, json!({ "ImportJobProperties": properties(j) })),
                None => error("ResourceNotFoundException", &format!("Job {id} not found")),
            }
        }
        "ListFHIRImportJobs" => {
            let status = text("JobStatus");
            let list: Vec<Value> = s
                .jobs
                .iter()
                .filter(|j| {
                    j.datastore == datastore && status.as_ref().is_none_or(|st| &j.status == st)
                })
                .map(properties)
                .collect();
            reply(200, json!({ "ImportJobPropertiesList": list }))
        }
        "DescribeFHIRDatastore" => reply(
            200,
            json!({ "DatastoreProperties": {
                "DatastoreId": datastore,
                "DatastoreArn": format!("arn:aws:healthlake:us-east-1:123456789012:datastore/fhir/{datastore}"),
                "DatastoreName": datastore,
                "DatastoreStatus": "ACTIVE",
                "CreatedAt": 1_700_000_000.0,
                "DatastoreTypeVersion": "R4",
                "DatastoreEndpoint": format!("https://healthlake.us-east-1.amazonaws.com/datastore/{datastore}/r4/"),
            }}),
        ),
        other => error(
            "UnknownOperationException",
            &format!("{other} is not supported by the stand-in"),
        ),
    })
}

fn fhir_reply(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", "application/fhir+json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// Whether a request carries a SigV4 signature for HealthLake: an
/// `Authorization` header of the AWS4-HMAC-SHA256 scheme whose credential
/// scope names the service, and its `X-Amz-Date`. (Present, not verified:
/// the stand-in does not know the secret.)
fn signed(req: &Request<hyper::body::Incoming>) -> bool {
    let header = |k: &str| req.headers().get(k).and_then(|v| v.to_str().ok());
    header("authorization").is_some_and(|a| {
        a.starts_with("AWS4-HMAC-SHA256 Credential=")
            && a.contains("/healthlake/aws4_request")
            && a.contains("SignedHeaders=")
            && a.contains("Signature=")
    }) && header("x-amz-date").is_some()
}

/// The datastore's FHIR REST API, as far as deletions need it:
/// `DELETE /datastore/<id>/r4/<Type>/<id>` and a batch Bundle of DELETE
/// entries `POST /datastore/<id>/r4/` (at most 160 entries). Unsigned
/// requests get 403; `throttle(n)` answers 429.
async fn fhir_rest(
    req: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
) -> Response<Full<Bytes>> {
    let outcome =
        |status: u16, code: &str, text: &str| fhir_reply(status, outcome(code, text, None));
    let is_signed = signed(&req);
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let rest = path.trim_start_matches("/datastore/");
    let Some((datastore, resource)) = rest.split_once("/r4") else {
        return outcome(404, "not-found", "no such endpoint");
    };
    let resource = resource.trim_matches('/').to_string();
    let mut s = state.lock().unwrap();
    s.requests.push(format!("FHIR {method} /{resource}"));
    if !is_signed {
        return outcome(403, "security", "Missing Authentication Token");
    }
    if s.throttle > 0 {
        s.throttle -= 1;
        s.throttled += 1;
        return outcome(429, "throttled", "Rate exceeded");
    }
    if !s.datastores.contains_key(datastore) {
        return outcome(404, "not-found", "Datastore not found");
    }
    let delete = |s: &mut State, key: &str| -> &'static str {
        if s.faults.failed_deletes > 0 {
            s.faults.failed_deletes -= 1;
            return "500 Internal Server Error";
        }
        let held = s.stored.entry(datastore.to_string()).or_default();
        if held.remove(key).is_some() {
            "204 No Content"
        } else {
            "404 Not Found"
        }
    };
    match method.as_str() {
        "DELETE" if resource.split('/').count() == 2 => {
            let status = delete(&mut s, &resource);
            let code: u16 = status[..3].parse().unwrap();
            fhir_reply(code, json!({}))
        }
        "POST" if resource.is_empty() => {
            let Ok(bundle) = serde_json::from_slice::<Value>(&body) else {
                return outcome(400, "structure", "the body is not JSON");
            };
            let entries = bundle
                .get("entry")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if bundle.get("type").and_then(Value::as_str) != Some("batch") {
                return outcome(400, "invalid", "only batch Bundles are supported");
            }
            if entries.len() > 160 {
                return outcome(400, "too-costly", "a Bundle holds at most 160 entries");
            }
            let mut answers = Vec::new();
            for e in &entries {
                let method = e.pointer("/request/method").and_then(Value::as_str);
                let url = e.pointer("/request/url").and_then(Value::as_str);
                let status = match (method, url) {
                    (Some("DELETE"), Some(u)) if u.split('/').count() == 2 => {
                        s.deleted_urls.push(u.to_string());
                        delete(&mut s, u)
                    }
                    _ => "400 Bad Request",
                };
                answers.push(json!({ "response": { "status": status } }));
            }
            s.batches.push(entries.len());
            fhir_reply(
                200,
                json!({ "resourceType": "Bundle", "type": "batch-response", "entry": answers }),
            )
        }
        _ => outcome(405, "not-supported", "not supported by the stand-in"),
    }
}

/// Runs the jobs: one at a time in the Region, in submission order.
async fn work(state: Arc<Mutex<State>>, s3: String) {
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let next = {
            let mut s = state.lock().unwrap();
            if s.jobs.iter().any(|j| j.status == "IN_PROGRESS") {
                for j in s.jobs.iter_mut().filter(|j| j.status == "SUBMITTED") {
                    j.status = "QUEUED".into();
                }
                continue;
            }
            let mut next = None;
            for j in s
                .jobs
                .iter_mut()
                .filter(|j| j.status == "SUBMITTED" || j.status == "QUEUED")
            {
                if next.is_none() {
                    j.status = "IN_PROGRESS".into();
                    next = Some(j.clone());
                } else {
                    j.status = "QUEUED".into();
                }
            }
            next.map(|j| {
                // The job's faults; deletions keep theirs.
                let faults = Faults {
                    server_errors: std::mem::take(&mut s.faults.server_errors),
                    lost_server_errors: std::mem::take(&mut s.faults.lost_server_errors),
                    failed_deletes: 0,
                };
                let setup = (s.datastores.clone(), faults, s.manifest_name);
                (j, s.work_time, setup)
            })
        };
        let Some((job, work_time, (datastores, faults, manifest_name))) = next else {
            continue;
        };
        tokio::time::sleep(work_time).await;
        let outcome = if datastores.get(&job.datastore) != Some(&job.role) {
            Err(format!(
                "Unable to assume the data access role {}",
                job.role
            ))
        } else {
            run_job(&job, &s3, faults, manifest_name).await
        };
        let mut s = state.lock().unwrap();
        let stored = outcome
            .as_ref()
            .map(|o| o.stored.clone())
            .unwrap_or_default();
        s.stored
            .entry(job.datastore.clone())
            .or_default()
            .extend(stored);
        let j = s.jobs.iter_mut().find(|j| j.id == job.id).unwrap();
        j.end = Some(now());
        match outcome {
            Ok(o) => {
                j.scanned = o.scanned;
                j.imported = o.imported;
                j.rejected = o.rejected;
                j.server_errors = o.server_errors;
                j.files = o.files;
                j.megabytes = o.megabytes;
                j.status = if o.rejected + o.server_errors > 0 {
                    "COMPLETED_WITH_ERRORS"
                } else {
                    "COMPLETED"
                }
                .into();
            }
            Err(m) => {
                j.status = "FAILED".into();
                j.message = Some(m);
            }
        }
    }
}

struct Outcome {
    scanned: u64,
    imported: u64,
    rejected: u64,
    server_errors: u64,
    files: u64,
    megabytes: f64,
    stored: BTreeMap<String, String>,
}

fn store(s3: &str, bucket: &str) -> Arc<dyn ObjectStore> {
    Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(s3)
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .build()
            .unwrap(),
    )
}

fn split(uri: &str) -> (String, String) {
    let rest = uri.strip_prefix("s3://").unwrap_or(uri);
    let (b, k) = rest.split_once('/').unwrap_or((rest, ""));
    (b.to_string(), k.trim_matches('/').to_string())
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// An OperationOutcome of one error issue.
fn outcome(code: &str, diagnostics: &str, location: Option<&str>) -> Value {
    let mut issue = json!({ "severity": "error", "code": code, "diagnostics": diagnostics });
    if let Some(l) = location {
        issue["location"] = json!([l]);
        issue["expression"] = json!([l]);
    }
    json!({ "resourceType": "OperationOutcome", "issue": [issue] })
}

/// The first empty string, array or object in `v`, as a FHIRPath-like
/// location under `at`.
fn first_empty(v: &Value, at: &str) -> Option<String> {
    match v {
        Value::String(s) if s.is_empty() => Some(at.to_string()),
        Value::Array(a) if a.is_empty() => Some(at.to_string()),
        Value::Object(o) if o.is_empty() => Some(at.to_string()),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| first_empty(x, &format!("{at}[{i}]"))),
        Value::Object(o) => o
            .iter()
            .find_map(|(k, x)| first_empty(x, &format!("{at}.{k}"))),
        _ => None,
    }
}

/// What the service answers for one line: stored (the text it keeps), or
/// the status and OperationOutcome of a failure.
fn check_line(line: &[u8], level: &str) -> Result<(String, String), (u16, Value)> {
    let mut v: Value = serde_json::from_slice(line).map_err(|e| {
        (
            400,
            outcome("structure", &format!("Invalid JSON: {e}"), None),
        )
    })?;
    let Some(ty) = v
        .get("resourceType")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        return Err((400, outcome("required", "resourceType is missing", None)));
    };
    let Some(id) = v.get("id").and_then(Value::as_str).map(str::to_string) else {
        return Err((
            400,
            outcome(
                "required",
                "Resource id is missing",
                Some(&format!("{ty}.id")),
            ),
        ));
    };
    if !valid_id(&id) {
        return Err((
            400,
            outcome(
                "value",
                "Resource id does not match [A-Za-z0-9\\-\\.]{1,64}",
                Some(&format!("{ty}.id")),
            ),
        ));
    }
    let key = format!("{ty}/{id}");
    match first_empty(&v, &ty) {
        None => Ok((key, String::from_utf8_lossy(line).into_owned())),
        Some(at) if level == "minimal" => {
            // Stored all the same, the issue recorded on the resource.
            let ext = json!({
                "url": "http://hl7.org/fhir/StructureDefinition/validation-issue",
                "valueString": format!("empty value at {at}"),
            });
            if let Some(list) = v
                .as_object_mut()
                .unwrap()
                .entry("extension")
                .or_insert_with(|| json!([]))
                .as_array_mut()
            {
                list.push(ext);
            }
            Ok((key, v.to_string()))
        }
        Some(at) => Err((
            400,
            outcome(
                "invalid",
                "Empty strings, arrays and objects are not allowed",
                Some(&at),
            ),
        )),
    }
}

fn response_line(line_id: usize, blob: Value, status: u16) -> String {
    let mut s = json!({
        "lineId": line_id,
        "UpdateResourceResponse": { "jsonBlob": blob, "statusCode": status },
    })
    .to_string();
    s.push('\n');
    s
}

async fn run_job(
    job: &Job,
    s3: &str,
    mut faults: Faults,
    manifest_name: &str,
) -> Result<Outcome, String> {
    let (in_bucket, in_prefix) = split(&job.input);
    let input = store(s3, &in_bucket);
    let objects: Vec<_> = input
        .list(Some(&Path::from(in_prefix.as_str())))
        .try_collect()
        .await
        .map_err(|e| format!("reading the input: {e}"))?;
    if objects.is_empty() {
        return Err(format!("No files found at {}", job.input));
    }
    let folder_uri = output_folder(job);
    let (out_bucket, folder) = split(&folder_uri);
    let output = store(s3, &out_bucket);
    let mut o = Outcome {
        scanned: 0,
        imported: 0,
        rejected: 0,
        server_errors: 0,
        files: 0,
        megabytes: 0.0,
        stored: BTreeMap::new(),
    };
    let mut imported_bytes = 0usize;
    for obj in objects {
        let data = input
            .get(&obj.location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        o.files += 1;
        o.megabytes += data.len() as f64 / 1e6;
        let name = obj.location.filename().unwrap().to_string();
        let mut successes = String::new();
        let mut failures = String::new();
        for (n, line) in data.split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            o.scanned += 1;
            let line_id = n + 1;
            match check_line(line, &job.validation_level) {
                Ok(_) if faults.lost_server_errors > 0 => {
                    faults.lost_server_errors -= 1;
                    o.server_errors += 1;
                }
                Ok(_) if faults.server_errors > 0 => {
                    faults.server_errors -= 1;
                    o.server_errors += 1;
                    let blob = outcome("exception", "Internal server error", None);
                    failures.push_str(&response_line(line_id, blob, 500));
                }
                Ok((key, text)) => {
                    o.imported += 1;
                    imported_bytes += line.len();
                    let (ty, id) = key.split_once('/').unwrap();
                    let blob =
                        json!({ "resourceType": ty, "id": id, "meta": { "versionId": "1" } });
                    successes.push_str(&response_line(line_id, blob, 200));
                    o.stored.insert(key, text);
                }
                Err((status, blob)) => {
                    o.rejected += 1;
                    failures.push_str(&response_line(line_id, blob, status));
                }
            }
        }
        for (kind, lines) in [("SUCCESS", successes), ("FAILURE", failures)] {
            if lines.is_empty() {
                continue;
            }
            let p = Path::from(format!("{folder}/{kind}/{name}"));
            output
                .put(&p, lines.into_bytes().into())
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    let manifest = json!({
        "inputDataConfig": { "s3Uri": job.input },
        "outputDataConfig": { "s3Uri": folder_uri, "encryptionKeyID": job.kms },
        "successOutput": { "successOutputS3Uri": format!("{folder_uri}SUCCESS/") },
        "failureOutput": { "failureOutputS3Uri": format!("{folder_uri}FAILURE/") },
        "numberOfScannedFiles": o.files,
        "numberOfFilesImported": o.files,
        "sizeOfScannedFilesInMB": o.megabytes,
        "sizeOfDataImportedSuccessfullyInMB": imported_bytes as f64 / 1e6,
        "numberOfResourcesScanned": o.scanned,
        "numberOfResourcesImportedSuccessfully": o.imported,
        "numberOfResourcesWithCustomerError": o.rejected,
        "numberOfResourcesWithServerError": o.server_errors,
    });
    output
        .put(
            &Path::from(format!("{folder}/{manifest_name}")),
            manifest.to_string().into_bytes().into(),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(o)
}
