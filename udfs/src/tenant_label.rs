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

/// The label of one tenant, its JSON text built once.
#[derive(Debug, Clone)]
pub struct TenantLabeller {
    system: String,
    tenant: String,
    /// `{"system":…,"code":…}`
    label: String,
    /// The texts inserted in each case, prebuilt (see [`Piece`]).
    with_meta: String,
    meta_first: String,
    meta_first_comma: String,
    with_security: String,
    security_alone: String,
    after_entry: String,
}

/// Which text an insertion adds: a small value, so that a plan made while
/// scanning can be kept per line and applied later without scanning again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Piece {
    /// `,"meta":{"security":[L]}` after `id`.
    MetaAfterId,
    /// `"meta":{"security":[L]}` first in an empty object.
    MetaFirst,
    /// `"meta":{"security":[L]},` first in an object without `id`.
    MetaFirstComma,
    /// `,"security":[L]` after meta's last member.
    SecurityAfterMember,
    /// `"security":[L]` in an empty meta.
    SecurityAlone,
    /// `,L` after the last security label.
    EntryAfterLast,
    /// `L` in an empty security array.
    EntryAlone,
}

/// The edit that gives a resource exactly one tenant label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelEdit {
    /// Already labelled: write the line as it is.
    Unchanged,
    /// Insert the text of `piece` at byte `at`.
    Insert { at: usize, piece: Piece },
    /// Remove these byte ranges (extra copies of the label), in order.
    Remove(Vec<std::ops::Range<usize>>),
}

impl TenantLabeller {
    pub fn new(system: &str, tenant: &str) -> Self {
        let label = format!(
            "{{\"system\":{},\"code\":{}}}",
            serde_json::Value::from(system),
            serde_json::Value::from(tenant)
        );
        TenantLabeller {
            system: system.to_string(),
            tenant: tenant.to_string(),
            with_meta: format!(",\"meta\":{{\"security\":[{label}]}}"),
            meta_first: format!("\"meta\":{{\"security\":[{label}]}}"),
            meta_first_comma: format!("\"meta\":{{\"security\":[{label}]}},"),
            with_security: format!(",\"security\":[{label}]"),
            security_alone: format!("\"security\":[{label}]"),
            after_entry: format!(",{label}"),
            label,
        }
    }

    /// Whether this labeller is for `system` and `tenant`.
    pub fn is_for(&self, system: &str, tenant: &str) -> bool {
        self.system == system && self.tenant == tenant
    }

    /// The text a [`Piece`] inserts.
    pub fn text(&self, piece: Piece) -> &str {
        match piece {
            Piece::MetaAfterId => &self.with_meta,
            Piece::MetaFirst => &self.meta_first,
            Piece::MetaFirstComma => &self.meta_first_comma,
            Piece::SecurityAfterMember => &self.with_security,
            Piece::SecurityAlone => &self.security_alone,
            Piece::EntryAfterLast => &self.after_entry,
            Piece::EntryAlone => &self.label,
        }
    }

    /// The length of `src` once `edit` is applied.
    pub fn edited_len(&self, src_len: usize, edit: &LabelEdit) -> usize {
        match edit {
            LabelEdit::Unchanged => src_len,
            LabelEdit::Insert { piece, .. } => src_len + self.text(*piece).len(),
            LabelEdit::Remove(ranges) => src_len - ranges.iter().map(|r| r.len()).sum::<usize>(),
        }
    }

    /// Calls `f` with the pieces of the edited text, in order, so that a
    /// writer can stream them without building the line.
    pub fn for_each_piece<'s>(
        &'s self,
        src: &'s str,
        edit: &LabelEdit,
        mut f: impl FnMut(&'s str),
    ) {
        match edit {
            LabelEdit::Unchanged => f(src),
            LabelEdit::Insert { at, piece } => {
                f(&src[..*at]);
                f(self.text(*piece));
                f(&src[*at..]);
            }
            LabelEdit::Remove(ranges) => {
                let mut from = 0;
                for r in ranges {
                    f(&src[from..r.start]);
                    from = r.end;
                }
                f(&src[from..]);
            }
        }
    }

