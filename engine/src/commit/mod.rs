//! The commit protocol: how a run's output becomes a partition's state, on
//! S3 as on a local disk, with any number of runs and readers at once.
//!
//! Modelled on Delta Lake's and Iceberg's logs on object stores:
//!
//! * **Immutable objects.** A run writes its data objects under names no
//!   other run uses (curated parts under
//!   `curated/_runs/<partition>/<run_id>/`, metadata Parquet named by run id)
//!   and never changes them.
//! * **A commit log per partition.** A run becomes visible by creating the
//!   next record of its partition's log,
//!   `metadata/_commits/<partition>/<sequence>.json`, with a create-only write
//!   (S3 `If-None-Match: *`): of two runs that want the same sequence number
//!   one wins, the other takes the next. The record lists every object the
//!   run published with its size and xxh3-128 checksum. The log's order is
//!   commit order; a partition's state for a stage is its highest record of
//!   that stage.
//! * **Readers resolve through the log.** SQL, import and the catalog read the
//!   objects a record lists, so during a publish they see the previous record
//!   or the new one, never nothing and never a mix.
//! * **One writer per partition** holds its [`lease`] from before it writes
//!   until after it cleans up; it checks the lease right before committing.
//!
//! After a curate commit the run makes the partition's visible folder
//! (`curated/tenantGuid=…/import_date=…/<Type>-processed[.NNN].ndjson`, what
//! HealthLake imports as a prefix) hold exactly the committed objects
//! ([`mirror`]), then removes the objects of superseded runs and of runs that
//! died before committing ([`collect_garbage`]). A run killed anywhere leaves
//! the previous commit as the state; the next lease holder cleans up after it.

pub mod lease;

use std::collections::{BTreeMap, BTreeSet};

use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layout::{curated_file_type, ImportDate, MetadataTable, TenantGuid};
use crate::storage::{Lake, Root};
use lease::Lease;

const STAGE: &str = "commit";

/// Aborts the process when `FHIRFLOW_FAILPOINT` names this point: lets the
/// tests kill a run at exact places of the protocol. Compiled in only with
/// the `failpoints` feature (the tests' build); a release build has none.
pub fn failpoint(name: &str) {
    if failpoint_active(name) {
        eprintln!("fhirflow: failpoint {name}: aborting");
        std::process::abort();
    }
}

/// Whether `FHIRFLOW_FAILPOINT` names `name` (for faults other than a crash).
#[cfg(feature = "failpoints")]
pub fn failpoint_active(name: &str) -> bool {
    std::env::var_os("FHIRFLOW_FAILPOINT").is_some_and(|v| v == name)
}

/// Without the `failpoints` feature no fault is ever injected.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn failpoint_active(_name: &str) -> bool {
    false
}

/// The stage whose commit records define a partition's curated files.
pub const CURATE: &str = "curate";

/// One object a commit published.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Object {
    /// Its path in its layer's store.
    pub path: String,
    pub size: u64,
    /// xxh3-128 of its bytes, 32 hex digits.
    pub xxh3: String,
    /// For a curated part: its name in the partition's visible folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// For a curated part: the records (lines) it holds, which an import
    /// reconciles with what its destination reports. Commits written before
    /// it was recorded have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<u64>,
}

impl Object {
    pub fn location(&self) -> Path {
        Path::from(self.path.as_str())
    }

    /// The object as a listing would describe it (no store round trip).
    pub fn meta(&self) -> ObjectMeta {
        ObjectMeta {
            location: self.location(),
            last_modified: chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
            size: self.size,
            e_tag: None,
            version: None,
        }
    }
}

