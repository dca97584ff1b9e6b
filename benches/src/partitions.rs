//! Does working on one partition stay as cheap when the lake around it grows?
//!
//! For a local lake folder and for an `s3://` lake in moto, this benchmark
//! times, as whole `fhirflow` processes, a curate of one small partition and
//! a SQL count over that partition, while the lake holds 1, 100 and 1,000
//! *other* partitions. Every operation here names its tenant and date, so
//! its cost should not depend on the rest of the lake; a ratio well above 1
//! between the largest and the smallest lake means something lists or reads
//! more than its own partition.
//!
//! How the other partitions are made: one of them (the template) is landed
//! and curated for real, with `fhirflow ingest` and `fhirflow curate`. The
//! rest are copies of the template's objects made with the store's own copy
//! (a hard link locally, a server-side copy on S3): raw files and their
//! landing claims, the run's parts, the visible folder, the metadata Parquet,
//! the lease generations, each under the new (tenant, date) path; the commit
//! record is rewritten so that its partition values and listed paths name the
//! copy. Copies keep the template's bytes, so the tenant label inside the
//! curated lines and the partition columns inside the metadata Parquet still
//! name the template (no cost measured here depends on them). The others are
//! spread over four tenants, the measured one among them (so that listings
//! by tenant see the growth too), with a distinct date each, all after the
//! measured partition's date.
//!
//! The last column, LIST ms, is one listing of the measured partition's
//! (one-record) commit folder from the benchmark itself: fhirflow's own
//! listings are all of its partition's folders, but moto scans every key of
//! the bucket for each listing, so there a change in LIST ms is the store's
//! and not fhirflow's.
//!
//! Before each timed curate the measured partition is put back to "landed,
//! never curated" (its runs, visible folder, metadata, commit log and lease
//! removed; its raw files kept), so every timed curate is a first curate and
//! the partition's own history does not grow with the runs.
//!
//! Usage (from the repository root, after `cargo build --release -p fhirflow`
//! and `tests/run.sh` or `pip install -r tests/requirements.txt` into
//! `.venv` for moto):
//! `cargo run --release -p fhirflow-benches --bin partitions_e2e -- --runs 3`

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use clap::Parser;
use fhirflow::layout::{ImportDate, MetadataTable, TenantGuid};
use fhirflow::settings::Settings;
use fhirflow::storage::{Lake, Root};
use fhirflow_benches::{median, run, Measured, DATE, TENANT};
use fhirflow_tests::Moto;
use futures::{StreamExt, TryStreamExt};
use object_store::path::{Path as ObjectPath, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// Per-partition cost as the lake grows.
#[derive(Parser)]
struct Args {
    /// Runs of each measurement; min, median and max are printed.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Working folder (the local lake and the S3 lake's config file).
    #[arg(long, default_value = "target/bench-partitions")]
    work: PathBuf,
    /// The fhirflow binary.
    #[arg(long, default_value = "target/release/fhirflow")]
    fhirflow: PathBuf,
    /// Where the small partition's files come from (its Patient and
    /// Condition files: a few hundred lines).
    #[arg(long, default_value = "tests/data/synthea-10")]
    sample: PathBuf,
    /// Only the local lake.
    #[arg(long)]
    no_s3: bool,
    /// The largest number of other partitions (the lake is measured at 1,
    /// 100, 1,000 others, up to this).
    #[arg(long, default_value_t = 1000)]
    max_others: usize,
}

/// The source system every partition here is landed under.
const SOURCE: &str = "bench";
/// How many copies are in flight at once: enough to keep moto busy without
/// drowning it.
const COPIES_AT_ONCE: usize = 16;

/// A (tenant, date) partition, kept as the strings that appear in paths.
#[derive(Clone, Debug, PartialEq)]
struct Partition {
    tenant: String,
    date: String,
}

impl Partition {
    fn tenant_segment(&self) -> String {
        format!("tenantGuid={}", self.tenant)
    }
    fn date_segment(&self) -> String {
        format!("import_date={}", self.date)
    }
}

/// The other partitions, in the order they are added: round-robin over four
/// tenants (the measured partition's first), each (tenant, date) distinct and
/// every date after the measured partition's, so none is the measured one.
fn others(count: usize) -> Vec<Partition> {
    let tenants: Vec<String> = std::iter::once(TENANT.to_string())
        .chain((1u32..=3).map(|i| format!("{:08x}-5eed-4b1e-9a7c-{:012x}", 0xbe7c_0000u32 + i, i)))
        .collect();
    for t in &tenants {
        t.parse::<TenantGuid>().expect("a valid tenant GUID");
    }
    let mut date: ImportDate = "2025-01-01".parse().unwrap();
    assert!(date > DATE.parse().unwrap());
    let mut out = Vec::with_capacity(count);
    for k in 0..count {
        if k > 0 && k % tenants.len() == 0 {
            date = ImportDate(date.0.succ_opt().expect("a next day"));
        }
        out.push(Partition {
            tenant: tenants[k % tenants.len()].clone(),
            date: date.to_string(),
        });
    }
    out
}

/// A lake under test: the benchmark's own handle on it (for copies and
/// resets) and how a `fhirflow` child process is pointed at it.
struct Store {
    name: &'static str,
    lake: Lake,
    /// The variable that tells the CLI where the lake is, and its value.
    env: (&'static str, PathBuf),
    /// Keeps moto running as long as the store is used.
    _moto: Option<Moto>,
}

impl Store {
    fn local(work: &Path) -> Store {
        let dir = work.join("lake-local");
        // A fresh lake each time: copying into a lake left by an earlier
        // session would measure that session's leftovers too.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let dir = fs::canonicalize(&dir).unwrap();
        let settings = Settings {
            lake: dir.display().to_string(),
            ..Default::default()
        };
        Store {
            name: "local",
            lake: Lake::open(&settings).expect("open the local lake"),
            env: ("FHIRFLOW_LAKE", dir),
            _moto: None,
        }
    }

    fn s3(work: &Path) -> Store {
        let moto = Moto::start();
        moto.create_bucket("bench");
        let mut settings = Settings::default();
        moto.configure(&mut settings, "bench", "lake");
        // The CLI takes S3 settings from a config file only; JSON strings
        // are valid TOML basic strings.
        let q = |s: &str| serde_json::to_string(s).unwrap();
        let s3 = &settings.s3;
        let config = format!(
            "lake = {}\n\n[s3]\nendpoint = {}\nregion = {}\nallow_http = {}\naccess_key_id = {}\nsecret_access_key = {}\n",
            q(&settings.lake),
            q(s3.endpoint.as_deref().unwrap()),
            q(s3.region.as_deref().unwrap()),
            s3.allow_http,
            q(s3.access_key_id.as_deref().unwrap()),
            q(s3.secret_access_key.as_deref().unwrap()),
        );
        fs::create_dir_all(work).unwrap();
        let path = fs::canonicalize(work).unwrap().join("s3-lake.toml");
        fs::write(&path, config).unwrap();
        Store {
            name: "s3",
            lake: Lake::open(&settings).expect("open the S3 lake"),
            env: ("FHIRFLOW_CONFIG", path),
            _moto: Some(moto),
        }
    }

    /// Every layer of these lakes lives under the one root (no separate
    /// layer roots are configured), so one store handle serves all three.
    fn root(&self) -> &Root {
        &self.lake.raw
    }

    /// `fhirflow ARGS` on this lake, with none of the caller's `FHIRFLOW_*`
    /// variables (a stray one could point a run at another lake or change
    /// what it does).
    fn command(&self, fhirflow: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(fhirflow);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FHIRFLOW_") {
                cmd.env_remove(k);
            }
        }
        cmd.env(self.env.0, &self.env.1).args(args);
        cmd
    }

    fn ingest(&self, fhirflow: &Path, files: &[PathBuf], p: &Partition) {
        let mut args = vec!["ingest", "--tenant", &p.tenant, "--source-system", SOURCE];
        args.extend(["--date", &p.date, "--quiet"]);
        args.extend(files.iter().map(|f| f.to_str().unwrap()));
        run(&mut self.command(fhirflow, &args));
    }

    fn curate(&self, fhirflow: &Path, p: &Partition) -> Measured {
        run(&mut self.command(
            fhirflow,
            &[
                "curate", "--tenant", &p.tenant, "--date", &p.date, "--quiet",
            ],
        ))
    }

    /// The single number a `SELECT count(*) …` prints.
    fn count(&self, fhirflow: &Path, query: &str) -> u64 {
        let out = self
            .command(fhirflow, &["sql", query, "--format", "csv", "--quiet"])
            .output()
            .expect("run fhirflow sql");
        assert!(
            out.status.success(),
            "{query}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        last.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{query}: no count in {text:?}"))
    }
}

