//! fhirflow as an AWS Lambda function on the custom runtime
//! (`provided.al2023`): the `fhirflow` binary, packaged as `bootstrap`, asks
//! the Lambda Runtime API for the next invocation, runs the one plan unit it
//! names, and posts the unit's summary to the response endpoint or its
//! failure to the error endpoint.
//!
//! An invocation's event is one of:
//!
//! * `{"plan": "<plan URI or id>", "index": N}`: run unit N, as the Step
//!   Functions Distributed Map passes each line of a plan (other members are
//!   ignored);
//! * `{"command": "plan", "stage": "curate", "tenant": …, "date": …,
//!   "since": …}` (all but `command` optional): write a plan, answer where it
//!   is;
//! * `{"command": "catalog-sync"}`: register the layers in Glue.
//!
//! A failure's `errorType` says what to do with it:
//! [`BUSY`] is worth retrying later; [`NOT_CONSERVED`] and [`FAILED`] are not.
//! Step Functions matches `Retry` and `Catch` on that name.

use std::future::Future;

use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde::Deserialize;
use serde_json::Value;

/// Another worker holds the partition: retry later.
pub const BUSY: &str = "Busy";
/// The unit ran, but its records do not add up: look before retrying.
pub const NOT_CONSERVED: &str = "NotConserved";
/// Anything else (bad input, configuration, storage): do not retry.
pub const FAILED: &str = "Failed";

/// Run one unit of a plan.
#[derive(Debug, Clone, Deserialize)]
pub struct WorkEvent {
    pub plan: String,
    pub index: usize,
}

/// A command other than a unit's.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum CommandEvent {
    Plan {
        #[serde(default)]
        stage: Option<String>,
        #[serde(default)]
        tenant: Option<String>,
        #[serde(default)]
        date: Option<String>,
        #[serde(default)]
        since: Option<String>,
    },
    CatalogSync,
}

/// What one invocation asks for.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Event {
    Command(CommandEvent),
    Work(WorkEvent),
}

/// A unit that did not finish: the error endpoint's `errorType` and
/// `errorMessage`.
#[derive(Debug, Clone)]
pub struct Failure {
    pub error_type: &'static str,
    pub message: String,
}

/// Serves invocations until the runtime stops the process: `handler` runs
/// one unit and returns what the response endpoint gets.
pub async fn serve<F, Fut>(handler: F) -> Result<(), lambda_runtime::Error>
where
    F: Fn(Event) -> Fut,
    Fut: Future<Output = Result<Value, Failure>>,
{
    let handler = &handler;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Event>| async move {
        handler(event.payload).await.map_err(|f| Diagnostic {
            error_type: f.error_type.into(),
            error_message: f.message,
        })
    }))
    .await
}
