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
//! | this tenant's label, spelled otherwise   | its code rewritten (see below)        |
//! | another tenant's label                   | rejected: a cross-tenant leak         |
//! | a nested resource with another tenant's  | rejected, at the nested label         |
//!
//! *Spelled otherwise*: the same GUID in upper case, in braces `{…}` or after
//! `urn:uuid:` (see [`same_tenant`]). It is the same tenant, so not a leak,
//! but HealthLake's `_security` search matches codes exactly: the kept label's
//! code string is replaced by the canonical one (the tenant as the labeller
//! was given it; curation gives `TenantGuid`'s lower-case form), the smallest
//! edit that leaves exactly one canonical label. A copy already canonical is
//! the one kept when there are several.
//!
//! *Nested resources* (`contained[]`, `Bundle.entry[].resource`,
//! `Parameters.parameter[].resource`, at any depth) are found by the line's
//! one scan ([`Scanned::nested_meta`]). Their labels are judged like the
//! top-level ones but never edited: only the top-level meta gets the label,
//! and a nested label of this tenant, in any spelling, stays as it is.
//!
//! The engine calls [`apply_tenant_label`] directly on each surviving line; SQL
//! rules reach the same function through the UDF.

use std::borrow::Cow;
use std::fmt;

use crate::json::{
    items, key_is, members, path_to, scan_resource, value_at, JsonError, Kind, Scanned, Span,
};

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
    /// A tenant-system label with no string code; `location` is where the
    /// label is (`meta.security[1]`, `contained[0].meta.security[0]`).
    TenantLabelWithoutCode {
        location: String,
    },
    /// A tenant-system label for another tenant, at the top level or in a
    /// nested resource; `location` as above.
    ForeignTenant {
        location: String,
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
            LabelError::SecurityEntryNotObject { index, .. } => {
                Some(format!("meta.security[{index}]"))
            }
            LabelError::TenantLabelWithoutCode { location }
            | LabelError::ForeignTenant { location, .. } => Some(location.clone()),
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
            LabelError::TenantLabelWithoutCode { location } => {
                write!(
                    f,
                    "the tenant security label at {location} has no string code"
                )
            }
            // The foreign code is a tenant id, not record content: naming it
            // lets an engineer trace the leak to its source.
            LabelError::ForeignTenant { location, code } => {
                write!(
                    f,
                    "already labelled for another tenant ({code}) at {location}; not relabelled"
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
    /// `"<tenant>"`: what replaces a variant spelling's code.
    code: String,
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
    /// Cut these byte ranges, in order: extra copies of the label, and the
    /// code of a label spelled otherwise (rewritten, see [`Cut`]). Rare: the
    /// engine plans it again in pass 2 (the name predates rewriting).
    Remove(Vec<Cut>),
}

/// One change of a [`LabelEdit::Remove`]: the bytes of `range` go and, when
/// `recode`, the canonical code string (quotes included) takes their place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub range: std::ops::Range<usize>,
    pub recode: bool,
}

impl Cut {
    fn remove(range: std::ops::Range<usize>) -> Self {
        Cut {
            range,
            recode: false,
        }
    }
}

/// What a label coding is, for [`TenantLabeller::judge`].
enum Verdict {
    /// Not the tenant system.
    Other,
    /// This tenant; `canonical`: its code is the labeller's, exactly.
    Ours {
        canonical: bool,
    },
    NoCode,
    Foreign(String),
}

/// Whether `code` names `tenant`: equal but for the case of letters, and,
/// when both are GUIDs, in any of the spellings systems write (`{…}`,
/// `urn:uuid:…`). Curation's tenant flag takes the plain 8-4-4-4-12 form only
/// (`TenantGuid`); labels written by other systems vary more. A GUID without
/// hyphens is not taken for the same tenant: rejected, never guessed.
pub fn same_tenant(code: &str, tenant: &str) -> bool {
    if code.eq_ignore_ascii_case(tenant) {
        return true;
    }
    match (guid_core(code), guid_core(tenant)) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        _ => false,
    }
}

