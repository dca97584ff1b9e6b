//! The partition lease: at most one writing run per partition at a time.
//!
//! A lease is a sequence of small objects under the partition's lease folder,
//! `metadata/_leases/<partition>/<generation>.json`, each created with a
//! create-only write (S3 `If-None-Match: *`, a hard link on a local disk). The
//! highest generation is the lease's state. Every change (take, renew, take
//! over, hand to a HealthLake job, release) is the creation of the next
//! generation, so of two runs that both try the same change exactly one
//! succeeds, on every store object_store supports.
//!
//! Why generations and not one object updated with `If-Match` on its ETag:
//! object_store's local store has no `PutMode::Update`, and a lake on a local
//! disk must be as safe as one on S3. Creating generation n+1 is the same
//! compare-and-swap as an ETag-conditional update of generation n.
//!
//! A holder renews its lease every third of its time to live; a run that
//! crashed stops renewing, and once its lease has expired the next run takes
//! it over. A run whose renewal finds that someone else took the lease over
//! has lost it: [`Lease::ensure_held`] fails and the run commits nothing. A
//! HealthLake import hands its lease to its job ([`Lease::hand_to_job`]): such
//! a lease does not expire, and only a run that settles that job (import, or
//! `import status`) takes it over.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::storage::Root;

const STAGE: &str = "lease";
/// Generations kept behind the current one (the rest are deleted): enough to
/// read the lease while another run writes the next one.
const KEEP: u64 = 2;

/// One generation of a lease.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseRecord {
    pub generation: u64,
    pub stage: String,
    pub run_id: String,
    pub host: String,
    pub pid: u32,
    /// When this generation was written (µs since the epoch, the writer's clock).
    pub written_at: i64,
    /// When it lapses unless renewed; None while a HealthLake job holds it.
    pub expires_at: Option<i64>,
    /// The holder gave the lease up.
    pub released: bool,
    /// The HealthLake import job that holds the partition until it ends.
    pub healthlake_job_id: Option<String>,
}

impl LeaseRecord {
    /// Whether another run may take the lease now.
    fn free(&self, now: i64) -> bool {
        self.released || self.expires_at.is_some_and(|e| e <= now)
    }

    /// Who holds it, for the busy message.
    fn holder(&self) -> String {
        match &self.healthlake_job_id {
            Some(job) => format!(
                "HealthLake import job {job} (started by {} run {}) is in flight; \
                 `fhirflow import status` ends it once the job is done",
                self.stage, self.run_id
            ),
            None => format!(
                "{} run {} on {} (pid {}) holds the lease until {}",
                self.stage,
                self.run_id,
                self.host,
                self.pid,
                self.expires_at
                    .and_then(chrono::DateTime::from_timestamp_micros)
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_default()
            ),
        }
    }
}

/// How long to wait and how long a lease lives.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub ttl: Duration,
    pub wait: Duration,
}

impl Timing {
    pub fn from_settings(s: &crate::settings::LeaseSettings) -> Timing {
        Timing {
            ttl: Duration::from_secs(s.ttl_seconds),
            wait: Duration::from_secs(s.wait_seconds),
        }
    }
}

/// Which runs a newly taken lease may displace besides free ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Take<'a> {
    /// Only a released or expired lease.
    Free,
    /// Also a lease handed to this HealthLake job: the run settles the job.
    SettlingJob(&'a str),
}

#[derive(Debug)]
struct Held {
    record: LeaseRecord,
    /// Set when a renewal found the lease taken over, or failed for good.
    lost: Option<String>,
}

/// A lease this run holds. Dropping it without [`Lease::release`] stops the
/// renewals: the lease then expires like a crashed run's.
#[derive(Debug)]
pub struct Lease {
    root: Root,
    dir: Path,
    /// The partition, for messages.
    partition: String,
    held: Arc<Mutex<Held>>,
    /// Every write of a generation (renewals included) takes this first, so
    /// that this run never races itself for a generation number.
    writes: Arc<tokio::sync::Mutex<()>>,
    /// Tells the renewer to write no more (checked under `writes`).
    stopped: Arc<std::sync::atomic::AtomicBool>,
    renewer: Option<tokio::task::JoinHandle<()>>,
    ttl: Duration,
    /// The lease this run took over from a holder that never released it
    /// (it crashed): that run can no longer commit, so what it left is garbage.
    displaced: Option<LeaseRecord>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
    }
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn generation_path(dir: &Path, generation: u64) -> Path {
    dir.clone().join(format!("{generation:020}.json"))
}

