//! The storage layout (DESIGN.md, "Storage layout"): the only place that turns
//! partition values into object paths, and the only place that reads them back.
//!
//! ```text
//! raw/tenantGuid=<guid>/source_system=<system>/import_date=<YYYY-MM-DD>/<Type>[.NNN].ndjson[.gz]
//! raw/…/import_date=<YYYY-MM-DD>/_landed/<raw file name>.json   (the claim of a raw name)
//! raw/…/import_date=<YYYY-MM-DD>/_export/<run_id>/...           (an export's manifest, error and deleted files)
//! curated/tenantGuid=<guid>/import_date=<YYYY-MM-DD>/<Type>-processed[.NNN].ndjson
//! metadata/<table>/tenantGuid=<guid>/import_date=<YYYY-MM-DD>/<run_id>.parquet
//! metadata/_commits/tenantGuid=<guid>/import_date=<YYYY-MM-DD>/<sequence>.json
//! metadata/_leases/tenantGuid=<guid>/{import_date=<date>|source_system=<system>|imports}/<generation>.json
//! curated/_runs/tenantGuid=<guid>/import_date=<date>/<run_id>/...  (immutable parts; commits list them)
//! ```
//!
//! Partition values are validated types: nothing a source sends can choose
//! where data is written.

use std::fmt;
use std::str::FromStr;

use chrono::NaiveDate;
use object_store::path::Path;

use crate::error::Error;
use crate::fhir;

/// A tenant id: a GUID, kept in lower-case hyphenated form so that one tenant
/// has exactly one path and one label code.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantGuid(String);

impl FromStr for TenantGuid {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |reason| Error::InvalidPartition {
            what: "tenant GUID",
            value: s.to_string(),
            reason,
        };
        let b = s.as_bytes();
        if b.len() != 36 {
            return Err(bad(
                "expected 36 characters like 0f8fad5b-d9cb-469f-a165-70867728950e",
            ));
        }
        for (i, c) in b.iter().enumerate() {
            let ok = if matches!(i, 8 | 13 | 18 | 23) {
                *c == b'-'
            } else {
                c.is_ascii_hexdigit()
            };
            if !ok {
                return Err(bad("expected hex digits in groups 8-4-4-4-12"));
            }
        }
        Ok(TenantGuid(s.to_ascii_lowercase()))
    }
}

/// A source system name: `[A-Za-z0-9_-]{1,64}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceSystem(String);

impl FromStr for SourceSystem {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
        if ok {
            Ok(SourceSystem(s.to_string()))
        } else {
            Err(Error::InvalidPartition {
                what: "source system",
                value: s.to_string(),
                reason: "expected 1 to 64 of A-Z a-z 0-9 _ -",
            })
        }
    }
}

/// An import date, `YYYY-MM-DD`, a real calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImportDate(pub NaiveDate);

impl FromStr for ImportDate {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let well_formed = s.len() == 10
            && s.bytes().enumerate().all(|(i, c)| {
                if i == 4 || i == 7 {
                    c == b'-'
                } else {
                    c.is_ascii_digit()
                }
            });
        match NaiveDate::parse_from_str(s, "%Y-%m-%d") {
            Ok(d) if well_formed => Ok(ImportDate(d)),
            _ => Err(Error::InvalidPartition {
                what: "import date",
                value: s.to_string(),
                reason: "expected a real date as YYYY-MM-DD",
            }),
        }
    }
}

impl ImportDate {
    pub fn today() -> Self {
        ImportDate(chrono::Utc::now().date_naive())
    }
    /// Days since 1970-01-01, Arrow's Date32.
    pub fn days_since_epoch(self) -> i32 {
        (self.0 - NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days() as i32
    }
    /// The date `days` after 1970-01-01 (None outside chrono's range).
    pub fn from_days_since_epoch(days: i32) -> Option<Self> {
        NaiveDate::from_ymd_opt(1970, 1, 1)?
            .checked_add_signed(chrono::Duration::days(days.into()))
            .map(ImportDate)
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl $t {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
    )*};
}
display_as_str!(TenantGuid, SourceSystem);

impl fmt::Display for ImportDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.format("%Y-%m-%d"))
    }
}

