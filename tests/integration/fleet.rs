//! A night's work on many machines, played on one: `fhirflow plan` on a lake
//! on moto S3, then `fhirflow work` processes started as AWS Batch array
//! children (`AWS_BATCH_JOB_ARRAY_INDEX`), four at a time, some indexes twice
//! and one child killed with SIGKILL and retried. Every unit is done once,
//! a re-plan after a partial night lists only what is left, and the curated
//! bytes and metadata equal those of one `fhirflow run` per partition on a
//! second lake.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use fhirflow::layout::{ImportDate, TenantGuid};
use fhirflow::settings::ImportTarget;
use fhirflow_tests::healthlake::HealthLake;
use fhirflow_tests::*;

const TENANTS: usize = 8;
const DATES: [&str; 3] = ["2026-11-01", "2026-11-02", "2026-11-03"];

fn tenant_of(i: usize) -> String {
    format!("{:08x}-5a1e-4c0d-8e2f-{:012x}", 0x1000 + i, 0xfeed00 + i)
}

/// The partitions of the night, in the plan's (tenant, date) order.
fn partitions() -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = (0..TENANTS)
        .flat_map(|i| DATES.iter().map(move |d| (tenant_of(i), d.to_string())))
        .collect();
    all.sort();
    all
}

/// Input of one partition, different for each: some patients and
/// conditions of the Synthea sample, one duplicated line and one that is
/// not JSON.
fn write_input(t: &TestLake, n: usize) -> PathBuf {
    let dir = t.input(&format!("p{n}"));
    let sample = shared().join("data/synthea-10");
    for (name, take) in [("Patient", 1 + n % 5), ("Condition", 10 + 3 * n)] {
        let text = std::fs::read_to_string(sample.join(format!("{name}.000.ndjson"))).unwrap();
        let mut lines: Vec<&str> = text.lines().take(take).collect();
        if name == "Condition" {
            lines.push(lines[0]);
            lines.push("{not json");
        }
        write_lines(&dir, &format!("{name}.ndjson"), &lines);
    }
    dir
}

