//! fhirflow's integration tests: each module proves one property of
//! issue 2 against a real lake in a temporary folder.

mod bad_input;
mod catalog;
mod cli;
mod concurrency;
mod crash;
mod dedup;
mod deploy;
mod extract;
mod fleet;
mod healthlake;
mod labels;
mod lake;
mod lambda;
mod lossless;
mod ranges;
mod relanding;
mod rules;
mod s3;
mod sql;
mod validation;
mod views;