/// A raw file name: `<Type>.ndjson`, `<Type>.<NNN>.ndjson`, optionally `.gz`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RawFileName {
    pub resource_type: &'static str,
    name: String,
}

impl RawFileName {
    pub fn parse(name: &str) -> Option<Self> {
        let stem = name.strip_suffix(".gz").unwrap_or(name);
        let stem = stem.strip_suffix(".ndjson")?;
        let ty = match stem.split_once('.') {
            Some((ty, seq)) if !seq.is_empty() && seq.bytes().all(|c| c.is_ascii_digit()) => ty,
            Some(_) => return None,
            None => stem,
        };
        let resource_type = fhir::resource_type(ty)?;
        Some(RawFileName {
            resource_type,
            name: name.to_string(),
        })
    }
    pub fn is_gzip(&self) -> bool {
        self.name.ends_with(".gz")
    }
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The part number the name carries: 7 for `Patient.007.ndjson`, None for
    /// `Patient.ndjson` (or digits too long for a number).
    pub fn part(&self) -> Option<u64> {
        let stem = self.name.strip_suffix(".gz").unwrap_or(&self.name);
        let stem = stem.strip_suffix(".ndjson")?;
        stem.split_once('.')?.1.parse().ok()
    }

    /// The same type and compression as part `n`: `<Type>.<NNN>.ndjson[.gz]`.
    pub fn with_part(&self, n: u64) -> RawFileName {
        let gz = if self.is_gzip() { ".gz" } else { "" };
        RawFileName {
            resource_type: self.resource_type,
            name: format!("{}.{n:03}.ndjson{gz}", self.resource_type),
        }
    }

    /// The name with `.gz` added (a download the server sent as gzip).
    pub fn with_gzip(&self) -> RawFileName {
        if self.is_gzip() {
            return self.clone();
        }
        RawFileName {
            resource_type: self.resource_type,
            name: format!("{}.gz", self.name),
        }
    }
}

/// The folder of a raw partition that holds its name claims (see
/// `raw::landing`). Not a `key=value` segment, so `parse_partition` never
/// takes a claim for data.
const LANDED_DIR: &str = "_landed";

/// What an object directly in, or in the claims folder of, a raw partition is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawEntry {
    /// A data file.
    File(RawFileName),
    /// The claim of a data file's name.
    Claim(RawFileName),
}

/// The resource type of a curated file name, `<Type>-processed[.NNN].ndjson`.
pub fn curated_file_type(name: &str) -> Option<&'static str> {
    let (ty, rest) = name.split_once("-processed")?;
    let ok = rest == ".ndjson"
        || rest
            .strip_prefix('.')
            .and_then(|r| r.strip_suffix(".ndjson"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()));
    ok.then(|| fhir::resource_type(ty)).flatten()
}

/// The three layers, each under its own root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Raw,
    Curated,
    Metadata,
}

impl Layer {
    pub fn dir(self) -> &'static str {
        match self {
            Layer::Raw => "raw",
            Layer::Curated => "curated",
            Layer::Metadata => "metadata",
        }
    }
}

/// The metadata tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataTable {
    ImportJobs,
    ImportErrors,
    ImportMetrics,
}

impl MetadataTable {
    pub const ALL: [MetadataTable; 3] = [
        MetadataTable::ImportJobs,
        MetadataTable::ImportErrors,
        MetadataTable::ImportMetrics,
    ];
    pub fn name(self) -> &'static str {
        match self {
            MetadataTable::ImportJobs => "import_jobs",
            MetadataTable::ImportErrors => "import_errors",
            MetadataTable::ImportMetrics => "import_metrics",
        }
    }
}

fn tenant_seg(t: &TenantGuid) -> String {
    format!("tenantGuid={t}")
}
fn system_seg(s: &SourceSystem) -> String {
    format!("source_system={s}")
}
fn date_seg(d: ImportDate) -> String {
    format!("import_date={d}")
}

/// Builds every object path from a layer root's prefix.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The prefix inside the store under which the layer directory lives.
    pub prefix: Path,
}