/// Ingests and curates partition 0 with the binary; its tenant and date.
fn curate_first_partition(t: &TestLake) -> (String, &'static str) {
    let (tenant, date) = (tenant_of(0), DATES[0]);
    let dir = write_input(t, 0);
    let input = dir.to_str().unwrap();
    for args in [
        vec![
            "ingest",
            input,
            "--tenant",
            &tenant,
            "--source-system",
            "ehr",
            "--date",
            date,
        ],
        vec!["curate", "--tenant", &tenant, "--date", date],
    ] {
        let out = t.cli(&args, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (tenant, date)
}

/// `fhirflow plan`: the URI it printed, and the (tenant, dates) of its units
/// as the lake holds them.
async fn plan(t: &TestLake, stage: &str) -> (String, Vec<(String, Vec<String>)>) {
    let out = t.cli(&["plan", "--stage", stage], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let uri = text.split_whitespace().last().unwrap().to_string();
    let (_, units) = fhirflow::fleet::units(&t.lake, &uri)
        .await
        .expect("the plan");
    for u in &units {
        assert_eq!(serde_json::to_value(u.stage).unwrap(), stage);
    }
    let keys = units.into_iter().map(|u| (u.tenant, u.dates)).collect();
    (uri, keys)
}

fn worker(t: &TestLake, plan: &str, index: usize) -> Child {
    t.command(
        &["work", "--plan", plan],
        &[("AWS_BATCH_JOB_ARRAY_INDEX", &index.to_string())],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn a worker")
}

/// What one worker did: its index, exit code and EMF lines.
struct Done {
    index: usize,
    code: i32,
    emf: Vec<serde_json::Value>,
    stderr: String,
}

fn finish(index: usize, child: Child) -> Done {
    let out = child.wait_with_output().unwrap();
    let emf = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("an EMF line is JSON"))
        .collect();
    Done {
        index,
        code: out.status.code().expect("a worker exits"),
        emf,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the workers of `indexes`, four at a time (a Batch array's
/// concurrency), and returns what each did.
fn run_workers(t: &TestLake, plan: &str, indexes: &[usize]) -> Vec<Done> {
    let mut done = Vec::new();
    for wave in indexes.chunks(4) {
        let children: Vec<(usize, Child)> = wave.iter().map(|&i| (i, worker(t, plan, i))).collect();
        done.extend(children.into_iter().map(|(i, c)| finish(i, c)));
    }
    done
}

/// Every index worked: exactly one worker of each did it (exit 0), every
/// other one skipped it as done (exit 10); each says so in EMF.
fn assert_once(done: &[Done], stage: &str, indexes: &BTreeSet<usize>, killed: Option<usize>) {
    let mut by_index: BTreeMap<usize, Vec<i32>> = BTreeMap::new();
    for d in done {
        assert!(
            d.code == 0 || d.code == 10,
            "worker {} exited {}: {}",
            d.index,
            d.code,
            d.stderr
        );
        by_index.entry(d.index).or_default().push(d.code);
        for line in &d.emf {
            check_emf(line).unwrap_or_else(|e| panic!("worker {}: EMF line {line}: {e}", d.index));
        }
        let unit = d
            .emf
            .last()
            .expect("a worker's last EMF line is its unit's");
        assert_eq!(
            unit["_aws"]["CloudWatchMetrics"][0]["Namespace"],
            "fhirflow"
        );
        assert_eq!(unit["stage"], stage);
        let done_n = if d.code == 0 { 1.0 } else { 0.0 };
        assert_eq!(unit["UnitsDone"], done_n);
        assert_eq!(unit["UnitsSkipped"], 1.0 - done_n);
        if d.code == 0 {
            // The unit's counts come before it, per resource type.
            let types: BTreeSet<&str> = d.emf[..d.emf.len() - 1]
                .iter()
                .filter_map(|m| m["resource_type"].as_str())
                .collect();
            assert!(types.contains("Patient"), "{:?}", d.emf);
        }
    }
    assert_eq!(&by_index.keys().copied().collect::<BTreeSet<_>>(), indexes);
    for (i, codes) in by_index {
        let worked = codes.iter().filter(|&&c| c == 0).count();
        // A child killed after its commit leaves the work done: its retry skips.
        let expected = if Some(i) == killed { 0..=1 } else { 1..=1 };
        assert!(expected.contains(&worked), "unit {i}: exit codes {codes:?}");
    }
}

const METRICS: &str = "SELECT tenant_guid, CAST(import_date AS VARCHAR), stage, resource_type, \
    coalesce(rule, ''), records_in, records_out, records_rejected, records_changed, \
    records_duplicate, records_unchanged, records_stale, bytes_in, bytes_out, conserved \
    FROM metadata.import_metrics ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14";

const ROLE: &str = "arn:aws:iam::123456789012:role/healthlake-import";

/// The HealthLake data store of tenant `i` in the fleet's lake (0) or the
/// second lake (1).
fn datastore(lake: usize, i: usize) -> String {
    format!("{:032x}", (lake << 8) + i + 0xd5)
}

/// A lake at `s3://<bucket>/night` on `moto`, importing into HealthLake.
fn lake_on(moto: &Moto, hl: &HealthLake, bucket: &str, n: usize) -> TestLake {
    TestLake::with(|s| {
        moto.configure(s, bucket, "night");
        for i in 0..TENANTS {
            hl.configure(s, &tenant_of(i), &datastore(n, i), ROLE);
        }
        s.import.target = ImportTarget::Healthlake;
        // `fhirflow run` on S3 syncs the Glue catalog: moto's, one per lake.
        s.glue.endpoint = Some(moto.endpoint());
        s.glue.env = bucket.into();
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_of_workers_does_every_unit_once_and_matches_one_run_per_partition() {
    let moto = Moto::start();
    for bucket in ["fleet", "single", "hl-output"] {
        moto.create_bucket(bucket);
    }
    let stores: Vec<(String, &str)> = (0..2)
        .flat_map(|n| (0..TENANTS).map(move |i| (datastore(n, i), ROLE)))
        .collect();
    let stores: Vec<(&str, &str)> = stores.iter().map(|(d, r)| (d.as_str(), *r)).collect();
    let hl = HealthLake::start(&moto.endpoint(), &stores);
    let fleet = lake_on(&moto, &hl, "fleet", 0);
    let f = &fleet;
    let reference = lake_on(&moto, &hl, "single", 1);
    let all = partitions();
    for (n, (tenant, date)) in all.iter().enumerate() {
        let input = write_input(f, n);
        let input = input.to_str().unwrap();
        // The fleet's lake gets the raw data; the second lake one `fhirflow
        // run` per partition.
        for (lake, command) in [(f, "ingest"), (&reference, "run")] {
            let args = [
                command,
                input,
                "--tenant",
                tenant,
                "--source-system",
                "synthea",
                "--date",
                date,
            ];
            let out = lake.cli(&args, &[]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    // Night 1, partial: the first eight curate units, one index twice and
    // one child killed and retried.
    let one_date: Vec<_> = all
        .iter()
        .map(|(t, d)| (t.clone(), vec![d.clone()]))
        .collect();
    let (first, units) = plan(f, "curate").await;
    assert_eq!(units, one_date);
    let mut killed = worker(f, &first, 5);
    std::thread::sleep(Duration::from_millis(300));
    killed.kill().unwrap(); // SIGKILL
    killed.wait().unwrap();
    let mut done = run_workers(f, &first, &[0, 1, 2, 3, 3, 4, 6, 7]);
    // The retry of the killed child waits for its lease to lapse.
    done.extend(run_workers(f, &first, &[5]));
    assert_once(&done, "curate", &(0..8).collect(), Some(5));

    // Re-planning lists only the sixteen partitions left.
    let (second, units) = plan(f, "curate").await;
    assert_eq!(units, one_date[8..].to_vec());
    // A retried child of the first plan skips, whatever the second plan says.
    let again = run_workers(f, &first, &[2]);
    assert_eq!(again[0].code, 10, "{}", again[0].stderr);
    // ... and exits 0 with --skipped-ok, for a Batch array job.
    let out = f.cli(
        &["work", "--plan", &first, "--index", "2", "--skipped-ok"],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped"));

    // The rest of the night: every unit of the second plan, two of them twice
    // and at the same time.
    let mut indexes: Vec<usize> = (0..16).collect();
    indexes.insert(1, 0);
    indexes.insert(9, 8);
    let done = run_workers(f, &second, &indexes);
    assert_once(&done, "curate", &(0..16).collect(), None);
    assert!(
        plan(f, "curate").await.1.is_empty(),
        "nothing left to curate"
    );

    // Then the imports, the same way: one unit per tenant, its dates in order.
    let (imports, units) = plan(f, "import").await;
    let per_tenant: Vec<_> = all
        .chunks(3)
        .map(|c| (c[0].0.clone(), c.iter().map(|(_, d)| d.clone()).collect()))
        .collect();
    assert_eq!(units, per_tenant);
    // Small, but HealthLake imports wait for their jobs: Batch, not Lambda.
    let (_, listed) = fhirflow::fleet::units(&f.lake, &imports).await.unwrap();
    assert!(listed
        .iter()
        .all(|u| u.runner == fhirflow::fleet::Runner::Batch));
    let (_, listed) = fhirflow::fleet::units(&f.lake, &second).await.unwrap();
    assert!(listed
        .iter()
        .all(|u| u.runner == fhirflow::fleet::Runner::Lambda));
    let mut indexes: Vec<usize> = (0..TENANTS).collect();
    indexes.insert(4, 3);
    let done = run_workers(f, &imports, &indexes);
    assert_once(&done, "import", &(0..TENANTS).collect(), None);
    assert!(plan(f, "all").await.1.is_empty(), "nothing left at all");
    // The same, with the config file on S3, as a deployment keeps it (read
    // with the AWS chain: here the environment's keys and endpoint).
    let config = f.lake.metadata.paths.file("fhirflow.toml");
    let text = toml::to_string(&f.settings).unwrap().into_bytes();
    f.lake.metadata.put("test", &config, text).await.unwrap();
    let url = f.lake.metadata.url_of(&config);
    let endpoint = moto.endpoint();
    let aws = [
        ("FHIRFLOW_CONFIG", url.as_str()),
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
    ];
    let out = f.cli(&["plan", "--stage", "all"], &aws);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("plan: 0 units"));

    // One curate and one import commit per partition, however many workers.
    let jobs = f
        .sql("SELECT stage, count(*), count(DISTINCT tenant_guid || CAST(import_date AS VARCHAR)) FROM metadata.import_jobs_history GROUP BY stage ORDER BY stage")
        .await;
    assert_eq!(
        jobs,
        vec![
            vec!["curate".to_string(), "24".into(), "24".into()],
            vec!["import".to_string(), "24".into(), "24".into()],
        ]
    );
    // The same bytes and the same accounts as one run per partition.
    for (tenant, date) in &all {
        let t: TenantGuid = tenant.parse().unwrap();
        let d: ImportDate = date.parse().unwrap();
        let (a, b) = (
            f.visible_files_of(&t, d).await,
            reference.visible_files_of(&t, d).await,
        );
        assert!(!a.is_empty(), "{tenant} {date}: curated");
        assert_eq!(a, b, "{tenant} {date}: curated bytes");
    }
    let metrics = f.sql(METRICS).await;
    let accounted: BTreeSet<_> = metrics.iter().map(|r| (&r[0], &r[1], &r[2])).collect();
    assert_eq!(
        accounted.len(),
        24 * 2,
        "each partition's curate and import"
    );
    let expected = reference.sql(METRICS).await;
    let differ: Vec<_> = metrics
        .iter()
        .zip(&expected)
        .filter(|(a, b)| a != b)
        .collect();
    assert!(
        differ.is_empty() && metrics.len() == expected.len(),
        "metrics differ: {differ:?}"
    );
    let rejected = f
        .sql("SELECT count(*) FROM metadata.import_errors WHERE stage = 'curate'")
        .await;
    assert_eq!(
        rejected,
        vec![vec!["24".to_string()]],
        "one bad line per partition"
    );
    for i in 0..TENANTS {
        let (a, b) = (hl.stored(&datastore(0, i)), hl.stored(&datastore(1, i)));
        assert!(!a.is_empty());
        assert_eq!(a, b, "tenant {i}: HealthLake holds the same resources");
    }
}

/// A raw object the latest curate run did not read makes its partition
/// pending, whatever its timestamp says: here one lands with a LastModified
/// a day in the past, as a writer whose clock runs behind would leave it.
#[tokio::test(flavor = "multi_thread")]
async fn a_landing_the_curate_did_not_read_is_pending_whatever_its_clock() {
    let t = TestLake::new();
    let (tenant, date) = curate_first_partition(&t);
    assert!(
        plan(&t, "curate").await.1.is_empty(),
        "curated: nothing pending"
    );

    // A second landing, backdated.
    let landed = t
        .root()
        .join("raw")
        .join(format!("tenantGuid={tenant}"))
        .join("source_system=ehr")
        .join(format!("import_date={date}"))
        .join("Encounter.ndjson");
    let sample =
        std::fs::read_to_string(shared().join("data/synthea-10/Encounter.000.ndjson")).unwrap();
    std::fs::write(&landed, format!("{}\n", sample.lines().next().unwrap())).unwrap();
    let day_ago = std::time::SystemTime::now() - Duration::from_secs(86_400);
    std::fs::File::options()
        .write(true)
        .open(&landed)
        .unwrap()
        .set_modified(day_ago)
        .unwrap();
    let (_, units) = plan(&t, "curate").await;
    assert_eq!(units, vec![(tenant.clone(), vec![date.to_string()])]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_s3_lake_importing_locally_plans_no_imports_and_says_why() {
    let moto = Moto::start();
    moto.create_bucket("fleet-local");
    let t = TestLake::with(|s| moto.configure(s, "fleet-local", "night"));
    curate_first_partition(&t);

    // The local lake needs a file system: import units here could only fail.
    for stage in ["import", "all"] {
        let out = t.cli(&["plan", "--stage", stage, "--output", "json"], &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(doc["plan"]["units"], 0, "{stage}: {doc}");
        let why = doc["plan"]["left_out"].as_str().unwrap_or_default();
        assert!(
            why.starts_with("1 import unit(s) left out") && why.contains("healthlake"),
            "{stage}: {doc}"
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("left out"));
    }
    let out = t.cli(&["plan", "--stage", "curate", "--output", "json"], &[]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(doc["plan"]["left_out"].is_null(), "{doc}");
}
