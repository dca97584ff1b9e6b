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
    pub extract: ExtractSettings,
    pub import: ImportSettings,
    pub healthlake: HealthLakeSettings,
    pub glue: GlueSettings,
    pub s3: S3Settings,
    pub lease: LeaseSettings,
    pub sql: SqlSettings,
    pub fleet: FleetSettings,
}

/// `[fleet]`: how `fhirflow plan` sizes the units `fhirflow work` runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FleetSettings {
    /// A curate unit whose raw bytes are at most this many MiB is marked
    /// `lambda` (Lambda allows 15 minutes and 10 GB of memory); a larger
    /// one `batch`.
    pub lambda_max_mb: u64,
    /// The tenants file (a local path or a URL such as `s3://bucket/key`):
    /// which tenants and source systems `plan` extracts, from where, how
    /// often. Without one, `plan` lists no extract units.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenants: Option<String>,
}

impl Default for FleetSettings {
    fn default() -> Self {
        FleetSettings {
            lambda_max_mb: 1024,
            tenants: None,
        }
    }
}

/// `[sql]`: what every `fhirflow sql` session registers besides the layers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SqlSettings {
    /// The SQL-on-FHIR ViewDefinitions registered as `view.<name>`:
    /// `builtin` (the set in the binary), `none`, or a folder of `*.json`.
    pub views: String,
}

impl Default for SqlSettings {
    fn default() -> Self {
        SqlSettings {
            views: crate::rules::BUILTIN.into(),
        }
    }
}

/// `[lease]`: the partition lease every writing stage holds (see `commit::lease`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseSettings {
    /// How long a lease stays valid without renewal: a crashed holder's lease
    /// can be taken over this long after its last renewal. A live holder
    /// renews it every third of this.
    pub ttl_seconds: u64,
    /// How long a run waits for a busy partition before it gives up with exit
    /// code 4 (`--wait` overrides it; 0: do not wait).
    pub wait_seconds: u64,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            ttl_seconds: 60,
            wait_seconds: 0,
        }
    }
}

/// Where `fhirflow import` (and `run`) sends a curated partition.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ImportTarget {
    /// The local Iceberg lake (the embedded stand-in for HealthLake).
    #[default]
    Local,
    /// AWS HealthLake, through StartFHIRImportJob.
    Healthlake,
}

/// `[import]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ImportSettings {
    /// The default target (`--target` overrides it).
    pub target: ImportTarget,
}

/// `[healthlake]`: the import into AWS HealthLake.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthLakeSettings {
    /// Tenant GUID → datastore id: a tenant's data only ever goes to its own
    /// datastore.
    pub datastores: std::collections::BTreeMap<String, String>,
    /// The IAM role HealthLake assumes to read the input and write the output.
    pub data_access_role_arn: String,
    /// Where HealthLake writes each job's output manifest and failure files
    /// (`s3://bucket/prefix`).
    pub output_s3_uri: String,
    /// The KMS key for the output.
    pub kms_key_id: String,
    /// `strict`, `structure-only` or `minimal` (HealthLake's own validation).
    pub validation_level: String,
    /// The service endpoint (default: the region's); for tests and VPC endpoints.
    pub endpoint: Option<String>,
    /// The region (default: `s3.region`, then the standard AWS chain).
    pub region: Option<String>,
    /// DescribeFHIRImportJob polling: the first wait, doubled up to the max.
    pub poll_initial_seconds: f64,
    pub poll_max_seconds: f64,
    /// Give up waiting (the job goes on; `fhirflow import status` looks later).
    pub max_wait_seconds: u64,
    /// Attempts of one call that HealthLake throttles or fails with a 5xx.
    pub max_attempts: u32,
}

/// `[glue]`: the AWS Glue Data Catalog that `fhirflow catalog sync` keeps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GlueSettings {
    /// The environment: the metadata database is `fhir_import_metadata_<env>`
    /// (`--env` overrides it).
    pub env: String,
    /// The service endpoint (default: the region's).
    pub endpoint: Option<String>,
    /// The region (default: `s3.region`, then the standard AWS chain).
    pub region: Option<String>,
    /// The Data Catalog id (default: the caller's account).
    pub catalog_id: Option<String>,
}

