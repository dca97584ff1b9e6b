//! A stand-in of the AWS Lambda Runtime API, the HTTP interface a custom
//! runtime's `bootstrap` polls, as AWS documents it ("Using the Lambda
//! runtime API for custom runtimes"), version 2018-06-01:
//!
//! * `GET /2018-06-01/runtime/invocation/next` blocks until there is an
//!   invocation, then answers with the event as its body and the headers
//!   `Lambda-Runtime-Aws-Request-Id`, `Lambda-Runtime-Deadline-Ms`,
//!   `Lambda-Runtime-Invoked-Function-Arn` and `Lambda-Runtime-Trace-Id`;
//! * `POST /2018-06-01/runtime/invocation/<request id>/response` takes the
//!   function's result, `POST …/<request id>/error` its failure (a JSON body
//!   with `errorType` and `errorMessage`); both answer 202;
//! * `POST /2018-06-01/runtime/init/error` reports a failed start.
//!
//! Tests queue invocations with [`LambdaApi::invoke`] and read what the
//! function answered with [`LambdaApi::outcome`].

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use serde_json::Value;

/// What the function did with one invocation.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Response(Value),
    Error(Value),
}

#[derive(Default)]
struct State {
    queue: VecDeque<(String, Value)>,
    outcomes: BTreeMap<String, Outcome>,
    init_errors: Vec<Value>,
    next_id: usize,
}

pub struct LambdaApi {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
}

const PREFIX: &str = "/2018-06-01/runtime";

impl LambdaApi {
    /// Starts the stand-in on a free loopback port.
    pub fn start() -> LambdaApi {
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let addr = crate::serve_loopback(move |req| handle(req, shared.clone()), async {});
        LambdaApi { addr, state }
    }

    /// `AWS_LAMBDA_RUNTIME_API`: host and port, no scheme.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Queues an invocation with `event`; returns its request id.
    pub fn invoke(&self, event: Value) -> String {
        let mut s = self.state.lock().unwrap();
        s.next_id += 1;
        let id = format!("8476a536-e9f4-11e8-9739-{:012x}", s.next_id);
        s.queue.push_back((id.clone(), event));
        id
    }

    /// Waits up to `timeout` for the function's answer to invocation `id`.
    pub fn outcome(&self, id: &str, timeout: Duration) -> Option<Outcome> {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if let Some(o) = self.state.lock().unwrap().outcomes.get(id) {
                return Some(o.clone());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn init_errors(&self) -> Vec<Value> {
        self.state.lock().unwrap().init_errors.clone()
    }
}

fn reply(status: u16, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return Ok(reply(404, r#"{"errorType":"NotFound"}"#));
    };
    let json = || serde_json::from_slice::<Value>(&body);
    match (method.as_str(), rest) {
        ("GET", "/invocation/next") => loop {
            let next = state.lock().unwrap().queue.pop_front();
            if let Some((id, event)) = next {
                let deadline = chrono::Utc::now().timestamp_millis() + 900_000;
                let resp = Response::builder()
                    .status(200)
                    .header("Lambda-Runtime-Aws-Request-Id", &id)
                    .header("Lambda-Runtime-Deadline-Ms", deadline.to_string())
                    .header(
                        "Lambda-Runtime-Invoked-Function-Arn",
                        "arn:aws:lambda:us-east-1:123456789012:function:fhirflow-worker",
                    )
                    .header(
                        "Lambda-Runtime-Trace-Id",
                        "Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700",
                    )
                    .body(Full::new(Bytes::from(event.to_string())))
                    .unwrap();
                return Ok(resp);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        },
        ("POST", "/init/error") => {
            let v = json().unwrap_or(Value::Null);
            state.lock().unwrap().init_errors.push(v);
            Ok(reply(202, r#"{"status":"OK"}"#))
        }
        ("POST", r) => {
            let Some(r) = r.strip_prefix("/invocation/") else {
                return Ok(reply(404, r#"{"errorType":"NotFound"}"#));
            };
            let (id, kind) = r.split_once('/').unwrap_or((r, ""));
            let Ok(v) = json() else {
                return Ok(reply(400, r#"{"errorType":"InvalidRequestPayload"}"#));
            };
            let outcome = match kind {
                "response" => Outcome::Response(v),
                "error" => Outcome::Error(v),
                _ => return Ok(reply(404, r#"{"errorType":"NotFound"}"#)),
            };
            state
                .lock()
                .unwrap()
                .outcomes
                .insert(id.to_string(), outcome);
            Ok(reply(202, r#"{"status":"OK"}"#))
        }
        _ => Ok(reply(404, r#"{"errorType":"NotFound"}"#)),
    }
}
