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
    /// Where it is, for messages: a path on disk, or
    /// `builtin:<version>/<name>` for a rule of the built-in set.
    pub path: PathBuf,
    /// The resource type of its folder; None for a shared rule.
    pub resource_type: Option<&'static str>,
    pub sql: String,
    /// Its sqllogictest file (`NAME.slt` beside `NAME.sql`), if it has one.
    pub test: Option<String>,
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

/// Where a rule set came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// No rules (`none`).
    None,
    /// The set compiled into the binary (the repository's `queries/`).
    Builtin,
    /// A folder on disk.
    Folder(PathBuf),
}

/// The rules of one set.
#[derive(Debug, Clone)]
pub struct RuleSet {
    pub origin: Origin,
    /// Every rule, sorted by file name (shared first on ties), then folder.
    pub rules: Vec<Arc<Rule>>,
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet {
            origin: Origin::None,
            rules: Vec::new(),
        }
    }
}

/// What `--rules` and the `rules` settings accept to mean "no rules".
pub const NO_RULES: &str = "none";
/// What they accept to mean the built-in set (the default).
pub const BUILTIN: &str = "builtin";

/// The built-in set's files, `(path inside the folder, contents)`, sorted:
/// the rules, their tests and the analysts' guide (see `build.rs`).
pub const BUILTIN_FILES: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/builtin_rules.rs"));

/// How reports and `import_jobs.rule_set` name the built-in set.
pub fn builtin_name() -> String {
    format!("{BUILTIN}:{}", env!("CARGO_PKG_VERSION"))
}

/// A file of a rule set, read from disk or from the binary.
struct SourceFile {
    /// `/`-separated, inside the set: `010_a.sql`, `Observation/020_b.sql`.
    name: String,
    /// For messages.
    path: PathBuf,
    text: String,
}

impl RuleSet {
    /// Loads the folder `dir`. A file that cannot be read, a folder that is
    /// not a resource type or an empty rule is an error naming it.
    pub fn load(dir: &Path) -> Result<RuleSet> {
        let read_dir = |dir: &Path| -> Result<Vec<PathBuf>> {
            let entries = std::fs::read_dir(dir).map_err(|e| {
                rule_error(
                    dir,
                    format!("cannot read the rules folder ({e}); pass --rules DIR, --rules builtin or --rules none (or set [curate] rules)"),
                )
            })?;
            let mut paths = Vec::new();
            for entry in entries {
                paths.push(entry.map_err(|e| rule_error(dir, e.to_string()))?.path());
            }
            Ok(paths)
        };
        let read = |path: PathBuf, name: String| -> Result<SourceFile> {
            let text =
                std::fs::read_to_string(&path).map_err(|e| rule_error(&path, e.to_string()))?;
            Ok(SourceFile { name, path, text })
        };
        let is_rule_or_test = |p: &Path| p.extension().is_some_and(|x| x == "sql" || x == "slt");
        let mut files = Vec::new();
        for path in read_dir(dir)? {
            let file_name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            if path.is_dir() {
                if file_name == crate::views::VIEWS_FOLDER {
                    // ViewDefinitions (see `views`), not rules.
                    continue;
                }
                if !fhirflow_fhir::RESOURCE_TYPES.contains(&file_name.as_str()) {
                    return Err(not_a_type_folder(&path));
                }
                for inner in read_dir(&path)? {
                    if is_rule_or_test(&inner) {
                        let name = format!(
                            "{file_name}/{}",
                            inner.file_name().unwrap().to_string_lossy()
                        );
                        files.push(read(inner, name)?);
                    }
                }
            } else if is_rule_or_test(&path) {
                files.push(read(path, file_name)?);
            }
        }
        Self::from_files(Origin::Folder(dir.to_path_buf()), files)
    }

    /// The set compiled into the binary.
    pub fn builtin() -> Result<RuleSet> {
        let files = BUILTIN_FILES
            .iter()
            .map(|(name, text)| SourceFile {
                name: name.to_string(),
                path: PathBuf::from(format!("{}/{name}", builtin_name())),
                text: text.to_string(),
            })
            .collect();
        Self::from_files(Origin::Builtin, files)
    }

