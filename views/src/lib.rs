//! SQL-on-FHIR v2 ViewDefinitions (<https://sql-on-fhir.org/ig/>):
//!
//! * [`definition`]: a ViewDefinition's JSON read into a [`View`], with
//!   errors that give the place in the file;
//! * [`check`]: its paths typed against the FHIR R4 model (unknown elements,
//!   functions and constants are errors; columns without `type` get one);
//! * [`run`]: a resource's rows, by the specification's processing model;
//! * [`batch`]: rows into Arrow record batches;
//! * [`suite`]: the official conformance test format and its report.
//!
//! The engine puts views on DataFusion (`fhirflow view`, `view.<name>` in
//! `fhirflow sql`); this crate knows nothing of storage or SQL.

pub mod athena;
pub mod batch;
pub mod check;
pub mod definition;
pub mod run;
pub mod suite;

pub use batch::BatchBuilder;
pub use check::ColumnKind;
pub use definition::{View, ViewError};
pub use run::{Cell, RunError};
