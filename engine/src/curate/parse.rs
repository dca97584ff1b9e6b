//! Curation step 1, parse and key: one raw line becomes either the key
//! columns of the record model or a rejection with a code and a reason.
//!
//! Rejected here (DESIGN.md, "Curation semantics" step 1): invalid UTF-8,
//! invalid or truncated JSON, nesting deeper than the limit, a line that is not
//! an object, a missing/unknown `resourceType` or one that differs from the
//! file's type, a missing `id` or one outside `[A-Za-z0-9\-\.]{1,64}`, `meta`
//! or `meta.security` of the wrong JSON type, and a `meta.versionId` or
//! `meta.lastUpdated` that cannot be a dedup key.

use std::borrow::Cow;

use fhirflow_udfs::json::{scan_resource, JsonError, Kind, Scanned, Span};
use fhirflow_udfs::tenant_label::{check_meta_shape, LabelError};

use crate::fhir;

/// The key columns of one accepted line.
#[derive(Debug, Clone, PartialEq)]
pub struct Keys<'a> {
    pub text: &'a str,
    pub resource_type: &'static str,
    pub id: Cow<'a, str>,
    pub version_id: Option<Cow<'a, str>>,
    /// `meta.lastUpdated` in microseconds since the epoch, UTC.
    pub last_updated: Option<i64>,
}

/// Why a line was rejected: becomes an `import_errors` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub code: &'static str,
    pub message: String,
    /// FHIRPath-style location, e.g. `Patient.meta.security[0]`.
    pub location: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
}

impl Reject {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Reject {
            code,
            message: message.into(),
            location: None,
            resource_type: None,
            resource_id: None,
        }
    }
    pub fn at(mut self, location: String) -> Self {
        self.location = Some(location);
        self
    }
}

/// Step 1 for one line of a file whose name gives `file_type` (None when the
/// file name names no resource type).
pub fn key_line<'a>(
    bytes: &'a [u8],
    file_type: Option<&'static str>,
    max_depth: usize,
    last_unterminated: bool,
) -> Result<Keys<'a>, Reject> {
    key_and_scan(bytes, file_type, max_depth, last_unterminated).map(|(keys, _)| keys)
}

/// [`key_line`], also returning the scan (its spans serve the label step).
pub fn key_and_scan<'a>(
    bytes: &'a [u8],
    file_type: Option<&'static str>,
    max_depth: usize,
    last_unterminated: bool,
) -> Result<(Keys<'a>, Scanned), Reject> {
    key_with(bytes, file_type, last_unterminated, |text| {
        scan_resource(text, max_depth)
    })
}

/// [`key_and_scan`] with the scan made by `scan`: [`scan_resource`] or a
/// walk that gives the same result and does more on the way (the
/// validator's, [`fhirflow_fhir::Validator::validate_scan`]), so that step
/// 1 and step 2 read the line once. `scan` runs on text that is UTF-8.
pub fn key_with<'a>(
    bytes: &'a [u8],
    file_type: Option<&'static str>,
    last_unterminated: bool,
    scan: impl FnOnce(&'a str) -> Result<Scanned, JsonError>,
) -> Result<(Keys<'a>, Scanned), Reject> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Reject::new(
            "INVALID_UTF8",
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        )
    })?;
    let scanned = scan(text).map_err(|e| json_reject(&e, last_unterminated))?;
    let keys = key_scanned(text, &scanned, file_type)?;
    Ok((keys, scanned))
}

fn json_reject(e: &JsonError, last_unterminated: bool) -> Reject {
    match e {
        JsonError::Truncated { .. } if last_unterminated => Reject::new(
            "TRUNCATED_LINE",
            format!(
                "the last line has no newline and its JSON is incomplete (file cut short?): {e}"
            ),
        ),
        JsonError::Truncated { .. } => Reject::new("TRUNCATED_JSON", format!("invalid JSON: {e}")),
        JsonError::TooDeep { .. } => Reject::new("TOO_DEEP", e.to_string()),
        JsonError::Syntax { .. } => Reject::new("INVALID_JSON", format!("invalid JSON: {e}")),
    }
}

