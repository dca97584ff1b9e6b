//! Curation step 3: the analysts' SQL rules (`queries/` by default).
//!
//! A rules folder holds shared rules (`*.sql` at the top) and a folder per
//! resource type (`Observation/*.sql`) whose rules see only that type. The
//! rules for a record run in file-name order (a shared rule first when two
//! names tie), each a SELECT over the previous step's rows, `records`, with
//! the record model's columns ([`crate::model`], Shape::Curated). A rule:
//!
//! * keeps a row by returning it (identified by `line_no`; the engine joins
//!   on it, so a rule must return it unchanged);
//! * rejects a row by returning it with a non-NULL `reject_reason`: the row
//!   becomes an `import_errors` row (RULE_REJECTED) carrying the rule's name;
//! * drops a row by not returning it: that too is an `import_errors` row
//!   (RULE_DROPPED), so nothing disappears silently;
//! * changes a row by returning another `resource` text (through the
//!   text-preserving UDFs); every other column it returns is ignored.
//!
//! Rules also see `keys`: the key and lineage columns of every record of the
//! (tenant, import date) that passed steps 1 and 2, to look up what else
//! arrived (a referenced Patient, say). `rule_param(name, default)` reads the
//! run's `[curate.rule_params]`.
//!
//! [`exec`] runs a rule chain over batches of records; [`check`] plans rules
//! without data; [`test`] runs their sqllogictest files; [`diff`] is the dry
//! run.

pub mod check;
pub mod dialect;
pub mod diff;
pub mod exec;
pub mod test;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::settings::Settings;

/// One rule file.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its path inside the rules folder, `/`-separated: the name reported in
    /// `import_errors` and `import_metrics` (`Observation/020_units.sql`).
    pub name: String,
    pub path: PathBuf,
    /// The resource type of its folder; None for a shared rule.
    pub resource_type: Option<&'static str>,
    pub sql: String,
}

impl Rule {
    pub fn file_name(&self) -> &str {
        self.name.rsplit('/').next().unwrap_or(&self.name)
    }

    /// The comment block at the top of the file (without `--`), if any.
    pub fn header(&self) -> Option<String> {
        let lines: Vec<&str> = self
            .sql
            .lines()
            .map(str::trim)
            .skip_while(|l| l.is_empty())
            .take_while(|l| l.starts_with("--"))
            .map(|l| l.trim_start_matches('-').trim())
            .collect();
        let text = lines.join(" ").trim().to_string();
        (!text.is_empty()).then_some(text)
    }
}

/// The rules of one folder.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    /// The folder; None for "no rules".
    pub dir: Option<PathBuf>,
    /// Every rule, sorted by file name (shared first on ties), then folder.
    pub rules: Vec<Arc<Rule>>,
}

/// What `--rules` and the `rules` settings accept to mean "no rules".
pub const NO_RULES: &str = "none";