/// The extract stage: the Bulk Data client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExtractSettings {
    /// The FHIR server's base URL (`--fhir-url` overrides it).
    pub fhir_url: Option<String>,
    /// The kick-off request: `get` (parameters in the query) or `post` (a
    /// Parameters resource).
    pub kickoff_method: KickoffMethod,
    /// Output files downloaded at once.
    pub parallel_downloads: usize,
    /// Retries of one request (kick-off, a poll, a file) after a 429, a 5xx
    /// or a broken connection.
    pub retries: u32,
    /// The first backoff between retries, doubled each time up to
    /// `backoff_max_seconds` (with jitter).
    pub backoff_initial_ms: u64,
    pub backoff_max_seconds: u64,
    /// Wait between status polls when the server sends no Retry-After.
    pub poll_interval_seconds: u64,
    /// A server's Retry-After is honoured up to this many seconds.
    pub max_retry_after_seconds: u64,
    /// Give up on an export that is still in progress after this long.
    pub max_export_wait_seconds: u64,
    /// A request (or a file's body) that sends nothing for this long is a
    /// broken connection.
    pub timeout_seconds: u64,
    /// DELETE the status URL once every file is downloaded.
    pub delete_when_done: bool,
    /// A static bearer token (the simple alternative to `smart`); better
    /// given as FHIRFLOW_BEARER_TOKEN or in `bearer_token_file`.
    pub bearer_token: Option<String>,
    /// A file holding the static bearer token (its content, trimmed);
    /// `--bearer-token-file` overrides it.
    pub bearer_token_file: Option<PathBuf>,
    /// Hosts besides the FHIR server's own origin that the client may follow
    /// a manifest's file URL, a `Content-Location` or a redirect to:
    /// `host` (any port) or `host:port` (`[::1]:8443` for IPv6).
    /// Link-local and instance-metadata addresses are refused regardless.
    pub allowed_hosts: Vec<String>,
    /// Plain `http` to hosts that are not loopback (default: https only,
    /// except on 127.0.0.0/8, ::1 and localhost).
    pub allow_http: bool,
    /// SMART Backend Services authorization.
    pub smart: Option<SmartSettings>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KickoffMethod {
    #[default]
    Get,
    Post,
}

/// `[extract.smart]`: a registered backend client and its private key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SmartSettings {
    pub client_id: String,
    /// A PEM file (PKCS#8, or PKCS#1 for RSA) or a JWK (JSON) file holding
    /// an RSA key (signs RS384) or a P-384 key (signs ES384).
    pub private_key: PathBuf,
    /// The `kid` of the key as registered with the server (default: the
    /// JWK's own `kid`).
    pub kid: Option<String>,
    /// The token endpoint (default: from `.well-known/smart-configuration`).
    pub token_url: Option<String>,
    pub scope: String,
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
    /// Files (or pieces of files) processed at once (default: the number of
    /// cores).
    pub concurrency: usize,
    /// A plain (not gzip) raw file larger than this is read as pieces of
    /// about this size, at line boundaries, in parallel: one large file then
    /// uses every core. Each piece being read is held in memory. 0: never.
    pub range_bytes: u64,
    /// Memory for dedup, in MiB: half holds key rows (past it they spill to
    /// a temporary folder), half is the dedup query's pool (its aggregation
    /// and sort spill past it; the pool is at least 16 MiB, the room
    /// DataFusion needs to spill at all).
    pub memory_limit_mb: usize,
    /// Step 2, FHIR R4 validation: `strict` (any error rejects),
    /// `structure-only` (value-set bindings are not checked) or `off`.
    pub validation: fhirflow_fhir::Level,
    /// Step 3: `builtin` (the rule set inside the binary, the default), a
    /// rules folder (relative to the working directory), or `none`.
    pub rules: String,
    /// Other rules folders for some tenants or source systems; the most
    /// specific matching entry wins over `rules`.
    pub rules_for: Vec<RulesFor>,
    /// Values the rules read with `rule_param(name, default)`.
    pub rule_params: std::collections::BTreeMap<String, String>,
    /// Two source systems' records under one (type, id) with different
    /// content: `warn` (the loser is a duplicate, with an ID_COLLISION
    /// warning in import_errors) or `reject` (the loser is rejected with
    /// ID_COLLISION).
    pub id_collision: IdCollision,
}