/// The template's objects, ready to be copied under other partitions.
struct Template {
    from: Partition,
    /// Everything but the commit records, copied byte for byte.
    objects: Vec<ObjectPath>,
    /// The commit records (path and parsed JSON), rewritten per copy.
    commits: Vec<(ObjectPath, serde_json::Value)>,
}

impl Template {
    /// Every object of the lake whose path names `from`'s tenant and date.
    async fn take(root: &Root, from: &Partition) -> Template {
        let (tenant, date) = (from.tenant_segment(), from.date_segment());
        let listed: Vec<_> = root
            .store
            .list(Some(&root.paths.prefix))
            .try_collect()
            .await
            .expect("list the lake");
        let mut t = Template {
            from: from.clone(),
            objects: Vec::new(),
            commits: Vec::new(),
        };
        for o in listed {
            let parts: Vec<String> = o.location.parts().map(|p| p.as_ref().to_string()).collect();
            if !(parts.contains(&tenant) && parts.contains(&date)) {
                continue;
            }
            if parts.iter().any(|p| p == "_commits") {
                let bytes = root
                    .store
                    .get(&o.location)
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap();
                t.commits.push((
                    o.location,
                    serde_json::from_slice(&bytes).expect("a commit record"),
                ));
            } else {
                t.objects.push(o.location);
            }
        }
        assert!(
            !t.objects.is_empty() && !t.commits.is_empty(),
            "the template has no objects"
        );
        t
    }