impl Paths {
    pub fn new(prefix: Path) -> Self {
        Paths { prefix }
    }

    fn join<'a>(&self, parts: impl IntoIterator<Item = &'a str>) -> Path {
        let mut p = self.prefix.clone();
        for part in parts {
            p = p.join(part);
        }
        p
    }

    /// An object directly under the root (a file a setting names by URL).
    pub fn file(&self, name: &str) -> Path {
        self.join([name])
    }

    pub fn layer(&self, layer: Layer) -> Path {
        self.join([layer.dir()])
    }

    pub fn raw_tenant(&self, t: &TenantGuid) -> Path {
        self.join(["raw", &tenant_seg(t)])
    }

    /// A (tenant, source system) folder of the raw layer: every date of it.
    pub fn raw_source(&self, t: &TenantGuid, s: &SourceSystem) -> Path {
        self.join(["raw", &tenant_seg(t), &system_seg(s)])
    }

    pub fn raw_partition(&self, t: &TenantGuid, s: &SourceSystem, d: ImportDate) -> Path {
        self.join(["raw", &tenant_seg(t), &system_seg(s), &date_seg(d)])
    }

    /// Where the extractor keeps its state for a (tenant, source system):
    /// `raw/tenantGuid=…/source_system=…/_extract/<name>` (not a partition,
    /// so no reader takes it for data).
    pub fn extract_state(&self, t: &TenantGuid, s: &SourceSystem, name: &str) -> Path {
        self.join(["raw", &tenant_seg(t), &system_seg(s), "_extract", name])
    }

    /// An export's own files kept beside the raw data: the manifest, the
    /// `error` and `deleted` files, under `<raw partition>/_export/`.
    pub fn export_file(&self, t: &TenantGuid, s: &SourceSystem, d: ImportDate, rel: &str) -> Path {
        let mut p = self.raw_partition(t, s, d).join("_export");
        for part in rel.split('/') {
            p = p.join(part);
        }
        p
    }

    pub fn raw_file(
        &self,
        t: &TenantGuid,
        s: &SourceSystem,
        d: ImportDate,
        f: &RawFileName,
    ) -> Path {
        self.raw_partition(t, s, d).join(f.as_str())
    }

    /// The folder of a raw partition's name claims:
    /// `raw/tenantGuid=…/source_system=…/import_date=…/_landed/`.
    pub fn raw_claims(&self, t: &TenantGuid, s: &SourceSystem, d: ImportDate) -> Path {
        self.raw_partition(t, s, d).join(LANDED_DIR)
    }

    /// The claim of raw file name `f`: `_landed/<name>.json`, created before
    /// the data so that two landings never choose the same name.
    pub fn raw_claim(
        &self,
        t: &TenantGuid,
        s: &SourceSystem,
        d: ImportDate,
        f: &RawFileName,
    ) -> Path {
        self.raw_claims(t, s, d)
            .join(format!("{}.json", f.as_str()))
    }

    /// An export's own file (manifest, `error/…`, `deleted/…`) under
    /// `_export/<run_id>/`: one folder per extraction, so a second export of
    /// the same day never replaces the first one's files.
    pub fn export_run_file(
        &self,
        t: &TenantGuid,
        s: &SourceSystem,
        d: ImportDate,
        run: &str,
        rel: &str,
    ) -> Path {
        self.export_file(t, s, d, &format!("{run}/{rel}"))
    }

    pub fn curated_partition(&self, t: &TenantGuid, d: ImportDate) -> Path {
        self.join(["curated", &tenant_seg(t), &date_seg(d)])
    }

    /// The curated file of a type: `<Type>-processed.ndjson` when the type fits
    /// in one part, else `<Type>-processed.<NNN>.ndjson` numbered from 001.
    pub fn curated_file(
        &self,
        t: &TenantGuid,
        d: ImportDate,
        ty: &str,
        part: Option<usize>,
    ) -> Path {
        let name = match part {
            None => format!("{ty}-processed.ndjson"),
            Some(n) => format!("{ty}-processed.{n:03}.ndjson"),
        };
        self.curated_partition(t, d).join(name)
    }

    /// The folder of a metadata table's files of one partition.
    pub fn metadata_partition(&self, table: MetadataTable, t: &TenantGuid, d: ImportDate) -> Path {
        self.join(["metadata", table.name(), &tenant_seg(t), &date_seg(d)])
    }

    pub fn metadata_file(
        &self,
        table: MetadataTable,
        t: &TenantGuid,
        d: ImportDate,
        run: &str,
    ) -> Path {
        self.join([
            "metadata",
            table.name(),
            &tenant_seg(t),
            &date_seg(d),
            &format!("{run}.parquet"),
        ])
    }

    /// The state of a partition's HealthLake import (its job id), for
    /// `import status` and for a retried import.
    pub fn import_state(&self, t: &TenantGuid, d: ImportDate) -> Path {
        self.join([
            "metadata",
            "_import",
            &tenant_seg(t),
            &date_seg(d),
            "healthlake.json",
        ])
    }

    /// A tenant's import ledger for one target (`local`, or `healthlake-`
    /// and the datastore id): one Parquet file per import, named by its job.
    pub fn ledger(&self, t: &TenantGuid, target: &str) -> Path {
        self.join([
            "metadata",
            "_ledger",
            &tenant_seg(t),
            &format!("target={target}"),
        ])
    }

    /// The ledger entries of the records a HealthLake import sends, in the
    /// order it sends them, kept until the job has ended and those it took
    /// join the ledger.
    pub fn ledger_pending(&self, t: &TenantGuid, d: ImportDate, job: &str) -> Path {
        self.join([
            "metadata",
            "_import",
            &tenant_seg(t),
            &date_seg(d),
            &format!("ledger-{job}.parquet"),
        ])
    }

    /// The records one HealthLake import sends when the ledger leaves some
    /// of the partition's out: a prefix of their own beside (not under) the
    /// curated layer, since HealthLake reads every object under its input.
    pub fn healthlake_import(&self, t: &TenantGuid, d: ImportDate, job: &str) -> Path {
        self.join([
            "healthlake-import",
            &tenant_seg(t),
            &date_seg(d),
            &format!("job={job}"),
        ])
    }

    /// The local Iceberg lake: `iceberg/catalog.db` and `iceberg/warehouse/`.
    pub fn iceberg(&self) -> Path {
        self.join(["iceberg"])
    }

    pub fn commits_root(&self) -> Path {
        self.join(["metadata", "_commits"])
    }

    pub fn commits_tenant(&self, t: &TenantGuid) -> Path {
        self.join(["metadata", "_commits", &tenant_seg(t)])
    }

    /// A (tenant, date) partition's commit log (see `commit`).
    pub fn commits(&self, t: &TenantGuid, d: ImportDate) -> Path {
        self.join(["metadata", "_commits", &tenant_seg(t), &date_seg(d)])
    }

    /// The lease of a (tenant, date) partition: curate and import of it.
    pub fn partition_lease(&self, t: &TenantGuid, d: ImportDate) -> Path {
        self.join(["metadata", "_leases", &tenant_seg(t), &date_seg(d)])
    }

    /// The lease of a tenant's imports: the import ledger judges each record
    /// against what the imports before it sent, so one tenant's imports run
    /// one at a time.
    pub fn import_lease(&self, t: &TenantGuid) -> Path {
        self.join(["metadata", "_leases", &tenant_seg(t), "imports"])
    }

    /// The lease of a (tenant, source system): its extraction.
    pub fn source_lease(&self, t: &TenantGuid, s: &SourceSystem) -> Path {
        self.join(["metadata", "_leases", &tenant_seg(t), &system_seg(s)])
    }

    /// Where curate runs of a partition write their immutable parts:
    /// `curated/_runs/tenantGuid=…/import_date=…/<run>/` (outside the
    /// visible folder, which HealthLake imports whole).
    pub fn curated_runs(&self, t: &TenantGuid, d: ImportDate) -> Path {
        self.join(["curated", "_runs", &tenant_seg(t), &date_seg(d)])
    }

    pub fn curated_run_part(&self, t: &TenantGuid, d: ImportDate, run: &str, name: &str) -> Path {
        self.curated_runs(t, d).join(run).join(name)
    }
}