/// What a committed run published.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommitRecord {
    /// The record's place in its partition's log (commit order).
    pub sequence: u64,
    pub run_id: String,
    pub stage: String,
    pub tenant_guid: String,
    pub import_date: String,
    pub committed_at: String,
    /// Curated parts (curate runs only).
    pub curated: Vec<Object>,
    /// The deletions of a curate run, kept out of the visible partition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deletions: Vec<Object>,
    /// Metadata Parquet files, any table.
    pub metadata: Vec<Object>,
    /// For an import: the sequence of the curate commit it imported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported: Option<u64>,
    /// For an extraction: its source system (each source system's latest
    /// extraction is current).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_system: Option<String>,
    /// For a curate run: the raw objects it read (their paths in the raw
    /// root), so that `plan` knows a later landing without comparing clocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub raw_inputs: Vec<String>,
}

impl CommitRecord {
    /// The metadata files of `table`.
    pub fn metadata_of(&self, table: MetadataTable) -> impl Iterator<Item = &Object> {
        self.metadata.iter().filter(move |o| {
            Path::from(o.path.as_str())
                .parts()
                .any(|p| p.as_ref() == table.name())
        })
    }
}

/// A run's output, ready to commit.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    pub curated: Vec<Object>,
    /// A curate run's deletions object ([`crate::curate::deletions`]).
    pub deletions: Vec<Object>,
    pub metadata: Vec<Object>,
    pub imported: Option<u64>,
    pub source_system: Option<String>,
    pub raw_inputs: Vec<String>,
}

/// Streams bytes into an xxh3-128 checksum.
#[derive(Default, Clone)]
pub struct Checksum(xxhash_rust::xxh3::Xxh3);

impl Checksum {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn hex(&self) -> String {
        format!("{:032x}", self.0.digest128())
    }
    pub fn of(bytes: &[u8]) -> String {
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
    }
}

/// A writer that takes the checksum and size of what passes through it, so
/// that a streamed object's commit entry needs no second read. Put it below a
/// buffer: one update per block, not one per small write.
pub struct Summing<W> {
    inner: W,
    sum: Checksum,
    bytes: u64,
}

impl<W> Summing<W> {
    pub fn new(inner: W) -> Self {
        Summing {
            inner,
            sum: Checksum::default(),
            bytes: 0,
        }
    }

    /// The writer, and the commit entry of what went through it to `path`.
    pub fn into_parts(self, path: &Path) -> (W, Object) {
        let object = Object {
            path: path.to_string(),
            size: self.bytes,
            xxh3: self.sum.hex(),
            name: None,
            records: None,
        };
        (self.inner, object)
    }
}

impl<W: std::io::Write> std::io::Write for Summing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sum.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The lease folder of a (tenant, date) partition: curate and import of it.
pub fn partition_lease(lake: &Lake, tenant: &TenantGuid, date: ImportDate) -> (Path, String) {
    (
        lake.metadata.paths.partition_lease(tenant, date),
        format!("tenant {tenant} date {date}"),
    )
}

/// Takes the (tenant, source system) lease of an extraction.
pub async fn lease_source(
    lake: &Lake,
    settings: &crate::settings::Settings,
    tenant: &TenantGuid,
    system: &crate::layout::SourceSystem,
    stage: &'static str,
    run_id: &str,
) -> Result<Lease> {
    Lease::acquire(
        &lake.metadata,
        lake.metadata.paths.source_lease(tenant, system),
        format!("tenant {tenant} source system {system}"),
        stage,
        run_id,
        lease::Timing::from_settings(&settings.lease),
        lease::Take::Free,
    )
    .await
}

/// Takes the lease of a tenant's imports (held for one import, beside its
/// partition's lease).
pub async fn lease_imports(
    lake: &Lake,
    settings: &crate::settings::Settings,
    tenant: &TenantGuid,
    stage: &'static str,
    run_id: &str,
) -> Result<Lease> {
    Lease::acquire(
        &lake.metadata,
        lake.metadata.paths.import_lease(tenant),
        format!("tenant {tenant} imports"),
        stage,
        run_id,
        lease::Timing::from_settings(&settings.lease),
        lease::Take::Free,
    )
    .await
}

