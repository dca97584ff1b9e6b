//! The SQL-on-FHIR v2 conformance test format: a file holds `resources`
//! and `tests`; each test has a `view` and `expect` (rows, compared without
//! regard to order), `expectCount`, `expectError` and/or `expectColumns`.
//! Results are reported in the suite's `test_report.json` shape:
//! `{ "<file>": { "tests": [ { "name", "result": { "passed", "reason"? } } ] } }`.

use std::path::Path;

use serde_json::{json, Map, Value as Json};

use crate::definition::View;
use crate::run::{Cell, RunError};

/// One test's result.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub name: String,
    pub passed: bool,
    pub reason: Option<String>,
}

/// The rows of `view` over `resources` (JSON texts), in order.
pub fn evaluate(view: &View, resources: &[String]) -> Result<Vec<Vec<Cell>>, RunError> {
    let mut rows = Vec::new();
    for r in resources {
        view.rows(r, &mut |row| rows.push(row))?;
    }
    Ok(rows)
}

pub fn cell_json(c: &Cell) -> Json {
    match c {
        Cell::Null => Json::Null,
        Cell::Bool(b) => Json::Bool(*b),
        Cell::Int(i) => json!(i),
        Cell::Dec(d, _) => json!(d),
        Cell::Str(s) => Json::String(s.clone()),
        Cell::List(items) => Json::Array(items.iter().map(cell_json).collect()),
    }
}

/// A value as comparable text: numbers to nine decimals, so 5 and 5.0 and
/// 1.05 computed in binary compare equal to what the test wrote.
fn canonical(v: &Json) -> String {
    match v {
        Json::Number(n) => match n.as_f64() {
            Some(f) => format!("{f:.9}"),
            None => n.to_string(),
        },
        Json::Array(items) => format!(
            "[{}]",
            items.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        Json::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .iter()
                .map(|k| format!("{k:?}:{}", canonical(&m[*k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        other => other.to_string(),
    }
}

fn row_key(columns: &[&str], row: &Map<String, Json>) -> String {
    let mut cols: Vec<&str> = columns.to_vec();
    cols.sort();
    cols.iter()
        .map(|c| format!("{c}={}", canonical(row.get(*c).unwrap_or(&Json::Null))))
        .collect::<Vec<_>>()
        .join(";")
}

/// Runs one test of a file over its resources.
pub fn run_test(test: &Json, resources: &[String]) -> Outcome {
    let name = test
        .get("title")
        .and_then(Json::as_str)
        .unwrap_or("(untitled)")
        .to_string();
    let expect_error = test
        .get("expectError")
        .and_then(Json::as_bool)
        .unwrap_or(false);
    let result = (|| -> Result<(Vec<String>, Vec<Vec<Cell>>), String> {
        let view_text = test
            .get("view")
            .map(Json::to_string)
            .ok_or("the test has no view")?;
        let view = View::parse(&view_text).map_err(|e| e.to_string())?;
        let rows = evaluate(&view, resources).map_err(|e| e.to_string())?;
        Ok((
            view.column_names()
                .into_iter()
                .map(str::to_string)
                .collect(),
            rows,
        ))
    })();
    let (passed, reason) = match (result, expect_error) {
        (Err(_), true) => (true, None),
        (Err(e), false) => (false, Some(e)),
        (Ok(_), true) => (false, Some("expected an error, the view ran".to_string())),
        (Ok((columns, rows)), false) => match compare(test, &columns, &rows) {
            Ok(()) => (true, None),
            Err(why) => (false, Some(why)),
        },
    };
    Outcome {
        name,
        passed,
        reason,
    }
}

fn compare(test: &Json, columns: &[String], rows: &[Vec<Cell>]) -> Result<(), String> {
    if let Some(want) = test.get("expectColumns").and_then(Json::as_array) {
        let want: Vec<&str> = want.iter().filter_map(Json::as_str).collect();
        if want != columns {
            return Err(format!("columns {columns:?}, expected {want:?}"));
        }
    }
    if let Some(n) = test.get("expectCount").and_then(Json::as_u64) {
        if rows.len() as u64 != n {
            return Err(format!("{} rows, expected {n}", rows.len()));
        }
    }
    if let Some(want) = test.get("expect").and_then(Json::as_array) {
        let cols: Vec<&str> = columns.iter().map(String::as_str).collect();
        let mut got: Vec<String> = rows
            .iter()
            .map(|r| {
                let m: Map<String, Json> = columns
                    .iter()
                    .cloned()
                    .zip(r.iter().map(cell_json))
                    .collect();
                row_key(&cols, &m)
            })
            .collect();
        let mut expected = Vec::new();
        for w in want {
            let Some(m) = w.as_object() else {
                return Err("an expected row is not an object".into());
            };
            if let Some(extra) = m.keys().find(|k| !columns.contains(k)) {
                return Err(format!(
                    "expected column '{extra}' is not in the view's columns {columns:?}"
                ));
            }
            expected.push(row_key(&cols, m));
        }
        got.sort();
        expected.sort();
        if got != expected {
            return Err(format!(
                "rows differ:\n  got      {got:?}\n  expected {expected:?}"
            ));
        }
    }
    Ok(())
}

/// Runs every test of one file.
pub fn run_file(path: &Path) -> Result<Vec<Outcome>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: Json =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let resources: Vec<String> = file
        .get("resources")
        .and_then(Json::as_array)
        .ok_or_else(|| format!("{}: no 'resources' array", path.display()))?
        .iter()
        .map(Json::to_string)
        .collect();
    let tests = file
        .get("tests")
        .and_then(Json::as_array)
        .ok_or_else(|| format!("{}: no 'tests' array", path.display()))?;
    Ok(tests.iter().map(|t| run_test(t, &resources)).collect())
}

/// The report of several files, in the suite's format.
pub fn report(files: &[(String, Vec<Outcome>)]) -> Json {
    let mut out = Map::new();
    for (name, outcomes) in files {
        let tests: Vec<Json> = outcomes
            .iter()
            .map(|o| {
                let mut result = Map::new();
                result.insert("passed".into(), Json::Bool(o.passed));
                if let Some(r) = &o.reason {
                    result.insert("reason".into(), Json::String(r.clone()));
                }
                json!({ "name": o.name, "result": result })
            })
            .collect();
        out.insert(name.clone(), json!({ "tests": tests }));
    }
    Json::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The official test files kept in `../shared/sql-on-fhir/tests`: every
    /// test of every file passes.
    #[test]
    fn the_shared_conformance_files_pass() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/sql-on-fhir/tests");
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        entries.sort();
        assert!(entries.len() >= 12, "the shared suite has 12 files");
        let mut failures = Vec::new();
        let mut count = 0;
        for p in &entries {
            for o in run_file(p).unwrap() {
                count += 1;
                if !o.passed {
                    failures.push(format!(
                        "{} / {}: {}",
                        p.display(),
                        o.name,
                        o.reason.unwrap_or_default()
                    ));
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {count} failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}