    fn objects_per_partition(&self) -> usize {
        self.objects.len() + self.commits.len()
    }

    /// `path` with the template's tenant and date segments replaced by `to`'s.
    fn moved(&self, path: &str, to: &Partition) -> String {
        let (ft, fd) = (self.from.tenant_segment(), self.from.date_segment());
        let (tt, td) = (to.tenant_segment(), to.date_segment());
        path.split('/')
            .map(|seg| {
                if seg == ft {
                    tt.as_str()
                } else if seg == fd {
                    td.as_str()
                } else {
                    seg
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    fn moved_path(&self, path: &ObjectPath, to: &Partition) -> ObjectPath {
        let moved = self.moved(path.as_ref(), to);
        // Segments of a listed path are already valid parts: rebuild from
        // them rather than re-parsing the string.
        ObjectPath::from_iter(moved.split('/').map(|s| PathPart::from(s.to_string())))
    }

    /// The commit record as the copy's own: its partition values and every
    /// path it lists name `to` (sizes and checksums stay: the bytes do).
    fn moved_commit(&self, record: &serde_json::Value, to: &Partition) -> Vec<u8> {
        let mut r = record.clone();
        r["tenant_guid"] = to.tenant.clone().into();
        r["import_date"] = to.date.clone().into();
        for list in ["curated", "metadata"] {
            if let Some(objects) = r[list].as_array_mut() {
                for o in objects {
                    let path = o["path"].as_str().expect("an object path").to_string();
                    o["path"] = self.moved(&path, to).into();
                }
            }
        }
        serde_json::to_vec_pretty(&r).unwrap()
    }

    /// Copies the template under every partition of `to`.
    async fn replicate(&self, store: &dyn ObjectStore, to: &[Partition]) {
        enum Op {
            Copy(ObjectPath, ObjectPath),
            Put(ObjectPath, Vec<u8>),
        }
        let ops = to.iter().flat_map(|p| {
            let copies = self
                .objects
                .iter()
                .map(move |o| Op::Copy(o.clone(), self.moved_path(o, p)));
            let records = self
                .commits
                .iter()
                .map(move |(path, r)| Op::Put(self.moved_path(path, p), self.moved_commit(r, p)));
            copies.chain(records)
        });
        futures::stream::iter(ops)
            .map(|op| async move {
                match op {
                    Op::Copy(from, to) => store.copy(&from, &to).await,
                    Op::Put(to, bytes) => store.put(&to, PutPayload::from(bytes)).await.map(|_| ()),
                }
            })
            .buffer_unordered(COPIES_AT_ONCE)
            .try_collect::<Vec<()>>()
            .await
            .expect("copy the template");
    }
}

/// Puts `p` back to landed and never curated: removes its runs' parts, its
/// visible folder, its metadata files, its commit log and its lease, and
/// keeps its raw files.
async fn reset(root: &Root, p: &Partition) {
    let (t, d): (TenantGuid, ImportDate) = (p.tenant.parse().unwrap(), p.date.parse().unwrap());
    let paths = &root.paths;
    let mut prefixes = vec![
        paths.curated_runs(&t, d),
        paths.curated_partition(&t, d),
        paths.commits(&t, d),
        paths.partition_lease(&t, d),
    ];
    prefixes.extend(MetadataTable::ALL.map(|m| paths.metadata_partition(m, &t, d)));
    for prefix in prefixes {
        let listed: Vec<_> = root
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .expect("list");
        for o in listed {
            root.store.delete(&o.location).await.expect("delete");
        }
    }
}

/// The median time of one listing of the measured partition's commit log (a
/// folder of one record) from this process, in ms. fhirflow lists only
/// folders of its own partition, but a store may still answer those more
/// slowly as the bucket fills (moto scans every key of the bucket for each
/// listing): this shows how much of a change is the store's own.
async fn list_ms(root: &Root, p: &Partition) -> f64 {
    let (t, d): (TenantGuid, ImportDate) = (p.tenant.parse().unwrap(), p.date.parse().unwrap());
    let folder = root.paths.commits(&t, d);
    let mut times = Vec::new();
    for _ in 0..7 {
        let started = Instant::now();
        let listed: Vec<_> = root
            .store
            .list(Some(&folder))
            .try_collect()
            .await
            .expect("list");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(
            listed.len(),
            1,
            "the measured partition has one commit record"
        );
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Min, median and max wall time of a set of runs.
struct Spread {
    min: f64,
    median: f64,
    max: f64,
}

impl Spread {
    fn of(runs: Vec<Measured>) -> Spread {
        let secs = || runs.iter().map(|m| m.seconds);
        let (min, max) = (
            secs().fold(f64::INFINITY, f64::min),
            secs().fold(0.0, f64::max),
        );
        Spread {
            min,
            max,
            median: median(runs).seconds,
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cell = format!("{:.3} / {:.3} / {:.3}", self.min, self.median, self.max);
        f.pad(&cell)
    }
}

struct Row {
    store: &'static str,
    others: usize,
    curate: Spread,
    sql: Spread,
    list_ms: f64,
}

/// Measures one store at every lake size, growing its lake as it goes.
fn bench_store(
    rt: &tokio::runtime::Runtime,
    args: &Args,
    store: &Store,
    files: &[PathBuf],
    levels: &[usize],
) -> Vec<Row> {
    let fhirflow = args.fhirflow.as_path();
    let measured = Partition {
        tenant: TENANT.into(),
        date: DATE.into(),
    };
    let all_others = others(*levels.last().unwrap());

    // The template, landed and curated for real; it is the first other.
    let started = Instant::now();
    store.ingest(fhirflow, files, &all_others[0]);
    store.curate(fhirflow, &all_others[0]);
    let template = rt.block_on(Template::take(store.root(), &all_others[0]));
    store.ingest(fhirflow, files, &measured);
    eprintln!(
        "{}: template partition landed and curated in {:.1} s ({} objects a partition)",
        store.name,
        started.elapsed().as_secs_f64(),
        template.objects_per_partition()
    );

    let query = format!(
        "SELECT count(*) FROM curated.patient WHERE tenant_guid = '{TENANT}' AND import_date = DATE '{DATE}'"
    );
    let (mut built, mut rows) = (1, Vec::new());
    let mut per_partition = None;
    for &level in levels {
        let started = Instant::now();
        rt.block_on(template.replicate(store.root().store.as_ref(), &all_others[built..level]));
        eprintln!(
            "{}: {} other partitions copied in {:.1} s (lake: {} partitions)",
            store.name,
            level - built,
            started.elapsed().as_secs_f64(),
            level + 1
        );
        built = level;

        let (mut curate, mut sql) = (Vec::new(), Vec::new());
        for _ in 0..args.runs.max(1) {
            rt.block_on(reset(store.root(), &measured));
            curate.push(store.curate(fhirflow, &measured));
            sql.push(run(
                &mut store.command(fhirflow, &["sql", &query, "--quiet"])
            ));
        }

        // Untimed checks that the lake is what it claims to be: the measured
        // partition answers the same count at every size, and every copy is
        // a committed partition SQL resolves (the whole lake holds one
        // template's worth of Patients per partition).
        let own = store.count(fhirflow, &query);
        assert!(own > 0, "the measured partition has no Patients");
        assert_eq!(
            *per_partition.get_or_insert(own),
            own,
            "the measured partition's count changed"
        );
        let total = store.count(fhirflow, "SELECT count(*) FROM curated.patient");
        assert_eq!(
            total,
            own * (level as u64 + 1),
            "not every partition is visible to SQL"
        );

        let row = Row {
            store: store.name,
            others: level,
            curate: Spread::of(curate),
            sql: Spread::of(sql),
            list_ms: rt.block_on(list_ms(store.root(), &measured)),
        };
        print_row(&row);
        rows.push(row);
    }
    rows
}

fn print_header() {
    println!(
        "{:<6} {:>6}  {:<27}  {:<27}  {:>7}",
        "store", "others", "curate s (min/median/max)", "sql s (min/median/max)", "LIST ms"
    );
}

fn print_row(r: &Row) {
    println!(
        "{:<6} {:>6}  {:<27}  {:<27}  {:>7.1}",
        r.store, r.others, r.curate, r.sql, r.list_ms
    );
}

fn main() {
    let args = Args::parse();
    assert!(args.max_others >= 1, "--max-others must be at least 1");
    assert!(
        args.fhirflow.is_file(),
        "{} is not built",
        args.fhirflow.display()
    );
    let mut levels: Vec<usize> = [1, 100, 1000]
        .into_iter()
        .filter(|&n| n <= args.max_others)
        .collect();
    if levels.last() != Some(&args.max_others) {
        levels.push(args.max_others);
    }
    let files: Vec<PathBuf> = ["Patient.000.ndjson", "Condition.000.ndjson"]
        .iter()
        .map(|f| args.sample.join(f))
        .collect();
    for f in &files {
        assert!(f.is_file(), "{} is missing", f.display());
    }
    let rt = tokio::runtime::Runtime::new().unwrap();

    println!(
        "partitions benchmark: {} cores, {}, {} run(s) each, partition of {}",
        std::thread::available_parallelism().map_or(2, |n| n.get()),
        args.fhirflow.display(),
        args.runs.max(1),
        files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy())
            .collect::<Vec<_>>()
            .join(" + ")
    );
    print_header();
    let mut rows = bench_store(&rt, &args, &Store::local(&args.work), &files, &levels);
    if !args.no_s3 {
        // Dropping the store at the end of the statement stops moto.
        rows.extend(bench_store(
            &rt,
            &args,
            &Store::s3(&args.work),
            &files,
            &levels,
        ));
    }

    println!();
    print_header();
    for r in &rows {
        print_row(r);
    }
    let (small, large) = (levels[0], *levels.last().unwrap());
    if large > small {
        for store in ["local", "s3"] {
            let at = |n| rows.iter().find(|r| r.store == store && r.others == n);
            if let (Some(a), Some(b)) = (at(small), at(large)) {
                println!(
                    "{store}: {large}/{small} others, median curate x{:.2}, median sql x{:.2} (one LIST x{:.2})",
                    b.curate.median / a.curate.median,
                    b.sql.median / a.sql.median,
                    b.list_ms / a.list_ms
                );
            }
        }
    }
}
