//! Simple FHIRPath-like paths over resource text, and the text-preserving
//! edits the rule UDFs make with them.
//!
//! A path is a dot-separated list of steps, optionally starting with the
//! resource type: `name.given`, `Patient.identifier[0].value`,
//! `descendants().reference`.
//!
//! * `name`: the member `name` of every object in the collection; an array
//!   value contributes its items (FHIRPath flattens collections).
//! * `name[n]`: the `n`th (0-based) item of the collection so far.
//! * `descendants()`: every value nested below the collection.
//!
//! Choice elements are named as they appear in JSON (`valueQuantity`, not
//! `value`), and `where()`, functions and operators are not supported: a rule
//! that needs them filters in SQL.
//!
//! Edits replace, insert or remove exactly the bytes of the elements they
//! change; every other byte of the resource stays as it was.

use std::borrow::Cow;

use crate::json::{self, items, key_is, members, Cursor, JsonError, Kind, Span};

/// Nesting limit for the texts the path functions read.
pub const MAX_DEPTH: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Member(String),
    Index(usize),
    Descendants,
}

/// A parsed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FhirPath {
    /// The leading resource type, when the path names one: the path then
    /// matches only resources of that type.
    pub resource_type: Option<String>,
    pub steps: Vec<Step>,
}

impl std::str::FromStr for FhirPath {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut path = FhirPath {
            resource_type: None,
            steps: Vec::new(),
        };
        let bad = |why: &str| Err(format!("path '{text}': {why}"));
        if text.trim().is_empty() {
            return Ok(path); // the value itself
        }
        for (i, part) in text.split('.').enumerate() {
            let part = part.trim();
            if part == "descendants()" {
                path.steps.push(Step::Descendants);
                continue;
            }
            let (name, index) = match part.find('[') {
                Some(open) if part.ends_with(']') => {
                    let n = &part[open + 1..part.len() - 1];
                    match n.parse::<usize>() {
                        Ok(n) => (&part[..open], Some(n)),
                        Err(_) => return bad(&format!("'{n}' is not an index")),
                    }
                }
                Some(_) => return bad("'[' without a closing ']'"),
                None => (part, None),
            };
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return bad(&format!("'{part}' is not an element name"));
            }
            if i == 0 && name.starts_with(|c: char| c.is_ascii_uppercase()) {
                if fhirflow_fhir::RESOURCE_TYPES.binary_search(&name).is_err() {
                    return bad(&format!("{name} is not a FHIR R4 resource type"));
                }
                path.resource_type = Some(name.to_string());
            } else {
                path.steps.push(Step::Member(name.to_string()));
            }
            if let Some(n) = index {
                path.steps.push(Step::Index(n));
            }
        }
        Ok(path)
    }
}

/// Where a selected value sits, for edits.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Root,
    Member { object: Span, key: Span },
    Item { array: Span },
}

#[derive(Debug, Clone, Copy)]
struct Node {
    value: Span,
    slot: Slot,
}

/// The root value of `src`, or None when `src` is not JSON or is of another
/// resource type than the path names.
fn root(src: &str, path: &FhirPath) -> Option<Span> {
    let root = json::validate(src, MAX_DEPTH).ok()?;
    if let Some(ty) = &path.resource_type {
        let matches = members(src, root)
            .iter()
            .any(|(k, v)| key_is(src, *k, "resourceType") && v.str_eq(src, ty));
        if !matches {
            return None;
        }
    }
    Some(root)
}

fn push_flattened(out: &mut Vec<Node>, src: &str, value: Span, slot: Slot) {
    if value.kind == Kind::Array {
        for item in items(src, value) {
            out.push(Node {
                value: item,
                slot: Slot::Item { array: value },
            });
        }
    } else {
        out.push(Node { value, slot });
    }
}

