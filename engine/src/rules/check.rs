//! `fhirflow rules check`: every rule planned against the engine's schema
//! (`records`, `keys`, the UDF library) without reading data.

use std::collections::BTreeMap;

use super::exec::RuleSession;
use super::RuleSet;
use crate::error::{Error, Result};

/// One problem with one rule file.
#[derive(Debug, Clone)]
pub struct Problem {
    pub file: String,
    pub message: String,
}

/// The problems of every rule of `set`: planning errors (with line and
/// column where DataFusion knows them) and rules without the comment at the
/// top that says what they do and why.
pub async fn check(set: &RuleSet, params: &BTreeMap<String, String>) -> Result<Vec<Problem>> {
    let session = RuleSession::new(params, Vec::new())?;
    let mut problems = Vec::new();
    for rule in &set.rules {
        match session.plan(rule).await {
            Ok(_) => {}
            Err(Error::Rule { file, message }) => problems.push(Problem { file, message }),
            Err(e) => return Err(e),
        }
        if rule.header().is_none() {
            problems.push(Problem {
                file: rule.path.display().to_string(),
                message: "no comment at the top: start the file with -- lines that say what the rule does and why".into(),
            });
        }
    }
    Ok(problems)
}
