//! Staging and commit: how a run's output becomes visible all at once.
//!
//! A run writes everything under `<layer>/_staging/<run_id>/`, then publishes:
//!
//! 1. writes an intent `metadata/_commits/<partition>/_publishing.json` naming
//!    the run: from here until step 4 readers treat the curated partition as
//!    absent rather than show a mix of two runs;
//! 2. moves its curated files into place and deletes the partition's files
//!    that the run did not write (parts of an older, larger run);
//! 3. moves its metadata files into place (named by run id);
//! 4. writes its commit record `<run_id>.json`: the run is now committed;
//! 5. deletes the intent.
//!
//! Readers ([`visible`]) show a partition's curated files from its latest
//! commit record unless an intent names an uncommitted run, and metadata files
//! only of committed runs. A run killed at any point therefore leaves either
//! the previous state, nothing, or its complete output visible. The next run of
//! the partition ([`recover`]) deletes what a killed run left behind, so
//! running again gives the same curated bytes and no duplicated metadata rows.
//!
//! Local moves are atomic renames; on S3 a move is a copy and a delete, which
//! is why the intent covers the whole of step 2.

use std::collections::{BTreeMap, BTreeSet};

use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layout::{parse_partition, ImportDate, Layer, MetadataTable, TenantGuid};
use crate::storage::Lake;

const STAGE: &str = "commit";
const INTENT: &str = "_publishing.json";

/// What a committed run published.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommitRecord {
    pub run_id: String,
    pub stage: String,
    pub tenant_guid: String,
    pub import_date: String,
    pub committed_at: String,
    pub curated_files: Vec<String>,
    pub metadata_files: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Intent {
    run_id: String,
}

/// A staged object and where it goes.
#[derive(Debug, Clone)]
pub struct Move {
    pub staged: Path,
    pub target: Path,
}

/// Aborts the process when `FHIRFLOW_FAILPOINT` names this point: lets the
/// tests kill a run at exact places of the protocol. Costs one env lookup.
pub fn failpoint(name: &str) {
    if failpoint_active(name) {
        eprintln!("fhirflow: failpoint {name}: aborting");
        std::process::abort();
    }
}

/// Whether `FHIRFLOW_FAILPOINT` names `name` (for faults other than a crash).
pub fn failpoint_active(name: &str) -> bool {
    std::env::var_os("FHIRFLOW_FAILPOINT").is_some_and(|v| v == name)
}

/// The stage whose commit records define a partition's curated files.
pub const CURATE: &str = "curate";

/// Publishes a curate run's staged output (steps 1 to 5 above).
pub async fn publish(
    lake: &Lake,
    tenant: &TenantGuid,
    date: ImportDate,
    run_id: &str,
    curated: &[Move],
    metadata: &[Move],
) -> Result<CommitRecord> {
    let commits = lake.metadata.paths.commits(tenant, date);
    let intent = serde_json::to_vec(&Intent {
        run_id: run_id.to_string(),
    })
    .expect("intent serialises");
    lake.metadata
        .put(STAGE, &commits.clone().join(INTENT), intent)
        .await?;
    failpoint("after-intent");

    for (i, m) in curated.iter().enumerate() {
        lake.curated.rename(STAGE, &m.staged, &m.target).await?;
        if i == 0 {
            failpoint("mid-curated-publish");
        }
    }
    let keep: BTreeSet<&Path> = curated.iter().map(|m| &m.target).collect();
    let partition = lake.curated.paths.curated_partition(tenant, date);
    for old in lake.curated.list(STAGE, &partition).await? {
        if !keep.contains(&old.location) {
            lake.curated.delete(STAGE, &old.location).await?;
        }
    }
    failpoint("after-curated-publish");
    let record = publish_metadata(lake, tenant, date, run_id, CURATE, curated, metadata).await?;
    lake.metadata
        .delete(STAGE, &commits.clone().join(INTENT))
        .await?;
    Ok(record)
}

/// Publishes the metadata files of a run of another stage (steps 3 and 4
/// above): such a run publishes no curated files, so the partition's curated
/// files stay those of its latest curate run.
pub async fn publish_stage_metadata(
    lake: &Lake,
    tenant: &TenantGuid,
    date: ImportDate,
    run_id: &str,
    stage: &str,
    metadata: &[Move],
) -> Result<CommitRecord> {
    assert_ne!(stage, CURATE, "curate runs publish through `publish`");
    publish_metadata(lake, tenant, date, run_id, stage, &[], metadata).await
}

async fn publish_metadata(
    lake: &Lake,
    tenant: &TenantGuid,
    date: ImportDate,
    run_id: &str,
    stage: &str,
    curated: &[Move],
    metadata: &[Move],
) -> Result<CommitRecord> {
    let commits = lake.metadata.paths.commits(tenant, date);
    for m in metadata {
        lake.metadata.rename(STAGE, &m.staged, &m.target).await?;
    }
    failpoint("after-metadata-publish");

    let record = CommitRecord {
        run_id: run_id.to_string(),
        stage: stage.into(),
        tenant_guid: tenant.to_string(),
        import_date: date.to_string(),
        committed_at: chrono::Utc::now().to_rfc3339(),
        curated_files: curated.iter().map(|m| m.target.to_string()).collect(),
        metadata_files: metadata.iter().map(|m| m.target.to_string()).collect(),
    };
    let bytes = serde_json::to_vec_pretty(&record).expect("commit record serialises");
    lake.metadata
        .put(
            STAGE,
            &commits.clone().join(format!("{run_id}.json")),
            bytes,
        )
        .await?;
    failpoint("after-commit-record");
    Ok(record)
}