fn descendants(out: &mut Vec<Node>, src: &str, node: Span) {
    match node.kind {
        Kind::Object => {
            for (key, value) in members(src, node) {
                if value.kind == Kind::Array {
                    descendants(out, src, value);
                } else {
                    out.push(Node {
                        value,
                        slot: Slot::Member { object: node, key },
                    });
                    descendants(out, src, value);
                }
            }
        }
        Kind::Array => {
            for item in items(src, node) {
                out.push(Node {
                    value: item,
                    slot: Slot::Item { array: node },
                });
                descendants(out, src, item);
            }
        }
        _ => {}
    }
}

fn step(src: &str, nodes: Vec<Node>, s: &Step) -> Vec<Node> {
    let mut out = Vec::new();
    match s {
        Step::Member(name) => {
            for n in nodes {
                for (key, value) in members(src, n.value) {
                    if key_is(src, key, name) {
                        let slot = Slot::Member {
                            object: n.value,
                            key,
                        };
                        push_flattened(&mut out, src, value, slot);
                    }
                }
            }
        }
        Step::Index(i) => out.extend(nodes.get(*i).copied()),
        Step::Descendants => {
            for n in nodes {
                descendants(&mut out, src, n.value);
            }
        }
    }
    out
}

fn select_nodes(src: &str, root: Span, steps: &[Step]) -> Vec<Node> {
    let mut nodes = vec![Node {
        value: root,
        slot: Slot::Root,
    }];
    for s in steps {
        if nodes.is_empty() {
            break;
        }
        nodes = step(src, nodes, s);
    }
    nodes
}

/// The spans of the values at `path` (arrays flattened), in document order.
pub fn select(src: &str, path: &FhirPath) -> Vec<Span> {
    select_any(src, std::slice::from_ref(path))
}

/// The spans of the values at any of `paths`, in document order, each once.
/// Paths without indexes are matched together in one pass over the text.
pub fn select_any(src: &str, paths: &[FhirPath]) -> Vec<Span> {
    let (indexed, streamed): (Vec<&FhirPath>, Vec<&FhirPath>) = paths
        .iter()
        .partition(|p| p.steps.iter().any(|s| matches!(s, Step::Index(_))));
    // A leading resource type: the path applies only to that type.
    let typed = paths.iter().any(|p| p.resource_type.is_some());
    let actual_type = if typed { resource_type_of(src) } else { None };
    let applies = |p: &&FhirPath| {
        p.resource_type.is_none() || p.resource_type.as_deref() == actual_type.as_deref()
    };
    let steps: Vec<&[Step]> = streamed
        .into_iter()
        .filter(applies)
        .map(|p| p.steps.as_slice())
        .collect();
    let mut out = Vec::new();
    if !steps.is_empty() {
        let mut c = Cursor::new(src, MAX_DEPTH);
        let start: Vec<(usize, usize)> = (0..steps.len()).map(|p| (p, 0)).collect();
        if walk(&mut c, src, &steps, &start, &mut out)
            .and_then(|_| c.finish())
            .is_err()
        {
            return Vec::new();
        }
    }
    for p in indexed.into_iter().filter(applies) {
        if let Ok(r) = json::validate(src, MAX_DEPTH) {
            out.extend(select_nodes(src, r, &p.steps).into_iter().map(|n| n.value));
        }
    }
    if paths.len() > 1 {
        out.sort_by_key(|s| (s.start, std::cmp::Reverse(s.end)));
        out.dedup();
    }
    out
}

/// The `resourceType` of a resource text, if it has one.
fn resource_type_of(src: &str) -> Option<String> {
    let root = json::validate(src, MAX_DEPTH).ok()?;
    members(src, root)
        .into_iter()
        .find(|(k, _)| key_is(src, *k, "resourceType"))
        .and_then(|(_, v)| v.decoded(src).map(Cow::into_owned))
}

