//! Many runs, one truth: runs of the writing stages started together on one
//! partition, killed at random moments, or repeated, on a local lake and on
//! S3 (moto). Exactly one run does the work at a time, readers always see a
//! whole state, and the end state is a single run's.
//!
//! moto checks `If-None-Match` but not atomically: on S3 these tests prove
//! the protocol's behaviour, not the store's atomicity.

use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fhirflow_tests::*;

/// Deterministic offsets and delays (an LCG: the same run every time).
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Lands `n` new patients as a file of its own (`Patient.<round>.ndjson`).
async fn land_patients(t: &TestLake, round: usize, n: usize) {
    let dir = t.input(&format!("round-{round}"));
    let lines: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"resourceType":"Patient","id":"r{round}-{i}","gender":"female"}}"#))
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let file = write_lines(&dir, &format!("Patient.{:03}.ndjson", round + 1), &refs);
    t.ingest(&[file], "ehr").await;
}

fn spawn(t: &TestLake, args: &[&str], env: &[(&str, &str)]) -> Child {
    t.command(args, env)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fhirflow")
}

const CURATE: [&str; 5] = ["curate", "--tenant", TENANT, "--date", DATE];
const IMPORT: [&str; 5] = ["import", "--tenant", TENANT, "--date", DATE];

/// Polls `curated.patient` until stopped; every answer must be one of
/// `allowed` (never an error, never a partial count). Returns the reads.
fn reader(
    t: Arc<TestLake>,
    allowed: Vec<u64>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut reads = 0;
        while !stop.load(Ordering::Relaxed) {
            let ctx = fhirflow::sql::session(&t.lake, &t.settings)
                .await
                .expect("a session while runs publish");
            let answer = fhirflow::sql::query(&ctx, "SELECT count(*) FROM curated.patient").await;
            let n: u64 = match answer {
                Ok(b) => rows(&b)[0][0].parse().unwrap(),
                // Before the first commit the table does not exist yet.
                Err(e) if allowed.contains(&0) && e.to_string().contains("not found") => 0,
                Err(e) => panic!("a reader failed while runs published: {e}"),
            };
            assert!(
                allowed.contains(&n),
                "a reader saw {n} patients, not one of {allowed:?}"
            );
            reads += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        reads
    })
}

async fn exit_codes(children: Vec<Child>) -> Vec<(i32, String)> {
    tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(|c| {
                let out = c.wait_with_output().unwrap();
                (
                    out.status.code().unwrap_or(-1),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                )
            })
            .collect()
    })
    .await
    .unwrap()
}

