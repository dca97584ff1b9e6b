//! Settings: `fhirflow.toml`, then `FHIRFLOW_*` environment variables, then
//! flags, resolved once into one [`Settings`] value that `fhirflow config`
//! prints (secrets masked).
//!
//! The config file is strict: an unknown key is an error naming the file, so
//! a typo never silently falls back to a default.

use std::path::{Path as FsPath, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Everything a command needs to know, from every source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The root of every layer unless a layer root is set: a folder or an
    /// object_store URL (`file:///…`, `s3://bucket/prefix`, `memory://`).
    pub lake: String,
    /// Root of the raw layer (default: `lake`).
    pub raw_root: Option<String>,
    /// Root of the curated layer (default: `lake`).
    pub curated_root: Option<String>,
    /// Root of the metadata layer (default: `lake`).
    pub metadata_root: Option<String>,
    /// The `system` of the tenant label in `meta.security`.
    pub tenant_label_system: String,
    pub curate: CurateSettings,
    pub s3: S3Settings,
}

/// Limits and sizes of the curate stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CurateSettings {
    /// A longer line is rejected (LINE_TOO_LONG) without being held in memory.
    pub max_line_bytes: usize,
    /// Deeper JSON nesting is rejected (TOO_DEEP).
    pub max_depth: usize,
    /// A curated file is split into numbered parts above this size. The
    /// default, 1 GiB, stays well under HealthLake's per-file import limit.
    pub part_max_bytes: u64,
    /// How much of a rejected record `import_errors.record` keeps (0: none).
    pub error_record_max_bytes: usize,
    /// Rows per Arrow batch.
    pub batch_rows: usize,
    /// Files processed at once (default: the number of cores).
    pub concurrency: usize,
    /// Memory DataFusion may use for the dedup query before it spills, in MiB.
    pub memory_limit_mb: usize,
    /// Step 2, FHIR R4 validation: `strict` (any error rejects),
    /// `structure-only` (value-set bindings are not checked) or `off`.
    pub validation: fhirflow_fhir::Level,
    /// Step 3: the rules folder (relative to the working directory), or
    /// `none`.
    pub rules: String,
    /// Other rules folders for some tenants or source systems; the most
    /// specific matching entry wins over `rules`.
    pub rules_for: Vec<RulesFor>,
    /// Values the rules read with `rule_param(name, default)`.
    pub rule_params: std::collections::BTreeMap<String, String>,
}

/// `[[curate.rules_for]]`: a rules folder for one tenant, one source system,
/// or both.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RulesFor {
    pub tenant: Option<String>,
    pub source_system: Option<String>,
    pub rules: String,
}

/// S3 (and S3-compatible) access. Credentials otherwise come from the
/// standard AWS chain (environment, profile, instance role).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub allow_http: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            lake: "./lake".into(),
            raw_root: None,
            curated_root: None,
            metadata_root: None,
            tenant_label_system: fhirflow_udfs::tenant_label::DEFAULT_TENANT_SYSTEM.into(),
            curate: CurateSettings::default(),
            s3: S3Settings::default(),
        }
    }
}

impl Default for CurateSettings {
    fn default() -> Self {
        CurateSettings {
            max_line_bytes: 64 << 20,
            max_depth: 128,
            part_max_bytes: 1 << 30,
            error_record_max_bytes: 4096,
            batch_rows: 8192,
            concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            memory_limit_mb: 512,
            validation: fhirflow_fhir::Level::Strict,
            rules: "queries".into(),
            rules_for: Vec::new(),
            rule_params: Default::default(),
        }
    }
}

/// Values given on the command line or in the environment; each overrides the
/// config file when set.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub lake: Option<String>,
    pub raw_root: Option<String>,
    pub curated_root: Option<String>,
    pub metadata_root: Option<String>,
    pub tenant_label_system: Option<String>,
    pub max_line_bytes: Option<usize>,
    pub max_depth: Option<usize>,
    pub part_max_bytes: Option<u64>,
    pub concurrency: Option<usize>,
    pub validation: Option<fhirflow_fhir::Level>,
    /// A rules folder for every file of the run (`rules_for` is then not
    /// used), or `none`.
    pub rules: Option<String>,
    /// `name=value` pairs for `rule_param`, over the config file's.
    pub rule_params: Vec<(String, String)>,
}

