//! The import ledger: per tenant and target, the version of each resource
//! the target holds, so that an import sends only what changed.
//!
//! Each import that sent records writes one Parquet file of them
//! (`metadata/_ledger/tenantGuid=…/target=…/<job id>.parquet`: type, id,
//! versionId, lastUpdated, import date, content hash) once the target has
//! them. The ledger is the newest entry per (type, id) over those files, by
//! [`Latest`]. A file is written only after its import succeeded, so a crash
//! in between costs a re-send of its records (the target's import is an
//! upsert by id), never a record the target lacks.
//!
//! A curated record is then
//! * **stale** when it is older, by [`Latest`], than the version the target
//!   holds: sending it would overwrite a newer one;
//! * **unchanged** when its content hash, taken over the text without the
//!   values of `meta.versionId` and `meta.lastUpdated`, is the held one's;
//! * sent otherwise.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, BooleanArray, Date32Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use fhirflow_udfs::json::Scanned;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::STAGE;
use crate::curate::parse::Keys;
use crate::error::{Error, Result};
use crate::layout::TenantGuid;
use crate::storage::Lake;
use object_store::path::Path;

/// The order of versions of one resource (DESIGN.md, "Latest"): the highest
/// `meta.versionId` as a number when it is one, else as text, then the latest
/// `meta.lastUpdated`, then the latest import date; a missing value sorts
/// lowest. Dedup (`curate/dedup.sql`) and the lake's current view
/// (`sql/lake_tables.rs`) order by the same columns, then by what breaks
/// ties within one import (file and line; import time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latest {
    pub version_id: Option<String>,
    pub last_updated: Option<i64>,
    pub import_date: i32,
}

impl Latest {
    /// `TRY_CAST(version_id AS DECIMAL(38, 0))`: an integer of up to 38
    /// digits.
    fn numeric(&self) -> Option<i128> {
        let v = self.version_id.as_deref()?.trim();
        let digits = v.strip_prefix(['-', '+']).unwrap_or(v);
        if digits.is_empty() || digits.len() > 38 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        v.parse().ok()
    }
}

impl Ord for Latest {
    fn cmp(&self, other: &Self) -> Ordering {
        self.numeric()
            .cmp(&other.numeric())
            .then_with(|| self.version_id.cmp(&other.version_id))
            .then_with(|| self.last_updated.cmp(&other.last_updated))
            .then_with(|| self.import_date.cmp(&other.import_date))
    }
}

impl PartialOrd for Latest {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The xxh3-128 of a resource's text without the values of its
/// `meta.versionId` and `meta.lastUpdated`: two versions that differ only
/// there have the same content.
pub fn content_hash(text: &str, scan: &Scanned) -> u128 {
    let mut cut: Vec<(usize, usize)> = [scan.meta_fields.version_id, scan.meta_fields.last_updated]
        .into_iter()
        .flatten()
        .map(|s| (s.start, s.end))
        .collect();
    cut.sort_unstable();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut at = 0;
    for (start, end) in cut {
        h.update(&text.as_bytes()[at..start]);
        at = end;
    }
    h.update(&text.as_bytes()[at..]);
    h.digest128()
}

/// What the ledger says of one curated record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Send,
    Unchanged,
    Stale,
}

/// One resource as the target holds it (or is being sent).
#[derive(Debug, Clone)]
pub struct Entry {
    pub resource_type: String,
    pub id: String,
    pub latest: Latest,
    pub hash: u128,
    /// A deletion the target applied: the resource is no longer held.
    pub deleted: bool,
}

impl Entry {
    pub fn of(keys: &Keys<'_>, import_date: i32, hash: u128) -> Entry {
        Entry {
            resource_type: keys.resource_type.to_string(),
            id: keys.id.to_string(),
            latest: Latest {
                version_id: keys.version_id.as_deref().map(str::to_string),
                last_updated: keys.last_updated,
                import_date,
            },
            hash,
            deleted: false,
        }
    }

    /// The entry of a deletion applied on `import_date`.
    pub fn deletion(resource_type: &str, id: &str, import_date: i32) -> Entry {
        Entry {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            latest: Latest {
                version_id: None,
                last_updated: None,
                import_date,
            },
            hash: 0,
            deleted: true,
        }
    }
}

/// The ledger of one tenant and target, as it was when the import began.
#[derive(Debug, Default)]
pub struct Ledger {
    held: HashMap<(String, String), (Latest, u128)>,
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("resource_type", DataType::Utf8, false),
        Field::new("id", DataType::Utf8, false),
        Field::new("version_id", DataType::Utf8, true),
        Field::new(
            "last_updated",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
        Field::new("import_date", DataType::Date32, false),
        Field::new("content_hash", DataType::Utf8, false),
        Field::new("deleted", DataType::Boolean, true),
    ]))
}

