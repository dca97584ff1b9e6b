//! The deletions of a partition: what a Bulk Data export's `deleted` files
//! say the source deleted, read from every source system's
//! `_export/<run>/deleted/` of the (tenant, date) and written as one
//! NDJSON object of the curate run (`_deletions.ndjson` in its staged
//! folder), which the commit lists beside the curated parts but which is
//! never mirrored into the visible partition: HealthLake imports every
//! object there.
//!
//! A deleted file holds one Bundle per line whose entries each have
//! `request.method` DELETE and `request.url` `<Type>/<id>` (FHIR Bulk Data
//! Access, "Response - Complete Status", `deleted`). Only extractions that
//! finished (their `manifest.json` is written last) count. A line or entry
//! that is not of that shape fails the run, naming the file, the line and
//! why: a deletion is never dropped unread.

use std::collections::BTreeSet;

use object_store::path::Path;
use serde::{Deserialize, Serialize};

use super::STAGE;
use crate::commit::{Checksum, Object};
use crate::error::{Error, Result};
use crate::layout::{source_system_folder, ImportDate, TenantGuid};
use crate::storage::Lake;

/// One deleted resource, as the curated layer keeps it (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Deletion {
    #[serde(rename = "resourceType")]
    pub resource_type: String,
    pub id: String,
    #[serde(rename = "sourceSystem")]
    pub source_system: String,
}

/// The name of the deletions object in a run's folder.
pub const NAME: &str = "_deletions.ndjson";

#[derive(Deserialize)]
struct Bundle {
    #[serde(rename = "resourceType")]
    resource_type: String,
    #[serde(default)]
    entry: Vec<BundleEntry>,
}

#[derive(Deserialize)]
struct BundleEntry {
    request: Option<Request>,
}

#[derive(Deserialize)]
struct Request {
    method: String,
    url: String,
}

/// The deletions one line of a deleted file names.
fn parse_line(line: &[u8]) -> std::result::Result<Vec<(String, String)>, String> {
    let b: Bundle = serde_json::from_slice(line).map_err(|e| format!("not a Bundle: {e}"))?;
    if b.resource_type != "Bundle" {
        return Err(format!("a {}, not a Bundle", b.resource_type));
    }
    let mut out = Vec::new();
    for (i, e) in b.entry.iter().enumerate() {
        let Some(r) = &e.request else {
            return Err(format!("entry {i} has no request"));
        };
        if !r.method.eq_ignore_ascii_case("DELETE") {
            return Err(format!(
                "entry {i}: request.method is {}, not DELETE",
                r.method
            ));
        }
        let path = r.url.trim_start_matches('/');
        let mut parts = path.rsplit('/');
        let (Some(id), Some(ty)) = (parts.next(), parts.next()) else {
            return Err(format!(
                "entry {i}: request.url {:?} is not <Type>/<id>",
                r.url
            ));
        };
        let Some(ty) = crate::fhir::resource_type(ty) else {
            return Err(format!("entry {i}: {ty} is not an R4 resource type"));
        };
        if !crate::fhir::is_valid_id(id) {
            return Err(format!("entry {i}: {id:?} is not a FHIR id"));
        }
        out.push((ty.to_string(), id.to_string()));
    }
    Ok(out)
}

/// Every deletion of the partition, sorted and once each.
pub async fn read(lake: &Lake, tenant: &TenantGuid, date: ImportDate) -> Result<Vec<Deletion>> {
    let root = &lake.raw;
    let mut all = BTreeSet::new();
    for dir in root
        .list_dirs(STAGE, &root.paths.raw_tenant(tenant))
        .await?
    {
        let Some(system) = source_system_folder(&dir) else {
            continue;
        };
        let export = root
            .paths
            .raw_partition(tenant, &system, date)
            .join("_export");
        let objects = root.list(STAGE, &export).await?;
        let finished: BTreeSet<Path> = objects
            .iter()
            .filter(|o| o.location.filename() == Some("manifest.json"))
            .filter_map(|o| {
                let parts: Vec<_> = o.location.prefix_match(&export)?.collect();
                (parts.len() == 2).then(|| export.clone().join(parts[0].as_ref()))
            })
            .collect();
        for o in &objects {
            let Some(parts) = o.location.prefix_match(&export) else {
                continue;
            };
            let parts: Vec<_> = parts.collect();
            if parts.len() != 3 || parts[1].as_ref() != "deleted" {
                continue;
            }
            if !finished.contains(&export.clone().join(parts[0].as_ref())) {
                continue;
            }
            let Some(bytes) = root.get_bytes(STAGE, &o.location).await? else {
                continue;
            };
            for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let named = parse_line(line).map_err(|reason| Error::Input {
                    path: format!("{} line {}", root.url_of(&o.location), n + 1).into(),
                    reason,
                })?;
                for (resource_type, id) in named {
                    all.insert(Deletion {
                        resource_type,
                        id,
                        source_system: system.to_string(),
                    });
                }
            }
        }
    }
    Ok(all.into_iter().collect())
}

/// Writes `deletions` into the run's folder; its commit entry.
pub async fn write(
    lake: &Lake,
    tenant: &TenantGuid,
    date: ImportDate,
    run_id: &str,
    deletions: &[Deletion],
) -> Result<Option<Object>> {
    if deletions.is_empty() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    for d in deletions {
        serde_json::to_writer(&mut bytes, d).expect("a deletion serialises");
        bytes.push(b'\n');
    }
    let path = lake
        .curated
        .paths
        .curated_run_part(tenant, date, run_id, NAME);
    let object = Object {
        path: path.to_string(),
        size: bytes.len() as u64,
        xxh3: Checksum::of(&bytes),
        name: None,
        records: Some(deletions.len() as u64),
    };
    lake.curated.put(STAGE, &path, bytes).await?;
    Ok(Some(object))
}

/// Reads the deletions a curate commit lists.
pub async fn of_commit(lake: &Lake, objects: &[Object]) -> Result<Vec<Deletion>> {
    let mut out = Vec::new();
    for o in objects {
        let bytes = crate::commit::read_verified(&lake.curated, STAGE, o).await?;
        for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            out.push(serde_json::from_slice(line).map_err(|e| Error::Corrupt {
                stage: STAGE,
                location: format!("{} line {}", lake.curated.url_of(&o.location()), n + 1),
                detail: e.to_string(),
            })?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_line_names_its_resources() {
        let line = br#"{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"DELETE","url":"Patient/p1"}},{"request":{"method":"DELETE","url":"Observation/o-2"}}]}"#;
        assert_eq!(
            parse_line(line).unwrap(),
            vec![
                ("Patient".to_string(), "p1".to_string()),
                ("Observation".into(), "o-2".into())
            ]
        );
        for (bad, why) in [
            (&br#"{"resourceType":"Patient"}"#[..], "not a Bundle"),
            (
                br#"{"resourceType":"Bundle","entry":[{"request":{"method":"PUT","url":"Patient/p"}}]}"#,
                "not DELETE",
            ),
            (
                br#"{"resourceType":"Bundle","entry":[{"request":{"method":"DELETE","url":"Nope/p"}}]}"#,
                "not an R4 resource type",
            ),
            (
                br#"{"resourceType":"Bundle","entry":[{"request":{"method":"DELETE","url":"Patient/a b"}}]}"#,
                "not a FHIR id",
            ),
            (b"{", "not a Bundle"),
        ] {
            let e = parse_line(bad).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