/// The lease's current generation (None: never taken).
pub async fn current(root: &Root, dir: &Path) -> Result<Option<LeaseRecord>> {
    // Listing, then reading the highest: a generation deleted between the two
    // (the holder pruning old ones) only happens to one that is not highest.
    loop {
        let listed = root.list(STAGE, dir).await?;
        let Some(last) = listed
            .iter()
            .filter(|o| o.location.filename().is_some_and(|n| n.ends_with(".json")))
            .max_by(|a, b| a.location.cmp(&b.location))
        else {
            return Ok(None);
        };
        let Some(bytes) = root.get_bytes(STAGE, &last.location).await? else {
            continue; // pruned after a newer generation appeared: look again
        };
        let record: LeaseRecord = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
            stage: STAGE,
            location: root.url_of(&last.location),
            detail: format!("not a lease record: {e}"),
        })?;
        return Ok(Some(record));
    }
}

impl Lease {
    /// Takes the lease of the partition whose lease folder is `dir`, waiting
    /// up to `timing.wait` while another run holds it; [`Error::Busy`] after
    /// that.
    pub async fn acquire(
        root: &Root,
        dir: Path,
        partition: String,
        stage: &'static str,
        run_id: &str,
        timing: Timing,
        take: Take<'_>,
    ) -> Result<Lease> {
        let deadline = tokio::time::Instant::now() + timing.wait;
        let mut waiting_for: Option<String> = None;
        loop {
            let now = now_micros();
            let current = current(root, &dir).await?;
            let takeable = match &current {
                None => true,
                Some(r) => {
                    r.free(now)
                        || matches!(take, Take::SettlingJob(job)
                            if r.healthlake_job_id.as_deref() == Some(job))
                }
            };
            if takeable {
                let generation = current.as_ref().map_or(1, |r| r.generation + 1);
                // A run settling a HealthLake job keeps the job's claim on the
                // partition until it has seen the job end.
                let job = match take {
                    Take::SettlingJob(job)
                        if current
                            .as_ref()
                            .and_then(|r| r.healthlake_job_id.as_deref())
                            == Some(job) =>
                    {
                        Some(job.to_string())
                    }
                    _ => None,
                };
                let record = LeaseRecord {
                    generation,
                    stage: stage.to_string(),
                    run_id: run_id.to_string(),
                    host: hostname(),
                    pid: std::process::id(),
                    written_at: now,
                    expires_at: job.is_none().then_some(now + timing.ttl.as_micros() as i64),
                    released: false,
                    healthlake_job_id: job,
                };
                // Created, and still the newest: a generation number that was
                // pruned long ago can be created again by a run that read a
                // stale state, so creation alone does not prove the take.
                let newest = |r: Option<LeaseRecord>| r.is_some_and(|r| r.generation == generation);
                if write(root, &dir, &record).await? && newest(self::current(root, &dir).await?) {
                    let mut lease = Lease {
                        root: root.clone(),
                        dir,
                        partition,
                        held: Arc::new(Mutex::new(Held { record, lost: None })),
                        writes: Arc::default(),
                        stopped: Arc::default(),
                        renewer: None,
                        ttl: timing.ttl,
                        displaced: current.filter(|r| !r.released),
                    };
                    lease.prune().await;
                    lease.start_renewing();
                    return Ok(lease);
                }
                continue; // another run wrote that generation first: look again
            }
            let holder = current.expect("a held lease").holder();
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Busy {
                    stage,
                    partition,
                    holder,
                });
            }
            if waiting_for.as_ref() != Some(&holder) {
                let left = deadline - tokio::time::Instant::now();
                tracing::info!(
                    stage,
                    partition = %partition,
                    holder = %holder,
                    wait_seconds = left.as_secs_f64(),
                    "partition busy; waiting"
                );
                waiting_for = Some(holder);
            }
            let pause = Duration::from_millis(500).min(deadline - tokio::time::Instant::now());
            tokio::time::sleep(pause.max(Duration::from_millis(50))).await;
        }
    }

    /// The holder this run took the lease over from, when it never released it.
    pub fn displaced(&self) -> Option<&LeaseRecord> {
        self.displaced.as_ref()
    }

    /// The lease record as this run last wrote it.
    pub fn record(&self) -> LeaseRecord {
        self.held.lock().expect("lease lock").record.clone()
    }

    /// Fails unless this run still holds the lease (checked against the
    /// store, not only the renewer's last word). Called right before a
    /// commit: a run that lost its lease must not publish.
    pub async fn ensure_held(&self) -> Result<()> {
        let (mine, lost) = {
            let h = self.held.lock().expect("lease lock");
            (h.record.clone(), h.lost.clone())
        };
        if let Some(detail) = lost {
            return Err(self.lost(detail));
        }
        match current(&self.root, &self.dir).await? {
            // A renewal may have landed since `mine` was read: same run, a
            // generation at least as new.
            Some(r)
                if r.run_id == mine.run_id && r.generation >= mine.generation && !r.released =>
            {
                // Commit only with a third of the lease's time left (renewals
                // keep two thirds): a run whose renewals failed stops here,
                // well before another run can take the lease over.
                let margin = (self.ttl / 3).as_micros() as i64;
                if r.expires_at.is_some_and(|e| e - margin <= now_micros()) {
                    return Err(self.lost("it is about to expire (renewals failed)".into()));
                }
                Ok(())
            }
            Some(r) => Err(self.lost(format!("now held by {}", r.holder()))),
            None => Err(self.lost("the lease is gone".into())),
        }
    }

    fn lost(&self, detail: String) -> Error {
        Error::LeaseLost {
            stage: STAGE,
            partition: self.partition.clone(),
            detail,
        }
    }

    /// Gives the lease to a HealthLake job: it holds the partition, without
    /// expiring, until a run that settles the job takes it over.
    pub async fn hand_to_job(mut self, job_id: &str) -> Result<()> {
        self.stop_renewing().await;
        self.advance(|r| {
            r.expires_at = None;
            r.healthlake_job_id = Some(job_id.to_string());
        })
        .await
    }

    /// Records the job that this run now waits for, so that a crash of this
    /// run leaves the partition held by the job (not free for a re-curate
    /// while HealthLake still reads it).
    pub async fn note_job(&self, job_id: &str) -> Result<()> {
        self.advance(|r| {
            r.expires_at = None;
            r.healthlake_job_id = Some(job_id.to_string());
        })
        .await
    }

    /// Gives the lease up.
    pub async fn release(mut self) -> Result<()> {
        self.stop_renewing().await;
        self.advance(|r| {
            r.released = true;
            r.healthlake_job_id = None;
        })
        .await
    }

    /// Writes the next generation: this run's record changed by `change`.
    async fn advance(&self, change: impl FnOnce(&mut LeaseRecord)) -> Result<()> {
        let _writing = self.writes.lock().await;
        let mut next = self.record();
        change(&mut next);
        next.generation += 1;
        next.written_at = now_micros();
        if !write(&self.root, &self.dir, &next).await? {
            let detail = "another run wrote the lease".to_string();
            self.held.lock().expect("lease lock").lost = Some(detail.clone());
            return Err(self.lost(detail));
        }
        self.held.lock().expect("lease lock").record = next;
        self.prune().await;
        Ok(())
    }

    /// Stops the renewals, after a renewal in flight has finished.
    async fn stop_renewing(&mut self) {
        let _writing = self.writes.lock().await;
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
    }

    fn start_renewing(&mut self) {
        let (root, dir, held, writes, stopped, ttl) = (
            self.root.clone(),
            self.dir.clone(),
            self.held.clone(),
            self.writes.clone(),
            self.stopped.clone(),
            self.ttl,
        );
        self.renewer = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                let _writing = writes.lock().await;
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let mut next = held.lock().expect("lease lock").record.clone();
                if next.expires_at.is_none() {
                    continue; // a HealthLake job holds it: nothing to renew
                }
                next.generation += 1;
                next.written_at = now_micros();
                next.expires_at = Some(next.written_at + ttl.as_micros() as i64);
                match write(&root, &dir, &next).await {
                    Ok(true) => {
                        held.lock().expect("lease lock").record = next.clone();
                        let old = next.generation.saturating_sub(KEEP + 1);
                        if old > 0 {
                            let _ = root.delete(STAGE, &generation_path(&dir, old)).await;
                        }
                    }
                    Ok(false) => {
                        tracing::warn!(lease = %dir, "lost the lease: another run took it over (a renewal came too late)");
                        held.lock().expect("lease lock").lost =
                            Some("another run took it over (a renewal came too late)".into());
                        return;
                    }
                    // A passing store error: try again at the next tick; if
                    // they go on, the lease runs short and `ensure_held`
                    // stops the run before it commits.
                    Err(e) => {
                        tracing::warn!(lease = %dir, "renewing the lease failed, trying again in {:.0} s: {e}", (ttl / 3).as_secs_f64());
                    }
                }
            }
        }));
    }

    /// Deletes generations older than the last few (best effort: a leftover
    /// old generation is never read as current).
    async fn prune(&self) {
        let generation = self.record().generation;
        let Ok(listed) = self.root.list(STAGE, &self.dir).await else {
            return;
        };
        for o in listed {
            let g = o
                .location
                .filename()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| n.parse::<u64>().ok());
            if g.is_some_and(|g| g + KEEP < generation) {
                let _ = self.root.delete(STAGE, &o.location).await;
            }
        }
    }
}