impl Ledger {
    /// Reads every file of the tenant's ledger for `target`.
    pub async fn load(lake: &Lake, tenant: &TenantGuid, target: &str) -> Result<Ledger> {
        let root = &lake.metadata;
        let mut ledger = Ledger::default();
        for obj in root.list(STAGE, &root.paths.ledger(tenant, target)).await? {
            for e in read_entries(lake, &obj.location).await? {
                let key = (e.resource_type, e.id);
                if e.deleted {
                    // Files are read in job order (ids are time-ordered), so
                    // a deletion ends what earlier imports held.
                    ledger.held.remove(&key);
                } else {
                    ledger.hold(key.0, key.1, e.latest, e.hash);
                }
            }
        }
        Ok(ledger)
    }

    fn hold(&mut self, ty: String, id: String, latest: Latest, hash: u128) {
        match self.held.entry((ty, id)) {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                if latest >= o.get().0 {
                    o.insert((latest, hash));
                }
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert((latest, hash));
            }
        }
    }

    /// Whether the target holds resource `ty`/`id`.
    pub fn holds(&self, ty: &str, id: &str) -> bool {
        self.held.contains_key(&(ty.to_string(), id.to_string()))
    }

    pub fn judge(&self, e: &Entry) -> Verdict {
        // One allocation-free lookup would need a borrowed key type; the
        // import allocates the entry anyway for the file it writes.
        let Some((held, hash)) = self.held.get(&(e.resource_type.clone(), e.id.clone())) else {
            return Verdict::Send;
        };
        if e.latest < *held {
            Verdict::Stale
        } else if e.hash == *hash {
            Verdict::Unchanged
        } else {
            Verdict::Send
        }
    }
}

/// The entries of one ledger-format file (a ledger file, or the entries an
/// import is about to send); none when it is absent.
pub async fn read_entries(lake: &Lake, path: &Path) -> Result<Vec<Entry>> {
    let root = &lake.metadata;
    let Some(bytes) = root.get_bytes(STAGE, path).await? else {
        return Ok(Vec::new());
    };
    let bad = |e: &dyn std::fmt::Display| Error::Input {
        path: root.url_of(path).into(),
        reason: format!("not a ledger file: {e}"),
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .and_then(|b| b.build())
        .map_err(|e| bad(&e))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| bad(&e))?;
        entries_of(&batch, &mut out).map_err(|e| bad(&e))?;
    }
    Ok(out)
}

fn entries_of(b: &RecordBatch, out: &mut Vec<Entry>) -> std::result::Result<(), String> {
    fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> std::result::Result<&'a T, String> {
        b.column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<T>())
            .ok_or_else(|| format!("no column {name} of the ledger's type"))
    }
    let ty = col::<StringArray>(b, "resource_type")?;
    let id = col::<StringArray>(b, "id")?;
    let version = col::<StringArray>(b, "version_id")?;
    let updated = col::<TimestampMicrosecondArray>(b, "last_updated")?;
    let date = col::<Date32Array>(b, "import_date")?;
    let hash = col::<StringArray>(b, "content_hash")?;
    let deleted = col::<BooleanArray>(b, "deleted").ok();
    for i in 0..b.num_rows() {
        out.push(Entry {
            resource_type: ty.value(i).to_string(),
            id: id.value(i).to_string(),
            latest: Latest {
                version_id: version.is_valid(i).then(|| version.value(i).to_string()),
                last_updated: updated.is_valid(i).then(|| updated.value(i)),
                import_date: date.value(i),
            },
            hash: u128::from_str_radix(hash.value(i), 16)
                .map_err(|e| format!("content_hash {}: {e}", hash.value(i)))?,
            deleted: deleted.is_some_and(|d| d.is_valid(i) && d.value(i)),
        });
    }
    Ok(())
}

/// Writes the entries the target took as the import's ledger file.
pub async fn save(
    lake: &Lake,
    tenant: &TenantGuid,
    target: &str,
    job_id: &str,
    entries: &[Entry],
) -> Result<()> {
    let path = lake
        .metadata
        .paths
        .ledger(tenant, target)
        .join(format!("{job_id}.parquet").as_str());
    write_entries(lake, &path, entries).await
}