fn key_scanned<'a>(
    text: &'a str,
    s: &Scanned,
    file_type: Option<&'static str>,
) -> Result<Keys<'a>, Reject> {
    if s.root.kind != Kind::Object {
        return Err(Reject::new(
            "NOT_AN_OBJECT",
            format!("the line is a JSON {}, not an object", s.root.kind.name()),
        ));
    }
    let rt = s
        .resource_type
        .ok_or_else(|| Reject::new("MISSING_RESOURCE_TYPE", "no resourceType"))?;
    let rt_name = rt.decoded(text).ok_or_else(|| {
        Reject::new(
            "INVALID_RESOURCE_TYPE",
            format!("resourceType is a JSON {}, not a string", rt.kind.name()),
        )
    })?;
    let resource_type = fhir::resource_type(&rt_name).ok_or_else(|| {
        Reject::new(
            "UNKNOWN_RESOURCE_TYPE",
            format!(
                "resourceType {:?} is not a FHIR R4 resource type",
                truncate(&rt_name, 64)
            ),
        )
    })?;
    let with_type = |mut r: Reject| {
        r.resource_type = Some(resource_type.to_string());
        r
    };
    match file_type {
        Some(ft) if ft != resource_type => {
            return Err(with_type(Reject::new(
                "RESOURCE_TYPE_MISMATCH",
                format!("resourceType {resource_type} in a {ft} file"),
            )))
        }
        None => {
            return Err(with_type(Reject::new(
                "UNKNOWN_FILE_TYPE",
                "the file name does not name a resource type (<Type>[.NNN].ndjson[.gz])",
            )))
        }
        _ => {}
    }
    let id = id_of(text, s.id).map_err(|r| with_type(r).at(format!("{resource_type}.id")))?;
    let with_id = |r: Reject| {
        let mut r = with_type(r);
        r.resource_id = Some(id.to_string());
        r
    };
    check_meta_shape(s).map_err(|e| {
        let loc = e.location().map(|l| format!("{resource_type}.{l}"));
        let mut r = with_id(Reject::new(e.code(), e.to_string()));
        r.location = loc;
        r
    })?;
    let meta = &s.meta_fields;
    let version_id = match meta.version_id {
        None => None,
        Some(v) => Some(v.decoded(text).ok_or_else(|| {
            with_id(Reject::new(
                "INVALID_META",
                "meta.versionId is not a string",
            ))
            .at(format!("{resource_type}.meta.versionId"))
        })?),
    };
    let last_updated = match meta.last_updated {
        None => None,
        Some(v) => Some(
            v.decoded(text)
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.timestamp_micros())
                .ok_or_else(|| {
                    with_id(Reject::new(
                        "INVALID_META",
                        "meta.lastUpdated is not an instant (YYYY-MM-DDThh:mm:ss[.f]Z or offset)",
                    ))
                    .at(format!("{resource_type}.meta.lastUpdated"))
                })?,
        ),
    };
    Ok(Keys {
        text,
        resource_type,
        id,
        version_id,
        last_updated,
    })
}

