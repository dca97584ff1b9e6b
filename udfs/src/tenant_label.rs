//! `fhir_tenant_label(resource, tenant [, system])`: curation step 5.
//!
//! Puts exactly one tenant label `{"system": <system>, "code": <tenant>}` in
//! `meta.security` by inserting text; every other byte of the resource is left
//! as it was (key order, number text, escapes, whitespace). The cases:
//!
//! | the resource has                         | edit                                  |
//! | ---------------------------------------- | ------------------------------------- |
//! | no `meta`                                | `,"meta":{"security":[L]}` after `id` |
//! | `meta` without `security`                | `,"security":[L]` at the end of meta  |
//! | `security` without a tenant label        | `,L` after the last label             |
//! | this tenant's label                      | nothing (extra copies removed)        |
//! | another tenant's label                   | rejected: a cross-tenant leak         |
//!
//! The engine calls [`apply_tenant_label`] directly on each surviving line; SQL
//! rules reach the same function through the UDF.

use std::borrow::Cow;
use std::fmt;

use crate::json::{scan_resource, JsonError, Kind, Scanned};

/// The default label system (DESIGN.md, step 5).
pub const DEFAULT_TENANT_SYSTEM: &str = "http://thirdopinion.io/identity/claims/tenant";

/// Why a resource cannot carry the tenant label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelError {
    Json(JsonError),
    NotAnObject(Kind),
    /// A member curation reads occurs twice.
    DuplicateMember(&'static str),
    MetaNotObject(Kind),
    SecurityNotArray(Kind),
    SecurityEntryNotObject {
        index: usize,
        kind: Kind,
    },
    /// A tenant-system label with no string code.
    TenantLabelWithoutCode {
        index: usize,
    },
    /// A tenant-system label for another tenant.
    ForeignTenant {
        index: usize,
        code: String,
    },
}

impl LabelError {
    /// A stable code for `import_errors.error_code`.
    pub fn code(&self) -> &'static str {
        match self {
            LabelError::Json(JsonError::TooDeep { .. }) => "TOO_DEEP",
            LabelError::Json(JsonError::Truncated { .. }) => "TRUNCATED_JSON",
            LabelError::Json(_) => "INVALID_JSON",
            LabelError::NotAnObject(_) => "NOT_AN_OBJECT",
            LabelError::DuplicateMember(_) => "DUPLICATE_MEMBER",
            LabelError::MetaNotObject(_) | LabelError::SecurityNotArray(_) => "INVALID_META",
            LabelError::SecurityEntryNotObject { .. } => "INVALID_META",
            LabelError::TenantLabelWithoutCode { .. } => "INVALID_TENANT_LABEL",
            LabelError::ForeignTenant { .. } => "FOREIGN_TENANT_LABEL",
        }
    }

    /// A FHIRPath-style location below the resource type.
    pub fn location(&self) -> Option<String> {
        match self {
            LabelError::MetaNotObject(_) => Some("meta".into()),
            LabelError::SecurityNotArray(_) => Some("meta.security".into()),
            LabelError::SecurityEntryNotObject { index, .. }
            | LabelError::TenantLabelWithoutCode { index }
            | LabelError::ForeignTenant { index, .. } => Some(format!("meta.security[{index}]")),
            _ => None,
        }
    }
}

impl fmt::Display for LabelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabelError::Json(e) => write!(f, "invalid JSON: {e}"),
            LabelError::NotAnObject(k) => {
                write!(f, "the line is a JSON {}, not an object", k.name())
            }
            LabelError::DuplicateMember(m) => write!(f, "member '{m}' occurs more than once"),
            LabelError::MetaNotObject(k) => write!(f, "meta is a JSON {}, not an object", k.name()),
            LabelError::SecurityNotArray(k) => {
                write!(f, "meta.security is a JSON {}, not an array", k.name())
            }
            LabelError::SecurityEntryNotObject { kind, .. } => {
                write!(
                    f,
                    "a meta.security entry is a JSON {}, not an object",
                    kind.name()
                )
            }
            LabelError::TenantLabelWithoutCode { .. } => {
                write!(f, "a tenant security label has no string code")
            }
            // The foreign code is a tenant id, not record content: naming it
            // lets an engineer trace the leak to its source.
            LabelError::ForeignTenant { code, .. } => {
                write!(
                    f,
                    "already labelled for another tenant ({code}); not relabelled"
                )
            }
        }
    }
}

impl std::error::Error for LabelError {}

