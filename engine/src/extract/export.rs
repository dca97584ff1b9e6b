//! The Bulk Data `$export` protocol (FHIR Bulk Data Access IG v2): the
//! kick-off request, polling the status URL, and the manifest.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use url::Url;

use super::auth::Auth;
use super::http::{error_text, shown, Http, Request};
use crate::error::{Error, Result};
use crate::report::Reporter;
use crate::settings::KickoffMethod;

/// Which data the export covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Level {
    /// `[base]/$export`: everything.
    System,
    /// `[base]/Patient/$export`: every patient's compartment.
    Patient,
    /// `[base]/Group/<id>/$export`: the group's members' compartments.
    Group(String),
}

/// The kick-off request's parameters.
#[derive(Debug, Clone, Default)]
pub struct Parameters {
    pub types: Vec<String>,
    pub type_filters: Vec<String>,
    pub since: Option<String>,
}

/// `base` joined with a relative path, whether or not `base` ends in `/`.
pub fn join(base: &Url, rel: &str) -> Url {
    let mut b = base.clone();
    if !b.path().ends_with('/') {
        let p = format!("{}/", b.path());
        b.set_path(&p);
    }
    b.join(rel).expect("a relative path joins")
}

/// The kick-off request for `level` and `params` at `base`.
pub fn kickoff_request(
    base: &Url,
    level: &Level,
    params: &Parameters,
    method: KickoffMethod,
) -> Request {
    let path = match level {
        Level::System => "$export".to_string(),
        Level::Patient => "Patient/$export".to_string(),
        Level::Group(id) => format!("Group/{id}/$export"),
    };
    let mut url = join(base, &path);
    let mut pairs: Vec<(&str, String)> = vec![("_outputFormat", "application/fhir+ndjson".into())];
    if !params.types.is_empty() {
        pairs.push(("_type", params.types.join(",")));
    }
    if let Some(s) = &params.since {
        pairs.push(("_since", s.clone()));
    }
    for f in &params.type_filters {
        pairs.push(("_typeFilter", f.clone()));
    }
    let req = match method {
        KickoffMethod::Get => {
            url.query_pairs_mut()
                .extend_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())));
            Request::get(url)
        }
        KickoffMethod::Post => {
            let parameter: Vec<Value> = pairs
                .iter()
                .map(|(k, v)| {
                    let kind = if *k == "_since" {
                        "valueInstant"
                    } else {
                        "valueString"
                    };
                    json!({"name": k, kind: v})
                })
                .collect();
            let body = json!({"resourceType": "Parameters", "parameter": parameter});
            Request::post(url, "application/fhir+json", body.to_string().into_bytes())
        }
    };
    req.header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
}

/// Sends the kick-off request; the status URL.
pub async fn kickoff(http: &Http, req: &Request, auth: Option<(&Auth, &Url)>) -> Result<Url> {
    let resp = http.send("export kick-off", req, auth).await?;
    let status = resp.status();
    let location = resp
        .headers()
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| req.url.join(v).ok());
    match (status, location) {
        (StatusCode::ACCEPTED, Some(url)) => {
            http.check("export status URL (Content-Location)", &url)?;
            Ok(url)
        }
        (StatusCode::ACCEPTED, None) => Err(Error::Http {
            what: "export kick-off".into(),
            url: shown(&req.url),
            message: "202 Accepted without a Content-Location header".into(),
        }),
        _ => Err(Error::Http {
            what: "export kick-off".into(),
            url: shown(&req.url),
            message: error_text(resp).await,
        }),
    }
}

/// The completion manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub transaction_time: String,
    #[serde(default)]
    pub request: String,
    #[serde(default)]
    pub requires_access_token: bool,
    #[serde(default)]
    pub output: Vec<OutputFile>,
    #[serde(default)]
    pub error: Vec<OutputFile>,
    /// `deleted` is an optional field of v2 manifests.
    #[serde(default)]
    pub deleted: Vec<OutputFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputFile {
    #[serde(rename = "type")]
    pub resource_type: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// How polling ended.
pub enum Polled {
    Complete(Manifest, Value),
    /// The server no longer knows the export (404 or 410).
    Gone(String),
}

/// Polls `status_url` until the export completes, showing `X-Progress`.
pub async fn poll(
    http: &Http,
    status_url: &Url,
    auth: Option<(&Auth, &Url)>,
    interval: Duration,
    max_wait: Duration,
    reporter: &dyn Reporter,
) -> Result<Polled> {
    let started = Instant::now();
    let err = |message: String| Error::Http {
        what: "export status".into(),
        url: shown(status_url),
        message,
    };
    let req = Request::get(status_url.clone()).header("Accept", "application/json");
    loop {
        let resp = http.send("export status", &req, auth).await?;
        match resp.status() {
            StatusCode::OK => {
                let body = resp
                    .bytes()
                    .await
                    .map_err(|e| err(super::http::describe(&e)))?;
                let raw: Value = serde_json::from_slice(&body)
                    .map_err(|e| err(format!("the manifest is not JSON: {e}")))?;
                let manifest: Manifest = serde_json::from_value(raw.clone())
                    .map_err(|e| err(format!("not a Bulk Data manifest: {e}")))?;
                return Ok(Polled::Complete(manifest, raw));
            }
            StatusCode::ACCEPTED => {
                let progress = resp
                    .headers()
                    .get("x-progress")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("in progress")
                    .to_string();
                reporter.status(&format!("export: {progress}"));
                let wait = http.policy.retry_after(resp.headers()).unwrap_or(interval);
                if started.elapsed() + wait > max_wait {
                    return Err(err(format!(
                        "still in progress ({progress}) after {} s (extract.max_export_wait_seconds); run again later to resume",
                        started.elapsed().as_secs()
                    )));
                }
                tokio::time::sleep(wait).await;
            }
            StatusCode::NOT_FOUND | StatusCode::GONE => {
                return Ok(Polled::Gone(error_text(resp).await))
            }
            _ => {
                return Err(err(format!(
                    "the export failed: {}",
                    error_text(resp).await
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kickoff_requests() {
        let base = Url::parse("http://h:1/fhir").unwrap();
        let p = Parameters {
            types: vec!["Patient".into(), "Observation".into()],
            type_filters: vec!["Observation?status=final".into()],
            since: Some("2024-01-01T00:00:00Z".into()),
        };
        let get = kickoff_request(&base, &Level::Group("g1".into()), &p, KickoffMethod::Get);
        assert_eq!(get.url.path(), "/fhir/Group/g1/$export");
        let q: Vec<(String, String)> = get.url.query_pairs().into_owned().collect();
        assert!(q.contains(&("_type".into(), "Patient,Observation".into())));
        assert!(q.contains(&("_typeFilter".into(), "Observation?status=final".into())));
        assert!(get.headers.contains(&("Prefer", "respond-async".into())));
        let post = kickoff_request(&base, &Level::System, &p, KickoffMethod::Post);
        assert_eq!(post.url.path(), "/fhir/$export");
        let body: Value = serde_json::from_slice(post.body.as_ref().unwrap()).unwrap();
        assert_eq!(body["resourceType"], "Parameters");
        assert!(body["parameter"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "_since", "valueInstant": "2024-01-01T00:00:00Z"})));
    }
}
