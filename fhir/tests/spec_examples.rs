//! Every example of the FHIR R4 specification (`../shared/data/r4-examples`,
//! 5,298 resources) is valid, except the ones listed here: each breaks the
//! specification in a way the R4 definitions show.
//!
//! The official R4 JSON schema rejects 40 examples
//! (`_official_schema_failures.json`); we accept them, because the schema is
//! wrong there: 32 use `_baseDefinition` / `_profile`, primitive extensions
//! of `canonical` elements that the schema leaves out, and 16 have a
//! non-breaking space (U+00A0) in a string, which the schema's ECMAScript
//! `\S` refuses but FHIR's string type allows.

use std::collections::BTreeSet;
use std::path::PathBuf;

use fhirflow_fhir::{Level, Severity, Validator};

/// (file:line, finding code, why the example is invalid).
const INVALID: &[(&str, &str, &str)] = &[
    (
        "DeviceMetric.ndjson:1",
        "REFERENCE_TARGET_TYPE",
        "parent refers to a DeviceDefinition; R4 allows Reference(Device)",
    ),
    (
        "DeviceUseStatement.ndjson:1",
        "REFERENCE_TARGET_TYPE",
        "reasonReference refers to a Procedure, not in its target list",
    ),
    (
        "ImplementationGuide.ndjson:2",
        "REFERENCE_FORMAT",
        "refers to SearchParameter/<66-character id>, over the id limit of 64",
    ),
    (
        "ImplementationGuide.ndjson:2",
        "REQUIRED_MISSING",
        "the core package's manifest IG has no name and no status (both 1..1)",
    ),
    (
        "ImplementationGuide.ndjson:3",
        "REFERENCE_FORMAT",
        "the same as line 2",
    ),
    (
        "ImplementationGuide.ndjson:3",
        "REQUIRED_MISSING",
        "the same as line 2",
    ),
    (
        "MedicationRequest.ndjson:2",
        "REFERENCE_TARGET_TYPE",
        "dispenseRequest.performer refers to a Practitioner; R4 allows Reference(Organization)",
    ),
    (
        "Observation.ndjson:20",
        "REFERENCE_TARGET_TYPE",
        "performer refers to an Encounter",
    ),
    (
        "Questionnaire.ndjson:6",
        "REQUIRED_MISSING",
        "nested items without linkId (1..1)",
    ),
    (
        "SearchParameter.ndjson:1342",
        "REQUIRED_MISSING",
        "an extension search parameter without base (1..*)",
    ),
    (
        "SearchParameter.ndjson:1343",
        "REQUIRED_MISSING",
        "the same",
    ),
    (
        "SearchParameter.ndjson:1344",
        "REQUIRED_MISSING",
        "the same",
    ),
    (
        "SearchParameter.ndjson:1345",
        "REQUIRED_MISSING",
        "the same",
    ),
    (
        "SearchParameter.ndjson:1346",
        "REQUIRED_MISSING",
        "the same",
    ),
    (
        "SearchParameter.ndjson:1395",
        "INVALID_FORMAT",
        "its id has 66 characters; ids have at most 64",
    ),
    (
        "SearchParameter.ndjson:1396",
        "REQUIRED_MISSING",
        "an extension search parameter without base (1..*)",
    ),
    (
        "SearchParameter.ndjson:1397",
        "REQUIRED_MISSING",
        "the same",
    ),
    (
        "SearchParameter.ndjson:1398",
        "REQUIRED_MISSING",
        "the same",
    ),
    (
        "SearchParameter.ndjson:1399",
        "REQUIRED_MISSING",
        "the same",
    ),
    (
        "SearchParameter.ndjson:1400",
        "REQUIRED_MISSING",
        "the same",
    ),
];

fn examples_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/r4-examples");
    assert!(
        dir.is_dir(),
        "{} is missing: ../shared must sit beside the repository",
        dir.display()
    );
    dir
}

#[test]
fn every_specification_example_is_valid_but_the_listed_ones() {
    let validator = Validator::new(Level::Strict, 128);
    let mut paths: Vec<_> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
        .collect();
    paths.sort();
    let mut found = BTreeSet::new();
    let mut lines = 0;
    for path in &paths {
        let name = path.file_name().unwrap().to_str().unwrap();
        let expected = name.strip_suffix(".ndjson").unwrap();
        for (n, line) in std::fs::read_to_string(path).unwrap().lines().enumerate() {
            lines += 1;
            let errors = validator
                .validate(line, Some(expected))
                .into_iter()
                .filter(|f| f.severity == Severity::Error);
            for f in errors {
                found.insert((format!("{name}:{}", n + 1), f.code));
            }
        }
    }
    assert_eq!(lines, 5298);
    let want: BTreeSet<_> = INVALID
        .iter()
        .map(|(at, code, _)| (at.to_string(), *code))
        .collect();
    assert_eq!(found, want);
}

/// The committed model is exactly what the generator makes of the package.
#[test]
fn the_committed_model_is_the_generators_output() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let package = root.join("../../shared/fhir-r4/package");
    assert!(package.is_dir(), "{} is missing", package.display());
    let out = std::env::temp_dir().join(format!("fhirflow-model-{}.rs", std::process::id()));
    let status = std::process::Command::new("python3")
        .arg(root.join("gen/gen_model.py"))
        .arg(&package)
        .arg(&out)
        .status()
        .expect("python3 runs the generator");
    assert!(status.success());
    let generated = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    assert!(
        generated == std::fs::read(root.join("src/model.rs")).unwrap(),
        "fhir/src/model.rs differs from the generator's output: run python3 fhir/gen/gen_model.py"
    );
}