/// One pass over the value at the cursor, which is in `states`: (path,
/// index of the path's next step), where the step index equal to the path's
/// length means selected. Skips, without descending, every value no state
/// needs.
fn walk(
    c: &mut Cursor<'_>,
    src: &str,
    paths: &[&[Step]],
    states: &[(usize, usize)],
    out: &mut Vec<Span>,
) -> Result<(), JsonError> {
    let selected = states.iter().any(|&(p, s)| s == paths[p].len());
    let descend = states.iter().any(|&(p, s)| s < paths[p].len());
    match c.peek_kind() {
        Some(Kind::Array) if descend || selected => {
            // An array is not a node: its items are, in the same states.
            c.enter()?;
            let mut first = true;
            while c.next_item(first)? {
                first = false;
                walk(c, src, paths, states, out)?;
            }
        }
        Some(Kind::Object) if descend => {
            let start = c.pos();
            let slot = out.len();
            if selected {
                out.push(Span {
                    kind: Kind::Object,
                    start,
                    end: start,
                    escaped: false,
                });
            }
            c.enter()?;
            let mut child: Vec<(usize, usize)> = Vec::with_capacity(4);
            let mut first = true;
            while let Some(key) = c.next_key(first)? {
                first = false;
                child.clear();
                for &(p, s) in states {
                    let next: &[(usize, usize)] = match paths[p].get(s) {
                        Some(Step::Member(n)) if key_is(src, key, n) => &[(p, s + 1)],
                        Some(Step::Descendants) => &[(p, s), (p, s + 1)],
                        _ => &[],
                    };
                    for n in next {
                        if !child.contains(n) {
                            child.push(*n);
                        }
                    }
                }
                if child.is_empty() {
                    c.value()?;
                } else {
                    walk(c, src, paths, &child, out)?;
                }
            }
            if selected {
                out[slot].end = c.pos();
            }
        }
        _ => {
            let v = c.value()?;
            if selected {
                out.push(v);
            }
        }
    }
    Ok(())
}

/// A value as SQL text: strings decoded, other values as their JSON text,
/// `null` as None.
pub fn value_text(src: &str, span: Span) -> Option<Cow<'_, str>> {
    match span.kind {
        Kind::String => span.decoded(src),
        Kind::Null => None,
        _ => Some(span.text(src).into()),
    }
}

/// Byte-range replacements, applied back to front. An edit inside another
/// edit's range is dropped (the outer one wins).
fn apply(src: &str, mut edits: Vec<(usize, usize, String)>) -> Option<String> {
    if edits.is_empty() {
        return None;
    }
    edits.sort_by_key(|e| (e.0, std::cmp::Reverse(e.1)));
    let mut kept: Vec<(usize, usize, String)> = Vec::with_capacity(edits.len());
    for e in edits {
        match kept.last() {
            Some(last) if e.0 < last.1 || (e.0 == last.0 && e.1 == last.1) => {}
            _ => kept.push(e),
        }
    }
    let mut out = String::with_capacity(src.len() + 64);
    let mut at = 0;
    for (start, end, text) in kept {
        out.push_str(&src[at..start]);
        out.push_str(&text);
        at = end;
    }
    out.push_str(&src[at..]);
    (out != src).then_some(out)
}

/// The parent nodes of the path's last step, and that step.
fn parents<'p>(src: &str, root: Span, path: &'p FhirPath) -> Option<(Vec<Node>, &'p Step)> {
    let (last, init) = path.steps.split_last()?;
    Some((select_nodes(src, root, init), last))
}

