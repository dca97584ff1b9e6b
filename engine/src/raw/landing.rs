//! Landing a file in a raw partition without ever replacing one (DESIGN.md,
//! "Storage layout": the raw layer is append-only).
//!
//! Every landing, an ingested file or a downloaded export file, first
//! *claims* its name: it creates
//! `raw/tenantGuid=…/source_system=…/import_date=…/_landed/<name>.json` with
//! a create-only write ([`Root::create`]: S3 `If-None-Match: *`, a hard link
//! on a local disk). Only the creator of a claim writes the data object of
//! that name. The claim comes first, rather than a create-only write of the
//! data itself, because object_store's multipart uploads (everything above
//! 8 MiB) take no put mode.
//!
//! The name is the file's own (`Patient.ndjson`) when no claim and no object
//! has it yet, else the next part number of its type (`Patient.002.ndjson`,
//! `.003`, …, `.gz` kept), counting further up whenever another landing
//! claims a number first.
//!
//! A claim records what was landed: the content's xxh3-128 and size when they
//! are known before the upload (an ingested file), and a source key that
//! names the landing across retries (an export's file). A retried landing
//! finds its earlier one, by content or by source key: when that one's data
//! object exists nothing is written again; when it is missing (the landing
//! stopped between claim and upload) the retry writes the data to the
//! claimed name.
//!
//! Two landings of the same bytes at the same moment may both claim a name
//! (neither sees the other's claim yet); the file is then stored twice and
//! curation counts its lines as exact duplicates. Letting one defer to the
//! other was rejected: if the other then died, the deferring one would have
//! reported a file as landed that never was.

use std::collections::{BTreeMap, BTreeSet};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use crate::commit::Checksum;
use crate::error::{Error, Result};
use crate::layout::{raw_entry, ImportDate, RawEntry, RawFileName, SourceSystem, TenantGuid};
use crate::storage::Root;

/// Gives up choosing a name after this many lost races: only a store that
/// refuses every create gets there, and a clear error beats a hang.
const MAX_CLAIM_ATTEMPTS: usize = 10_000;

/// What a claim object records about its landing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// xxh3-128 of the data, 32 hex digits; None when the bytes were not
    /// known before landing (a download streams straight into its name).
    pub xxh3_128: Option<String>,
    /// The data's size in bytes, known when `xxh3_128` is.
    pub size: Option<u64>,
    /// What was landed: `ingest`, or an export file's identity (its export
    /// and URL, never a query string).
    pub source: String,
    /// When the name was claimed (RFC 3339, UTC).
    pub landed_at: String,
}

impl Claim {
    pub fn new(source: impl Into<String>, content: Option<(&str, u64)>) -> Claim {
        Claim {
            xxh3_128: content.map(|(h, _)| h.to_string()),
            size: content.map(|(_, s)| s),
            source: source.into(),
            landed_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }
    }
}

/// An earlier landing of the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Its data object is there: nothing to write.
    Landed(RawFileName),
    /// Only its claim is there: write the data to this name.
    Unfinished(RawFileName),
}

/// A raw partition's names, read with one listing and kept up to date with
/// what this process lands in it.
pub struct Partition<'a> {
    root: &'a Root,
    stage: &'static str,
    tenant: TenantGuid,
    system: SourceSystem,
    date: ImportDate,
    /// Data objects, with their sizes.
    files: BTreeMap<RawFileName, u64>,
    /// Claimed names, each with its claim once read.
    claims: BTreeMap<RawFileName, Option<Claim>>,
    /// xxh3-128 of data objects whose claims do not record it, once read.
    hashed: BTreeMap<RawFileName, String>,
}