/// Removes what killed runs of this partition left: their staged objects and
/// any metadata files they published without committing.
pub async fn recover(lake: &Lake, tenant: &TenantGuid, date: ImportDate) -> Result<()> {
    let commits = lake.metadata.paths.commits(tenant, date);
    let committed = committed_runs(lake, &commits).await?;
    if let Some(bytes) = lake
        .metadata
        .get_bytes(STAGE, &commits.clone().join(INTENT))
        .await?
    {
        let intent: Intent = serde_json::from_slice(&bytes).map_err(|e| Error::Input {
            path: commits.clone().join(INTENT).to_string().into(),
            reason: e.to_string(),
        })?;
        if !committed.contains(&intent.run_id) {
            for table in MetadataTable::ALL {
                let p = lake
                    .metadata
                    .paths
                    .metadata_file(table, tenant, date, &intent.run_id);
                lake.metadata.delete(STAGE, &p).await?;
            }
        }
    }
    // Staged objects of this partition from runs that never committed. Other
    // partitions' staging is left alone: their runs may be in progress.
    let marker_t = format!("tenantGuid={tenant}");
    let marker_d = format!("import_date={date}");
    for (root, layer) in [
        (&lake.curated, Layer::Curated),
        (&lake.metadata, Layer::Metadata),
    ] {
        for obj in root.list(STAGE, &root.paths.staging_root(layer)).await? {
            let parts: Vec<String> = obj
                .location
                .parts()
                .map(|p| p.as_ref().to_string())
                .collect();
            if parts.contains(&marker_t) && parts.contains(&marker_d) {
                root.delete(STAGE, &obj.location).await?;
            }
        }
    }
    Ok(())
}

/// The partition's latest committed curate run, unless a curate run is
/// publishing it right now.
pub async fn latest_curate(
    lake: &Lake,
    tenant: &TenantGuid,
    date: ImportDate,
) -> Result<Option<CommitRecord>> {
    let commits = lake.metadata.paths.commits(tenant, date);
    let mut latest: Option<CommitRecord> = None;
    let mut committed = BTreeSet::new();
    let mut intent = None;
    for obj in lake.metadata.list(STAGE, &commits).await? {
        let Some(bytes) = lake.metadata.get_bytes(STAGE, &obj.location).await? else {
            continue;
        };
        if obj.location.filename() == Some(INTENT) {
            intent = serde_json::from_slice::<Intent>(&bytes).ok();
        } else if let Ok(r) = serde_json::from_slice::<CommitRecord>(&bytes) {
            committed.insert(r.run_id.clone());
            // Run ids are UUIDv7: their order is the order the runs started.
            if r.stage == CURATE && latest.as_ref().is_none_or(|l| l.run_id < r.run_id) {
                latest = Some(r);
            }
        }
    }
    let publishing = intent.is_some_and(|i| !committed.contains(&i.run_id));
    Ok(if publishing { None } else { latest })
}

async fn committed_runs(lake: &Lake, commits: &Path) -> Result<BTreeSet<String>> {
    Ok(lake
        .metadata
        .list(STAGE, commits)
        .await?
        .into_iter()
        .filter_map(|o| {
            let name = o.location.filename()?.to_string();
            let run = name.strip_suffix(".json")?;
            (!name.starts_with('_')).then(|| run.to_string())
        })
        .collect())
}

/// The objects readers may see.
#[derive(Debug, Default, Clone)]
pub struct Visible {
    /// Curated files of each partition's latest commit.
    pub curated: Vec<Path>,
    /// Metadata files of every committed run, by table.
    pub metadata: BTreeMap<&'static str, Vec<Path>>,
}

/// Reads every commit record and intent of the lake.
pub async fn visible(lake: &Lake) -> Result<Visible> {
    let root = lake.metadata.paths.commits_root();
    // (tenant, date) -> (committed records by run id, the intent's run id)
    type Partition = (Option<TenantGuid>, Option<ImportDate>);
    let mut parts: BTreeMap<Partition, (BTreeMap<String, CommitRecord>, Option<String>)> =
        BTreeMap::new();
    for obj in lake.metadata.list(STAGE, &root).await? {
        let Some(pp) = parse_partition(&root, &obj.location) else {
            continue;
        };
        let key = (pp.tenant.clone(), pp.date);
        let Some(bytes) = lake.metadata.get_bytes(STAGE, &obj.location).await? else {
            continue; // deleted since the listing (an intent being removed)
        };
        let entry = parts.entry(key).or_default();
        if pp.file_name == INTENT {
            if let Ok(i) = serde_json::from_slice::<Intent>(&bytes) {
                entry.1 = Some(i.run_id);
            }
        } else if let Ok(r) = serde_json::from_slice::<CommitRecord>(&bytes) {
            entry.0.insert(r.run_id.clone(), r);
        }
    }
    let mut out = Visible::default();
    for table in MetadataTable::ALL {
        out.metadata.insert(table.name(), Vec::new());
    }
    for (records, intent) in parts.values() {
        let publishing = intent
            .as_ref()
            .is_some_and(|run| !records.contains_key(run));
        // Run ids are UUIDv7: their order is the order the runs started.
        let latest = records.values().rev().find(|r| r.stage == CURATE);
        if let (false, Some(latest)) = (publishing, latest) {
            out.curated
                .extend(latest.curated_files.iter().map(|p| Path::from(p.as_str())));
        }
        for r in records.values() {
            for f in &r.metadata_files {
                let path = Path::from(f.as_str());
                let table = MetadataTable::ALL
                    .into_iter()
                    .find(|t| path.parts().any(|p| p.as_ref() == t.name()));
                if let Some(t) = table {
                    out.metadata
                        .get_mut(t.name())
                        .expect("all tables")
                        .push(path);
                }
            }
        }
    }
    Ok(out)
}
