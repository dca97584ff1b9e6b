//! What a HealthLake import job leaves in its output folder, and how it is
//! reconciled with what curate published.
//!
//! The formats (AWS HealthLake Developer Guide, "Manifest JSON file" and
//! "Importing FHIR data"):
//! * the folder is `<output S3Uri>/<datastore id>-FHIR_IMPORT-<job id>/`;
//!   DescribeFHIRImportJob returns the output S3Uri with it appended;
//! * `manifest.json` (some users report `Manifest.json`: both are read) has
//!   `inputDataConfig`, `outputDataConfig`, `successOutput.successOutputS3Uri`,
//!   `failureOutput.failureOutputS3Uri` and the counts of files, megabytes
//!   and resources (scanned, imported successfully, with customer error,
//!   with server error);
//! * `SUCCESS/` and `FAILURE/` hold one file per input file, one JSON line
//!   per resource: `{"lineId":3,"UpdateResourceResponse":{"jsonBlob":{…},
//!   "statusCode":400}}`, the blob of a failure an OperationOutcome.
//!   `FAILURE/` is absent when nothing failed.
//!
//! `lineId` is read as the 1-based line of the input file (the documented
//! example does not say which; [`LINE_ID_BASE`] is the one place to change
//! it). A status of 500 or more is a server error, below it a customer error.

use std::collections::BTreeMap;

use serde::Deserialize;

/// What `lineId` 1 names: the first line.
pub(super) const LINE_ID_BASE: u64 = 1;

/// The manifest's fields.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Manifest {
    #[serde(default)]
    pub success_output: Option<SuccessOutput>,
    #[serde(default)]
    pub failure_output: Option<FailureOutput>,
    /// Sizes and file counts other than this are not read.
    #[serde(default)]
    pub number_of_scanned_files: u64,
    pub number_of_resources_scanned: u64,
    pub number_of_resources_imported_successfully: u64,
    pub number_of_resources_with_customer_error: u64,
    pub number_of_resources_with_server_error: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SuccessOutput {
    pub success_output_s3_uri: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct FailureOutput {
    pub failure_output_s3_uri: String,
}

/// The names the manifest goes by, in the order they are looked for.
pub(super) const MANIFEST_NAMES: [&str; 2] = ["manifest.json", "Manifest.json"];

/// The job's output folder, given the output S3 URI Describe returned: the
/// folder itself, or (as the job was started) its parent.
pub(super) fn job_folder(output_uri: &str, datastore: &str, job: &str) -> String {
    let folder = format!("{datastore}-FHIR_IMPORT-{job}");
    let base = output_uri.trim_end_matches('/');
    if base.rsplit('/').next() == Some(folder.as_str()) {
        format!("{base}/")
    } else {
        format!("{base}/{folder}/")
    }
}

pub(super) fn parse_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// One issue of an OperationOutcome.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Issue {
    pub code: String,
    pub diagnostics: Option<String>,
    pub location: Option<String>,
}

/// One line of a SUCCESS or FAILURE file.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Response {
    pub line_id: u64,
    pub status: u16,
    /// A failure's OperationOutcome issues.
    pub issues: Vec<Issue>,
}

impl Response {
    pub fn server_error(&self) -> bool {
        self.status >= 500
    }

    /// The 1-based line of the input file it answers for.
    pub fn line(&self) -> Option<u64> {
        (self.line_id + 1)
            .checked_sub(LINE_ID_BASE)
            .filter(|&n| n > 0)
    }
}

#[derive(Deserialize)]
struct RawLine {
    #[serde(rename = "lineId")]
    line_id: u64,
    #[serde(rename = "UpdateResourceResponse")]
    response: RawResponse,
}

#[derive(Deserialize)]
struct RawResponse {
    #[serde(rename = "jsonBlob", default)]
    blob: serde_json::Value,
    #[serde(rename = "statusCode")]
    status: u16,
}