/// Sets the element at `path` to `value` (JSON text) in every parent object
/// the path selects, adding the member where it is missing. Returns None when
/// nothing changes (or `src` is not JSON); Err when `value` is not JSON or the
/// path cannot be set.
pub fn set(src: &str, path: &FhirPath, value: &str) -> Result<Option<String>, String> {
    let value = value.trim();
    json::validate(value, MAX_DEPTH)
        .map_err(|e| format!("the new value is not JSON ({e}): {value:.40}"))?;
    let Some(root) = root(src, path) else {
        return Ok(None);
    };
    let Some((parents, last)) = parents(src, root, path) else {
        return Err("an empty path cannot be set".into());
    };
    let mut edits = Vec::new();
    match last {
        Step::Member(name) => {
            let quoted = serde_json::to_string(name).expect("a name serialises");
            for p in parents.iter().filter(|p| p.value.kind == Kind::Object) {
                let ms = members(src, p.value);
                let found: Vec<&(Span, Span)> =
                    ms.iter().filter(|(k, _)| key_is(src, *k, name)).collect();
                if found.is_empty() {
                    let (at, text) = match ms.last() {
                        Some((_, v)) => (v.end, format!(",{quoted}:{value}")),
                        None => (p.value.start + 1, format!("{quoted}:{value}")),
                    };
                    edits.push((at, at, text));
                }
                for (_, v) in found {
                    edits.push((v.start, v.end, value.to_string()));
                }
            }
        }
        Step::Index(i) => {
            if let Some(n) = parents.get(*i) {
                edits.push((n.value.start, n.value.end, value.to_string()));
            }
        }
        Step::Descendants => return Err("a path ending in descendants() cannot be set".into()),
    }
    Ok(apply(src, edits))
}

/// Removes every element the path selects (a whole member, or one array
/// item), with the comma that separated it. An array or object left empty
/// stays as `[]` or `{}`.
pub fn remove(src: &str, path: &FhirPath) -> Option<String> {
    let root = root(src, path)?;
    let (parents, last) = parents(src, root, path)?;
    // (container, first..=last span of the entry to remove)
    let targets: Vec<(Span, (Span, Span))> = match last {
        // A member step removes the whole member (an array with its items).
        Step::Member(name) => parents
            .iter()
            .flat_map(|p| {
                members(src, p.value)
                    .into_iter()
                    .filter(|(k, _)| key_is(src, *k, name))
                    .map(move |(k, v)| (p.value, (k, v)))
            })
            .collect(),
        _ => step(src, parents, last)
            .into_iter()
            .filter_map(|n| match n.slot {
                Slot::Member { object, key } => Some((object, (key, n.value))),
                Slot::Item { array } => Some((array, (n.value, n.value))),
                Slot::Root => None,
            })
            .collect(),
    };
    let edits = targets
        .into_iter()
        .filter_map(|(container, entry)| removal_range(src, container, entry))
        .map(|(from, to)| (from, to, String::new()))
        .collect();
    apply(src, edits)
}

/// The bytes to delete to remove one entry (`first..=last` spans: key and
/// value of a member, or one item) from `container`, with one comma.
fn removal_range(
    src: &str,
    container: Span,
    (first, last): (Span, Span),
) -> Option<(usize, usize)> {
    let entries: Vec<(usize, usize)> = if container.kind == Kind::Object {
        members(src, container)
            .into_iter()
            .map(|(k, v)| (k.start, v.end))
            .collect()
    } else {
        items(src, container)
            .into_iter()
            .map(|i| (i.start, i.end))
            .collect()
    };
    let j = entries
        .iter()
        .position(|e| e.0 == first.start && e.1 == last.end)?;
    Some(if j > 0 {
        (entries[j - 1].1, entries[j].1)
    } else if entries.len() > 1 {
        (entries[0].0, entries[1].0)
    } else {
        (entries[0].0, entries[0].1)
    })
}

/// FHIR's whitespace: what `string` values should not start or end with.
fn is_fhir_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// Whether any string of `src` may start or end with whitespace: a space
/// beside a quote, or an escape right after a quote or a whitespace escape
/// (`\t`, `\n`, `\r`, `\u00XX`) right before one. One pass over the spaces
/// and backslashes, which are far rarer than quotes; compact NDJSON rarely
/// has any such place, so most resources skip the walk.
fn may_have_padded_string(src: &str) -> bool {
    let b = src.as_bytes();
    let at = |j: usize| b.get(j).copied();
    memchr::memchr2_iter(b' ', b'\\', b).any(|i| {
        let before = i.checked_sub(1).and_then(at);
        if b[i] == b' ' {
            return before == Some(b'"') || at(i + 1) == Some(b'"');
        }
        before == Some(b'"')
            || (matches!(at(i + 1), Some(b't' | b'n' | b'r')) && at(i + 2) == Some(b'"'))
            || b[i + 1..].starts_with(b"u00")
    })
}