impl Settings {
    /// Reads `config` (or `./fhirflow.toml` when present) and applies
    /// `overrides`.
    pub fn resolve(config: Option<&FsPath>, overrides: &Overrides) -> Result<Settings> {
        let default_path = PathBuf::from("fhirflow.toml");
        let path = match config {
            Some(p) => Some(p.to_path_buf()),
            None if default_path.is_file() => Some(default_path),
            None => None,
        };
        let mut s = match &path {
            Some(p) => Self::from_file(p)?,
            None => Settings::default(),
        };
        let o = overrides.clone();
        macro_rules! set {
            ($($field:ident).+ <- $value:expr) => {
                if let Some(v) = $value {
                    s.$($field).+ = v;
                }
            };
        }
        set!(lake <- o.lake);
        set!(raw_root <- o.raw_root.map(Some));
        set!(curated_root <- o.curated_root.map(Some));
        set!(metadata_root <- o.metadata_root.map(Some));
        set!(tenant_label_system <- o.tenant_label_system);
        set!(curate.max_line_bytes <- o.max_line_bytes);
        set!(curate.max_depth <- o.max_depth);
        set!(curate.part_max_bytes <- o.part_max_bytes);
        set!(curate.concurrency <- o.concurrency);
        set!(curate.validation <- o.validation);
        if let Some(r) = o.rules {
            s.curate.rules = r;
            s.curate.rules_for.clear();
        }
        s.curate.rule_params.extend(o.rule_params);
        s.check()?;
        Ok(s)
    }

    pub fn from_file(path: &FsPath) -> Result<Settings> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        toml::from_str(&text).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    fn check(&self) -> Result<()> {
        let c = &self.curate;
        let positive = [
            ("curate.max_line_bytes", c.max_line_bytes as u64),
            ("curate.max_depth", c.max_depth as u64),
            ("curate.part_max_bytes", c.part_max_bytes),
            ("curate.batch_rows", c.batch_rows as u64),
            ("curate.concurrency", c.concurrency as u64),
            ("curate.memory_limit_mb", c.memory_limit_mb as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::Config(format!("{name} must be greater than 0")));
            }
        }
        for o in &c.rules_for {
            if o.tenant.is_none() && o.source_system.is_none() {
                return Err(Error::Config(format!(
                    "curate.rules_for entry for {:?} names neither a tenant nor a source_system",
                    o.rules
                )));
            }
        }
        if self.tenant_label_system.is_empty() {
            return Err(Error::Config(
                "tenant_label_system must not be empty".into(),
            ));
        }
        Ok(())
    }

    /// The settings as TOML, with secrets replaced by `****`.
    pub fn to_masked_toml(&self) -> String {
        let mut s = self.clone();
        let mask = |v: &mut Option<String>| {
            if v.is_some() {
                *v = Some("****".into());
            }
        };
        mask(&mut s.s3.access_key_id);
        mask(&mut s.s3.secret_access_key);
        mask(&mut s.s3.session_token);
        toml::to_string_pretty(&s).expect("settings serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_overrides_and_masking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(
            &path,
            "lake = \"s3://b/p\"\n[curate]\nmax_depth = 7\nvalidation = \"structure-only\"\n[s3]\nsecret_access_key = \"hunter2\"\n",
        )
        .unwrap();
        let o = Overrides {
            max_depth: Some(9),
            ..Default::default()
        };
        let s = Settings::resolve(Some(&path), &o).unwrap();
        assert_eq!(s.lake, "s3://b/p");
        assert_eq!(s.curate.max_depth, 9);
        assert_eq!(s.curate.validation, fhirflow_fhir::Level::StructureOnly);
        let shown = s.to_masked_toml();
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("****"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, "lak = \"x\"\n").unwrap();
        let err = Settings::resolve(Some(&path), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("f.toml"), "{err}");
    }
}