/// Checks the JSON shape that the label step relies on: an object, no
/// duplicated `id`/`meta`, `meta` an object, `meta.security` an array of
/// objects. Curation runs this in step 1 so that shape errors are reported
/// before dedup.
pub fn check_meta_shape(scanned: &Scanned) -> Result<(), LabelError> {
    if scanned.root.kind != Kind::Object {
        return Err(LabelError::NotAnObject(scanned.root.kind));
    }
    if let Some(m) = scanned.duplicate_member {
        return Err(LabelError::DuplicateMember(m));
    }
    if let Some(meta) = scanned.meta {
        if meta.kind != Kind::Object {
            return Err(LabelError::MetaNotObject(meta.kind));
        }
    }
    let fields = &scanned.meta_fields;
    if let Some(sec) = fields.security {
        if sec.kind != Kind::Array {
            return Err(LabelError::SecurityNotArray(sec.kind));
        }
    }
    for (index, e) in fields.security_entries.iter().enumerate() {
        if e.span.kind != Kind::Object {
            return Err(LabelError::SecurityEntryNotObject {
                index,
                kind: e.span.kind,
            });
        }
    }
    Ok(())
}

/// Returns `resource` with exactly one tenant label for `tenant`, editing only
/// what the label needs. `Cow::Borrowed` when the label was already there.
pub fn apply_tenant_label<'a>(
    resource: &'a str,
    system: &str,
    tenant: &str,
    max_depth: usize,
) -> Result<Cow<'a, str>, LabelError> {
    let scanned = scan_resource(resource, max_depth).map_err(LabelError::Json)?;
    apply_to_scanned(resource, &scanned, system, tenant)
}

/// [`apply_tenant_label`] for a line that has already been scanned.
pub fn apply_to_scanned<'a>(
    src: &'a str,
    scanned: &Scanned,
    system: &str,
    tenant: &str,
) -> Result<Cow<'a, str>, LabelError> {
    check_meta_shape(scanned)?;
    let label = || {
        format!(
            "{{\"system\":{},\"code\":{}}}",
            serde_json::Value::from(system),
            serde_json::Value::from(tenant)
        )
    };
    let Some(meta) = scanned.meta else {
        // No meta: add one after `id` (FHIR's usual place), or first.
        let block = format!("\"meta\":{{\"security\":[{}]}}", label());
        return Ok(match scanned.id {
            Some(id) => insert(src, id.end, &format!(",{block}")).into(),
            None => {
                let open = scanned.root.start + 1;
                let empty = src[open..scanned.root.end - 1].trim().is_empty();
                let sep = if empty { "" } else { "," };
                insert(src, open, &format!("{block}{sep}")).into()
            }
        });
    };
    let fields = &scanned.meta_fields;
    let Some(security) = fields.security else {
        return Ok(match fields.last_member_end {
            Some(end) => insert(src, end, &format!(",\"security\":[{}]", label())),
            None => insert(src, meta.start + 1, &format!("\"security\":[{}]", label())),
        }
        .into());
    };
    // Find the entries that use the tenant system.
    let mut ours: Vec<usize> = Vec::new();
    for (index, e) in fields.security_entries.iter().enumerate() {
        if !e.system.is_some_and(|s| s.str_eq(src, system)) {
            continue;
        }
        let code = e
            .code
            .filter(|c| c.kind == Kind::String)
            .and_then(|c| c.decoded(src))
            .ok_or(LabelError::TenantLabelWithoutCode { index })?;
        // Tenant ids are GUIDs: compare without regard to hex case.
        if !code.eq_ignore_ascii_case(tenant) {
            return Err(LabelError::ForeignTenant {
                index,
                code: code.into_owned(),
            });
        }
        ours.push(index);
    }
    match ours.as_slice() {
        [] => Ok(match fields.security_entries.last() {
            Some(last) => insert(src, last.span.end, &format!(",{}", label())),
            None => insert(src, security.start + 1, &label()),
        }
        .into()),
        [_] => Ok(Cow::Borrowed(src)),
        [_, extra @ ..] => {
            // Keep the first copy; drop each later one with the separator
            // before it (the end of the previous entry up to its own end).
            let entries = &fields.security_entries;
            let mut out = String::with_capacity(src.len());
            let mut from = 0;
            for &i in extra {
                out.push_str(&src[from..entries[i - 1].span.end]);
                from = entries[i].span.end;
            }
            out.push_str(&src[from..]);
            Ok(out.into())
        }
    }
}