/// Reads back an object listed below raw partition folder `partition`: a
/// data file directly in it or a claim in its `_landed/` folder. None for
/// anything else (the export's own files, names that give no type).
pub fn raw_entry(partition: &Path, path: &Path) -> Option<RawEntry> {
    let parts: Vec<_> = path.prefix_match(partition)?.collect();
    match parts.as_slice() {
        [file] => RawFileName::parse(file.as_ref()).map(RawEntry::File),
        [dir, claim] if dir.as_ref() == LANDED_DIR => claim
            .as_ref()
            .strip_suffix(".json")
            .and_then(RawFileName::parse)
            .map(RawEntry::Claim),
        _ => None,
    }
}

/// The source system a raw tenant folder's sub-folder names
/// (`…/source_system=<system>`), if it is one.
pub fn source_system_folder(dir: &Path) -> Option<SourceSystem> {
    dir.filename()?.strip_prefix("source_system=")?.parse().ok()
}

/// The tenant a folder names (`…/tenantGuid=<guid>`), if it is one.
pub fn tenant_folder(dir: &Path) -> Option<TenantGuid> {
    dir.filename()?.strip_prefix("tenantGuid=")?.parse().ok()
}

/// Partition values read back from a path below a layer directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathPartition {
    pub tenant: Option<TenantGuid>,
    pub source_system: Option<SourceSystem>,
    pub date: Option<ImportDate>,
    pub file_name: String,
}