impl<'a> Partition<'a> {
    pub async fn read(
        root: &'a Root,
        stage: &'static str,
        tenant: &TenantGuid,
        system: &SourceSystem,
        date: ImportDate,
    ) -> Result<Partition<'a>> {
        let dir = root.paths.raw_partition(tenant, system, date);
        let mut files = BTreeMap::new();
        let mut claims = BTreeMap::new();
        for obj in root.list(stage, &dir).await? {
            match raw_entry(&dir, &obj.location) {
                Some(RawEntry::File(name)) => {
                    files.insert(name, obj.size);
                }
                Some(RawEntry::Claim(name)) => {
                    claims.insert(name, None);
                }
                None => {}
            }
        }
        Ok(Partition {
            root,
            stage,
            tenant: tenant.clone(),
            system: system.clone(),
            date,
            files,
            claims,
            hashed: BTreeMap::new(),
        })
    }

    /// Where the data of `name` lives.
    pub fn path_of(&self, name: &RawFileName) -> Path {
        self.root
            .paths
            .raw_file(&self.tenant, &self.system, self.date, name)
    }

    fn claim_path(&self, name: &RawFileName) -> Path {
        self.root
            .paths
            .raw_claim(&self.tenant, &self.system, self.date, name)
    }

    /// The size of the data object of `name`, if there is one.
    pub fn stored(&self, name: &RawFileName) -> Option<u64> {
        self.files.get(name).copied()
    }

    /// Records that this process wrote the data of `name`.
    pub fn landed(&mut self, name: &RawFileName, size: u64) {
        self.files.insert(name.clone(), size);
    }

    /// The claim of `name`, read from the store the first time.
    async fn claim_of(&mut self, name: &RawFileName) -> Result<Option<Claim>> {
        match self.claims.get(name) {
            None => return Ok(None),
            Some(Some(c)) => return Ok(Some(c.clone())),
            Some(None) => {}
        }
        let claim = read_claim(self.root, self.stage, &self.claim_path(name)).await?;
        self.claims.insert(name.clone(), Some(claim.clone()));
        Ok(Some(claim))
    }

    /// Reads every claim not read yet (in parallel: on S3 each is a request).
    async fn read_all_claims(&mut self) -> Result<()> {
        let unread: Vec<(RawFileName, Path)> = self
            .claims
            .iter()
            .filter(|(_, c)| c.is_none())
            .map(|(n, _)| (n.clone(), self.claim_path(n)))
            .collect();
        let (root, stage) = (self.root, self.stage);
        let read: Vec<(RawFileName, Claim)> = futures::stream::iter(unread)
            .map(|(name, path)| async move {
                Ok::<_, Error>((name, read_claim(root, stage, &path).await?))
            })
            .buffer_unordered(16)
            .try_collect()
            .await?;
        for (name, claim) in read {
            self.claims.insert(name, Some(claim));
        }
        Ok(())
    }

    /// An earlier landing of exactly these bytes as a file of `like`'s type
    /// and compression (the name decides how a file is read, so the same
    /// bytes under another type are another file). Objects whose claim
    /// records no hash (downloads, files landed before claims existed) are
    /// read and hashed, but only when their size matches.
    pub async fn find_content(
        &mut self,
        like: &RawFileName,
        xxh3: &str,
        size: u64,
    ) -> Result<Option<Found>> {
        let candidates: BTreeSet<RawFileName> = self
            .files
            .keys()
            .chain(self.claims.keys())
            .filter(|n| n.resource_type == like.resource_type && n.is_gzip() == like.is_gzip())
            .cloned()
            .collect();
        let mut unfinished = None;
        for name in candidates {
            let claim = self.claim_of(&name).await?;
            let recorded = claim.as_ref().and_then(|c| c.xxh3_128.clone().zip(c.size));
            let same = |(h, s): &(String, u64)| h == xxh3 && *s == size;
            match (recorded, self.stored(&name)) {
                (Some(r), Some(stored)) if same(&r) && stored == size => {
                    return Ok(Some(Found::Landed(name)));
                }
                (Some(r), None) if same(&r) => {
                    // Keep looking: a complete landing of the bytes beats
                    // completing an unfinished one.
                    unfinished.get_or_insert(name);
                }
                (None, Some(stored)) if stored == size => {
                    let h = match self.hashed.get(&name) {
                        Some(h) => h.clone(),
                        None => {
                            let (h, _) =
                                hash_object(self.root, self.stage, &self.path_of(&name)).await?;
                            self.hashed.insert(name.clone(), h.clone());
                            h
                        }
                    };
                    if h == xxh3 {
                        return Ok(Some(Found::Landed(name)));
                    }
                }
                _ => {}
            }
        }
        Ok(unfinished.map(Found::Unfinished))
    }

    /// The names claimed for `source`, each with the size of its data object
    /// when that exists.
    pub async fn find_source(&mut self, source: &str) -> Result<Vec<(RawFileName, Option<u64>)>> {
        self.read_all_claims().await?;
        Ok(self
            .claims
            .iter()
            .filter(|(_, c)| c.as_ref().is_some_and(|c| c.source == source))
            .map(|(n, _)| (n.clone(), self.stored(n)))
            .collect())
    }

    /// Claims a free name for a file that wants to be called `wanted`.
    pub async fn claim(&mut self, wanted: &RawFileName, claim: Claim) -> Result<RawFileName> {
        let body = serde_json::to_vec_pretty(&claim).expect("JSON serialises");
        let mut name = wanted.clone();
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            if self.taken(&name) {
                name = wanted.with_part(self.next_part(wanted.resource_type));
                continue;
            }
            let path = self.claim_path(&name);
            if self.root.create(self.stage, &path, body.clone()).await? {
                self.claims.insert(name.clone(), Some(claim));
                return Ok(name);
            }
            // Another landing took it since the listing: count past it.
            self.claims.insert(name.clone(), None);
        }
        Err(Error::Input {
            path: self
                .root
                .url_of(
                    &self
                        .root
                        .paths
                        .raw_claims(&self.tenant, &self.system, self.date),
                )
                .into(),
            reason: format!(
                "no free name for {} after {MAX_CLAIM_ATTEMPTS} attempts",
                wanted.as_str()
            ),
        })
    }

    fn taken(&self, name: &RawFileName) -> bool {
        self.files.contains_key(name) || self.claims.contains_key(name)
    }

    /// One above the highest part number of `ty` in the partition, counting
    /// `<Type>.ndjson` as part 1, so a second landing is part 2.
    fn next_part(&self, ty: &str) -> u64 {
        let highest = self
            .files
            .keys()
            .chain(self.claims.keys())
            .filter(|n| n.resource_type == ty)
            .map(|n| n.part().unwrap_or(1))
            .max()
            .unwrap_or(1);
        highest.max(1) + 1
    }
}

