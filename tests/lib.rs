//! Test harness for fhirflow's integration tests: a lake per test in its own
//! temporary folder, helpers to write NDJSON, run stages in-process or through
//! the real binary, and read results back with SQL.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use fhirflow::curate::CurateReport;
use fhirflow::layout::{ImportDate, SourceSystem, TenantGuid};
use fhirflow::settings::{Overrides, Settings};
use fhirflow::storage::Lake;

pub const TENANT: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";
pub const OTHER_TENANT: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
pub const DATE: &str = "2024-05-01";
pub const LABEL_SYSTEM: &str = "http://thirdopinion.io/identity/claims/tenant";

/// `../shared` beside the repository: the public data sets. Tests that need
/// it fail (never skip) when it is missing.
pub fn shared() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    assert!(
        p.join("data").is_dir(),
        "{} is missing: the tests need ../shared beside the repository",
        p.display()
    );
    p
}

/// A lake in its own temporary folder.
pub struct TestLake {
    pub dir: tempfile::TempDir,
    pub settings: Settings,
    pub lake: Lake,
}

impl TestLake {
    pub fn new() -> Self {
        Self::with(|_| {})
    }

    pub fn with(adjust: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings = Settings::resolve(
            None,
            &Overrides {
                lake: Some(dir.path().join("lake").display().to_string()),
                ..Default::default()
            },
        )
        .expect("settings");
        adjust(&mut settings);
        let lake = Lake::open(&settings).expect("lake");
        TestLake {
            dir,
            settings,
            lake,
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("lake")
    }

    /// A folder of input files for this test.
    pub fn input(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join("input").join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    pub async fn ingest(&self, paths: &[PathBuf], system: &str) {
        fhirflow::ingest::ingest(
            &self.lake,
            paths,
            &tenant(),
            &system.parse::<SourceSystem>().unwrap(),
            date(),
        )
        .await
        .expect("ingest");
    }

    pub async fn curate(&self) -> fhirflow::Result<CurateReport> {
        fhirflow::curate::curate(
            &self.lake,
            &self.settings,
            &tenant(),
            date(),
            &fhirflow::report::Quiet,
        )
        .await
    }

    /// Runs SQL and returns the rows as strings ("NULL" for nulls).
    pub async fn sql(&self, query: &str) -> Vec<Vec<String>> {
        let ctx = fhirflow::sql::session(&self.lake, &self.settings)
            .await
            .expect("session");
        let batches = ctx
            .sql(query)
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"))
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        rows(&batches)
    }

    /// The curated files of the partition: name → bytes.
    pub fn curated_files(&self) -> std::collections::BTreeMap<String, Vec<u8>> {
        let dir = self
            .root()
            .join("curated")
            .join(format!("tenantGuid={TENANT}"))
            .join(format!("import_date={DATE}"));
        let mut out = std::collections::BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries {
                let e = e.unwrap();
                out.insert(
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                );
            }
        }
        out
    }

    /// Runs the real `fhirflow` binary on this lake.
    pub fn cli(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(binary());
        cmd.args(args)
            .env("FHIRFLOW_LAKE", self.root())
            .env_remove("FHIRFLOW_FAILPOINT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.current_dir(self.dir.path())
            .output()
            .expect("run fhirflow")
    }
}

impl Default for TestLake {
    fn default() -> Self {
        Self::new()
    }
}

pub fn tenant() -> TenantGuid {
    TENANT.parse().unwrap()
}

pub fn date() -> ImportDate {
    DATE.parse().unwrap()
}

/// The `fhirflow` binary built beside this test binary.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join(format!("fhirflow{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} not built: run `cargo build -p fhirflow` first",
        bin.display()
    );
    bin
}

pub fn rows(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let opts = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for b in batches {
        let fmts: Vec<_> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).unwrap())
            .collect();
        for i in 0..b.num_rows() {
            out.push(fmts.iter().map(|f| f.value(i).to_string()).collect());
        }
    }
    out
}

/// Writes `lines` joined by `\n` (and a final `\n`) to `dir/name`.
pub fn write_lines(dir: &Path, name: &str, lines: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(&p, text).unwrap();
    p
}

/// The tenant label for `code`, as fhirflow writes it.
pub fn label(code: &str) -> String {
    format!(r#"{{"system":"{LABEL_SYSTEM}","code":"{code}"}}"#)
}

/// Checks that `curated` is `raw` with exactly one tenant label inserted, in
/// one of the forms the label step uses, and nothing else changed.
pub fn assert_label_only_edit(raw: &[u8], curated: &[u8]) {
    let l = label(TENANT);
    let forms = [
        format!(r#","meta":{{"security":[{l}]}}"#),
        format!(r#""meta":{{"security":[{l}]}},"#),
        format!(r#","security":[{l}]"#),
        format!(r#""security":[{l}]"#),
        format!(",{l}"),
        l.clone(),
    ];
    if raw == curated {
        // Already labelled for this tenant.
        assert!(
            memchr_find(raw, l.as_bytes()),
            "unchanged line must already carry the label: {}",
            String::from_utf8_lossy(&raw[..raw.len().min(200)])
        );
        return;
    }
    let prefix = raw.iter().zip(curated).take_while(|(a, b)| a == b).count();
    for form in &forms {
        let f = form.as_bytes();
        // The insertion may start anywhere the common prefix allows (the
        // label text can repeat bytes that follow it).
        for start in (prefix.saturating_sub(f.len())..=prefix).rev() {
            if curated.len() == raw.len() + f.len()
                && curated[..start] == raw[..start]
                && &curated[start..start + f.len()] == f
                && curated[start + f.len()..] == raw[start..]
            {
                return;
            }
        }
    }
    panic!(
        "curated line is not the raw line plus one label:\nraw:     {}\ncurated: {}",
        String::from_utf8_lossy(&raw[..raw.len().min(300)]),
        String::from_utf8_lossy(&curated[..curated.len().min(300)])
    );
}

fn memchr_find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