fn id_of<'a>(text: &'a str, id: Option<Span>) -> Result<Cow<'a, str>, Reject> {
    let id = id.ok_or_else(|| Reject::new("MISSING_ID", "no id"))?;
    let value = id.decoded(text).ok_or_else(|| {
        Reject::new(
            "INVALID_ID",
            format!("id is a JSON {}, not a string", id.kind.name()),
        )
    })?;
    if !fhir::is_valid_id(&value) {
        return Err(Reject::new(
            "INVALID_ID",
            format!(
                "id {:?} does not match [A-Za-z0-9\\-\\.]{{1,64}}",
                truncate(&value, 80)
            ),
        ));
    }
    Ok(value)
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The rejection for a label problem found in step 5. Its location starts
/// at the resource type, also for a label in a nested resource
/// (`Bundle.entry[3].resource.meta.security[0]`).
pub fn label_reject(e: &LabelError, resource_type: &str, id: Option<&str>) -> Reject {
    Reject {
        code: e.code(),
        message: e.to_string(),
        location: e.location().map(|l| format!("{resource_type}.{l}")),
        resource_type: Some(resource_type.to_string()),
        resource_id: id.map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &str, ty: &'static str) -> &'static str {
        key_line(line.as_bytes(), Some(ty), 16, false)
            .unwrap_err()
            .code
    }

    #[test]
    fn keys_a_good_line() {
        let line = r#"{"resourceType":"Patient","id":"p-1","meta":{"versionId":"2","lastUpdated":"2024-01-01T00:00:01.5+01:00"}}"#;
        let k = key_line(line.as_bytes(), Some("Patient"), 16, false).unwrap();
        assert_eq!(k.id, "p-1");
        assert_eq!(k.version_id.as_deref(), Some("2"));
        assert_eq!(k.last_updated, Some(1_704_063_601_500_000));
    }

    #[test]
    fn rejects_each_kind_of_bad_line() {
        let p = "Patient";
        assert_eq!(code("{", p), "TRUNCATED_JSON");
        assert_eq!(
            key_line(b"{\"a\":", Some(p), 16, true).unwrap_err().code,
            "TRUNCATED_LINE"
        );
        assert_eq!(code("{x}", p), "INVALID_JSON");
        assert_eq!(code("[1]", p), "NOT_AN_OBJECT");
        assert_eq!(code(r#"{"id":"a"}"#, p), "MISSING_RESOURCE_TYPE");
        assert_eq!(
            code(r#"{"resourceType":"Pasient","id":"a"}"#, p),
            "UNKNOWN_RESOURCE_TYPE"
        );
        assert_eq!(
            code(r#"{"resourceType":"Observation","id":"a"}"#, p),
            "RESOURCE_TYPE_MISMATCH"
        );
        assert_eq!(code(r#"{"resourceType":"Patient"}"#, p), "MISSING_ID");
        assert_eq!(
            code(r#"{"resourceType":"Patient","id":"a_b"}"#, p),
            "INVALID_ID"
        );
        assert_eq!(
            code(r#"{"resourceType":"Patient","id":7}"#, p),
            "INVALID_ID"
        );
        assert_eq!(
            code(r#"{"resourceType":"Patient","id":"a","meta":1}"#, p),
            "INVALID_META"
        );
        assert_eq!(
            code(
                r#"{"resourceType":"Patient","id":"a","meta":{"security":{}}}"#,
                p
            ),
            "INVALID_META"
        );
        assert_eq!(
            code(
                r#"{"resourceType":"Patient","id":"a","meta":{"lastUpdated":"yesterday"}}"#,
                p
            ),
            "INVALID_META"
        );
        assert_eq!(
            code(&format!("{}{}", "[".repeat(40), "]".repeat(40)), p),
            "TOO_DEEP"
        );
        assert_eq!(
            key_line(b"{\"id\":\"\xff\"}", Some(p), 16, false)
                .unwrap_err()
                .code,
            "INVALID_UTF8"
        );
        let r = key_line(
            br#"{"resourceType":"Patient","id":"a","meta":{"security":[1]}}"#,
            Some(p),
            16,
            false,
        )
        .unwrap_err();
        assert_eq!(r.location.as_deref(), Some("Patient.meta.security[0]"));
        assert_eq!(r.resource_id.as_deref(), Some("a"));
    }

    #[test]
    fn a_label_rejection_names_the_label_from_the_resource_type() {
        let e = LabelError::ForeignTenant {
            location: "entry[3].resource.meta.security[0]".into(),
            code: "7c9e6679-7425-40de-944b-e07fc1f90ae7".into(),
        };
        let r = label_reject(&e, "Bundle", Some("b"));
        assert_eq!(r.code, "FOREIGN_TENANT_LABEL");
        assert_eq!(
            r.location.as_deref(),
            Some("Bundle.entry[3].resource.meta.security[0]")
        );
        assert!(r.message.contains("at entry[3].resource.meta.security[0]"));
        assert_eq!(r.resource_id.as_deref(), Some("b"));
    }
}