    /// Plans the edit for a scanned resource (see the table at the top).
    pub fn plan(&self, src: &str, scanned: &Scanned) -> Result<LabelEdit, LabelError> {
        check_meta_shape(scanned)?;
        let Some(meta) = scanned.meta else {
            // No meta: add one after `id` (FHIR's usual place), or first.
            return Ok(match scanned.id {
                Some(id) => LabelEdit::Insert {
                    at: id.end,
                    piece: Piece::MetaAfterId,
                },
                None => {
                    let open = scanned.root.start + 1;
                    let empty = src[open..scanned.root.end - 1].trim().is_empty();
                    LabelEdit::Insert {
                        at: open,
                        piece: if empty {
                            Piece::MetaFirst
                        } else {
                            Piece::MetaFirstComma
                        },
                    }
                }
            });
        };
        let fields = &scanned.meta_fields;
        let Some(security) = fields.security else {
            return Ok(match fields.last_member_end {
                Some(end) => LabelEdit::Insert {
                    at: end,
                    piece: Piece::SecurityAfterMember,
                },
                None => LabelEdit::Insert {
                    at: meta.start + 1,
                    piece: Piece::SecurityAlone,
                },
            });
        };
        // Find the entries that use the tenant system.
        let mut ours: Vec<usize> = Vec::new();
        for (index, e) in fields.security_entries.iter().enumerate() {
            if !e.system.is_some_and(|s| s.str_eq(src, &self.system)) {
                continue;
            }
            let code = e
                .code
                .filter(|c| c.kind == Kind::String)
                .and_then(|c| c.decoded(src))
                .ok_or(LabelError::TenantLabelWithoutCode { index })?;
            // Tenant ids are GUIDs: compare without regard to hex case.
            if !code.eq_ignore_ascii_case(&self.tenant) {
                return Err(LabelError::ForeignTenant {
                    index,
                    code: code.into_owned(),
                });
            }
            ours.push(index);
        }
        let entries = &fields.security_entries;
        Ok(match ours.as_slice() {
            [] => match entries.last() {
                Some(last) => LabelEdit::Insert {
                    at: last.span.end,
                    piece: Piece::EntryAfterLast,
                },
                None => LabelEdit::Insert {
                    at: security.start + 1,
                    piece: Piece::EntryAlone,
                },
            },
            [_] => LabelEdit::Unchanged,
            // Keep the first copy; drop each later one with the separator
            // before it (the end of the previous entry up to its own end).
            [_, extra @ ..] => LabelEdit::Remove(
                extra
                    .iter()
                    .map(|&i| entries[i - 1].span.end..entries[i].span.end)
                    .collect(),
            ),
        })
    }

    /// The labelled resource as a string (`Cow::Borrowed` when unchanged).
    pub fn apply<'a>(&self, src: &'a str, max_depth: usize) -> Result<Cow<'a, str>, LabelError> {
        let scanned = scan_resource(src, max_depth).map_err(LabelError::Json)?;
        if self.plan(src, &scanned)? == LabelEdit::Unchanged {
            return Ok(Cow::Borrowed(src));
        }
        let edit = self.plan(src, &scanned)?;
        let mut s = String::with_capacity(self.edited_len(src.len(), &edit));
        self.for_each_piece(src, &edit, |piece| s.push_str(piece));
        Ok(s.into())
    }
}

/// Returns `resource` with exactly one tenant label for `tenant`, editing only
/// what the label needs. `Cow::Borrowed` when the label was already there.
pub fn apply_tenant_label<'a>(
    resource: &'a str,
    system: &str,
    tenant: &str,
    max_depth: usize,
) -> Result<Cow<'a, str>, LabelError> {
    TenantLabeller::new(system, tenant).apply(resource, max_depth)
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