/// `[curate] id_collision`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IdCollision {
    #[default]
    Warn,
    Reject,
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
            extract: ExtractSettings::default(),
            import: ImportSettings::default(),
            healthlake: HealthLakeSettings::default(),
            fleet: FleetSettings::default(),
            glue: GlueSettings::default(),
            s3: S3Settings::default(),
            lease: LeaseSettings::default(),
            sql: SqlSettings::default(),
        }
    }
}

impl Default for HealthLakeSettings {
    fn default() -> Self {
        HealthLakeSettings {
            datastores: Default::default(),
            data_access_role_arn: String::new(),
            output_s3_uri: String::new(),
            kms_key_id: String::new(),
            validation_level: "strict".into(),
            endpoint: None,
            region: None,
            poll_initial_seconds: 5.0,
            poll_max_seconds: 60.0,
            max_wait_seconds: 6 * 3600,
            max_attempts: 8,
        }
    }
}

impl Default for GlueSettings {
    fn default() -> Self {
        GlueSettings {
            env: "dev".into(),
            endpoint: None,
            region: None,
            catalog_id: None,
        }
    }
}

impl Default for SmartSettings {
    fn default() -> Self {
        SmartSettings {
            client_id: String::new(),
            private_key: PathBuf::new(),
            kid: None,
            token_url: None,
            scope: "system/*.read".into(),
        }
    }
}

impl Default for ExtractSettings {
    fn default() -> Self {
        ExtractSettings {
            fhir_url: None,
            kickoff_method: KickoffMethod::Get,
            parallel_downloads: 4,
            retries: 5,
            backoff_initial_ms: 500,
            backoff_max_seconds: 30,
            poll_interval_seconds: 5,
            max_retry_after_seconds: 300,
            max_export_wait_seconds: 24 * 3600,
            timeout_seconds: 120,
            delete_when_done: true,
            bearer_token: None,
            bearer_token_file: None,
            allowed_hosts: Vec::new(),
            allow_http: false,
            smart: None,
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
            range_bytes: 64 << 20,
            memory_limit_mb: 512,
            validation: fhirflow_fhir::Level::Strict,
            rules: crate::rules::BUILTIN.into(),
            rules_for: Vec::new(),
            rule_params: Default::default(),
            id_collision: IdCollision::Warn,
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
    pub fhir_url: Option<String>,
    /// The static bearer token, from FHIRFLOW_BEARER_TOKEN (never a flag).
    pub bearer_token: Option<String>,
    pub bearer_token_file: Option<PathBuf>,
    pub smart_client_id: Option<String>,
    pub smart_private_key: Option<PathBuf>,
    pub smart_token_url: Option<String>,
    pub import_target: Option<ImportTarget>,
    pub glue_env: Option<String>,
    pub lease_wait_seconds: Option<u64>,
    pub lease_ttl_seconds: Option<u64>,
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
        let base = match &path {
            Some(p) => Self::from_file(p)?,
            None => Settings::default(),
        };
        Self::resolve_from(base, overrides)
    }

    /// Applies `overrides` to settings read already (a config file fetched
    /// from a URL).
    pub fn resolve_from(base: Settings, overrides: &Overrides) -> Result<Settings> {
        let mut s = base;
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
        set!(extract.fhir_url <- o.fhir_url.map(Some));
        // A token given here replaces the config file's, in either form.
        match (o.bearer_token, o.bearer_token_file) {
            (None, None) => {}
            (token, file) => {
                s.extract.bearer_token = token;
                s.extract.bearer_token_file = file;
            }
        }
        if o.smart_client_id.is_some() || o.smart_private_key.is_some() {
            let smart = s.extract.smart.get_or_insert_with(SmartSettings::default);
            if let Some(id) = o.smart_client_id {
                smart.client_id = id;
            }
            if let Some(key) = o.smart_private_key {
                smart.private_key = key;
            }
        }
        if let (Some(url), Some(smart)) = (o.smart_token_url, s.extract.smart.as_mut()) {
            smart.token_url = Some(url);
        }
        set!(import.target <- o.import_target);
        set!(glue.env <- o.glue_env);
        set!(lease.wait_seconds <- o.lease_wait_seconds);
        set!(lease.ttl_seconds <- o.lease_ttl_seconds);
        s.check()?;
        Ok(s)
    }

    pub fn from_file(path: &FsPath) -> Result<Settings> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        Self::from_text(&text, path)
    }

