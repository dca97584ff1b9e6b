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

/// Step 2 proper: FHIR R4 validation ([`fhirflow_fhir::Validator`]). A
/// resource with an error is rejected with every finding (warnings included,
/// each with its severity in the message).
pub struct Validation(fhirflow_fhir::Validator);

impl Validation {
    /// The check for `level`, or None when validation is off.
    pub fn for_level(level: fhirflow_fhir::Level, max_depth: usize) -> Option<Self> {
        (level != fhirflow_fhir::Level::Off)
            .then(|| Validation(fhirflow_fhir::Validator::new(level, max_depth)))
    }
}

impl LineCheck for Validation {
    fn check(&self, line: &CheckedLine<'_>) -> Vec<Reject> {
        let findings = self.0.validate(line.text, Some(line.resource_type));
        if !fhirflow_fhir::Validator::has_error(&findings) {
            return Vec::new();
        }
        findings
            .into_iter()
            .map(|f| {
                let message = match f.severity {
                    fhirflow_fhir::Severity::Error => f.message,
                    s => format!("{}: {}", s.as_str(), f.message),
                };
                Reject::new(f.code, message).at(f.location)
            })
            .collect()
    }
}
