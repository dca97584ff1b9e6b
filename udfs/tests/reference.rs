//! `udfs/REFERENCE.md` is generated from the functions' documentation: this
//! test fails when it is stale (regenerate with `FHIRFLOW_BLESS=1`).

#[test]
fn reference_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("REFERENCE.md");
    let want = fhirflow_udfs::reference_markdown();
    if std::env::var_os("FHIRFLOW_BLESS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "udfs/REFERENCE.md is stale: run FHIRFLOW_BLESS=1 cargo test -p fhirflow-udfs --test reference"
    );
}

#[test]
fn every_function_is_documented_with_an_example() {
    for udf in fhirflow_udfs::all_udfs() {
        let doc = udf
            .documentation()
            .unwrap_or_else(|| panic!("{} has no documentation", udf.name()));
        assert!(doc.sql_example.is_some(), "{} has no example", udf.name());
        assert!(doc.syntax_example.starts_with(udf.name()), "{}", udf.name());
    }
}