/// Takes the (tenant, date) lease for `stage`, with the settings' timing.
pub async fn lease_partition(
    lake: &Lake,
    settings: &crate::settings::Settings,
    tenant: &TenantGuid,
    date: ImportDate,
    stage: &'static str,
    run_id: &str,
    take: lease::Take<'_>,
) -> Result<Lease> {
    let (dir, name) = partition_lease(lake, tenant, date);
    Lease::acquire(
        &lake.metadata,
        dir,
        name,
        stage,
        run_id,
        lease::Timing::from_settings(&settings.lease),
        take,
    )
    .await
}

/// Commits `draft` as `run_id`'s record in the partition's log, if `lease`
/// is still held. Returns the record as written.
pub async fn commit(
    lake: &Lake,
    lease: &Lease,
    tenant: &TenantGuid,
    date: ImportDate,
    run_id: &str,
    stage: &str,
    draft: Draft,
) -> Result<CommitRecord> {
    let dir = lake.metadata.paths.commits(tenant, date);
    let mut sequence = last_sequence(&lake.metadata, &dir).await? + 1;
    loop {
        lease.ensure_held().await?;
        let record = CommitRecord {
            sequence,
            run_id: run_id.to_string(),
            stage: stage.to_string(),
            tenant_guid: tenant.to_string(),
            import_date: date.to_string(),
            committed_at: chrono::Utc::now().to_rfc3339(),
            curated: draft.curated.clone(),
            deletions: draft.deletions.clone(),
            metadata: draft.metadata.clone(),
            imported: draft.imported,
            source_system: draft.source_system.clone(),
            raw_inputs: draft.raw_inputs.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&record).expect("commit record serialises");
        if lake
            .metadata
            .create(STAGE, &record_path(&dir, sequence), bytes)
            .await?
        {
            failpoint("after-commit-record");
            return Ok(record);
        }
        // The number is taken. By this very record, when a retried request
        // (after an answer that got lost) found the first attempt's object:
        // that is the commit. Otherwise by another stage's run of this
        // partition (an extraction's metadata): take the next one.
        let existing = read_record(&lake.metadata, &record_path(&dir, sequence)).await?;
        if existing.run_id == run_id {
            failpoint("after-commit-record");
            return Ok(existing);
        }
        sequence += 1;
    }
}

fn record_path(dir: &Path, sequence: u64) -> Path {
    dir.clone().join(format!("{sequence:020}.json"))
}

fn sequence_of(p: &Path) -> Option<u64> {
    p.filename()?.strip_suffix(".json")?.parse().ok()
}

async fn last_sequence(root: &Root, dir: &Path) -> Result<u64> {
    Ok(root
        .list(STAGE, dir)
        .await?
        .iter()
        .filter_map(|o| sequence_of(&o.location))
        .max()
        .unwrap_or(0))
}

async fn read_record(root: &Root, path: &Path) -> Result<CommitRecord> {
    let bytes = root
        .get_bytes(STAGE, path)
        .await?
        .ok_or_else(|| Error::Corrupt {
            stage: STAGE,
            location: root.url_of(path),
            detail: "listed but gone (commit records are never deleted)".into(),
        })?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
        stage: STAGE,
        location: root.url_of(path),
        detail: format!("not a commit record: {e}"),
    })
}

/// The partition's log, in commit order. Reads only this partition's records.
pub async fn log(lake: &Lake, tenant: &TenantGuid, date: ImportDate) -> Result<Vec<CommitRecord>> {
    log_at(&lake.metadata, &lake.metadata.paths.commits(tenant, date)).await
}