/// The 8-4-4-4-12 hex digits of a GUID spelled plainly, in braces, or after
/// `urn:uuid:` (either case).
fn guid_core(s: &str) -> Option<&str> {
    const URN: &str = "urn:uuid:";
    let s = match s.get(..URN.len()) {
        Some(p) if p.eq_ignore_ascii_case(URN) => &s[URN.len()..],
        _ => s,
    };
    let s = s
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or(s);
    let b = s.as_bytes();
    let guid = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                *c == b'-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    guid.then_some(s)
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
            code: serde_json::Value::from(tenant).to_string(),
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
            LabelEdit::Remove(cuts) => cuts.iter().fold(src_len, |len, c| {
                len - c.range.len() + if c.recode { self.code.len() } else { 0 }
            }),
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
            LabelEdit::Remove(cuts) => {
                let mut from = 0;
                for c in cuts {
                    f(&src[from..c.range.start]);
                    if c.recode {
                        f(&self.code);
                    }
                    from = c.range.end;
                }
                f(&src[from..]);
            }
        }
    }

    /// Plans the edit for a scanned resource (see the table at the top).
    pub fn plan(&self, src: &str, scanned: &Scanned) -> Result<LabelEdit, LabelError> {
        check_meta_shape(scanned)?;
        let ours = self.top_level_labels(src, scanned)?;
        self.check_nested(src, scanned)?;
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
        let entries = &fields.security_entries;
        let keep = match ours.as_slice() {
            [] => {
                return Ok(match entries.last() {
                    Some(last) => LabelEdit::Insert {
                        at: last.span.end,
                        piece: Piece::EntryAfterLast,
                    },
                    None => LabelEdit::Insert {
                        at: security.start + 1,
                        piece: Piece::EntryAlone,
                    },
                })
            }
            [(_, true)] => return Ok(LabelEdit::Unchanged),
            // Keep a copy that is already canonical, else the first one.
            _ => ours.iter().position(|&(_, c)| c).unwrap_or(0),
        };
        let (kept, canonical) = ours[keep];
        let mut cuts = Vec::with_capacity(ours.len());
        for &(index, _) in &ours {
            let e = &entries[index];
            if index == kept {
                if !canonical {
                    // top_level_labels found a string code.
                    let code = e.code.expect("a tenant label's code");
                    cuts.push(Cut {
                        range: code.start..code.end,
                        recode: true,
                    });
                }
            } else if index < kept {
                // Before the kept copy: drop it with the separator after it.
                cuts.push(Cut::remove(e.span.start..entries[index + 1].span.start));
            } else {
                // After it: with the separator before it.
                cuts.push(Cut::remove(entries[index - 1].span.end..e.span.end));
            }
        }
        Ok(LabelEdit::Remove(cuts))
    }

    /// The top-level tenant labels, as (index in `meta.security`, whether
    /// canonical); another tenant's or a malformed one is an error.
    fn top_level_labels(
        &self,
        src: &str,
        scanned: &Scanned,
    ) -> Result<Vec<(usize, bool)>, LabelError> {
        let mut ours = Vec::new();
        for (index, e) in scanned.meta_fields.security_entries.iter().enumerate() {
            let location = || format!("meta.security[{index}]");
            match self.judge(src, e.system, e.code) {
                Verdict::Other => {}
                Verdict::Ours { canonical } => ours.push((index, canonical)),
                Verdict::NoCode => {
                    return Err(LabelError::TenantLabelWithoutCode {
                        location: location(),
                    })
                }
                Verdict::Foreign(code) => {
                    return Err(LabelError::ForeignTenant {
                        location: location(),
                        code,
                    })
                }
            }
        }
        Ok(ours)
    }

    /// The labels of nested resources: another tenant's is a leak just as
    /// at the top level; this tenant's, in any spelling, stays as it is.
    /// The scan found where their metas are; they are read again here, which
    /// costs only lines that have them.
    fn check_nested(&self, src: &str, scanned: &Scanned) -> Result<(), LabelError> {
        for &at in &scanned.nested_meta {
            let Some(meta) = value_at(src, at) else {
                continue;
            };
            // A meta or security of another JSON type carries no coding that
            // a FHIR reader would take for a label.
            for (key, security) in members(src, meta) {
                if !key_is(src, key, "security") {
                    continue;
                }
                for coding in items(src, security) {
                    // The path is worked out only for the line being rejected.
                    let location = || path_to(src, scanned.root, coding.start);
                    match self.judge_members(src, coding) {
                        Verdict::Other | Verdict::Ours { .. } => {}
                        Verdict::NoCode => {
                            return Err(LabelError::TenantLabelWithoutCode {
                                location: location(),
                            })
                        }
                        Verdict::Foreign(code) => {
                            return Err(LabelError::ForeignTenant {
                                location: location(),
                                code,
                            })
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// One coding, from its `system` and `code`.
    fn judge(&self, src: &str, system: Option<Span>, code: Option<Span>) -> Verdict {
        if !system.is_some_and(|s| s.str_eq(src, &self.system)) {
            return Verdict::Other;
        }
        self.judge_code(src, code)
    }

    /// The `code` of a coding of the tenant system.
    fn judge_code(&self, src: &str, code: Option<Span>) -> Verdict {
        let Some(code) = code
            .filter(|c| c.kind == Kind::String)
            .and_then(|c| c.decoded(src))
        else {
            return Verdict::NoCode;
        };
        if *code == *self.tenant {
            Verdict::Ours { canonical: true }
        } else if same_tenant(&code, &self.tenant) {
            Verdict::Ours { canonical: false }
        } else {
            Verdict::Foreign(code.into_owned())
        }
    }

    /// One nested coding, from all its members: a tenant label when any
    /// `system` is the tenant system, and then every `code` must be a string
    /// naming this tenant (a reader that takes the first of repeated members
    /// must see the same tenant as one that takes the last).
    fn judge_members(&self, src: &str, coding: Span) -> Verdict {
        let all = members(src, coding);
        let is = |name| all.iter().filter(move |(k, _)| key_is(src, *k, name));
        if !is("system").any(|(_, v)| v.str_eq(src, &self.system)) {
            return Verdict::Other;
        }
        let mut verdict = Verdict::NoCode;
        for (_, code) in is("code") {
            match self.judge_code(src, Some(*code)) {
                Verdict::Ours { canonical } => {
                    if !matches!(verdict, Verdict::Ours { .. }) {
                        verdict = Verdict::Ours { canonical };
                    }
                }
                bad => return bad,
            }
        }
        verdict
    }

    /// The labelled resource as a string (`Cow::Borrowed` when unchanged).
    pub fn apply<'a>(&self, src: &'a str, max_depth: usize) -> Result<Cow<'a, str>, LabelError> {
        let scanned = scan_resource(src, max_depth).map_err(LabelError::Json)?;
        let edit = self.plan(src, &scanned)?;
        if edit == LabelEdit::Unchanged {
            return Ok(Cow::Borrowed(src));
        }
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
        assert_eq!(
            err.to_string(),
            format!(
                "already labelled for another tenant ({OTHER}) at meta.security[0]; not relabelled"
            )
        );
        // An escaped system is still the tenant system.
        let esc = src.replace("http://", "http:\\/\\/");
        assert_eq!(label(&esc).unwrap_err().code(), "FOREIGN_TENANT_LABEL");
    }

    /// `src` curated: only the top-level label added, nested text as it was.
    fn labelled_at_top(src: &str, tail: &str) -> String {
        let at = src.len() - tail.len();
        format!("{}{}{}", &src[..at], format_args!(",{}", lbl(T)), tail)
    }

    #[test]
    fn rejects_another_tenants_label_in_a_nested_resource() {
        let theirs = lbl(OTHER);
        let r = r#"{"system":"x","code":"R"}"#;
        for (src, location) in [
            (
                format!(
                    r#"{{"resourceType":"Patient","id":"p","contained":[{{"resourceType":"Organization","id":"o","meta":{{"security":[{r},{theirs}]}}}}]}}"#
                ),
                "contained[0].meta.security[1]",
            ),
            (
                format!(
                    r#"{{"resourceType":"Bundle","id":"b","entry":[{{}},{{}},{{"fullUrl":"x"}},{{"resource":{{"resourceType":"Patient","id":"p","meta":{{"security":[{theirs}]}}}}}}]}}"#
                ),
                "entry[3].resource.meta.security[0]",
            ),
            (
                format!(
                    r#"{{"resourceType":"Parameters","id":"q","parameter":[{{"name":"n","part":[{{"name":"m","resource":{{"resourceType":"Patient","meta":{{"versionId":"1","security":[{theirs}]}}}}}}]}}]}}"#
                ),
                "parameter[0].part[0].resource.meta.security[0]",
            ),
            // Deeper: a bundle entry's contained resource, under a key with
            // an escape (the same `meta` to every JSON reader).
            (
                format!(
                    r#"{{"resourceType":"Bundle","id":"b","entry":[{{"resource":{{"resourceType":"Patient","contained":[{{"resourceType":"Device","m\u0065ta":{{"security":[{theirs}]}}}}]}}}}]}}"#
                ),
                "entry[0].resource.contained[0].meta.security[0]",
            ),
        ] {
            let err = label(&src).unwrap_err();
            assert_eq!(err.code(), "FOREIGN_TENANT_LABEL", "{src}");
            assert_eq!(err.location().as_deref(), Some(location));
            assert_eq!(
                err.to_string(),
                format!(
                    "already labelled for another tenant ({OTHER}) at {location}; not relabelled"
                )
            );
        }
        // Alongside a good top-level label, and with the top level already ours.
        let src = format!(
            r#"{{"id":"p","meta":{{"security":[{}]}},"contained":[{{"meta":{{"security":[{theirs}]}}}}]}}"#,
            lbl(T)
        );
        assert_eq!(label(&src).unwrap_err().code(), "FOREIGN_TENANT_LABEL");
        // A coding that says its code twice: a reader that takes either one
        // must see this tenant.
        for codes in [
            format!(r#""code":"{OTHER}","code":"{T}""#),
            format!(r#""code":"{T}","code":"{OTHER}""#),
        ] {
            let src = format!(
                r#"{{"id":"p","contained":[{{"meta":{{"security":[{{"system":"{SYS}",{codes}}}]}}}}]}}"#
            );
            let err = label(&src).unwrap_err();
            assert_eq!(err.code(), "FOREIGN_TENANT_LABEL", "{src}");
            assert_eq!(
                err.location().as_deref(),
                Some("contained[0].meta.security[0]")
            );
        }
        // A tenant-system label without a code, nested, is as bad as on top.
        let src = format!(
            r#"{{"id":"p","contained":[{{"meta":{{"security":[{{"system":"{SYS}","code":{{"x":1}}}}]}}}}]}}"#
        );
        let err = label(&src).unwrap_err();
        assert_eq!(err.code(), "INVALID_TENANT_LABEL");
        assert_eq!(
            err.location().as_deref(),
            Some("contained[0].meta.security[0]")
        );
    }

    #[test]
    fn leaves_nested_labels_of_this_tenant_as_they_are() {
        // Any spelling of this tenant, in contained and bundle resources, and
        // labels of other systems: only the top-level meta is edited.
        let upper = lbl(&T.to_uppercase());
        let braced = lbl(&format!("{{{T}}}"));
        let r = r#"{"system":"x","code":"7c9e6679-7425-40de-944b-e07fc1f90ae7"}"#;
        let tail = r#"]}}"#;
        for src in [
            format!(
                r#"{{"resourceType":"Patient","id":"p","contained":[{{"resourceType":"Organization","meta":{{"security":[{upper},{r}]}}}}],"meta":{{"security":[{r}{tail}"#
            ),
            format!(
                r#"{{"resourceType":"Bundle","id":"b","entry":[{{"resource":{{"meta":{{"security":[{braced}]}}}}}},{{"resource":{{"meta":{{"security":[{}]}}}}}}],"meta":{{"security":[{r}{tail}"#,
                lbl(T)
            ),
        ] {
            assert_eq!(label(&src).unwrap(), labelled_at_top(&src, tail), "{src}");
        }
    }

    #[test]
    fn rewrites_another_spelling_of_this_tenant_to_the_canonical_code() {
        let up = T.to_uppercase();
        for variant in [
            up.clone(),
            format!("{{{T}}}"),
            format!("{{{up}}}"),
            format!("urn:uuid:{T}"),
            format!("URN:UUID:{up}"),
        ] {
            let src = format!(
                r#"{{"id":"p","meta":{{"security":[{{"code":"x"}}, {} ]}},"n":1E-22}}"#,
                lbl(&variant)
            );
            // Only the code string changes.
            let want = src.replace(&format!("\"{variant}\""), &format!("\"{T}\""));
            assert_eq!(label(&src).unwrap(), want, "{variant}");
        }
        // An escaped code that decodes to the canonical one is canonical.
        let esc = format!(
            r#"{{"id":"p","meta":{{"security":[{}]}}}}"#,
            lbl(&T.replacen('-', "\\u002d", 1))
        );
        assert!(matches!(
            apply_tenant_label(&esc, SYS, T, 64).unwrap(),
            Cow::Borrowed(_)
        ));
        // Copies: a canonical one is kept wherever it is; without one the
        // first is rewritten; the others go with one separator each.
        let (c, u, b) = (lbl(T), lbl(&up), lbl(&format!("{{{T}}}")));
        let x = r#"{"code":"x"}"#;
        for (security, want) in [
            (format!("{u}, {c}"), c.clone()),
            (format!("{u},{b} , {c},{x}"), format!("{c},{x}")),
            (format!("{x},{u},{c},{b}"), format!("{x},{c}")),
            (format!("{b}, {x}, {u}"), format!("{c}, {x}")),
        ] {
            let src = format!(r#"{{"id":"p","meta":{{"security":[{security}]}}}}"#);
            assert_eq!(
                label(&src).unwrap(),
                format!(r#"{{"id":"p","meta":{{"security":[{want}]}}}}"#),
                "{security}"
            );
        }
        // The SQL tenant, if given in another spelling, is what gets written.
        let src = format!(r#"{{"id":"p","meta":{{"security":[{c}]}}}}"#);
        assert_eq!(
            apply_tenant_label(&src, SYS, &up, 64).unwrap(),
            src.replace(T, &up)
        );
    }

    #[test]
    fn same_tenant_takes_the_spellings_of_one_guid() {
        let up = T.to_uppercase();
        for same in [
            T.to_string(),
            up.clone(),
            format!("{{{T}}}"),
            format!("urn:uuid:{up}"),
        ] {
            assert!(same_tenant(&same, T), "{same}");
        }
        for other in [
            OTHER.to_string(),
            T.replace('-', ""),
            format!("{{{T}"),
            format!(" {T}"),
            format!("urn:uuid:{{{OTHER}}}"),
            String::new(),
        ] {
            assert!(!same_tenant(&other, T), "{other}");
        }
        // Non-GUID tenants (the SQL function takes any string) compare only
        // without regard to case.
        assert!(same_tenant("ACME", "acme"));
        assert!(!same_tenant("{acme}", "acme"));
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