async fn read_claim(root: &Root, stage: &'static str, path: &Path) -> Result<Claim> {
    let unreadable = |reason: String| Error::Input {
        path: root.url_of(path).into(),
        reason,
    };
    // Claims are never deleted, so a listed claim that is gone is damage.
    let bytes = root
        .get_bytes(stage, path)
        .await?
        .ok_or_else(|| unreadable("a raw name claim was listed but is gone".into()))?;
    serde_json::from_slice(&bytes).map_err(|e| unreadable(format!("not a raw name claim: {e}")))
}

/// The xxh3-128 and size of an object, streamed.
pub async fn hash_object(root: &Root, stage: &'static str, path: &Path) -> Result<(String, u64)> {
    let store_err = |e| Error::store(stage, root.url_of(path), e);
    let mut stream = root.store.get(path).await.map_err(store_err)?.into_stream();
    let mut hasher = Checksum::default();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(store_err)?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
    }
    Ok((hasher.hex(), size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::S3Settings;

    fn partition_values() -> (TenantGuid, SourceSystem, ImportDate) {
        (
            "0f8fad5b-d9cb-469f-a165-70867728950e".parse().unwrap(),
            "epic".parse().unwrap(),
            "2024-05-01".parse().unwrap(),
        )
    }

    fn name(s: &str) -> RawFileName {
        RawFileName::parse(s).unwrap()
    }

    #[tokio::test]
    async fn names_count_up_and_claims_are_found_by_content_and_source() {
        let root = Root::open("memory://lake", &S3Settings::default()).unwrap();
        let (t, s, d) = partition_values();
        let mut p = Partition::read(&root, "test", &t, &s, d).await.unwrap();
        let wanted = name("Patient.ndjson");
        let first = p
            .claim(&wanted, Claim::new("ingest", Some(("aa", 3))))
            .await
            .unwrap();
        assert_eq!(first, wanted);
        root.put("test", &p.path_of(&first), b"abc".to_vec())
            .await
            .unwrap();
        p.landed(&first, 3);

        // A second process, listing after the first claimed: the next part.
        let mut q = Partition::read(&root, "test", &t, &s, d).await.unwrap();
        let second = q
            .claim(&wanted, Claim::new("ingest", Some(("bb", 4))))
            .await
            .unwrap();
        assert_eq!(second.as_str(), "Patient.002.ndjson");
        // The first process's listing predates the second's claim: it loses
        // the race for 002 and counts past it. Gzip keeps its suffix.
        let third = p.claim(&wanted, Claim::new("x", None)).await.unwrap();
        assert_eq!(third.as_str(), "Patient.003.ndjson");
        let gz = name("Patient.ndjson.gz");
        let fourth = p.claim(&gz, Claim::new("x", None)).await.unwrap();
        assert_eq!(fourth, gz);
        let fifth = p.claim(&gz, Claim::new("x", None)).await.unwrap();
        assert_eq!(fifth.as_str(), "Patient.004.ndjson.gz");

        // Read back by a fresh listing: landed, unfinished, by source.
        let mut r = Partition::read(&root, "test", &t, &s, d).await.unwrap();
        assert_eq!(
            r.find_content(&wanted, "aa", 3).await.unwrap(),
            Some(Found::Landed(first.clone()))
        );
        assert_eq!(
            r.find_content(&wanted, "bb", 4).await.unwrap(),
            Some(Found::Unfinished(second.clone()))
        );
        assert_eq!(r.find_content(&wanted, "aa", 4).await.unwrap(), None);
        // Same bytes, other type: another file.
        assert_eq!(
            r.find_content(&name("Condition.ndjson"), "aa", 3)
                .await
                .unwrap(),
            None
        );
        let by_source = r.find_source("x").await.unwrap();
        assert_eq!(
            by_source,
            vec![(third, None), (fifth, None), (fourth, None)]
        );
    }

    #[tokio::test]
    async fn objects_without_a_recorded_hash_are_compared_by_their_bytes() {
        let root = Root::open("memory://lake", &S3Settings::default()).unwrap();
        let (t, s, d) = partition_values();
        // A file landed before claims existed: data, no claim.
        let legacy = name("Condition.ndjson");
        let path = root.paths.raw_file(&t, &s, d, &legacy);
        root.put("test", &path, b"{}\n".to_vec()).await.unwrap();
        let mut p2 = Partition::read(&root, "test", &t, &s, d).await.unwrap();
        let h = Checksum::of(b"{}\n");
        assert_eq!(
            p2.find_content(&legacy, &h, 3).await.unwrap(),
            Some(Found::Landed(legacy.clone()))
        );
        // Its name is taken even though no claim has it.
        let next = p2.claim(&legacy, Claim::new("ingest", None)).await.unwrap();
        assert_eq!(next.as_str(), "Condition.002.ndjson");
        // Claims never pose as data for readers.
        let files = crate::raw::list_files(&root, "test", &root.paths.raw_tenant(&t))
            .await
            .unwrap();
        assert_eq!(files.len(), 1);
        assert!(files[0].origin.source_file.ends_with("/Condition.ndjson"));
    }
}