/// Writes `entries` in the ledger's format at `path` (nothing when there
/// are none).
pub async fn write_entries(lake: &Lake, path: &Path, entries: &[Entry]) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let batch = RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from_iter_values(
                entries.iter().map(|e| e.resource_type.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                entries.iter().map(|e| e.id.as_str()),
            )),
            Arc::new(
                entries
                    .iter()
                    .map(|e| e.latest.version_id.as_deref())
                    .collect::<StringArray>(),
            ),
            Arc::new(
                entries
                    .iter()
                    .map(|e| e.latest.last_updated)
                    .collect::<TimestampMicrosecondArray>()
                    .with_timezone("UTC"),
            ),
            Arc::new(
                entries
                    .iter()
                    .map(|e| Some(e.latest.import_date))
                    .collect::<Date32Array>(),
            ),
            Arc::new(StringArray::from_iter_values(
                entries.iter().map(|e| format!("{:032x}", e.hash)),
            )),
            Arc::new(
                entries
                    .iter()
                    .map(|e| Some(e.deleted))
                    .collect::<BooleanArray>(),
            ),
        ],
    )
    .expect("ledger columns match");
    crate::metadata::write_parquet(&lake.metadata, STAGE, path, &batch).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(v: Option<&str>, lu: Option<i64>, d: i32) -> Latest {
        Latest {
            version_id: v.map(str::to_string),
            last_updated: lu,
            import_date: d,
        }
    }

    #[test]
    fn latest_is_the_highest_version_as_a_number_then_last_updated_then_import_date() {
        assert!(at(Some("10"), None, 1) > at(Some("9"), Some(5), 2));
        assert!(at(Some("2"), None, 1) > at(None, Some(9), 9));
        assert!(at(Some("1"), Some(2), 1) > at(Some("1"), Some(1), 5));
        assert!(at(Some("1"), None, 2) > at(Some("1"), None, 1));
        // A number outranks text; text compares as text.
        assert!(at(Some("3"), None, 1) > at(Some("b"), None, 1));
        assert!(at(Some("b"), None, 1) > at(Some("a"), None, 1));
    }

    /// The order here is dedup.sql's: the survivor ORDER BY of the real
    /// file, run by DataFusion over the same cases, ranks them as
    /// [`Latest`] does.
    #[tokio::test]
    async fn latest_orders_as_dedup_sql_does() {
        let sql = crate::curate::dedup::DEDUP_SQL;
        // The survivor order, after the id's key in dedup's ORDER BY.
        let start = sql.find("TRY_CAST(k.version_id").expect("dedup's ORDER BY");
        let end = start
            + sql[start..]
                .find("k.source_file")
                .expect("its file tie-break");
        let order = format!(
            "ORDER BY {}",
            sql[start..end]
                .replace("k.", "")
                .trim()
                .trim_end_matches(',')
        );
        let cases = [
            (Some("10"), None, 1),
            (Some("9"), Some(5), 2),
            (Some("2"), None, 1),
            (None, Some(9), 9),
            (Some("b"), None, 1),
            (Some("a"), Some(3), 4),
            (Some("007"), Some(1), 1),
            (Some("1"), Some(2), 1),
            (Some("1"), Some(1), 5),
            (Some("1"), None, 2),
            (None, None, 3),
        ];
        let values: Vec<String> = cases
            .iter()
            .enumerate()
            .map(|(i, (v, lu, d))| {
                format!(
                    "({i}, {}, {}, {d})",
                    v.map_or("CAST(NULL AS VARCHAR)".into(), |v| format!("'{v}'")),
                    lu.map_or("CAST(NULL AS BIGINT)".into(), |n| n.to_string()),
                )
            })
            .collect();
        let q = format!(
            "SELECT n FROM (VALUES {}) AS t(n, version_id, last_updated, import_date) {order}",
            values.join(", ")
        );
        let ctx = datafusion::prelude::SessionContext::new();
        let batches = ctx.sql(&q).await.unwrap().collect().await.unwrap();
        let from_sql: Vec<i64> = batches
            .iter()
            .flat_map(|b| {
                let c = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .unwrap();
                c.values().to_vec()
            })
            .collect();
        let mut from_rust: Vec<(Latest, i64)> = cases
            .iter()
            .enumerate()
            .map(|(i, (v, lu, d))| (at(*v, *lu, *d), i as i64))
            .collect();
        from_rust.sort_by(|a, b| b.0.cmp(&a.0));
        let from_rust: Vec<i64> = from_rust.into_iter().map(|(_, i)| i).collect();
        assert_eq!(from_sql, from_rust, "{order}");
    }

    #[test]
    fn the_content_hash_ignores_only_version_and_last_updated() {
        let hash = |t: &str| {
            let scan = fhirflow_udfs::json::scan_resource(t, 64).unwrap();
            content_hash(t, &scan)
        };
        let a = r#"{"resourceType":"Patient","id":"p","meta":{"versionId":"1","lastUpdated":"2024-01-01T00:00:00Z"},"gender":"male"}"#;
        let b = r#"{"resourceType":"Patient","id":"p","meta":{"versionId":"2","lastUpdated":"2024-02-01T00:00:00Z"},"gender":"male"}"#;
        let c = r#"{"resourceType":"Patient","id":"p","meta":{"versionId":"2","lastUpdated":"2024-02-01T00:00:00Z"},"gender":"female"}"#;
        assert_eq!(hash(a), hash(b));
        assert_ne!(hash(b), hash(c));
    }

    #[test]
    fn a_record_is_sent_unchanged_or_stale() {
        let mut l = Ledger::default();
        l.hold("Patient".into(), "p".into(), at(Some("2"), None, 10), 7);
        let e = |v: &str, hash| Entry {
            resource_type: "Patient".into(),
            id: "p".into(),
            latest: at(Some(v), None, 11),
            hash,
            deleted: false,
        };
        assert_eq!(l.judge(&e("2", 7)), Verdict::Unchanged);
        assert_eq!(l.judge(&e("3", 7)), Verdict::Unchanged);
        assert_eq!(l.judge(&e("3", 8)), Verdict::Send);
        assert_eq!(l.judge(&e("1", 8)), Verdict::Stale);
        let mut other = e("1", 8);
        other.id = "q".into();
        assert_eq!(l.judge(&other), Verdict::Send);
    }
}
