//! One test per check of the validator: real resources, each with one defect
//! written from the R4 specification, asserting the finding's code and its
//! FHIRPath location.

use fhirflow_fhir::{Level, Severity, Validator};

fn findings(level: Level, json: &str) -> Vec<(String, String)> {
    Validator::new(level, 128)
        .validate(json, None)
        .into_iter()
        .filter(|f| f.severity == Severity::Error)
        .map(|f| (f.code.to_string(), f.location))
        .collect()
}

/// Asserts that `json` has exactly the error (code, location).
#[track_caller]
fn only(json: &str, code: &str, location: &str) {
    let got = findings(Level::Strict, json);
    assert_eq!(
        got,
        vec![(code.to_string(), location.to_string())],
        "{json}"
    );
}

#[track_caller]
fn valid(json: &str) {
    assert_eq!(findings(Level::Strict, json), vec![], "{json}");
}

/// A valid Observation (from the spec's example "f001", trimmed); `{}` marks
/// where each test adds or replaces properties.
fn obs(extra: &str) -> String {
    let base = r#""resourceType":"Observation","id":"f001","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"15074-8","display":"Glucose [Moles/volume] in Blood"}]},"subject":{"reference":"Patient/f001","display":"P. van de Heuvel"},"effectivePeriod":{"start":"2013-04-02T09:30:10+01:00"}"#;
    if extra.is_empty() {
        format!("{{{base}}}")
    } else {
        format!("{{{base},{extra}}}")
    }
}

#[test]
fn the_base_resources_are_valid() {
    valid(&obs(""));
    valid(&obs(
        r#""valueQuantity":{"value":6.3,"unit":"mmol/l","system":"http://unitsofmeasure.org","code":"mmol/L"}"#,
    ));
    valid(
        r#"{"resourceType":"Patient","id":"p1","gender":"female","birthDate":"1974-12-25","name":[{"given":["Ann",null],"_given":[null,{"extension":[{"url":"http://example.org/x","valueString":"y"}]}]}]}"#,
    );
}

