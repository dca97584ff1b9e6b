//! Curation step 2's seam: per-line checks (FHIR validation) that run in
//! pass 1 on every line that passed step 1, before dedup. A check returns its
//! findings; any finding rejects the line, and each one becomes an
//! `import_errors` row (with its FHIRPath location), so a record is reported
//! with every issue at once. The record then takes no part in dedup: an older
//! valid version of it survives instead.

use fhirflow_udfs::json::Scanned;

use crate::curate::parse::Reject;

/// One line that passed step 1, as checks see it.
#[derive(Debug)]
pub struct CheckedLine<'a> {
    pub resource_type: &'static str,
    pub id: &'a str,
    /// The line's exact text.
    pub text: &'a str,
    /// Its spans, from the scan step 1 made.
    pub scanned: &'a Scanned,
}

/// A check of step 2. Implementations must be cheap to call per line and
/// safe to share between the threads of a run.
pub trait LineCheck: Send + Sync {
    /// Findings that reject the line; empty when it passes.
    fn check(&self, line: &CheckedLine<'_>) -> Vec<Reject>;
}
