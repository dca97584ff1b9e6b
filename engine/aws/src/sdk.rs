//! The AWS SDK clients (Glue, HealthLake): one place that builds their
//! configuration.
//!
//! Credentials come from the standard AWS chain (environment, profile, web
//! identity, ECS task role, instance metadata) unless `[s3]` names static keys,
//! which then serve every AWS client of the run. The HTTP client is smithy's
//! hyper 1 client on rustls with ring; throttling and 5xx answers are retried
//! by the SDK's standard retry strategy with backoff.

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_glue::config::Credentials;
use aws_smithy_http_client::tls;

use fhirflow::settings::Settings;

/// An SDK configuration for one service: `endpoint` and `region` are that
/// service's overrides (`[glue]`, `[healthlake]`); `attempts` the retries of
/// one call, the first included.
pub async fn sdk_config(
    settings: &Settings,
    endpoint: Option<&str>,
    region: Option<&str>,
    attempts: u32,
) -> SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .retry_config(RetryConfig::standard().with_max_attempts(attempts.max(1)));
    if let Some(r) = region.or(settings.s3.region.as_deref()) {
        loader = loader.region(Region::new(r.to_string()));
    }
    if let Some(e) = endpoint {
        loader = loader.endpoint_url(e);
    }
    let s3 = &settings.s3;
    if let (Some(k), Some(s)) = (&s3.access_key_id, &s3.secret_access_key) {
        loader = loader.credentials_provider(Credentials::new(
            k,
            s,
            s3.session_token.clone(),
            None,
            "fhirflow-settings",
        ));
    }
    loader.load().await
}

/// Logs every attempt of an AWS call that the SDK's retry strategy will
/// answer with a backoff: throttling (HTTP 429, or an error type naming
/// throttling, as HealthLake and Glue answer it) and 5xx. Only the service,
/// operation, status and error type: never a body.
#[derive(Debug)]
pub(crate) struct LogRetries;

impl aws_smithy_runtime_api::client::interceptors::Intercept for LogRetries {
    fn name(&self) -> &'static str {
        "fhirflow-log-retries"
    }

    fn read_after_attempt(
        &self,
        context: &aws_smithy_runtime_api::client::interceptors::context::FinalizerInterceptorContextRef<'_>,
        _components: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        use aws_smithy_runtime_api::client::orchestrator::Metadata;
        use aws_smithy_runtime_api::client::retries::RequestAttempts;
        let Some(response) = context.response() else {
            return Ok(());
        };
        let status = response.status().as_u16();
        let error_type = response
            .headers()
            .get("x-amzn-errortype")
            .map(|t| t.split(':').next().unwrap_or(t).to_string());
        let throttled = status == 429
            || error_type
                .as_deref()
                .is_some_and(|t| t.contains("Throttl") || t.contains("TooManyRequests"));
        if throttled || status >= 500 {
            let (service, operation) = cfg
                .load::<Metadata>()
                .map_or(("aws", "call"), |m| (m.service(), m.name()));
            let attempt = cfg.load::<RequestAttempts>().map_or(1, |a| a.attempts());
            tracing::warn!(
                service,
                operation,
                status,
                error_type = error_type.as_deref().unwrap_or(""),
                attempt,
                "{} AWS {service} {operation}: HTTP {status}; the SDK retries with backoff",
                if throttled {
                    "throttled by"
                } else {
                    "server error from"
                },
            );
        }
        Ok(())
    }
}
