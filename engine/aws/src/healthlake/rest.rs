//! Deletions through a HealthLake datastore's FHIR REST API: the import job
//! cannot delete (AWS HealthLake Developer Guide, "Deleting a FHIR
//! resource"; "Bundling FHIR resources": a batch Bundle of at most 160
//! entries).
//!
//! The partition's deletions go in batch Bundles of DELETE entries, `POST
//! <datastore endpoint>` with SigV4-signed requests (service `healthlake`),
//! with the credentials and region of the SDK's configuration. A throttled
//! (429) or failed (5xx) request is sent again with backoff, up to
//! `[healthlake] max_attempts`. Each entry's answer counts it: 2xx deleted,
//! 404 or 410 already absent, anything else failed, with the status.

use std::time::{Duration, SystemTime};

use aws_credential_types::provider::ProvideCredentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use serde_json::{json, Value};

use super::STAGE;
use fhirflow::curate::deletions::Deletion;
use fhirflow::error::{Error, Result};
use fhirflow::settings::Settings;

/// HealthLake's limit of entries in one Bundle.
pub(super) const BUNDLE_ENTRIES: usize = 160;

/// What became of one deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    Deleted,
    Absent,
    Failed(String),
}

/// The datastore's FHIR base URL: `[healthlake] endpoint` (a stand-in) or
/// the Region's service endpoint, then `/datastore/<id>/r4/`.
fn base_url(settings: &Settings, region: &str, datastore: &str) -> String {
    let host = settings
        .healthlake
        .endpoint
        .clone()
        .unwrap_or_else(|| format!("https://healthlake.{region}.amazonaws.com"));
    format!("{}/datastore/{datastore}/r4/", host.trim_end_matches('/'))
}

/// Applies `deletions` to `datastore`; one outcome per deletion, in order.
pub(super) async fn delete(
    settings: &Settings,
    datastore: &str,
    deletions: &[Deletion],
) -> Result<Vec<Outcome>> {
    if deletions.is_empty() {
        return Ok(Vec::new());
    }
    let hl = &settings.healthlake;
    let config =
        crate::sdk::sdk_config(settings, hl.endpoint.as_deref(), hl.region.as_deref(), 1).await;
    let region = config.region().map(|r| r.to_string()).ok_or_else(|| {
        Error::Config(
            "HealthLake deletions need a region ([healthlake] region or the AWS chain)".into(),
        )
    })?;
    let provider = config.credentials_provider().ok_or_else(|| {
        Error::Config(
            "HealthLake deletions need AWS credentials (the AWS chain or [s3] keys)".into(),
        )
    })?;
    let credentials = provider
        .provide_credentials()
        .await
        .map_err(|e| Error::Aws {
            stage: STAGE,
            operation: "FHIR DELETE".into(),
            message: format!("no credentials: {e}"),
        })?;
    let identity = credentials.into();
    let url = base_url(settings, &region, datastore);
    let http = reqwest::Client::new();
    let mut out = Vec::with_capacity(deletions.len());
    for chunk in deletions.chunks(BUNDLE_ENTRIES) {
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "batch",
            "entry": chunk.iter().map(|d| json!({
                "request": { "method": "DELETE", "url": format!("{}/{}", d.resource_type, d.id) }
            })).collect::<Vec<_>>(),
        });
        let body = serde_json::to_vec(&bundle).expect("a Bundle serialises");
        let answer = send(&http, &url, &region, &identity, &body, hl.max_attempts).await;
        match answer {
            Ok(v) => out.extend(outcomes(&v, chunk.len())),
            Err(why) => out.extend(chunk.iter().map(|_| Outcome::Failed(why.clone()))),
        }
    }
    Ok(out)
}

/// One signed POST, retried on 429 and 5xx; the response Bundle, or why
/// there is none.
async fn send(
    http: &reqwest::Client,
    url: &str,
    region: &str,
    identity: &aws_smithy_runtime_api::client::identity::Identity,
    body: &[u8],
    attempts: u32,
) -> std::result::Result<Value, String> {
    let mut pause = Duration::from_millis(200);
    let mut last = String::new();
    for attempt in 1..=attempts.max(1) {
        let host = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| {
                u.host_str()
                    .map(|h| u.port().map_or(h.to_string(), |p| format!("{h}:{p}")))
            })
            .ok_or_else(|| format!("{url} is not a URL"))?;
        let headers = [
            ("host", host.as_str()),
            ("content-type", "application/fhir+json"),
        ];
        let params = v4::SigningParams::builder()
            .identity(identity)
            .region(region)
            .name("healthlake")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| format!("signing: {e}"))?
            .into();
        let signable = SignableRequest::new(
            "POST",
            url,
            headers.iter().copied(),
            SignableBody::Bytes(body),
        )
        .map_err(|e| format!("signing: {e}"))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| format!("signing: {e}"))?
            .into_parts();
        let mut req = http
            .post(url)
            .header("content-type", "application/fhir+json")
            .body(body.to_vec());
        for (k, v) in instructions.headers() {
            req = req.header(k, v);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => {
                return r
                    .json()
                    .await
                    .map_err(|e| format!("the response is not JSON: {e}"));
            }
            Ok(r) => {
                let status = r.status().as_u16();
                last = format!("HTTP {status}");
                if status != 429 && status < 500 {
                    return Err(last);
                }
            }
            Err(e) => last = format!("the request failed: {e}"),
        }
        tracing::info!(attempt, wait_seconds = pause.as_secs_f64(), reason = %last, "HealthLake DELETE batch retried");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(20));
    }
    Err(format!("{last} after {attempts} attempts"))
}

/// The outcome of each of the `n` entries of a batch-response Bundle.
fn outcomes(response: &Value, n: usize) -> Vec<Outcome> {
    let entries = response
        .get("entry")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    (0..n)
        .map(|i| {
            let status = entries
                .get(i)
                .and_then(|e| e.pointer("/response/status"))
                .and_then(Value::as_str);
            let code = status
                .and_then(|s| s.get(..3))
                .and_then(|c| c.parse::<u16>().ok());
            match code {
                Some(200..=299) => Outcome::Deleted,
                Some(404) | Some(410) => Outcome::Absent,
                Some(_) => Outcome::Failed(format!("status {}", status.unwrap_or_default())),
                None => Outcome::Failed("no answer for this entry in the response Bundle".into()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_response_counts_each_entry() {
        let r = json!({"resourceType":"Bundle","type":"batch-response","entry":[
            {"response":{"status":"204 No Content"}},
            {"response":{"status":"404 Not Found"}},
            {"response":{"status":"500 Internal Server Error"}},
        ]});
        assert_eq!(
            outcomes(&r, 4),
            vec![
                Outcome::Deleted,
                Outcome::Absent,
                Outcome::Failed("status 500 Internal Server Error".into()),
                Outcome::Failed("no answer for this entry in the response Bundle".into()),
            ]
        );
    }
}