pub(super) fn parse_response(line: &[u8]) -> Result<Response, String> {
    let raw: RawLine = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let texts = |v: Option<&serde_json::Value>| -> Option<String> {
        match v? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(a) => {
                let parts: Vec<&str> = a.iter().filter_map(|x| x.as_str()).collect();
                (!parts.is_empty()).then(|| parts.join(", "))
            }
            _ => None,
        }
    };
    let issues = raw
        .response
        .blob
        .get("issue")
        .and_then(|i| i.as_array())
        .map(|list| {
            list.iter()
                .map(|i| Issue {
                    code: i
                        .get("code")
                        .and_then(|c| c.as_str())
                        .unwrap_or("unknown")
                        .to_string(),
                    diagnostics: texts(i.get("diagnostics")),
                    location: texts(i.get("expression")).or_else(|| texts(i.get("location"))),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Response {
        line_id: raw.line_id,
        status: raw.response.status,
        issues,
    })
}

/// One curated file the job was given.
#[derive(Debug, Clone)]
pub(super) struct Published {
    pub name: String,
    pub resource_type: String,
    pub records: u64,
}

/// What the job's SUCCESS and FAILURE files say of one input file.
#[derive(Debug, Clone, Default)]
pub(super) struct Answered {
    pub successes: u64,
    pub failures: Vec<Response>,
}

/// Counts of one resource type, or of one file.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Counts {
    pub published: u64,
    pub imported: u64,
    pub customer_error: u64,
    pub server_error: u64,
}

impl Counts {
    pub fn adds_up(&self) -> bool {
        self.published == self.imported + self.customer_error + self.server_error
    }
    fn add(&mut self, o: &Counts) {
        self.published += o.published;
        self.imported += o.imported;
        self.customer_error += o.customer_error;
        self.server_error += o.server_error;
    }
}

/// The job reconciled with curate's files.
#[derive(Debug, Default)]
pub(super) struct Reconciled {
    pub by_type: BTreeMap<String, Counts>,
    /// Resource types with a file that does not add up.
    pub unconserved: Vec<String>,
    /// What does not add up, one sentence each, naming the file.
    pub mismatches: Vec<String>,
    pub total: Counts,
}

/// Reconciles each curated file with the job's answers for it, and the
/// whole with the manifest. `answered` is keyed by curated file name (the
/// caller matches output files to curated files). `have_success` says whether the job wrote any
/// SUCCESS file: when it wrote none, a file's imported count is what it
/// published less its failures, and only the manifest's totals check it.
pub(super) fn reconcile(
    files: &[Published],
    answered: &BTreeMap<String, Answered>,
    have_success: bool,
    manifest: &Manifest,
) -> Reconciled {
    let mut r = Reconciled::default();
    for f in files {
        let a = answered.get(&f.name).cloned().unwrap_or_default();
        let server = a.failures.iter().filter(|x| x.server_error()).count() as u64;
        let customer = a.failures.len() as u64 - server;
        let imported = if have_success {
            a.successes
        } else {
            f.records.saturating_sub(customer + server)
        };
        let c = Counts {
            published: f.records,
            imported,
            customer_error: customer,
            server_error: server,
        };
        let mut wrong = Vec::new();
        if !c.adds_up() {
            wrong.push(format!(
                "curate published {} but HealthLake reports {} imported + {} rejected + {} server errors",
                c.published, c.imported, c.customer_error, c.server_error
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for x in &a.failures {
            match x.line().filter(|&n| n <= f.records) {
                None => wrong.push(format!(
                    "a failure names line {} of {}",
                    x.line_id, f.records
                )),
                Some(line) if !seen.insert(line) => wrong.push(format!("line {line} failed twice")),
                Some(_) => {}
            }
        }
        if !wrong.is_empty() {
            r.mismatches
                .push(format!("{}: {}", f.name, wrong.join("; ")));
            if !r.unconserved.contains(&f.resource_type) {
                r.unconserved.push(f.resource_type.clone());
            }
        }
        r.by_type
            .entry(f.resource_type.clone())
            .or_default()
            .add(&c);
        r.total.add(&c);
    }
    let m = manifest;
    let totals = [
        ("scanned", m.number_of_resources_scanned, r.total.published),
        (
            "imported",
            m.number_of_resources_imported_successfully,
            r.total.imported,
        ),
        (
            "with customer error",
            m.number_of_resources_with_customer_error,
            r.total.customer_error,
        ),
        (
            "with server error",
            m.number_of_resources_with_server_error,
            r.total.server_error,
        ),
    ];
    let mut off: Vec<String> = totals
        .iter()
        .filter(|(_, said, counted)| said != counted)
        .map(|(what, said, counted)| format!("{said} resources {what} (the files show {counted})"))
        .collect();
    if m.number_of_scanned_files > 0 && m.number_of_scanned_files != files.len() as u64 {
        off.push(format!(
            "{} files scanned ({} were sent)",
            m.number_of_scanned_files,
            files.len()
        ));
    }
    if !off.is_empty() {
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        r.mismatches.push(format!(
            "the job's manifest counts {}; files of the job: {}",
            off.join(", "),
            names.join(", ")
        ));
        for f in files {
            if !r.unconserved.contains(&f.resource_type) {
                r.unconserved.push(f.resource_type.clone());
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(scanned: u64, imported: u64, customer: u64, server: u64) -> Manifest {
        Manifest {
            number_of_resources_scanned: scanned,
            number_of_resources_imported_successfully: imported,
            number_of_resources_with_customer_error: customer,
            number_of_resources_with_server_error: server,
            ..Default::default()
        }
    }

    #[test]
    fn the_documented_manifest_reads() {
        // The example of the Developer Guide's "Manifest JSON file".
        let text = br#"{ "inputDataConfig": { "s3Uri": "s3://in/healthlake-input/invalidInput/" },
          "outputDataConfig": { "s3Uri": "s3://out/32839038a2f47f17c2fe0f53f0c3a0ba-FHIR_IMPORT-19dd7bb7bcc8ee12a09bf6d322744a3d/", "encryptionKeyID": "arn:aws:kms:us-west-2:123456789012:key/k" },
          "successOutput": { "successOutputS3Uri": "s3://out/32839038a2f47f17c2fe0f53f0c3a0ba-FHIR_IMPORT-19dd7bb7bcc8ee12a09bf6d322744a3d/SUCCESS/" },
          "failureOutput": { "failureOutputS3Uri": "s3://out/32839038a2f47f17c2fe0f53f0c3a0ba-FHIR_IMPORT-19dd7bb7bcc8ee12a09bf6d322744a3d/FAILURE/" },
          "numberOfScannedFiles": 1, "numberOfFilesImported": 1, "sizeOfScannedFilesInMB": 0.023627,
          "sizeOfDataImportedSuccessfullyInMB": 0.011232, "numberOfResourcesScanned": 9,
          "numberOfResourcesImportedSuccessfully": 4, "numberOfResourcesWithCustomerError": 5,
          "numberOfResourcesWithServerError": 0 }"#;
        let m = parse_manifest(text).unwrap();
        assert_eq!(
            (
                m.number_of_resources_scanned,
                m.number_of_resources_imported_successfully,
                m.number_of_resources_with_customer_error,
                m.number_of_resources_with_server_error,
                m.number_of_scanned_files,
            ),
            (9, 4, 5, 0, 1)
        );
        assert!(m
            .failure_output
            .unwrap()
            .failure_output_s3_uri
            .ends_with("FAILURE/"));
        // A manifest without its counts is not one.
        assert!(parse_manifest(br#"{"inputDataConfig":{}}"#).is_err());
    }

    #[test]
    fn a_failure_line_gives_its_line_status_and_issues() {
        let line = br#"{"lineId":3,"UpdateResourceResponse":{"jsonBlob":{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"value","diagnostics":"bad id","expression":["Patient.id"]},{"severity":"error","code":"invalid","location":["Patient.name[0]"]}]},"statusCode":400}}"#;
        let r = parse_response(line).unwrap();
        assert_eq!((r.line_id, r.status, r.server_error()), (3, 400, false));
        assert_eq!(
            r.issues,
            vec![
                Issue {
                    code: "value".into(),
                    diagnostics: Some("bad id".into()),
                    location: Some("Patient.id".into())
                },
                Issue {
                    code: "invalid".into(),
                    diagnostics: None,
                    location: Some("Patient.name[0]".into())
                }
            ]
        );
        let server = parse_response(
            br#"{"lineId":1,"UpdateResourceResponse":{"jsonBlob":{},"statusCode":503}}"#,
        )
        .unwrap();
        assert!(server.server_error());
        // The other spellings a guess might accept are not the format.
        for wrong in [
            &br#"{"lineNumber":3,"errorCode":"X"}"#[..],
            br#"{"lineId":3,"statusCode":400}"#,
            b"not json",
        ] {
            assert!(parse_response(wrong).is_err());
        }
    }

    #[test]
    fn the_folder_is_appended_once() {
        assert_eq!(
            job_folder("s3://out/jobs", "ds", "j1"),
            "s3://out/jobs/ds-FHIR_IMPORT-j1/"
        );
        assert_eq!(
            job_folder("s3://out/jobs/ds-FHIR_IMPORT-j1/", "ds", "j1"),
            "s3://out/jobs/ds-FHIR_IMPORT-j1/"
        );
    }

    fn failure(line_id: u64, status: u16) -> Response {
        Response {
            line_id,
            status,
            issues: Vec::new(),
        }
    }

    #[test]
    fn files_and_totals_that_add_up_are_conserved() {
        let files = vec![
            Published {
                name: "Patient-processed.ndjson".into(),
                resource_type: "Patient".into(),
                records: 4,
            },
            Published {
                name: "Observation-processed.ndjson".into(),
                resource_type: "Observation".into(),
                records: 3,
            },
        ];
        let mut answered = BTreeMap::new();
        answered.insert(
            "Patient-processed.ndjson".to_string(),
            Answered {
                successes: 2,
                failures: vec![failure(2, 400), failure(4, 500)],
            },
        );
        answered.insert(
            "Observation-processed.ndjson".to_string(),
            Answered {
                successes: 3,
                failures: vec![],
            },
        );
        let r = reconcile(&files, &answered, true, &manifest(7, 5, 1, 1));
        assert!(r.mismatches.is_empty(), "{:?}", r.mismatches);
        assert_eq!(
            r.by_type["Patient"],
            Counts {
                published: 4,
                imported: 2,
                customer_error: 1,
                server_error: 1
            }
        );
        // Without SUCCESS files the same totals check the job.
        let mut no_success = answered.clone();
        for a in no_success.values_mut() {
            a.successes = 0;
        }
        let r = reconcile(&files, &no_success, false, &manifest(7, 5, 1, 1));
        assert!(r.mismatches.is_empty(), "{:?}", r.mismatches);
        assert_eq!(r.by_type["Patient"].imported, 2);
    }

    #[test]
    fn a_file_that_does_not_add_up_is_named() {
        let files = vec![Published {
            name: "Patient-processed.ndjson".into(),
            resource_type: "Patient".into(),
            records: 4,
        }];
        let mut answered = BTreeMap::new();
        // Two server errors counted by the manifest, with no line.
        answered.insert(
            "Patient-processed.ndjson".to_string(),
            Answered {
                successes: 2,
                failures: vec![],
            },
        );
        let r = reconcile(&files, &answered, true, &manifest(4, 2, 0, 2));
        assert_eq!(r.unconserved, vec!["Patient".to_string()]);
        assert!(
            r.mismatches[0].starts_with("Patient-processed.ndjson: curate published 4"),
            "{:?}",
            r.mismatches
        );
        // Without SUCCESS files, the manifest's totals catch it.
        let r = reconcile(&files, &BTreeMap::new(), false, &manifest(4, 2, 0, 2));
        assert!(
            r.mismatches
                .iter()
                .any(|m| m.contains("2 resources with server error")
                    && m.contains("Patient-processed.ndjson")),
            "{:?}",
            r.mismatches
        );
        // A line past the file's end.
        answered.insert(
            "Patient-processed.ndjson".to_string(),
            Answered {
                successes: 3,
                failures: vec![failure(9, 400)],
            },
        );
        let r = reconcile(&files, &answered, true, &manifest(4, 3, 1, 0));
        assert!(
            r.mismatches[0].contains("line 9 of 4"),
            "{:?}",
            r.mismatches
        );
    }
}