/// Reads `key=value` segments of `path` after `base`; values that do not
/// validate make the whole path unrecognised (None), so a stray object can
/// never pose as a partition.
pub fn parse_partition(base: &Path, path: &Path) -> Option<PathPartition> {
    let mut out = PathPartition::default();
    let parts: Vec<_> = path.prefix_match(base)?.collect();
    let (file, dirs) = parts.split_last()?;
    for seg in dirs {
        let (k, v) = seg.as_ref().split_once('=')?;
        match k {
            "tenantGuid" => out.tenant = Some(v.parse().ok()?),
            "source_system" => out.source_system = Some(v.parse().ok()?),
            "import_date" => out.date = Some(v.parse().ok()?),
            _ => return None,
        }
    }
    out.file_name = file.as_ref().to_string();
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_partition_values() {
        assert_eq!(
            "0F8FAD5B-D9CB-469F-A165-70867728950E"
                .parse::<TenantGuid>()
                .unwrap()
                .as_str(),
            "0f8fad5b-d9cb-469f-a165-70867728950e"
        );
        for bad in [
            "",
            "../x",
            "0f8fad5b-d9cb-469f-a165-70867728950",
            "0f8fad5bxd9cb-469f-a165-70867728950e",
        ] {
            assert!(bad.parse::<TenantGuid>().is_err(), "{bad}");
        }
        assert!("epic_prod-1".parse::<SourceSystem>().is_ok());
        for bad in ["", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(bad.parse::<SourceSystem>().is_err(), "{bad}");
        }
        assert!("2024-02-29".parse::<ImportDate>().is_ok());
        for bad in [
            "2023-02-29",
            "2024-1-01",
            "20240101",
            "2024-01-01/..",
            "+2024-01-01",
        ] {
            assert!(bad.parse::<ImportDate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_raw_file_names() {
        assert_eq!(
            RawFileName::parse("Patient.ndjson").unwrap().resource_type,
            "Patient"
        );
        assert_eq!(
            RawFileName::parse("Patient.001.ndjson.gz")
                .unwrap()
                .resource_type,
            "Patient"
        );
        let p = RawFileName::parse("Patient.ndjson").unwrap();
        assert_eq!(p.part(), None);
        assert_eq!(p.with_part(2).as_str(), "Patient.002.ndjson");
        assert_eq!(p.with_gzip().as_str(), "Patient.ndjson.gz");
        let gz = RawFileName::parse("Patient.017.ndjson.gz").unwrap();
        assert_eq!(gz.part(), Some(17));
        assert_eq!(gz.with_part(1234).as_str(), "Patient.1234.ndjson.gz");
        assert_eq!(gz.with_part(1234).part(), Some(1234));
        assert_eq!(gz.with_gzip(), gz);
        for bad in [
            "log.ndjson",
            "Patient.json",
            "Patient.x.ndjson",
            "Patient..ndjson",
            "Foo.ndjson",
        ] {
            assert!(RawFileName::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn builds_and_reads_back_paths() {
        let p = Paths::new(Path::from("lake"));
        let t: TenantGuid = "0f8fad5b-d9cb-469f-a165-70867728950e".parse().unwrap();
        let s: SourceSystem = "epic".parse().unwrap();
        let d: ImportDate = "2024-05-01".parse().unwrap();
        let f = RawFileName::parse("Patient.000.ndjson").unwrap();
        let path = p.raw_file(&t, &s, d, &f);
        assert_eq!(
            path.as_ref(),
            "lake/raw/tenantGuid=0f8fad5b-d9cb-469f-a165-70867728950e/source_system=epic/import_date=2024-05-01/Patient.000.ndjson"
        );
        let back = parse_partition(&p.layer(Layer::Raw), &path).unwrap();
        assert_eq!(back.tenant, Some(t.clone()));
        assert_eq!(back.source_system, Some(s));
        assert_eq!(back.file_name, "Patient.000.ndjson");
        let c = p.curated_file(&t, d, "Patient", Some(2));
        assert!(c
            .as_ref()
            .ends_with("import_date=2024-05-01/Patient-processed.002.ndjson"));
        let part = p.curated_run_part(&t, d, "r1", "Patient-processed.f000000.001.ndjson");
        assert_eq!(
            part.as_ref(),
            "lake/curated/_runs/tenantGuid=0f8fad5b-d9cb-469f-a165-70867728950e/import_date=2024-05-01/r1/Patient-processed.f000000.001.ndjson"
        );
        // A run's parts are never taken for a curated partition's files.
        assert!(parse_partition(&p.layer(Layer::Curated), &part).is_none());
        assert!(parse_partition(
            &p.layer(Layer::Raw),
            &Path::from("lake/raw/tenantGuid=x/a.ndjson")
        )
        .is_none());
    }

    #[test]
    fn claims_are_never_taken_for_data() {
        let p = Paths::new(Path::from("lake"));
        let t: TenantGuid = "0f8fad5b-d9cb-469f-a165-70867728950e".parse().unwrap();
        let s: SourceSystem = "epic".parse().unwrap();
        let d: ImportDate = "2024-05-01".parse().unwrap();
        let f = RawFileName::parse("Patient.002.ndjson.gz").unwrap();
        let claim = p.raw_claim(&t, &s, d, &f);
        assert_eq!(
            claim.as_ref(),
            "lake/raw/tenantGuid=0f8fad5b-d9cb-469f-a165-70867728950e/source_system=epic/import_date=2024-05-01/_landed/Patient.002.ndjson.gz.json"
        );
        // `_landed` is no key=value segment: a claim is no partition file.
        assert!(parse_partition(&p.layer(Layer::Raw), &claim).is_none());
        let partition = p.raw_partition(&t, &s, d);
        assert_eq!(
            raw_entry(&partition, &claim),
            Some(RawEntry::Claim(f.clone()))
        );
        assert_eq!(
            raw_entry(&partition, &p.raw_file(&t, &s, d, &f)),
            Some(RawEntry::File(f))
        );
        let manifest = p.export_run_file(&t, &s, d, "r1", "manifest.json");
        assert!(manifest
            .as_ref()
            .ends_with("import_date=2024-05-01/_export/r1/manifest.json"));
        assert_eq!(raw_entry(&partition, &manifest), None);
        assert!(parse_partition(&p.layer(Layer::Raw), &manifest).is_none());
        let stray = partition.clone().join(LANDED_DIR).join("notes.txt");
        assert_eq!(raw_entry(&partition, &stray), None);
    }
}