async fn log_at(root: &Root, dir: &Path) -> Result<Vec<CommitRecord>> {
    let mut paths: Vec<(u64, Path)> = Vec::new();
    for o in root.list(STAGE, dir).await? {
        match sequence_of(&o.location) {
            Some(n) => paths.push((n, o.location)),
            // Not silently passed over: a record this log cannot order.
            None => {
                return Err(Error::Corrupt {
                    stage: STAGE,
                    location: root.url_of(&o.location),
                    detail: "not a numbered commit record (a lake written by an earlier \
                             fhirflow: move its metadata/_commits away and curate again)"
                        .into(),
                })
            }
        }
    }
    paths.sort();
    let reads = paths.iter().map(|(_, p)| read_record(root, p));
    futures::future::try_join_all(reads).await
}

/// The partition's latest commit of `stage`: reads records from the newest
/// back until one of that stage.
pub async fn latest(
    lake: &Lake,
    tenant: &TenantGuid,
    date: ImportDate,
    stage: &str,
) -> Result<Option<CommitRecord>> {
    let root = &lake.metadata;
    let dir = root.paths.commits(tenant, date);
    let mut sequences: Vec<u64> = root
        .list(STAGE, &dir)
        .await?
        .iter()
        .filter_map(|o| sequence_of(&o.location))
        .collect();
    sequences.sort_unstable();
    for s in sequences.into_iter().rev() {
        let r = read_record(root, &record_path(&dir, s)).await?;
        if r.stage == stage {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

/// The partition's latest curate commit.
pub async fn latest_curate(
    lake: &Lake,
    tenant: &TenantGuid,
    date: ImportDate,
) -> Result<Option<CommitRecord>> {
    latest(lake, tenant, date, CURATE).await
}

/// Makes the partition's visible curated folder hold exactly `record`'s
/// parts under their names (copies on the store: a hard link on a local
/// disk, a server-side copy on S3), removes everything else in it, and checks
/// the result by listing. Called by the lease holder only.
pub async fn mirror(
    lake: &Lake,
    tenant: &TenantGuid,
    date: ImportDate,
    record: &CommitRecord,
) -> Result<()> {
    let root = &lake.curated;
    let folder = root.paths.curated_partition(tenant, date);
    let wanted: BTreeMap<Path, &Object> = named_parts(record)?
        .into_iter()
        .map(|(name, _, o)| (folder.clone().join(name), o))
        .collect();
    let present = root.list(STAGE, &folder).await?;
    for (target, o) in &wanted {
        root.store.copy(&o.location(), target).await.map_err(|e| {
            Error::store(
                STAGE,
                format!("{} -> {}", root.url_of(&o.location()), root.url_of(target)),
                e,
            )
        })?;
    }
    for p in present {
        if !wanted.contains_key(&p.location) {
            root.delete(STAGE, &p.location).await?;
        }
    }
    check_mirror(lake, tenant, date, record).await
}

/// Each curated part of `record` with its visible name and the resource
/// type that name gives; a part without them is a broken record, not a part
/// to pass over.
pub fn named_parts(record: &CommitRecord) -> Result<Vec<(&str, &'static str, &Object)>> {
    record
        .curated
        .iter()
        .map(|o| {
            let name = o.name.as_deref();
            match name.zip(name.and_then(curated_file_type)) {
                Some((name, ty)) => Ok((name, ty, o)),
                None => Err(Error::Corrupt {
                    stage: STAGE,
                    location: format!("commit {} of run {}", record.sequence, record.run_id),
                    detail: format!("part {} has no curated file name", o.path),
                }),
            }
        })
        .collect()
}

/// Fails unless the visible curated folder holds exactly `record`'s parts
/// (by name and size), naming what is in the way: HealthLake imports the
/// whole folder.
pub async fn check_mirror(
    lake: &Lake,
    tenant: &TenantGuid,
    date: ImportDate,
    record: &CommitRecord,
) -> Result<()> {
    let root = &lake.curated;
    let folder = root.paths.curated_partition(tenant, date);
    let wanted: BTreeMap<&str, u64> = named_parts(record)?
        .into_iter()
        .map(|(name, _, o)| (name, o.size))
        .collect();
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for o in root.list(STAGE, &folder).await? {
        let name = o.location.filename().unwrap_or_default().to_string();
        match wanted.get(name.as_str()) {
            Some(size) if *size == o.size => {
                seen.insert(name);
            }
            Some(size) => problems.push(format!(
                "{name} has {} bytes, the commit says {size}",
                o.size
            )),
            None => problems.push(format!(
                "{} is not part of curate run {}",
                root.url_of(&o.location),
                record.run_id
            )),
        }
    }
    for name in wanted.keys().filter(|n| !seen.contains(**n)) {
        problems.push(format!("{name} is missing"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Corrupt {
            stage: STAGE,
            location: root.url_of(&folder),
            detail: problems.join("; "),
        })
    }
}

/// Removes the partition's objects that no current state needs: curated
/// parts of every run but the last two committed curate runs and `keep_run`
/// (the caller's own, in progress), and metadata files of `dead_runs`
/// (runs whose lease was taken over: they can never commit) that no commit
/// lists. Called by the lease holder only, so no other writer is adding
/// objects meanwhile.
pub async fn collect_garbage(
    lake: &Lake,
    tenant: &TenantGuid,
    date: ImportDate,
    keep_run: &str,
    dead_runs: &[String],
) -> Result<()> {
    let log = log(lake, tenant, date).await?;
    // The latest curate commit's parts, and the one before's: a reader that
    // resolved the previous state just before this run committed is still
    // reading them (Delta Lake keeps superseded files for a retention period
    // for the same reason). A query slower than a whole curate run can
    // still lose a part: it fails naming the part, and running it again
    // reads the new state.
    let current: BTreeSet<String> = log
        .iter()
        .rev()
        .filter(|r| r.stage == CURATE)
        .take(2)
        .flat_map(|r| r.curated.iter().chain(&r.deletions).map(|o| o.path.clone()))
        .collect();
    let runs = lake.curated.paths.curated_runs(tenant, date);
    for o in lake.curated.list(STAGE, &runs).await? {
        let run = o
            .location
            .prefix_match(&runs)
            .and_then(|mut p| p.next())
            .map(|p| p.as_ref().to_string());
        if run.as_deref() != Some(keep_run) && !current.contains(o.location.as_ref()) {
            lake.curated.delete(STAGE, &o.location).await?;
        }
    }
    if dead_runs.is_empty() {
        return Ok(());
    }
    let committed: BTreeSet<&str> = log
        .iter()
        .flat_map(|r| r.metadata.iter().map(|o| o.path.as_str()))
        .collect();
    for table in MetadataTable::ALL {
        let folder = lake.metadata.paths.metadata_partition(table, tenant, date);
        for o in lake.metadata.list(STAGE, &folder).await? {
            let name = o.location.filename().unwrap_or_default();
            // Files are named `<run>.parquet` or `<run>-<publish>.parquet`.
            let of_dead_run = dead_runs.iter().any(|r| name.starts_with(r.as_str()));
            if of_dead_run && !committed.contains(o.location.as_ref()) {
                lake.metadata.delete(STAGE, &o.location).await?;
            }
        }
    }
    Ok(())
}

/// Removes what `run` wrote to the partition when it failed before its
/// commit: its own parts and metadata files, nothing of any other run (a run
/// that lost its lease must not touch the new holder's objects).
pub async fn discard_run(
    lake: &Lake,
    tenant: &TenantGuid,
    date: ImportDate,
    run: &str,
) -> Result<()> {
    let own = lake.curated.paths.curated_runs(tenant, date).join(run);
    for o in lake.curated.list(STAGE, &own).await? {
        lake.curated.delete(STAGE, &o.location).await?;
    }
    for table in MetadataTable::ALL {
        lake.metadata
            .delete(
                STAGE,
                &lake.metadata.paths.metadata_file(table, tenant, date, run),
            )
            .await?;
    }
    Ok(())
}

/// A curated part readers may see.
#[derive(Debug, Clone)]
pub struct CuratedPart {
    pub tenant: TenantGuid,
    pub date: ImportDate,
    pub resource_type: &'static str,
    pub object: Object,
}

/// What readers may see of the partitions that match a filter.
#[derive(Debug, Default, Clone)]
pub struct Visible {
    /// Parts of each partition's latest curate commit.
    pub curated: Vec<CuratedPart>,
    /// Metadata files of each partition's latest commit of each stage, by table.
    pub metadata: BTreeMap<&'static str, Vec<Path>>,
    /// Metadata files of every commit, by table.
    pub metadata_history: BTreeMap<&'static str, Vec<Path>>,
}

/// Which partitions a reader wants (None: any).
#[derive(Debug, Default, Clone)]
pub struct PartitionFilter {
    pub tenants: Option<Vec<TenantGuid>>,
    pub dates: Option<Vec<ImportDate>>,
}

/// Reads the commit logs of the partitions `filter` matches: with a tenant
/// and a date, exactly those logs; with a tenant, that tenant's.
pub async fn visible(lake: &Lake, filter: &PartitionFilter) -> Result<Visible> {
    let root = &lake.metadata;
    let mut dirs: Vec<Path> = Vec::new();
    // With dates but no tenant, the tenants come from one folder listing.
    let tenants = match (&filter.tenants, &filter.dates) {
        (None, Some(_)) => Some(
            root.list_dirs(STAGE, &root.paths.commits_root())
                .await?
                .iter()
                .filter_map(crate::layout::tenant_folder)
                .collect::<Vec<_>>(),
        ),
        (ts, _) => ts.clone(),
    };
    match (&tenants, &filter.dates) {
        (Some(ts), Some(ds)) => {
            for t in ts {
                for d in ds {
                    dirs.push(root.paths.commits(t, *d));
                }
            }
        }
        (ts, ds) => {
            let prefixes: Vec<Path> = match ts {
                Some(ts) => ts.iter().map(|t| root.paths.commits_tenant(t)).collect(),
                None => vec![root.paths.commits_root()],
            };
            let mut found = BTreeSet::new();
            for prefix in prefixes {
                for o in root.list(STAGE, &prefix).await? {
                    if let Some(parent) = parent_of(&o.location) {
                        found.insert(parent);
                    }
                }
            }
            let base = root.paths.commits_root();
            dirs.extend(found.into_iter().filter(|dir| {
                let date = crate::layout::parse_partition(&base, &dir.clone().join("x"))
                    .and_then(|p| p.date);
                ds.as_ref()
                    .is_none_or(|ds| date.is_some_and(|d| ds.contains(&d)))
            }));
        }
    }
    let logs = futures::future::try_join_all(dirs.iter().map(|d| log_at(root, d))).await?;
    let mut out = Visible::default();
    for table in MetadataTable::ALL {
        out.metadata.insert(table.name(), Vec::new());
        out.metadata_history.insert(table.name(), Vec::new());
    }
    for records in logs {
        // Current: the latest run of each stage (of each source system, for
        // extractions).
        let mut latest_by_stage: BTreeMap<(&str, Option<&str>), &CommitRecord> = BTreeMap::new();
        for r in &records {
            latest_by_stage.insert((r.stage.as_str(), r.source_system.as_deref()), r);
            for table in MetadataTable::ALL {
                let v = out
                    .metadata_history
                    .get_mut(table.name())
                    .expect("all tables");
                v.extend(r.metadata_of(table).map(Object::location));
            }
        }
        for r in latest_by_stage.values() {
            for table in MetadataTable::ALL {
                let v = out.metadata.get_mut(table.name()).expect("all tables");
                v.extend(r.metadata_of(table).map(Object::location));
            }
        }
        if let Some(r) = latest_by_stage.get(&(CURATE, None)) {
            let (Ok(tenant), Ok(date)) = (r.tenant_guid.parse(), r.import_date.parse()) else {
                return Err(Error::Corrupt {
                    stage: STAGE,
                    location: format!("commit {} of run {}", r.sequence, r.run_id),
                    detail: "its partition values do not parse".into(),
                });
            };
            for (_, ty, o) in named_parts(r)? {
                out.curated.push(CuratedPart {
                    tenant: TenantGuid::clone(&tenant),
                    date,
                    resource_type: ty,
                    object: o.clone(),
                });
            }
        }
    }
    Ok(out)
}

fn parent_of(p: &Path) -> Option<Path> {
    let parts: Vec<_> = p.parts().collect();
    let (_, dirs) = parts.split_last()?;
    Some(Path::from_iter(dirs.iter().cloned()))
}

/// Reads an object a commit lists and checks it against the record's size
/// and checksum: a mismatch names the object.
pub async fn read_verified(root: &Root, stage: &'static str, o: &Object) -> Result<bytes::Bytes> {
    let path = o.location();
    let bytes = root
        .get_bytes(stage, &path)
        .await?
        .ok_or_else(|| Error::Corrupt {
            stage,
            location: root.url_of(&path),
            detail: "the object is missing".into(),
        })?;
    verify(root, stage, o, &bytes)?;
    Ok(bytes)
}

/// Checks `bytes` against what the commit says of `o`.
pub fn verify(root: &Root, stage: &'static str, o: &Object, bytes: &[u8]) -> Result<()> {
    let sum = Checksum::of(bytes);
    if bytes.len() as u64 != o.size || sum != o.xxh3 {
        return Err(Error::Corrupt {
            stage,
            location: root.url_of(&o.location()),
            detail: format!(
                "{} bytes with checksum {sum}, the commit says {} bytes with {}",
                bytes.len(),
                o.size,
                o.xxh3
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;

    const T: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

    fn lake() -> Lake {
        let s = Settings {
            lake: "memory://".into(),
            ..Default::default()
        };
        Lake::open(&s).unwrap()
    }

    async fn take(lake: &Lake, run: &str) -> Lease {
        let s = Settings::default();
        lease_partition(
            lake,
            &s,
            &T.parse().unwrap(),
            "2024-05-01".parse().unwrap(),
            CURATE,
            run,
            lease::Take::Free,
        )
        .await
        .unwrap()
    }

    async fn put(lake: &Lake, path: &str, bytes: &[u8], name: &str) -> Object {
        lake.curated
            .put("t", &Path::from(path), bytes.to_vec())
            .await
            .unwrap();
        Object {
            path: path.into(),
            size: bytes.len() as u64,
            xxh3: Checksum::of(bytes),
            name: Some(name.into()),
            records: Some(bytes.iter().filter(|&&b| b == b'\n').count() as u64),
        }
    }

    #[tokio::test]
    async fn records_are_ordered_by_commit_and_the_latest_of_a_stage_wins() {
        let lake = lake();
        let (t, d) = (T.parse().unwrap(), "2024-05-01".parse().unwrap());
        // Run b started after run a but commits first: commit order decides.
        let l = take(&lake, "b").await;
        let ob = put(
            &lake,
            "curated/_runs/x/b/Patient-processed.f000000.001.ndjson",
            b"{}\n",
            "Patient-processed.ndjson",
        )
        .await;
        commit(
            &lake,
            &l,
            &t,
            d,
            "b",
            CURATE,
            Draft {
                curated: vec![ob],
                deletions: Vec::new(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        commit(&lake, &l, &t, d, "e", "extract", Draft::default())
            .await
            .unwrap();
        let rec = latest_curate(&lake, &t, d).await.unwrap().unwrap();
        assert_eq!(rec.run_id, "b");
        l.release().await.unwrap();
        let l = take(&lake, "a").await;
        let oa = put(
            &lake,
            "curated/_runs/x/a/Patient-processed.f000000.001.ndjson",
            b"{\"a\":1}\n",
            "Patient-processed.ndjson",
        )
        .await;
        let r = commit(
            &lake,
            &l,
            &t,
            d,
            "a",
            CURATE,
            Draft {
                curated: vec![oa],
                deletions: Vec::new(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(r.sequence, 3);
        assert_eq!(
            latest_curate(&lake, &t, d).await.unwrap().unwrap().run_id,
            "a"
        );
        let v = visible(&lake, &PartitionFilter::default()).await.unwrap();
        assert_eq!(v.curated.len(), 1);
        assert_eq!(
            v.curated[0].object.path,
            "curated/_runs/x/a/Patient-processed.f000000.001.ndjson"
        );
        assert_eq!(log(&lake, &t, d).await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_record_the_log_cannot_order_is_an_error() {
        let lake = lake();
        let (t, d) = (T.parse().unwrap(), "2024-05-01".parse().unwrap());
        let l = take(&lake, "a").await;
        commit(&lake, &l, &t, d, "a", CURATE, Draft::default())
            .await
            .unwrap();
        let dir = lake.metadata.paths.commits(&t, d);
        // A record this log cannot order is an error, not passed over.
        lake.metadata
            .put("t", &dir.clone().join("01a2-old-run.json"), b"{}".to_vec())
            .await
            .unwrap();
        let err = log(&lake, &t, d).await.unwrap_err();
        assert!(err.to_string().contains("earlier fhirflow"), "{err}");
    }

    #[tokio::test]
    async fn a_run_without_the_lease_cannot_commit() {
        let lake = lake();
        let (t, d) = (T.parse().unwrap(), "2024-05-01".parse().unwrap());
        let l = take(&lake, "a").await;
        let dir = lake.metadata.paths.partition_lease(&t, d);
        // Someone else writes the next generation (a takeover).
        let mut other = lease::current(&lake.metadata, &dir).await.unwrap().unwrap();
        other.generation += 1;
        other.run_id = "z".into();
        lake.metadata
            .create(
                "t",
                &dir.clone().join(format!("{:020}.json", other.generation)),
                serde_json::to_vec(&other).unwrap(),
            )
            .await
            .unwrap();
        let err = commit(&lake, &l, &t, d, "a", CURATE, Draft::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
        assert!(latest_curate(&lake, &t, d).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn the_mirror_holds_exactly_the_commit_and_checksums_are_checked() {
        let lake = lake();
        let (t, d): (TenantGuid, ImportDate) = (T.parse().unwrap(), "2024-05-01".parse().unwrap());
        let l = take(&lake, "a").await;
        let o = put(
            &lake,
            "curated/_runs/x/a/P.ndjson",
            b"{}\n",
            "Patient-processed.ndjson",
        )
        .await;
        let stray = lake
            .curated
            .paths
            .curated_partition(&t, d)
            .join("Old-processed.ndjson");
        lake.curated.put("t", &stray, b"x".to_vec()).await.unwrap();
        let r = commit(
            &lake,
            &l,
            &t,
            d,
            "a",
            CURATE,
            Draft {
                curated: vec![o.clone()],
                deletions: Vec::new(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let err = check_mirror(&lake, &t, d, &r).await.unwrap_err();
        assert!(err.to_string().contains("Old-processed.ndjson"), "{err}");
        mirror(&lake, &t, d, &r).await.unwrap();
        check_mirror(&lake, &t, d, &r).await.unwrap();
        read_verified(&lake.curated, "t", &o).await.unwrap();
        lake.curated
            .put("t", &o.location(), b"{ }\n".to_vec())
            .await
            .unwrap();
        let err = read_verified(&lake.curated, "t", &o).await.unwrap_err();
        assert!(err.to_string().contains("P.ndjson"), "{err}");
    }
}