    /// Parses a config file's text; `origin` names it in errors.
    pub fn from_text(text: &str, origin: &FsPath) -> Result<Settings> {
        toml::from_str(text).map_err(|e| Error::ConfigFile {
            path: origin.to_path_buf(),
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
            ("lease.ttl_seconds", self.lease.ttl_seconds),
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
        let x = &self.extract;
        for (name, v) in [
            ("extract.parallel_downloads", x.parallel_downloads as u64),
            ("extract.timeout_seconds", x.timeout_seconds),
        ] {
            if v == 0 {
                return Err(Error::Config(format!("{name} must be greater than 0")));
            }
        }
        if x.bearer_token.is_some() && x.bearer_token_file.is_some() {
            return Err(Error::Config(
                "extract: give the bearer token (FHIRFLOW_BEARER_TOKEN, bearer_token) or a \
                 file holding it (--bearer-token-file, bearer_token_file), not both"
                    .into(),
            ));
        }
        for h in &x.allowed_hosts {
            crate::extract::http::AllowedHost::parse(h)
                .map_err(|why| Error::Config(format!("extract.allowed_hosts: {h:?}: {why}")))?;
        }
        if let Some(smart) = &x.smart {
            if smart.client_id.is_empty() || smart.private_key.as_os_str().is_empty() {
                return Err(Error::Config(
                    "extract.smart needs both client_id and private_key".into(),
                ));
            }
        }
        if !self
            .glue
            .env
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            || self.glue.env.is_empty()
        {
            return Err(Error::Config(format!(
                "glue.env {:?} must be [a-z0-9_]+ (it names a Glue database)",
                self.glue.env
            )));
        }
        if !["strict", "structure-only", "minimal"]
            .contains(&self.healthlake.validation_level.as_str())
        {
            return Err(Error::Config(format!(
                "healthlake.validation_level {:?} must be strict, structure-only or minimal",
                self.healthlake.validation_level
            )));
        }
        for tenant in self.healthlake.datastores.keys() {
            tenant
                .parse::<crate::layout::TenantGuid>()
                .map_err(|e| Error::Config(format!("healthlake.datastores: {e}")))?;
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
        mask(&mut s.extract.bearer_token);
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
    fn extract_token_sources_and_allowed_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(
            &path,
            "[extract]\nbearer_token = \"from-file\"\nallowed_hosts = [\"files.example:8443\"]\n",
        )
        .unwrap();
        // A token file on the command line replaces the config file's token.
        let o = Overrides {
            bearer_token_file: Some("t.txt".into()),
            ..Default::default()
        };
        let s = Settings::resolve(Some(&path), &o).unwrap();
        assert_eq!(s.extract.bearer_token, None);
        assert_eq!(s.extract.bearer_token_file, Some("t.txt".into()));
        // Both at once is ambiguous.
        let o = Overrides {
            bearer_token: Some("env".into()),
            bearer_token_file: Some("t.txt".into()),
            ..Default::default()
        };
        let err = Settings::resolve(Some(&path), &o).unwrap_err().to_string();
        assert!(err.contains("not both"), "{err}");
        std::fs::write(
            &path,
            "[extract]\nallowed_hosts = [\"https://files.example\"]\n",
        )
        .unwrap();
        let err = Settings::resolve(Some(&path), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("extract.allowed_hosts"), "{err}");
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