/// Creates one generation; false when it exists already.
async fn write(root: &Root, dir: &Path, record: &LeaseRecord) -> Result<bool> {
    let bytes = serde_json::to_vec_pretty(record).expect("lease record serialises");
    root.create(STAGE, &generation_path(dir, record.generation), bytes)
        .await
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::S3Settings;

    fn timing(ttl_ms: u64, wait_ms: u64) -> Timing {
        Timing {
            ttl: Duration::from_millis(ttl_ms),
            wait: Duration::from_millis(wait_ms),
        }
    }

    fn roots() -> Vec<(Root, tempfile::TempDir)> {
        let dir = tempfile::tempdir().unwrap();
        let local = Root::open(dir.path().to_str().unwrap(), &S3Settings::default()).unwrap();
        let mem = Root::open("memory://", &S3Settings::default()).unwrap();
        vec![(local, dir), (mem, tempfile::tempdir().unwrap())]
    }

    fn dir(root: &Root) -> Path {
        root.paths
            .prefix
            .clone()
            .join("metadata")
            .join("_leases")
            .join("p")
    }

    async fn take(root: &Root, run: &str, t: Timing) -> Result<Lease> {
        Lease::acquire(root, dir(root), "p".into(), "curate", run, t, Take::Free).await
    }

    #[tokio::test]
    async fn second_run_is_busy_then_takes_a_released_lease() {
        for (root, _dir) in roots() {
            let a = take(&root, "a", timing(60_000, 0)).await.unwrap();
            let err = take(&root, "b", timing(60_000, 0)).await.unwrap_err();
            assert!(matches!(err, Error::Busy { .. }), "{err}");
            assert_eq!(err.exit_code(), 4);
            a.ensure_held().await.unwrap();
            a.release().await.unwrap();
            let b = take(&root, "b", timing(60_000, 0)).await.unwrap();
            assert_eq!(b.record().run_id, "b");
        }
    }

    #[tokio::test]
    async fn a_waiting_run_gets_the_lease_when_it_is_released() {
        for (root, _dir) in roots() {
            let a = take(&root, "a", timing(60_000, 0)).await.unwrap();
            let r = root.clone();
            let waiter = tokio::spawn(async move { take(&r, "b", timing(60_000, 5_000)).await });
            tokio::time::sleep(Duration::from_millis(300)).await;
            a.release().await.unwrap();
            let b = waiter.await.unwrap().unwrap();
            assert_eq!(b.record().run_id, "b");
        }
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_once_and_its_holder_cannot_commit() {
        for (root, _dir) in roots() {
            let mut a = take(&root, "a", timing(200, 0)).await.unwrap();
            a.stop_renewing().await; // as if the holder froze
            tokio::time::sleep(Duration::from_millis(300)).await;
            // Two runs race for the expired lease: exactly one wins.
            let (b, c) = tokio::join!(
                take(&root, "b", timing(60_000, 0)),
                take(&root, "c", timing(60_000, 0))
            );
            assert_eq!(b.is_ok() as u8 + c.is_ok() as u8, 1);
            let err = a.ensure_held().await.unwrap_err();
            assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
        }
    }

    #[tokio::test]
    async fn renewals_keep_a_live_lease() {
        for (root, _dir) in roots() {
            let a = take(&root, "a", timing(300, 0)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(800)).await;
            assert!(take(&root, "b", timing(300, 0)).await.is_err());
            a.ensure_held().await.unwrap();
            assert!(a.record().generation > 1);
        }
    }

    #[tokio::test]
    async fn a_job_holds_the_lease_until_a_run_settles_it() {
        for (root, _dir) in roots() {
            let a = take(&root, "a", timing(100, 0)).await.unwrap();
            a.hand_to_job("job-1").await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let err = take(&root, "b", timing(100, 0)).await.unwrap_err();
            assert!(err.to_string().contains("job-1"), "{err}");
            let s = Lease::acquire(
                &root,
                dir(&root),
                "p".into(),
                "import",
                "s",
                timing(60_000, 0),
                Take::SettlingJob("job-1"),
            )
            .await
            .unwrap();
            s.release().await.unwrap();
            take(&root, "b", timing(100, 0)).await.unwrap();
        }
    }
}