/// Trims surrounding whitespace from every string any of `paths` selects.
pub fn trim(src: &str, paths: &[FhirPath]) -> Option<String> {
    if !may_have_padded_string(src) {
        return None;
    }
    let mut edits = Vec::new();
    for v in select_any(src, paths) {
        let Some(raw) = v.raw_str(src) else { continue };
        let replacement = if !v.escaped {
            let t = raw.trim_matches(is_fhir_ws);
            (t.len() != raw.len()).then(|| format!("\"{t}\""))
        } else {
            let decoded = v.decoded(src)?;
            let t = decoded.trim_matches(is_fhir_ws);
            (t.len() != decoded.len())
                .then(|| serde_json::to_string(t).expect("a string serialises"))
        };
        if let Some(r) = replacement {
            edits.push((v.start, v.end, r));
        }
    }
    apply(src, edits)
}

/// The type and id of a FHIR reference: `Patient/123`,
/// `https://server/fhir/Patient/123`, `Patient/123/_history/2`. None for
/// contained (`#…`), `urn:` and other references without a resource type.
pub fn parse_reference(reference: &str) -> Option<(&str, &str)> {
    let r = reference.trim();
    if r.starts_with('#') || r.starts_with("urn:") {
        return None;
    }
    let r = r.split(['?', '#']).next()?;
    let mut parts: Vec<&str> = r.split('/').filter(|p| !p.is_empty()).collect();
    if parts.len() >= 4 && parts[parts.len() - 2] == "_history" {
        parts.truncate(parts.len() - 2);
    }
    let [.., ty, id] = parts.as_slice() else {
        return None;
    };
    let id_ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    (fhirflow_fhir::RESOURCE_TYPES.binary_search(ty).is_ok() && id_ok).then_some((ty, id))
}

/// The `code` of the first Coding with `system` among the values at `path`
/// (CodeableConcepts, whose `coding` items are read, or Codings).
pub fn code_by_system<'s>(src: &'s str, path: &FhirPath, system: &str) -> Option<Cow<'s, str>> {
    for value in select(src, path) {
        let ms = members(src, value);
        let codings: Vec<Span> = match ms.iter().find(|(k, _)| key_is(src, *k, "coding")) {
            Some((_, coding)) if coding.kind == Kind::Array => items(src, *coding),
            Some((_, coding)) => vec![*coding],
            None => vec![value],
        };
        for c in codings {
            let cm = members(src, c);
            let has_system = cm
                .iter()
                .any(|(k, v)| key_is(src, *k, "system") && v.str_eq(src, system));
            if !has_system {
                continue;
            }
            if let Some((_, code)) = cm.iter().find(|(k, _)| key_is(src, *k, "code")) {
                return value_text(src, *code);
            }
        }
    }
    None
}

/// Appends the canonical form of the value at `span` to `out`: object
/// members sorted by name, no whitespace, strings re-encoded minimally,
/// numbers and literals as written. `skip` says which members of which
/// objects to leave out (by their path of names from the root).
fn canonical(
    src: &str,
    span: Span,
    path: &mut Vec<String>,
    skip: &dyn Fn(&[String]) -> bool,
    out: &mut String,
) {
    match span.kind {
        Kind::Object => {
            let mut ms: Vec<(String, Span)> = members(src, span)
                .into_iter()
                .map(|(k, v)| (k.decoded(src).unwrap_or_default().into_owned(), v))
                .collect();
            ms.sort_by(|a, b| a.0.cmp(&b.0));
            out.push('{');
            let mut first = true;
            for (name, v) in ms {
                path.push(name);
                if !skip(path) {
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    out.push_str(&serde_json::to_string(path.last().unwrap()).unwrap());
                    out.push(':');
                    canonical(src, v, path, skip, out);
                }
                path.pop();
            }
            out.push('}');
        }
        Kind::Array => {
            out.push('[');
            for (i, item) in items(src, span).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(src, item, path, skip, out);
            }
            out.push(']');
        }
        Kind::String => {
            let s = span.decoded(src).unwrap_or_default();
            out.push_str(&serde_json::to_string(&*s).unwrap());
        }
        _ => out.push_str(span.text(src)),
    }
}