/// Rounds of 2, 2, 4 and 4 curate runs started at random offsets on one
/// partition, with new raw data before each round and a reader polling.
async fn concurrent_curates(store: Store) {
    let t = Arc::new(store.t);
    let sample = shared().join("data/synthea-10");
    t.ingest(std::slice::from_ref(&sample), "synthea").await;
    let mut dice = Dice(7);
    let base = 13; // synthea-10's patients
    let mut before = 0;
    for (round, n) in [2, 2, 4, 4].into_iter().enumerate() {
        land_patients(&t, round, 25).await;
        let after = base + 25 * (round as u64 + 1);
        let stop = Arc::new(AtomicBool::new(false));
        let reads = reader(t.clone(), vec![before, after], stop.clone());
        let mut children = Vec::new();
        for _ in 0..n {
            tokio::time::sleep(Duration::from_millis(dice.below(150))).await;
            children.push(spawn(&t, &CURATE, &[("FHIRFLOW_WAIT", "0")]));
        }
        let codes = exit_codes(children).await;
        stop.store(true, Ordering::Relaxed);
        let reads = reads.await.expect("the reader saw only whole states");
        let winners = codes.iter().filter(|c| c.0 == 0).count();
        assert_eq!(
            winners, 1,
            "round {round}: exactly one run does the work: {codes:?}"
        );
        for (code, err) in &codes {
            assert!(
                *code == 0 || (*code == 4 && err.contains("busy")),
                "round {round}: {code} {err}"
            );
        }
        assert!(reads > 0, "round {round}: the reader never read");
        let now = t.sql("SELECT count(*) FROM curated.patient").await;
        assert_eq!(now, vec![vec![after.to_string()]], "round {round}");
        before = after;
    }

    // The end state is one uninterrupted run's, byte for byte.
    let reference = TestLake::new();
    reference
        .ingest(std::slice::from_ref(&sample), "synthea")
        .await;
    for round in 0..4 {
        land_patients(&reference, round, 25).await;
    }
    reference.curate().await.expect("reference curate");
    assert_eq!(t.visible_files().await, reference.visible_files().await);
    // One curate run in the current metadata, one per round in the history.
    let jobs = t
        .sql("SELECT (SELECT count(*) FROM metadata.import_jobs WHERE stage = 'curate') AS current, (SELECT count(*) FROM metadata.import_jobs_history WHERE stage = 'curate') AS history")
        .await;
    assert_eq!(jobs, vec![vec!["1".to_string(), "4".into()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_curates_on_a_local_lake_do_the_work_once() {
    concurrent_curates(Store::local()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_curates_on_s3_do_the_work_once() {
    concurrent_curates(Store::s3("many-runs")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_imports_import_once() {
    let t = TestLake::new();
    let sample = shared().join("data/synthea-10");
    t.ingest(std::slice::from_ref(&sample), "synthea").await;
    t.curate().await.expect("curate");
    let mut dice = Dice(11);
    for n in [2, 4] {
        let mut children = Vec::new();
        for _ in 0..n {
            tokio::time::sleep(Duration::from_millis(dice.below(100))).await;
            children.push(spawn(&t, &IMPORT, &[("FHIRFLOW_WAIT", "0")]));
        }
        for (code, err) in exit_codes(children).await {
            assert!(
                code == 0 || (code == 4 && err.contains("busy")),
                "{code} {err}"
            );
        }
    }
    // However the runs interleaved, the curated partition went in once.
    let rows = t.sql("SELECT count(*) FROM lake_history.patient").await;
    assert_eq!(rows, vec![vec!["13".to_string()]]);
    let snapshots = t
        .sql("SELECT count(*) FROM lake_snapshots WHERE table_name = 'patient'")
        .await;
    assert_eq!(snapshots, vec![vec!["1".to_string()]]);
}

/// Runs of `args`, each killed at a random moment; each next run takes the
/// dead run's lease over once it lapses. After every kill readers see the
/// old state or the new one; the last run finishes the work.
async fn killed_runs(t: &TestLake, args: &[&str], seed: u64, kills: usize, check: impl AsyncCheck) {
    let mut dice = Dice(seed);
    for i in 0..kills {
        let mut child = spawn(t, args, &[("FHIRFLOW_LEASE_TTL_SECONDS", "1")]);
        tokio::time::sleep(Duration::from_millis(dice.below(1500))).await;
        let _ = child.kill(); // SIGKILL: no chance to clean up
        let _ = child.wait();
        check.after_kill(t, i).await;
    }
    let out = t.cli(args, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

trait AsyncCheck {
    async fn after_kill(&self, t: &TestLake, i: usize);
}

/// Curate: the visible parts are none or the full output.
struct CurateState {
    full: std::collections::BTreeMap<String, Vec<u8>>,
}

impl AsyncCheck for CurateState {
    async fn after_kill(&self, t: &TestLake, i: usize) {
        let v = fhirflow::commit::visible(&t.lake, &Default::default())
            .await
            .unwrap();
        let seen = v.curated.len();
        assert!(
            seen == 0 || seen == self.full.len(),
            "kill {i}: {seen} parts visible"
        );
        let jobs = t
            .sql("SELECT count(*) FROM metadata.import_jobs WHERE stage = 'curate'")
            .await;
        assert_eq!(
            jobs,
            vec![vec![usize::from(seen > 0).to_string()]],
            "kill {i}"
        );
    }
}

async fn killed_curates(store: Store) {
    let t = store.t;
    let sample = shared().join("data/synthea-10");
    let reference = TestLake::new();
    reference
        .ingest(std::slice::from_ref(&sample), "synthea")
        .await;
    reference.curate().await.expect("reference");
    let full = reference.visible_files().await;
    t.ingest(std::slice::from_ref(&sample), "synthea").await;
    killed_runs(&t, &CURATE, 3, 20, CurateState { full: full.clone() }).await;
    assert_eq!(t.visible_files().await, full);
    // The current tables hold one run's rows, as the reference does.
    let q = "SELECT (SELECT count(*) FROM metadata.import_jobs) AS j, (SELECT count(*) FROM metadata.import_metrics) AS m, (SELECT count(*) FROM metadata.import_errors) AS e";
    assert_eq!(t.sql(q).await, reference.sql(q).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_curates_on_a_local_lake_end_in_one_runs_state() {
    killed_curates(Store::local()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_curates_on_s3_end_in_one_runs_state() {
    killed_curates(Store::s3("many-runs")).await;
}

/// Import: a table holds the partition's rows or none of them.
struct ImportState;

impl AsyncCheck for ImportState {
    async fn after_kill(&self, t: &TestLake, i: usize) {
        if !t.root().join("iceberg/catalog.db").exists() {
            return; // killed before the lake was created
        }
        let rows = t
            .sql("SELECT count(*) FROM lake_snapshots WHERE table_name = 'patient'")
            .await;
        assert!(rows[0][0] == "0" || rows[0][0] == "1", "kill {i}: {rows:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_imports_import_once() {
    let t = TestLake::new();
    let sample = shared().join("data/synthea-10");
    t.ingest(std::slice::from_ref(&sample), "synthea").await;
    t.curate().await.expect("curate");
    killed_runs(&t, &IMPORT, 5, 20, ImportState).await;
    let rows = t
        .sql("SELECT (SELECT count(*) FROM lake_history.patient) AS p, (SELECT count(*) FROM lake_history.procedure) AS r, (SELECT count(*) FROM metadata.import_jobs WHERE stage = 'import') AS j")
        .await;
    let procedures = t.sql("SELECT count(*) FROM curated.procedure").await;
    assert_eq!(
        rows,
        vec![vec!["13".to_string(), procedures[0][0].clone(), "1".into()]]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn three_curates_leave_one_run_current_and_three_in_history() {
    let t = TestLake::new();
    let dir = t.input("p");
    let file = write_lines(
        &dir,
        "Patient.ndjson",
        &[
            r#"{"resourceType":"Patient","id":"a"}"#,
            r#"{"resourceType":"Patient","id":"a"}"#,
            r#"{"resourceType":"Patient","id":"bad id"}"#,
        ],
    );
    t.ingest(&[file], "ehr").await;
    for _ in 0..3 {
        t.curate().await.expect("curate");
    }
    for table in ["import_jobs", "import_errors", "import_metrics"] {
        let q = format!(
            "SELECT (SELECT count(DISTINCT job_id) FROM metadata.{table}) AS a, (SELECT count(*) FROM metadata.{table}) AS b, (SELECT count(DISTINCT job_id) FROM metadata.{table}_history) AS c, (SELECT count(*) FROM metadata.{table}_history) AS d"
        );
        let got = t.sql(&q).await;
        let current: u64 = got[0][1].parse().unwrap();
        let history: u64 = got[0][3].parse().unwrap();
        assert!(current > 0, "{table}: {got:?}");
        assert_eq!(
            (&got[0][0][..], &got[0][2][..]),
            ("1", "3"),
            "{table}: {got:?}"
        );
        assert_eq!(history, 3 * current, "{table}: {got:?}");
    }
}
