//! Embeds the default rule set (the repository's `queries/` folder) in the
//! binary, so `fhirflow curate` needs nothing beside it.
//!
//! Writes `$OUT_DIR/builtin_rules.rs`: every file of the folder, one level of
//! resource-type folders deep, as `(relative path, contents)`, sorted.

use std::path::{Path, PathBuf};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../queries");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for entry in read_dir(&root) {
        let name = file_name(&entry);
        if name.starts_with('.') {
            continue;
        }
        if entry.is_dir() {
            println!("cargo:rerun-if-changed={}", entry.display());
            for inner in read_dir(&entry) {
                if inner.is_file() && !file_name(&inner).starts_with('.') {
                    files.push((format!("{name}/{}", file_name(&inner)), inner));
                }
            }
        } else if entry.is_file() {
            files.push((name, entry));
        }
    }
    files.sort();
    let mut out = String::from("&[\n");
    for (name, path) in &files {
        let path = path.canonicalize().expect("a rule file's path");
        out.push_str(&format!(
            "    ({name:?}, include_str!({:?})),\n",
            path.display().to_string()
        ));
    }
    out.push_str("]\n");
    let target = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("builtin_rules.rs");
    std::fs::write(target, out).expect("writing builtin_rules.rs");
}

fn read_dir(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect()
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}