/// The resource's canonical JSON for hashing: key order, whitespace and
/// string escapes do not matter, nor do `meta.versionId` and
/// `meta.lastUpdated` (which servers assign). None when `src` is not JSON.
pub fn canonical_content(src: &str) -> Option<String> {
    let root = json::validate(src, MAX_DEPTH).ok()?;
    let skip = |p: &[String]| {
        p.len() == 2 && p[0] == "meta" && (p[1] == "versionId" || p[1] == "lastUpdated")
    };
    let mut out = String::with_capacity(src.len());
    canonical(src, root, &mut Vec::new(), &skip, &mut out);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> FhirPath {
        s.parse().unwrap()
    }

    fn texts(src: &str, path: &str) -> Vec<String> {
        select(src, &p(path))
            .into_iter()
            .filter_map(|s| value_text(src, s).map(Cow::into_owned))
            .collect()
    }

    const PAT: &str = r#"{"resourceType":"Patient","id":"p1","name":[{"given":["Ann","Bo"],"family":"Lee"},{"given":["Cy"]}],"identifier":[{"system":"urn:x","value":" 42 "}],"managingOrganization":{"reference":"Organization/o1"},"link":[{"other":{"reference":"Patient/p0"}}]}"#;

    #[test]
    fn paths_parse_and_reject() {
        assert_eq!(
            p("Patient.name[1].given").resource_type.as_deref(),
            Some("Patient")
        );
        assert_eq!(p("name[1].given").steps.len(), 3);
        assert!("name..given".parse::<FhirPath>().is_err());
        assert!("Foo.name".parse::<FhirPath>().is_err());
        assert!("name[x]".parse::<FhirPath>().is_err());
        assert!("name[0".parse::<FhirPath>().is_err());
    }

    #[test]
    fn selects_with_flattening_indexes_and_descendants() {
        assert_eq!(texts(PAT, "name.given"), ["Ann", "Bo", "Cy"]);
        assert_eq!(texts(PAT, "Patient.name[1].given"), ["Cy"]);
        assert_eq!(texts(PAT, "name.given[1]"), ["Bo"]);
        assert_eq!(texts(PAT, "Observation.id"), Vec::<String>::new());
        assert_eq!(
            texts(PAT, "descendants().reference"),
            ["Organization/o1", "Patient/p0"]
        );
        assert_eq!(
            texts(PAT, "name[0]"),
            [r#"{"given":["Ann","Bo"],"family":"Lee"}"#]
        );
        assert!(texts("not json", "id").is_empty());
    }

    #[test]
    fn set_replaces_or_adds_and_keeps_every_other_byte() {
        let src = r#"{"resourceType":"Patient", "id":"p1" ,"active" : true,"n":1.50}"#;
        assert_eq!(
            set(src, &p("active"), "false").unwrap().unwrap(),
            r#"{"resourceType":"Patient", "id":"p1" ,"active" : false,"n":1.50}"#
        );
        assert_eq!(
            set(src, &p("gender"), r#""female""#).unwrap().unwrap(),
            r#"{"resourceType":"Patient", "id":"p1" ,"active" : true,"n":1.50,"gender":"female"}"#
        );
        assert_eq!(set("{}", &p("a"), "1").unwrap().unwrap(), r#"{"a":1}"#);
        assert_eq!(set(src, &p("active"), "true").unwrap(), None);
        assert!(set(src, &p("active"), "nope").is_err());
        // Every identifier gets the member.
        let two = r#"{"identifier":[{"value":"a"},{"value":"b","system":"s"}]}"#;
        assert_eq!(
            set(two, &p("identifier.system"), r#""t""#)
                .unwrap()
                .unwrap(),
            r#"{"identifier":[{"value":"a","system":"t"},{"value":"b","system":"t"}]}"#
        );
    }

    #[test]
    fn remove_takes_the_member_and_one_comma() {
        let src = r#"{"a":1, "b":[1,2], "c":{"d":3}}"#;
        assert_eq!(remove(src, &p("a")).unwrap(), r#"{"b":[1,2], "c":{"d":3}}"#);
        assert_eq!(remove(src, &p("b")).unwrap(), r#"{"a":1, "c":{"d":3}}"#);
        assert_eq!(
            remove(src, &p("c.d")).unwrap(),
            r#"{"a":1, "b":[1,2], "c":{}}"#
        );
        assert_eq!(
            remove(src, &p("b[1]")).unwrap(),
            r#"{"a":1, "b":[1], "c":{"d":3}}"#
        );
        assert_eq!(remove(src, &p("zz")), None);
    }

    #[test]
    fn trim_only_touches_padded_strings() {
        let out = trim(PAT, &[p("identifier.value")]).unwrap();
        assert_eq!(out, PAT.replace("\" 42 \"", "\"42\""));
        assert_eq!(trim(PAT, &[p("name.given")]), None);
        let esc = r#"{"code":"\tA\u00e9 "}"#;
        assert_eq!(trim(esc, &[p("code")]).unwrap(), r#"{"code":"Aé"}"#);
        // Several paths in one pass, top level and nested.
        let obs = r#"{"resourceType":"Observation","code":{"coding":[{"code":" 1 "}]},"identifier":[{"value":"a "}],"component":[{"code":{"coding":[{"code":"2 "}]}}]}"#;
        let paths = [
            p("descendants().code"),
            p("identifier.value"),
            p("Patient.id"),
        ];
        assert_eq!(
            trim(obs, &paths).unwrap(),
            r#"{"resourceType":"Observation","code":{"coding":[{"code":"1"}]},"identifier":[{"value":"a"}],"component":[{"code":{"coding":[{"code":"2"}]}}]}"#
        );
    }

    #[test]
    fn references_parse() {
        assert_eq!(parse_reference("Patient/123"), Some(("Patient", "123")));
        assert_eq!(
            parse_reference("https://h/fhir/Patient/a.b-c/_history/2"),
            Some(("Patient", "a.b-c"))
        );
        assert_eq!(parse_reference("#c1"), None);
        assert_eq!(
            parse_reference("urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"),
            None
        );
        assert_eq!(parse_reference("Nope/1"), None);
        assert_eq!(parse_reference("Patient/"), None);
    }

    #[test]
    fn codes_by_system() {
        let obs = r#"{"resourceType":"Observation","code":{"coding":[{"system":"a","code":"1"},{"system":"http://loinc.org","code":"8867-4"}]}}"#;
        assert_eq!(
            code_by_system(obs, &p("code"), "http://loinc.org").unwrap(),
            "8867-4"
        );
        assert_eq!(code_by_system(obs, &p("code.coding"), "a").unwrap(), "1");
        assert_eq!(code_by_system(obs, &p("code"), "zz"), None);
    }

    #[test]
    fn canonical_content_ignores_formatting_and_server_meta() {
        let a = r#"{"id":"1","resourceType":"Patient","meta":{"versionId":"3","lastUpdated":"2020-01-01T00:00:00Z","tag":[]},"n":1.50,"s":"\u0041"}"#;
        let b = r#"{ "resourceType" : "Patient", "id":"1", "s":"A", "n":1.50, "meta":{"tag":[]} }"#;
        assert_eq!(canonical_content(a), canonical_content(b));
        assert_ne!(
            canonical_content(a),
            canonical_content(&b.replace("1.50", "1.5"))
        );
    }
}