fn insert(src: &str, at: usize, text: &str) -> String {
    let mut out = String::with_capacity(src.len() + text.len());
    out.push_str(&src[..at]);
    out.push_str(text);
    out.push_str(&src[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";
    const OTHER: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
    const SYS: &str = DEFAULT_TENANT_SYSTEM;

    fn label(src: &str) -> Result<String, LabelError> {
        apply_tenant_label(src, SYS, T, 64).map(|c| c.into_owned())
    }
    fn lbl(code: &str) -> String {
        format!(r#"{{"system":"{SYS}","code":"{code}"}}"#)
    }

    #[test]
    fn adds_meta_after_id() {
        let src = r#"{"resourceType":"Patient","id":"p1","x":1.50}"#;
        assert_eq!(
            label(src).unwrap(),
            format!(
                r#"{{"resourceType":"Patient","id":"p1","meta":{{"security":[{}]}},"x":1.50}}"#,
                lbl(T)
            )
        );
    }

    #[test]
    fn adds_security_to_meta_and_label_to_security() {
        let src = r#"{"resourceType":"Patient","id":"p","meta":{"versionId":"1"}}"#;
        assert_eq!(
            label(src).unwrap(),
            format!(
                r#"{{"resourceType":"Patient","id":"p","meta":{{"versionId":"1","security":[{}]}}}}"#,
                lbl(T)
            )
        );
        let src = r#"{"id":"p","meta":{}}"#;
        assert_eq!(
            label(src).unwrap(),
            format!(r#"{{"id":"p","meta":{{"security":[{}]}}}}"#, lbl(T))
        );
        let src = r#"{"id":"p","meta":{"security":[{"system":"x","code":"R"}]}}"#;
        assert_eq!(
            label(src).unwrap(),
            format!(
                r#"{{"id":"p","meta":{{"security":[{{"system":"x","code":"R"}},{}]}}}}"#,
                lbl(T)
            )
        );
    }

    #[test]
    fn keeps_an_existing_label_and_removes_extra_copies() {
        let one = format!(r#"{{"id":"p","meta":{{"security":[{}]}}}}"#, lbl(T));
        assert!(matches!(
            apply_tenant_label(&one, SYS, T, 64).unwrap(),
            Cow::Borrowed(_)
        ));
        let two = format!(
            r#"{{"id":"p","meta":{{"security":[{}, {{"code":"x"}} ,{}]}}}}"#,
            lbl(T),
            lbl(&T.to_uppercase())
        );
        assert_eq!(
            label(&two).unwrap(),
            format!(
                r#"{{"id":"p","meta":{{"security":[{}, {{"code":"x"}}]}}}}"#,
                lbl(T)
            )
        );
    }

    #[test]
    fn rejects_another_tenants_label() {
        let src = format!(r#"{{"id":"p","meta":{{"security":[{}]}}}}"#, lbl(OTHER));
        let err = label(&src).unwrap_err();
        assert_eq!(err.code(), "FOREIGN_TENANT_LABEL");
        assert_eq!(err.location().as_deref(), Some("meta.security[0]"));
        // An escaped system is still the tenant system.
        let esc = src.replace("http://", "http:\\/\\/");
        assert_eq!(label(&esc).unwrap_err().code(), "FOREIGN_TENANT_LABEL");
    }

    #[test]
    fn rejects_wrong_shapes() {
        for (src, code) in [
            (r#"{"id":"p","meta":[]}"#, "INVALID_META"),
            (r#"{"id":"p","meta":{"security":{}}}"#, "INVALID_META"),
            (r#"{"id":"p","meta":{"security":["x"]}}"#, "INVALID_META"),
            (r#"[1]"#, "NOT_AN_OBJECT"),
            (r#"{"id":"p","meta":{},"meta":{}}"#, "DUPLICATE_MEMBER"),
            (r#"{"id":"p""#, "TRUNCATED_JSON"),
        ] {
            assert_eq!(label(src).unwrap_err().code(), code, "{src}");
        }
    }

    #[test]
    fn without_id_the_meta_goes_first() {
        assert_eq!(
            label("{}").unwrap(),
            format!(r#"{{"meta":{{"security":[{}]}}}}"#, lbl(T))
        );
        assert_eq!(
            label(r#"{"a":1}"#).unwrap(),
            format!(r#"{{"meta":{{"security":[{}]}},"a":1}}"#, lbl(T))
        );
    }
}
