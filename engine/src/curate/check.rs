//! Curation step 2's seam: per-line checks (FHIR validation) that run in
//! pass 1 on every line that passed step 1, before dedup. A check returns its
//! findings; any finding rejects the line, and each one becomes an
//! `import_errors` row (with its FHIRPath location), so a record is reported
//! with every issue at once. The record then takes no part in dedup: an older
//! valid version of it survives instead.
//!
//! A check that parses the line anyway (the validator) makes step 1's scan
//! in the same walk ([`LineCheck::scan_and_check`]): a validated line is
//! read once. Its findings count only when step 1 accepts the line; a line
//! step 1 rejects is reported with step 1's reason alone, as when the
//! check ran after it.

use std::sync::Arc;

use fhirflow_udfs::json::{scan_resource, JsonError, Scanned};

use crate::curate::parse::{key_with, Keys, Reject};
use crate::curate::Run;

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

/// What [`LineCheck::scan_and_check`] gives: step 1's scan, and the check's
/// findings for when step 1 accepts the line.
pub type Walked = (Result<Scanned, JsonError>, Vec<Reject>);

/// A check of step 2. Implementations must be cheap to call per line and
/// safe to share between the threads of a run.
pub trait LineCheck: Send + Sync {
    /// Findings that reject the line; empty when it passes.
    fn check(&self, line: &CheckedLine<'_>) -> Vec<Reject>;

    /// For a check that parses the line itself: step 1's scan of `text`,
    /// exactly what [`scan_resource`]`(text, max_depth)` returns, and the
    /// findings [`LineCheck::check`] would return for the line with
    /// resource type `file_type` (step 1 accepts a line only of its file's
    /// type), from one walk. None (the default): step 1 scans, then calls
    /// `check`. Of a run's checks, the first that returns `Some` makes the
    /// scan.
    fn scan_and_check(
        &self,
        _text: &str,
        _file_type: Option<&'static str>,
        _max_depth: usize,
    ) -> Option<Walked> {
        None
    }
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

    fn rejects(findings: Vec<fhirflow_fhir::Finding>) -> Vec<Reject> {
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

impl LineCheck for Validation {
    fn check(&self, line: &CheckedLine<'_>) -> Vec<Reject> {
        Self::rejects(self.0.validate(line.text, Some(line.resource_type)))
    }

    fn scan_and_check(
        &self,
        text: &str,
        file_type: Option<&'static str>,
        max_depth: usize,
    ) -> Option<Walked> {
        // Step 1's depth limit is the walk's (both come from the settings);
        // a check built for another one leaves the scan to step 1.
        if max_depth != self.0.max_depth() {
            return None;
        }
        let (scanned, findings) = self.0.validate_scan(text, file_type);
        Some((scanned, Self::rejects(findings)))
    }
}

impl Run {
    /// Steps 1 and 2 of one line: its keys and spans, or step 1's
    /// rejection; and the findings of every check, each with the record's
    /// type and id. The first check that can walk the line makes step 1's
    /// scan on its way ([`LineCheck::scan_and_check`]).
    pub(crate) fn key_and_check<'a>(
        &self,
        bytes: &'a [u8],
        file_type: Option<&'static str>,
        last_unterminated: bool,
    ) -> Result<(Keys<'a>, Scanned, Vec<Reject>), Reject> {
        key_and_check(
            &self.checks,
            bytes,
            file_type,
            self.settings.curate.max_depth,
            last_unterminated,
        )
    }
}

/// [`Run::key_and_check`] with the given checks.
pub(crate) fn key_and_check<'a>(
    checks: &[Arc<dyn LineCheck>],
    bytes: &'a [u8],
    file_type: Option<&'static str>,
    max_depth: usize,
    last_unterminated: bool,
) -> Result<(Keys<'a>, Scanned, Vec<Reject>), Reject> {
    let mut walked: Option<(usize, Vec<Reject>)> = None;
    let (keys, scanned) = key_with(bytes, file_type, last_unterminated, |text| {
        for (i, c) in checks.iter().enumerate() {
            if let Some((scanned, findings)) = c.scan_and_check(text, file_type, max_depth) {
                walked = Some((i, findings));
                return scanned;
            }
        }
        scan_resource(text, max_depth)
    })?;
    let mut findings = Vec::new();
    if !checks.is_empty() {
        let line = CheckedLine {
            resource_type: keys.resource_type,
            id: &keys.id,
            text: keys.text,
            scanned: &scanned,
        };
        for (i, c) in checks.iter().enumerate() {
            match &mut walked {
                Some((w, found)) if *w == i => findings.append(found),
                _ => findings.extend(c.check(&line)),
            }
        }
        for f in &mut findings {
            f.resource_type
                .get_or_insert_with(|| keys.resource_type.to_string());
            f.resource_id.get_or_insert_with(|| keys.id.to_string());
        }
    }
    Ok((keys, scanned, findings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curate::parse::key_and_scan;
    use fhirflow_fhir::Level;

    /// A check that walks nothing: rejects the record with id `x`.
    struct NoX;

    impl LineCheck for NoX {
        fn check(&self, line: &CheckedLine<'_>) -> Vec<Reject> {
            if line.id == "x" {
                vec![Reject::new("TEST_X", "x").at(format!("{}.id", line.resource_type))]
            } else {
                Vec::new()
            }
        }
    }

    /// Steps 1 and 2 as curation made them before the one walk: the scan,
    /// then every check.
    fn two_walks<'a>(
        checks: &[Arc<dyn LineCheck>],
        bytes: &'a [u8],
    ) -> Result<(Keys<'a>, Scanned, Vec<Reject>), Reject> {
        let (keys, scanned) = key_and_scan(bytes, Some("Patient"), 16, false)?;
        let line = CheckedLine {
            resource_type: keys.resource_type,
            id: &keys.id,
            text: keys.text,
            scanned: &scanned,
        };
        let mut findings: Vec<Reject> = checks.iter().flat_map(|c| c.check(&line)).collect();
        for f in &mut findings {
            f.resource_type = Some("Patient".into());
            f.resource_id = Some(keys.id.to_string());
        }
        Ok((keys, scanned, findings))
    }

    #[test]
    fn one_walk_keys_and_checks_as_two() {
        let strict = |depth| -> Arc<dyn LineCheck> {
            Arc::new(Validation::for_level(Level::Strict, depth).unwrap())
        };
        let no_x: Arc<dyn LineCheck> = Arc::new(NoX);
        let lines: &[&[u8]] = &[
            br#"{"resourceType":"Patient","id":"p","meta":{"versionId":"2","security":[{"system":"s","code":"c"}]},"gender":"female"}"#,
            br#"{"resourceType":"Patient","id":"x","gender":"female"}"#,
            br#"{"resourceType":"Patient","id":"p","gender":"girl","colour":"red"}"#,
            br#"{"resourceType":"Patient","id":"x","gender":"girl"}"#,
            br#"{"resourceType":"Patient","id":"p","meta":{"lastUpdated":"yesterday"},"colour":1}"#,
            br#"{"resourceType":"Patient","id":"a_b","colour":1}"#,
            br#"{"resourceType":"Observation","id":"o"}"#,
            br#"{"resourceType":"Patient","id":"p","id":"q"}"#,
            br#"{"resourceType":"Patient","id":"p","name":[{"family":"a"}"#,
            br#"{"resourceType":"Patient","id":"p","extension":[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]}"#,
            b"{\"resourceType\":\"Patient\",\"id\":\"\xff\"}",
            br#"[1]"#,
        ];
        for checks in [
            vec![],
            vec![strict(16)],
            vec![no_x.clone(), strict(16)],
            vec![strict(16), no_x.clone()],
            vec![strict(8), no_x.clone()],
        ] {
            for line in lines {
                assert_eq!(
                    key_and_check(&checks, line, Some("Patient"), 16, false),
                    two_walks(&checks, line),
                    "{}",
                    String::from_utf8_lossy(line)
                );
            }
        }
    }

    #[test]
    fn a_line_step_1_rejects_has_step_1s_reason_alone() {
        let checks: Vec<Arc<dyn LineCheck>> =
            vec![Arc::new(Validation::for_level(Level::Strict, 16).unwrap())];
        // Unknown elements and a bad code, which the walk finds, and an id
        // that step 1 rejects.
        let line = br#"{"resourceType":"Patient","id":"a_b","gender":"girl","colour":1}"#;
        let r = key_and_check(&checks, line, Some("Patient"), 16, false).unwrap_err();
        assert_eq!(r.code, "INVALID_ID");
    }
}