impl RuleSet {
    /// Loads `dir`. A file that cannot be read, a folder that is not a
    /// resource type or an empty rule is an error naming it.
    pub fn load(dir: &Path) -> Result<RuleSet> {
        let err = |path: &Path, message: String| Error::Rule {
            file: path.display().to_string(),
            message,
        };
        let entries = std::fs::read_dir(dir).map_err(|e| {
            err(
                dir,
                format!("cannot read the rules folder ({e}); set [curate] rules or pass --rules DIR (or --rules none)"),
            )
        })?;
        let mut rules = Vec::new();
        let mut add = |path: PathBuf, name: String, ty: Option<&'static str>| -> Result<()> {
            let sql = std::fs::read_to_string(&path).map_err(|e| err(&path, e.to_string()))?;
            if sql.lines().all(|l| {
                let l = l.trim();
                l.is_empty() || l.starts_with("--")
            }) {
                return Err(err(&path, "the file has no SQL".into()));
            }
            rules.push(Arc::new(Rule {
                name,
                path,
                resource_type: ty,
                sql,
            }));
            Ok(())
        };
        let mut sorted: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        sorted.sort();
        for path in sorted {
            let file_name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            if path.is_dir() {
                let Some(ty) = fhirflow_fhir::RESOURCE_TYPES
                    .iter()
                    .find(|t| **t == file_name)
                else {
                    return Err(err(
                        &path,
                        "a folder of rules must be named after a FHIR R4 resource type (e.g. Observation)".into(),
                    ));
                };
                let mut inner: Vec<PathBuf> = std::fs::read_dir(&path)
                    .map_err(|e| err(&path, e.to_string()))?
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "sql"))
                    .collect();
                inner.sort();
                for p in inner {
                    let n = format!("{file_name}/{}", p.file_name().unwrap().to_string_lossy());
                    add(p, n, Some(ty))?;
                }
            } else if path.extension().is_some_and(|x| x == "sql") {
                add(path.clone(), file_name, None)?;
            }
        }
        rules.sort_by(|a, b| {
            (a.file_name(), a.resource_type.is_some(), &a.name).cmp(&(
                b.file_name(),
                b.resource_type.is_some(),
                &b.name,
            ))
        });
        Ok(RuleSet {
            dir: Some(dir.to_path_buf()),
            rules,
        })
    }

    /// `dir`, or no rules for `none`.
    pub fn from_setting(dir: &str) -> Result<RuleSet> {
        if dir == NO_RULES || dir.is_empty() {
            Ok(RuleSet::default())
        } else {
            RuleSet::load(Path::new(dir))
        }
    }

    /// The rules a record of `resource_type` goes through, in order.
    pub fn for_type(&self, resource_type: &str) -> Vec<Arc<Rule>> {
        self.rules
            .iter()
            .filter(|r| r.resource_type.is_none_or(|t| t == resource_type))
            .cloned()
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// A short description for reports: the folder and rule count.
    pub fn describe(&self) -> String {
        match &self.dir {
            Some(d) => format!("{} ({} rules)", d.display(), self.rules.len()),
            None => "none".into(),
        }
    }
}

/// The rules folder for files of (tenant, source system): the most specific
/// `[[curate.rules_for]]` entry that matches, else `[curate] rules`.
pub fn folder_for<'s>(
    settings: &'s Settings,
    tenant: &str,
    source_system: Option<&str>,
) -> &'s str {
    let mut best: Option<(u8, &str)> = None;
    for o in &settings.curate.rules_for {
        let t = match &o.tenant {
            Some(t) if t.eq_ignore_ascii_case(tenant) => 2,
            Some(_) => continue,
            None => 0,
        };
        let s = match &o.source_system {
            Some(s) if Some(s.as_str()) == source_system => 1,
            Some(_) => continue,
            None => 0,
        };
        if best.is_none_or(|(b, _)| t + s > b) {
            best = Some((t + s, &o.rules));
        }
    }
    best.map_or(&settings.curate.rules, |(_, r)| r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_shared_and_typed_rules_in_file_name_order() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("020_b.sql"), "-- b\nSELECT * FROM records").unwrap();
        std::fs::write(d.path().join("010_a.sql"), "-- a\nSELECT * FROM records").unwrap();
        std::fs::write(d.path().join("notes.txt"), "ignored").unwrap();
        std::fs::create_dir(d.path().join("Patient")).unwrap();
        std::fs::write(d.path().join("Patient/015_p.sql"), "SELECT * FROM records").unwrap();
        std::fs::write(d.path().join("Patient/010_a.sql"), "SELECT * FROM records").unwrap();
        let set = RuleSet::load(d.path()).unwrap();
        let names =
            |ty| -> Vec<String> { set.for_type(ty).iter().map(|r| r.name.clone()).collect() };
        assert_eq!(
            names("Patient"),
            [
                "010_a.sql",
                "Patient/010_a.sql",
                "Patient/015_p.sql",
                "020_b.sql"
            ]
        );
        assert_eq!(names("Observation"), ["010_a.sql", "020_b.sql"]);
        assert_eq!(set.rules[0].header().as_deref(), Some("a"));

        std::fs::create_dir(d.path().join("Patients")).unwrap();
        let e = RuleSet::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("Patients") && e.contains("resource type"), "{e}");
    }

    #[test]
    fn empty_rule_and_missing_folder_are_errors() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("010_a.sql"), "-- only a comment\n").unwrap();
        let e = RuleSet::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("010_a.sql") && e.contains("no SQL"), "{e}");
        let e = RuleSet::load(&d.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope") && e.contains("--rules"), "{e}");
        assert!(RuleSet::from_setting("none").unwrap().is_empty());
    }
}