    /// The rules among `files` (`.sql` at the top or one type folder deep),
    /// each with its `.slt` test when there is one.
    fn from_files(origin: Origin, files: Vec<SourceFile>) -> Result<RuleSet> {
        let tests: std::collections::HashMap<&str, &str> = files
            .iter()
            .filter_map(|f| Some((f.name.strip_suffix(".slt")?, f.text.as_str())))
            .collect();
        let mut rules = Vec::new();
        for f in &files {
            let resource_type = match f.name.split_once('/') {
                Some((folder, _)) if folder == crate::views::VIEWS_FOLDER => continue,
                None => None,
                Some((folder, _)) => {
                    match fhirflow_fhir::RESOURCE_TYPES.iter().find(|t| **t == folder) {
                        Some(ty) => Some(*ty),
                        None => return Err(not_a_type_folder(f.path.parent().unwrap_or(&f.path))),
                    }
                }
            };
            let Some(stem) = f.name.strip_suffix(".sql") else {
                continue;
            };
            if f.text.lines().all(|l| {
                let l = l.trim();
                l.is_empty() || l.starts_with("--")
            }) {
                return Err(rule_error(&f.path, "the file has no SQL".into()));
            }
            rules.push(Arc::new(Rule {
                name: f.name.clone(),
                path: f.path.clone(),
                resource_type,
                sql: f.text.clone(),
                test: tests.get(stem).map(|t| t.to_string()),
            }));
        }
        rules.sort_by(|a, b| {
            (a.file_name(), a.resource_type.is_some(), &a.name).cmp(&(
                b.file_name(),
                b.resource_type.is_some(),
                &b.name,
            ))
        });
        Ok(RuleSet { origin, rules })
    }

    /// The set a `rules` setting names: `builtin`, `none` or a folder.
    pub fn from_setting(setting: &str) -> Result<RuleSet> {
        match setting {
            NO_RULES | "" => Ok(RuleSet::default()),
            BUILTIN => RuleSet::builtin(),
            dir => RuleSet::load(Path::new(dir)),
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

    /// The set's name, as `import_jobs.rule_set` records it: the folder's
    /// path, `builtin:<version>` or `none`.
    pub fn name(&self) -> String {
        match &self.origin {
            Origin::None => NO_RULES.into(),
            Origin::Builtin => builtin_name(),
            Origin::Folder(d) => d.display().to_string(),
        }
    }

    /// A short description for reports: the name and rule count.
    pub fn describe(&self) -> String {
        match self.origin {
            Origin::None => self.name(),
            _ => format!("{} ({} rules)", self.name(), self.rules.len()),
        }
    }
}

/// Writes the built-in set's files into `dir` (created if missing) for
/// editing; refuses to overwrite a file that is there. Returns the paths
/// written.
pub fn export_builtin(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |path: &Path, e: std::io::Error| rule_error(path, e.to_string());
    let mut written = Vec::new();
    for (name, text) in BUILTIN_FILES {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    rule_error(&path, "the file exists; export into an empty folder".into())
                }
                _ => io(&path, e),
            })?;
        std::io::Write::write_all(&mut file, text.as_bytes()).map_err(|e| io(&path, e))?;
        written.push(path);
    }
    Ok(written)
}

fn not_a_type_folder(path: &Path) -> Error {
    rule_error(
        path,
        "a folder of rules must be named after a FHIR R4 resource type (e.g. Observation)".into(),
    )
}

fn rule_error(path: &Path, message: String) -> Error {
    Error::Rule {
        file: path.display().to_string(),
        message,
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

    #[test]
    fn the_builtin_set_is_the_repository_folder_with_its_tests() {
        let builtin = RuleSet::from_setting(BUILTIN).unwrap();
        let folder =
            RuleSet::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../queries")).unwrap();
        assert!(!builtin.is_empty());
        assert_eq!(builtin.rules.len(), folder.rules.len());
        for (b, f) in builtin.rules.iter().zip(&folder.rules) {
            assert_eq!((&b.name, &b.sql, &b.test), (&f.name, &f.sql, &f.test));
            assert!(b.test.is_some(), "{} has a test", b.name);
        }
        assert_eq!(
            builtin.name(),
            format!("builtin:{}", env!("CARGO_PKG_VERSION"))
        );
        assert!(builtin.rules[0].path.starts_with(builtin.name()));
    }
}