#[test]
fn unknown_elements() {
    only(
        &obs(r#""colour":"red""#),
        "UNKNOWN_ELEMENT",
        "Observation.colour",
    );
    only(
        &obs(r#""component":[{"code":{"text":"a"},"valueQuantity":{"value":1,"size":2}}]"#),
        "UNKNOWN_ELEMENT",
        "Observation.component[0].valueQuantity.size",
    );
    // A choice type the element does not allow: Observation.value[x] has no Address.
    only(
        &obs(r#""valueAddress":{"city":"Leiden"}"#),
        "UNKNOWN_ELEMENT",
        "Observation.valueAddress",
    );
    // _x only for primitives.
    only(
        &obs(r#""_code":{"id":"a"}"#),
        "UNKNOWN_ELEMENT",
        "Observation._code",
    );
}

#[test]
fn json_kinds() {
    only(
        &obs(r#""issued":20130403"#),
        "WRONG_KIND",
        "Observation.issued",
    );
    only(
        &obs(r#""valueQuantity":{"value":"6.3"}"#),
        "WRONG_KIND",
        "Observation.valueQuantity.value",
    );
    only(
        &obs(r#""valueBoolean":"true""#),
        "WRONG_KIND",
        "Observation.valueBoolean",
    );
    only(
        &obs(r#""valueQuantity":"6.3 mmol/l""#),
        "WRONG_KIND",
        "Observation.valueQuantity",
    );
    only(
        &obs(r#""valueString":{"text":"a"}"#),
        "WRONG_KIND",
        "Observation.valueString",
    );
}

#[test]
fn arrays_against_the_maximum() {
    // Observation.subject is 0..1; Observation.category is 0..*.
    only(
        &obs(r#""method":[{"text":"a"}]"#),
        "ARRAY_NOT_ALLOWED",
        "Observation.method",
    );
    only(
        &obs(r#""category":{"text":"vital-signs"}"#),
        "ARRAY_EXPECTED",
        "Observation.category",
    );
    only(
        r#"{"resourceType":"Patient","id":"p","name":{"family":"Chalmers"}}"#,
        "ARRAY_EXPECTED",
        "Patient.name",
    );
}

#[test]
fn cardinality_and_required_elements() {
    // Observation.status and Observation.code are 1..1.
    only(
        r#"{"resourceType":"Observation","id":"o","code":{"text":"x"}}"#,
        "REQUIRED_MISSING",
        "Observation.status",
    );
    // Observation.component.code is 1..1, in the second component.
    only(
        &obs(r#""component":[{"code":{"text":"a"}},{"valueString":"b"}]"#),
        "REQUIRED_MISSING",
        "Observation.component[1].code",
    );
    // A required primitive present only through its extension counts as present.
    valid(
        r#"{"resourceType":"Observation","id":"o","_status":{"extension":[{"url":"http://hl7.org/fhir/StructureDefinition/data-absent-reason","valueCode":"unknown"}]},"code":{"text":"x"}}"#,
    );
    // Extension.url is 1..1.
    only(
        r#"{"resourceType":"Patient","id":"p","extension":[{"valueString":"x"}]}"#,
        "REQUIRED_MISSING",
        "Patient.extension[0].url",
    );
}

#[test]
fn primitive_formats() {
    let cases = [
        (r#""issued":"2013-04-03""#, "Observation.issued"), // instant needs a time and zone
        (r#""issued":"2013-04-03T15:30:10""#, "Observation.issued"),
        (
            r#""valueDateTime":"2013-02-30""#,
            "Observation.valueDateTime",
        ),
        (r#""valueTime":"25:00:00""#, "Observation.valueTime"),
        (r#""valueInteger":1.5"#, "Observation.valueInteger"),
        (r#""valueInteger":2147483648"#, "Observation.valueInteger"),
        (r#""language":"en  US""#, "Observation.language"),
        (
            r#""implicitRules":"http://example.org/a b""#,
            "Observation.implicitRules",
        ),
        (
            r#""valueSampledData":{"origin":{"value":0},"period":1,"dimensions":0,"data":"1 2"}"#,
            "Observation.valueSampledData.dimensions",
        ),
        (
            r#""meta":{"versionId":"a_b"}"#,
            "Observation.meta.versionId",
        ),
        (r#""meta":{"source":"urn:uuid:ABC"}"#, ""),
    ];
    for (extra, location) in cases {
        let got = findings(Level::Strict, &obs(extra));
        if location.is_empty() {
            // uri: any text without whitespace is a valid uri.
            assert_eq!(got, vec![], "{extra}");
        } else {
            assert_eq!(
                got,
                vec![("INVALID_FORMAT".into(), location.into())],
                "{extra}"
            );
        }
    }
    only(
        r#"{"resourceType":"Binary","id":"b","contentType":"text/plain","data":"aGVsbG8*"}"#,
        "INVALID_FORMAT",
        "Binary.data",
    );
    only(
        r#"{"resourceType":"Patient","id":"p","text":{"status":"generated","div":"<p>x</p>"}}"#,
        "INVALID_FORMAT",
        "Patient.text.div",
    );
    only(
        r#"{"resourceType":"Patient","id":"p","name":[{"family":"   "}]}"#,
        "INVALID_FORMAT",
        "Patient.name[0].family",
    );
    only(
        r#"{"resourceType":"Device","id":"d","udiCarrier":[{"deviceIdentifier":"x","carrierHRF":"y"}],"url":"http://a","identifier":[{"value":"u"}],"uuid":"x"}"#,
        "UNKNOWN_ELEMENT",
        "Device.uuid",
    );
    only(
        r#"{"resourceType":"Task","id":"t","status":"draft","intent":"order","input":[{"type":{"text":"a"},"valueUuid":"urn:uuid:C757873D-EC9A-4326-A141-556F43239520"}]}"#,
        "INVALID_FORMAT",
        "Task.input[0].valueUuid",
    );
    only(
        r#"{"resourceType":"Observation","id":"o","status":"final","code":{"text":"x"},"valuePositiveInt":0}"#,
        "UNKNOWN_ELEMENT",
        "Observation.valuePositiveInt",
    );
    only(
        r#"{"resourceType":"Task","id":"t","status":"draft","intent":"order","input":[{"type":{"text":"a"},"valueOid":"urn:oid:1.02.3"}]}"#,
        "INVALID_FORMAT",
        "Task.input[0].valueOid",
    );
    only(
        r#"{"resourceType":"Task","id":"t","status":"draft","intent":"order","input":[{"type":{"text":"a"},"valuePositiveInt":0}]}"#,
        "INVALID_FORMAT",
        "Task.input[0].valuePositiveInt",
    );
    only(
        r#"{"resourceType":"Task","id":"t","status":"draft","intent":"order","input":[{"type":{"text":"a"},"valueUnsignedInt":-1}]}"#,
        "INVALID_FORMAT",
        "Task.input[0].valueUnsignedInt",
    );
    // The only maxLength of R4 core: 1 MB for a string.
    let long = "a".repeat(1024 * 1024 + 1);
    only(
        &obs(&format!(r#""valueString":"{long}""#)),
        "STRING_TOO_LONG",
        "Observation.valueString",
    );
}

#[test]
fn choice_elements() {
    only(
        &obs(r#""valueString":"a","valueBoolean":true"#),
        "CHOICE_MULTIPLE",
        "Observation.valueBoolean",
    );
    // effective[x] given twice, as a period (in the base) and a dateTime.
    only(
        &obs(r#""effectiveDateTime":"2013-04-02""#),
        "CHOICE_MULTIPLE",
        "Observation.effectiveDateTime",
    );
}

#[test]
fn required_bindings() {
    only(
        r#"{"resourceType":"Observation","id":"o","status":"done","code":{"text":"x"}}"#,
        "CODE_NOT_IN_VALUE_SET",
        "Observation.status",
    );
    only(
        r#"{"resourceType":"Patient","id":"p","gender":"F"}"#,
        "CODE_NOT_IN_VALUE_SET",
        "Patient.gender",
    );
    only(
        &obs(r#""valueQuantity":{"value":1,"comparator":"=="}"#),
        "CODE_NOT_IN_VALUE_SET",
        "Observation.valueQuantity.comparator",
    );
    // A CodeableConcept under a required binding: one coding must be in the set.
    let ai = |status: &str| {
        format!(
            r#"{{"resourceType":"AllergyIntolerance","id":"a","patient":{{"reference":"Patient/p"}},"clinicalStatus":{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical","code":"{status}"}}]}}}}"#
        )
    };
    valid(&ai("active"));
    only(
        &ai("gone"),
        "CODE_NOT_IN_VALUE_SET",
        "AllergyIntolerance.clinicalStatus",
    );
    // structure-only leaves bindings out.
    assert_eq!(
        findings(
            Level::StructureOnly,
            r#"{"resourceType":"Patient","id":"p","gender":"F"}"#
        ),
        vec![]
    );
    // Bindings to value sets not defined in the package (e.g. MIME types) are not checked.
    valid(r#"{"resourceType":"Binary","id":"b","contentType":"application/x-anything"}"#);
}

#[test]
fn primitive_extensions_and_nulls() {
    // _x must be an object holding id/extension only.
    only(
        r#"{"resourceType":"Patient","id":"p","_birthDate":"x"}"#,
        "WRONG_KIND",
        "Patient._birthDate",
    );
    only(
        r#"{"resourceType":"Patient","id":"p","birthDate":"1970","_birthDate":{"value":"1"}}"#,
        "UNKNOWN_ELEMENT",
        "Patient._birthDate.value",
    );
    // Arrays pair item by item.
    only(
        r#"{"resourceType":"Patient","id":"p","name":[{"given":["a","b"],"_given":[null]}]}"#,
        "PRIMITIVE_EXTENSION",
        "Patient.name[0]._given",
    );
    only(
        r#"{"resourceType":"Patient","id":"p","name":[{"given":["a",null]}]}"#,
        "NULL_NOT_ALLOWED",
        "Patient.name[0].given[1]",
    );
    only(
        r#"{"resourceType":"Patient","id":"p","name":[{"given":["a",null],"_given":[null,null]}]}"#,
        "NULL_NOT_ALLOWED",
        "Patient.name[0].given[1]",
    );
    only(
        r#"{"resourceType":"Patient","id":"p","name":[{"given":["a"],"_given":{"id":"x"}}]}"#,
        "ARRAY_EXPECTED",
        "Patient.name[0]._given",
    );
    // null is not a value anywhere else.
    only(
        r#"{"resourceType":"Patient","id":"p","birthDate":null}"#,
        "NULL_NOT_ALLOWED",
        "Patient.birthDate",
    );
    only(
        r#"{"resourceType":"Patient","id":"p","name":[null]}"#,
        "NULL_NOT_ALLOWED",
        "Patient.name[0]",
    );
}

#[test]
fn empty_values() {
    only(
        r#"{"resourceType":"Patient","id":"p","maritalStatus":{}}"#,
        "EMPTY_OBJECT",
        "Patient.maritalStatus",
    );
    only(
        r#"{"resourceType":"Patient","id":"p","name":[]}"#,
        "EMPTY_ARRAY",
        "Patient.name",
    );
    only(
        r#"{"resourceType":"Patient","id":"p","name":[{"family":""}]}"#,
        "EMPTY_STRING",
        "Patient.name[0].family",
    );
}

#[test]
fn references() {
    only(
        &obs(r#""performer":[{"reference":"Practitioner/"}]"#),
        "REFERENCE_FORMAT",
        "Observation.performer[0].reference",
    );
    only(
        &obs(r#""performer":[{"reference":"Doctor/f005"}]"#),
        "REFERENCE_FORMAT",
        "Observation.performer[0].reference",
    );
    only(
        &obs(r#""performer":[{"reference":"urn:uuid:not-a-uuid"}]"#),
        "REFERENCE_FORMAT",
        "Observation.performer[0].reference",
    );
    // Observation.performer allows Practitioner, not Device (also in absolute URLs).
    only(
        &obs(r#""performer":[{"reference":"Device/d1"}]"#),
        "REFERENCE_TARGET_TYPE",
        "Observation.performer[0].reference",
    );
    only(
        &obs(r#""performer":[{"reference":"http://example.org/fhir/Device/d1/_history/2"}]"#),
        "REFERENCE_TARGET_TYPE",
        "Observation.performer[0].reference",
    );
    valid(&obs(
        r#""performer":[{"reference":"Practitioner/f005/_history/1"},{"reference":"https://example.org/fhir/Practitioner/a"},{"reference":"urn:uuid:c757873d-ec9a-4326-a141-556f43239520"}]"#,
    ));
    // #local names a contained resource.
    valid(&obs(
        r##""contained":[{"resourceType":"Practitioner","id":"pr1"}],"performer":[{"reference":"#pr1"}]"##,
    ));
    only(
        &obs(
            r##""contained":[{"resourceType":"Practitioner","id":"pr1"}],"performer":[{"reference":"#pr2"}]"##,
        ),
        "REFERENCE_LOCAL_MISSING",
        "Observation.performer[0].reference",
    );
}

#[test]
fn contained_resources_and_bundle_entries_are_validated_inside() {
    only(
        &obs(r#""contained":[{"resourceType":"Practitioner","id":"pr1","gender":"x"}]"#),
        "CODE_NOT_IN_VALUE_SET",
        "Observation.contained[0].gender",
    );
    only(
        &obs(r#""contained":[{"resourceType":"Nobody","id":"pr1"}]"#),
        "UNKNOWN_RESOURCE_TYPE",
        "Observation.contained[0]",
    );
    let bundle = format!(
        r#"{{"resourceType":"Bundle","id":"b","type":"collection","entry":[{{"fullUrl":"urn:uuid:c757873d-ec9a-4326-a141-556f43239520","resource":{{"resourceType":"Patient","id":"p"}}}},{{"resource":{}}}]}}"#,
        r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":"1"}}"#
    );
    only(
        &bundle,
        "WRONG_KIND",
        "Bundle.entry[1].resource.valueQuantity.value",
    );
}

#[test]
fn resource_level_rules() {
    only(
        r#"{"resourceType":"Patient","id":"p_1"}"#,
        "INVALID_FORMAT",
        "Patient.id",
    );
    only(r#"{"resourceType":"Patient"}"#, "MISSING_ID", "Patient");
    only(
        r#"{"resourceType":"Patient","id":"p","gender":"male","gender":"female"}"#,
        "DUPLICATE_KEY",
        "Patient.gender",
    );
}

#[test]
fn broken_json_is_one_finding() {
    let got = findings(
        Level::Strict,
        r#"{"resourceType":"Patient","id":"p","name":[{"family":"a"}"#,
    );
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "INVALID_JSON");
    let deep = format!(
        r#"{{"resourceType":"Patient","id":"p","extension":{}1{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    // The walk reports what it saw on the way down, then stops at the limit.
    assert_eq!(findings(Level::Strict, &deep).last().unwrap().0, "TOO_DEEP");
}

#[test]
fn every_finding_code_is_listed_in_codes() {
    // Every SCREAMING_SNAKE string literal of the validator is a finding code.
    let src = include_str!("../src/validate.rs");
    let listed: Vec<&str> = fhirflow_fhir::validate::CODES
        .iter()
        .map(|(c, _)| *c)
        .collect();
    for literal in src.split('"').skip(1).step_by(2) {
        let is_code =
            literal.len() > 3 && literal.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
        if is_code {
            assert!(listed.contains(&literal), "{literal} is not in CODES");
        }
    }
}
