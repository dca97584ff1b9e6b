//! `fhirflow rules diff`: the dry run's report. Per rule: rows in, kept,
//! rejected and changed; then a few samples, a change shown as the elements
//! that differ (FHIRPath-style location, before → after), never the whole
//! resource.

use std::fmt::Write;

use serde_json::Value;

use crate::curate::RulesDryRun;

/// The elements that differ between two resource texts:
/// (location, before, after), `-` for an element that is absent.
pub fn changed_elements(before: &str, after: &str) -> Vec<(String, String, String)> {
    let parse = |t: &str| serde_json::from_str::<Value>(t).unwrap_or(Value::Null);
    let (a, b) = (parse(before), parse(after));
    let root = a
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let mut out = Vec::new();
    walk(&root, Some(&a), Some(&b), &mut out);
    out
}

fn show(v: Option<&Value>) -> String {
    match v {
        None => "-".into(),
        Some(v) => {
            let t = v.to_string();
            if t.len() > 80 {
                format!("{}…", &t[..t.floor_char_boundary(80)])
            } else {
                t
            }
        }
    }
}

fn walk(at: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<(String, String, String)>) {
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                walk(&format!("{at}.{k}"), x.get(k), y.get(k), out);
            }
        }
        (Some(Value::Array(x)), Some(Value::Array(y))) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                walk(&format!("{at}[{i}]"), Some(p), Some(q), out);
            }
        }
        (a, b) if a != b => out.push((at.to_string(), show(a), show(b))),
        _ => {}
    }
}

/// The dry run as text.
pub fn render(d: &RulesDryRun) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} lines read; {} rejected by steps 1 and 2 before the rules; nothing was written.",
        d.records_in, d.rejected_before_rules
    );
    if d.rules.is_empty() {
        let _ = writeln!(s, "No rules apply to these records.");
        return s;
    }
    let _ = writeln!(
        s,
        "{:<44} {:<24} {:>9} {:>9} {:>9} {:>9}",
        "rule", "resource type", "in", "kept", "rejected", "changed"
    );
    for r in &d.rules {
        let c = &r.counts;
        let _ = writeln!(
            s,
            "{:<44} {:<24} {:>9} {:>9} {:>9} {:>9}",
            r.rule, r.resource_type, c.rows_in, c.kept, c.rejected, c.changed
        );
    }
    for x in &d.samples {
        let _ = writeln!(
            s,
            "\n{} — {} line {} (id {}):",
            x.rule, x.source_file, x.line_no, x.id
        );
        if let Some(reason) = &x.reason {
            let _ = writeln!(s, "  rejected: {reason}");
        }
        if let Some((before, after)) = &x.change {
            for (at, b, a) in changed_elements(before, after) {
                let _ = writeln!(s, "  {at}: {b} → {a}");
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_only_the_changed_elements() {
        let before = r#"{"resourceType":"Patient","id":"p","identifier":[{"value":" 42 "},{"value":"x"}],"active":true}"#;
        let after = r#"{"resourceType":"Patient","id":"p","identifier":[{"value":"42"},{"value":"x"}],"gender":"female"}"#;
        assert_eq!(
            changed_elements(before, after),
            [
                (
                    "Patient.active".to_string(),
                    "true".to_string(),
                    "-".to_string()
                ),
                ("Patient.gender".into(), "-".into(), "\"female\"".into()),
                (
                    "Patient.identifier[0].value".into(),
                    "\" 42 \"".into(),
                    "\"42\"".into()
                ),
            ]
        );
    }
}
