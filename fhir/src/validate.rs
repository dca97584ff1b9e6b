//! The FHIR R4 validator: one pass over a resource's JSON text that parses it
//! (strictly, as RFC 8259 JSON) and walks the generated model at the same
//! time. Nothing is built: no tree, no copies of values except the few a check
//! keeps (reference strings, codings under a required binding, contained ids).
//!
//! What it checks, for every resource type and every nested element (contained
//! resources and Bundle entries included): unknown elements, JSON kinds,
//! arrays against the maximum cardinality, minimum and maximum cardinality,
//! primitive formats ([`crate::primitive`]), choice elements, required
//! bindings to value sets fully defined in the core package, primitive
//! extensions (`_element`) and their pairing with the values, empty objects,
//! arrays and strings, `null` outside primitive arrays, reference formats and
//! target types, `#local` references to contained resources, and HealthLake's
//! rule that a resource has an id of the `id` pattern.

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::json::{
    self, is_meta_key, key_name, scan_resource, unescape, JsonError, Lex, Member, Meta, Scanned,
    Scanner, SecurityEntry, Span, Stop,
};
use crate::model::*;
use crate::model_types::{Elem, Keep, Kind, TypeDef, TypeId};
use crate::primitive::{self, JsonKind};

/// How much curation checks, as HealthLake's validation levels name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    /// Every check; any error rejects the resource.
    #[default]
    Strict,
    /// Every check except required bindings (value sets).
    StructureOnly,
    /// No validation.
    Off,
}

impl std::str::FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Level, String> {
        match s {
            "strict" => Ok(Level::Strict),
            "structure-only" => Ok(Level::StructureOnly),
            "off" => Ok(Level::Off),
            _ => Err(format!(
                "'{s}' is not a validation level (strict, structure-only, off)"
            )),
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Strict => "strict",
            Level::StructureOnly => "structure-only",
            Level::Off => "off",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// One issue found in a resource. Messages name elements, types, codes and
/// reference types, never other values of the record (they may be PHI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// Stable, as in `import_errors.error_code`: see [`CODES`].
    pub code: &'static str,
    pub message: String,
    /// FHIRPath-style, with JSON names: `Observation.component[1].valueQuantity.value`.
    pub location: String,
}

/// Every finding code, with what it means.
pub const CODES: &[(&str, &str)] = &[
    ("INVALID_JSON", "the text is not valid JSON"),
    ("NOT_AN_OBJECT", "the resource is not a JSON object"),
    ("TOO_DEEP", "nesting deeper than the configured limit"),
    ("TOO_LARGE", "a resource of 4 GiB or more"),
    (
        "UNKNOWN_RESOURCE_TYPE",
        "resourceType is missing or not an R4 resource type",
    ),
    (
        "RESOURCE_TYPE_MISMATCH",
        "resourceType differs from the expected type",
    ),
    ("UNKNOWN_ELEMENT", "a property the definition does not have"),
    ("DUPLICATE_KEY", "a property given twice in one object"),
    (
        "WRONG_KIND",
        "an object, array, string, number or boolean where another kind is required",
    ),
    (
        "ARRAY_EXPECTED",
        "a bare value where the definition allows several (an array is required)",
    ),
    (
        "ARRAY_NOT_ALLOWED",
        "an array where the maximum cardinality is 1",
    ),
    (
        "CARDINALITY_MIN",
        "fewer values than the minimum cardinality",
    ),
    (
        "CARDINALITY_MAX",
        "more values than the maximum cardinality",
    ),
    (
        "REQUIRED_MISSING",
        "an element with minimum cardinality 1 or more is absent",
    ),
    (
        "CHOICE_MULTIPLE",
        "more than one type given for a choice element value[x]",
    ),
    ("EMPTY_OBJECT", "{} (FHIR has no empty objects)"),
    ("EMPTY_ARRAY", "[] (FHIR has no empty arrays)"),
    ("EMPTY_STRING", "\"\" (FHIR has no empty strings)"),
    (
        "NULL_NOT_ALLOWED",
        "null outside an array of primitives paired with its _element",
    ),
    (
        "PRIMITIVE_EXTENSION",
        "an _element that does not pair with its value",
    ),
    (
        "STRING_WHITESPACE",
        "warning: a string with leading or trailing whitespace",
    ),
    (
        "INVALID_FORMAT",
        "a primitive value not in its type's format",
    ),
    (
        "STRING_TOO_LONG",
        "a string longer than 1 MB, the limit of FHIR strings",
    ),
    (
        "CODE_NOT_IN_VALUE_SET",
        "a code not in the value set of a required binding",
    ),
    (
        "REFERENCE_FORMAT",
        "a reference that is not Type/id, an absolute URL, urn:uuid:, urn:oid: or #id",
    ),
    (
        "REFERENCE_TARGET_TYPE",
        "a reference to a resource type the element does not allow",
    ),
    (
        "REFERENCE_LOCAL_MISSING",
        "a #id reference to no contained resource",
    ),
    (
        "MISSING_ID",
        "a resource without an id (HealthLake requires one)",
    ),
];

/// The findings of one resource, with its type and id where it has them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    pub resource_type: Option<&'static str>,
    pub id: Option<String>,
    pub findings: Vec<Finding>,
}

impl Outcome {
    /// Whether a finding is an error (warnings do not reject).
    pub fn has_error(&self) -> bool {
        Validator::has_error(&self.findings)
    }
}

/// The validator; cheap to share between threads.
#[derive(Debug, Clone)]
pub struct Validator {
    level: Level,
    max_depth: usize,
}

impl Validator {
    pub fn new(level: Level, max_depth: usize) -> Self {
        Validator { level, max_depth }
    }

    pub fn level(&self) -> Level {
        self.level
    }

    /// The nesting limit: deeper JSON is a TOO_DEEP finding.
    pub fn max_depth(&self) -> usize {
        self.max_depth
    }

    /// The findings of one resource (`text` is one JSON value). With
    /// `expected`, a `resourceType` other than it is a finding. Empty when the
    /// resource is valid, and always empty at [`Level::Off`].
    pub fn validate(&self, text: &str, expected: Option<&str>) -> Vec<Finding> {
        self.outcome(text, expected).findings
    }

    /// [`Validator::validate`], with the resource's type and id.
    pub fn outcome(&self, text: &str, expected: Option<&str>) -> Outcome {
        self.walk(text, expected, false).0
    }

    /// [`Validator::validate`] and [`scan_resource`] of `text` in one walk:
    /// the scan is what `scan_resource(text, max_depth)` returns, the same
    /// spans or the same error, and the findings what `validate` does. At
    /// [`Level::Off`] (no findings) and for a text of 4 GiB or more (one
    /// TOO_LARGE finding) the scan is `scan_resource`'s own.
    pub fn validate_scan(
        &self,
        text: &str,
        expected: Option<&str>,
    ) -> (Result<Scanned, JsonError>, Vec<Finding>) {
        let (outcome, scanned) = self.walk(text, expected, true);
        (
            scanned.unwrap_or_else(|| scan_resource(text, self.max_depth)),
            outcome.findings,
        )
    }

    /// The walk, and (with `scan`) the scan it made; None when it made none.
    fn walk(
        &self,
        text: &str,
        expected: Option<&str>,
        scan: bool,
    ) -> (Outcome, Option<Result<Scanned, JsonError>>) {
        if self.level == Level::Off {
            return (Outcome::default(), None);
        }
        if text.len() > u32::MAX as usize {
            // Offsets are 32-bit; HealthLake's limits are far lower.
            let outcome = Outcome {
                findings: vec![Finding {
                    severity: Severity::Error,
                    code: "TOO_LARGE",
                    message: "a resource of 4 GiB or more".into(),
                    location: String::new(),
                }],
                ..Outcome::default()
            };
            return (outcome, None);
        }
        let mut w = Walk {
            lx: Scanner::new(text, self.max_depth),
            text,
            bindings: self.level == Level::Strict,
            path: Vec::with_capacity(16),
            out: Vec::new(),
            arrays: Vec::new(),
            contained_ids: Vec::new(),
            local_refs: Vec::new(),
            codings: Vec::new(),
            capture_depth: usize::MAX,
            root_type: None,
            root_id: None,
            scan,
            scanned: Scanned::at(0),
            meta: Meta::default(),
            entry: SecurityEntry::default(),
            next_spot: Spot::Below,
            security_items: false,
        };
        let broken = match w.root(expected) {
            Ok(()) => None,
            Err(Stop) => {
                let e = w.lx.error();
                let code = match e {
                    JsonError::TooDeep { .. } => "TOO_DEEP",
                    _ => "INVALID_JSON",
                };
                let location = w.location("");
                w.out.push(Finding {
                    severity: Severity::Error,
                    code,
                    message: e.to_string(),
                    location,
                });
                Some(e)
            }
        };
        let Walk {
            lx,
            out,
            root_type,
            root_id,
            mut scanned,
            ..
        } = w;
        let outcome = Outcome {
            resource_type: root_type,
            id: root_id.map(Cow::into_owned),
            findings: out,
        };
        let scanned = scan.then(|| match broken {
            Some(e) => Err(e),
            None => {
                scanned.nested_meta = lx.nested_meta;
                Ok(scanned)
            }
        });
        (outcome, scanned)
    }

    /// Whether `findings` include an error (warnings do not reject).
    pub fn has_error(findings: &[Finding]) -> bool {
        findings.iter().any(|f| f.severity == Severity::Error)
    }
}

/// The walk stopped: the JSON itself is broken (why and where: the
/// lexer's [`Scanner::error`]).
type R<T> = Lex<T>;

#[derive(Debug, Clone, Copy)]
struct Seg<'a> {
    name: &'a str,
    index: Option<u32>,
}

/// A primitive array seen in the current objects, for `x` / `_x` pairing.
#[derive(Debug)]
struct PrimArray {
    depth: usize,
    slot: u8,
    ext: bool,
    len: u32,
    /// Indexes of the nulls, in a small inline list (more are rare).
    nulls: Vec<u32>,
}

/// What an object walk kept for its caller's checks.
#[derive(Debug, Default)]
struct Kept<'a> {
    /// `Resource.id`, `Reference.reference`, `Coding.code`.
    value: Option<Cow<'a, str>>,
    /// `Coding.system`.
    system: Option<Cow<'a, str>>,
}

/// (system, code) of one coding.
type Coding<'a> = (Option<Cow<'a, str>>, Option<Cow<'a, str>>);

/// Where an object is, for the scan the walk makes ([`Scanned`]): the
/// objects whose members it records, and below them everything else, where
/// a member named `meta` is a nested resource's. The scanner reads the same
/// objects in `Scanner::resource_object`; the members it records are
/// [`Member`]s, and each is stored by the same code ([`Scanned::put_root`],
/// [`Meta::put`], [`SecurityEntry::put`]). A member whose name has escapes
/// (no FHIR name has) is read by the scanner's own code
/// ([`Walk::scan_member`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spot {
    Below,
    /// The root resource: `resourceType`, `id`, `meta`.
    Root,
    /// The root's `meta` object: `versionId`, `lastUpdated`, `security`.
    Meta,
    /// An object in the root's `meta.security` array: `system`, `code`.
    Security,
}

struct Walk<'a> {
    /// The tokens, through the one JSON lexer ([`crate::json`]).
    lx: Scanner<'a>,
    text: &'a str,
    bindings: bool,
    path: Vec<Seg<'a>>,
    out: Vec<Finding>,
    arrays: Vec<PrimArray>,
    /// Contained ids and `#id` references (with their locations); each
    /// non-contained resource checks and drops the ones after its marks.
    contained_ids: Vec<Cow<'a, str>>,
    local_refs: Vec<(Cow<'a, str>, String)>,
    /// (system, code) of the codings of a CodeableConcept under a required binding.
    codings: Vec<Coding<'a>>,
    /// Depth of the Coding objects to keep in `codings`.
    capture_depth: usize,
    root_type: Option<&'static str>,
    root_id: Option<Cow<'a, str>>,
    // ---- the scan (step 1's spans), filled on the way -------------------
    /// Whether to make it: the few objects whose members it records are
    /// walked as such only then (see [`Walk::object`]).
    scan: bool,
    scanned: Scanned,
    /// The root `meta` while it is walked.
    meta: Meta,
    /// The `meta.security` entry being walked.
    entry: SecurityEntry,
    /// The spot of the next object [`Walk::object`] walks.
    next_spot: Spot,
    /// The next array [`Walk::element`] walks is the root `meta.security`.
    security_items: bool,
}

impl<'a> Walk<'a> {
    // ---- findings and locations ------------------------------------------

    fn location(&self, last: &str) -> String {
        let mut s = String::with_capacity(64);
        for (i, seg) in self.path.iter().enumerate() {
            if i > 0 {
                s.push('.');
            }
            s.push_str(seg.name);
            if let Some(n) = seg.index {
                let _ = write!(s, "[{n}]");
            }
        }
        if !last.is_empty() {
            if !s.is_empty() {
                s.push('.');
            }
            s.push_str(last);
        }
        s
    }

    #[cold]
    fn error(&mut self, code: &'static str, message: String) {
        let location = self.location("");
        self.out.push(Finding {
            severity: Severity::Error,
            code,
            message,
            location,
        });
    }

    fn here(&self) -> &str {
        self.path.last().map(|s| s.name).unwrap_or("")
    }

    // ---- JSON: the lexer's ----------------------------------------------

    #[inline]
    fn ws(&mut self) {
        self.lx.ws();
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.lx.peek()
    }

    /// A string at `pos` (on its `"`): its span, quotes included.
    #[inline(always)]
    fn string(&mut self) -> R<Span> {
        self.lx.string()
    }

    /// The text of a string, escapes decoded.
    #[inline]
    fn text_of(&self, s: Span) -> Cow<'a, str> {
        let raw = &self.text[s.start + 1..s.end - 1];
        if s.escaped {
            Cow::Owned(unescape(raw, false).unwrap_or_default())
        } else {
            Cow::Borrowed(raw)
        }
    }

    #[inline]
    fn number(&mut self) -> R<Span> {
        self.lx.number()
    }

    #[inline]
    fn null(&mut self) -> R<()> {
        self.lx.literal(b"null", json::Kind::Null).map(drop)
    }

    #[inline]
    fn enter(&mut self) -> R<()> {
        self.lx.enter()
    }

    /// After a member or an item: `,` (true: another follows) or `close`
    /// (false: the object or array ends).
    #[inline]
    fn more(&mut self, close: u8) -> R<bool> {
        self.lx.next_item(close)
    }

    /// At a member: its name, and the cursor at its value.
    #[inline(always)]
    fn member_key(&mut self) -> R<Span> {
        self.lx.member_key()
    }

    /// Skips any value, checking its syntax (and noting the metas in it,
    /// as [`Scanner::watched`] does).
    fn skip_value(&mut self) -> R<Span> {
        self.ws();
        self.lx.watched()
    }

    /// The `resourceType` of the object at `pos`, without moving; None when
    /// it has none (or the object is broken: the walk will say so).
    fn peek_resource_type(&mut self) -> Option<Cow<'a, str>> {
        let (save, depth, metas) = (self.lx.pos, self.lx.depth, self.lx.nested_meta.len());
        let found = (|| -> R<Option<Cow<'a, str>>> {
            self.lx.pos += 1;
            self.ws();
            loop {
                if self.peek() != Some(b'"') {
                    return Ok(None);
                }
                let key = self.member_key()?;
                if &self.text[key.start..key.end] == "\"resourceType\"" {
                    if self.peek() != Some(b'"') {
                        return Ok(None);
                    }
                    let s = self.string()?;
                    return Ok(Some(self.text_of(s)));
                }
                self.skip_value()?;
                self.ws();
                if self.peek() != Some(b',') {
                    return Ok(None);
                }
                self.lx.pos += 1;
                self.ws();
            }
        })();
        self.lx.pos = save;
        self.lx.depth = depth;
        self.lx.nested_meta.truncate(metas);
        self.lx.err = None;
        found.ok().flatten()
    }

    // ---- the scan ----------------------------------------------------------

    /// The span of the value at `start..end` (just walked).
    fn span(&self, start: usize, end: usize) -> Span {
        let b = self.lx.b;
        let kind = match b[start] {
            b'{' => json::Kind::Object,
            b'[' => json::Kind::Array,
            b'"' => json::Kind::String,
            b't' | b'f' => json::Kind::Bool,
            b'n' => json::Kind::Null,
            _ => json::Kind::Number,
        };
        let escaped = kind == json::Kind::String && b[start + 1..end - 1].contains(&b'\\');
        Span {
            kind,
            start,
            end,
            escaped,
        }
    }

    /// Before the value of member `key` of an object at `spot` (not
    /// `Below`): which member it is for the scan, and the spot of the
    /// objects below it.
    #[inline]
    fn spot_ahead(&mut self, spot: Spot, key: &str) -> Member {
        let m = match spot {
            Spot::Below => return Member::None,
            Spot::Root => Member::of_root(key.as_bytes()),
            Spot::Meta => Member::of_meta(key.as_bytes()),
            Spot::Security => Member::of_security(key.as_bytes()),
        };
        match (m, self.peek()) {
            (Member::Meta, Some(b'{')) => {
                self.meta = Meta::default();
                self.next_spot = Spot::Meta;
            }
            (Member::Security, Some(b'[')) => {
                self.meta.security_entries.clear();
                self.security_items = true;
            }
            _ => {}
        }
        m
    }

    /// After the value of member `m` of an object the scan reads (walked
    /// from `start` to here): records it as the scanner would.
    #[inline]
    fn captured(&mut self, spot: Spot, m: Member, start: usize) {
        let end = self.lx.pos;
        match m {
            Member::None | Member::Other => {}
            Member::Meta if self.lx.b[start] == b'{' => {
                let fields = std::mem::take(&mut self.meta);
                let v = self.span(start, end);
                self.scanned.put_meta(v, fields);
            }
            Member::ResourceType | Member::Id | Member::Meta => {
                let v = self.span(start, end);
                self.scanned.put_root(m, v);
            }
            Member::VersionId | Member::LastUpdated | Member::Security => {
                let v = self.span(start, end);
                self.meta.put(m, v, &mut self.scanned.duplicate_member);
            }
            Member::System | Member::Code => {
                let v = self.span(start, end);
                self.entry.put(m, v);
            }
        }
        if spot == Spot::Meta {
            self.meta.last_member_end = Some(end);
        }
    }

    /// After an item of the root `meta.security`, walked from `start`.
    fn security_entry(&mut self, start: usize) {
        self.next_spot = Spot::Below;
        let mut entry = std::mem::take(&mut self.entry);
        entry.span = self.span(start, self.lx.pos);
        self.meta.security_entries.push(entry);
    }

    /// A member of an object at `spot` (not `Below`) whose name has escapes:
    /// the model has no such name, but decoded it may be one the scan
    /// records, so the scanner's own code reads the value.
    #[cold]
    #[inline(never)]
    fn scan_member(&mut self, spot: Spot, key: Span) -> R<()> {
        let b = self.lx.b;
        let name = key_name(b, key);
        let r = match spot {
            Spot::Below => self.lx.watched().map(drop),
            Spot::Root => self.lx.resource_member(&name, &mut self.scanned),
            Spot::Meta => {
                self.lx
                    .meta_member(&name, &mut self.meta, &mut self.scanned.duplicate_member)
            }
            Spot::Security => self.lx.security_member(&name, &mut self.entry),
        };
        r?;
        if spot == Spot::Meta {
            self.meta.last_member_end = Some(self.lx.pos);
        }
        Ok(())
    }

    // ---- the walk ----------------------------------------------------------

    fn root(&mut self, expected: Option<&str>) -> R<()> {
        self.ws();
        if self.peek() != Some(b'{') {
            self.error("NOT_AN_OBJECT", "a resource must be a JSON object".into());
            // As the scanner reads a root that is no object: no metas.
            self.scanned.root = self.lx.value()?;
        } else {
            self.resource(expected, false)?;
        }
        self.lx.finish()
    }

    /// The resource object at `pos`. Returns its id.
    fn resource(&mut self, expected: Option<&str>, contained: bool) -> R<Option<Cow<'a, str>>> {
        let root = self.path.is_empty();
        let start = self.lx.pos;
        let rt = self.peek_resource_type();
        let ty = rt
            .as_deref()
            .and_then(|n| crate::model_types::resource_type_id(n.as_bytes()));
        let Some(ty) = ty else {
            let message = match rt {
                Some(_) => "resourceType is not an R4 resource type".to_string(),
                None => "the resource has no resourceType".to_string(),
            };
            if root {
                self.path.push(Seg {
                    name: "Resource",
                    index: None,
                });
            }
            self.error("UNKNOWN_RESOURCE_TYPE", message);
            if root {
                // Not walked with the model: the scanner's walk records the
                // spans (step 1 says what is wrong with the type).
                self.lx.resource_object(&mut self.scanned)?;
            } else {
                self.skip_value()?;
            }
            return Ok(None);
        };
        let name = TYPES[ty as usize].name;
        if let Some(want) = expected.filter(|w| *w != name) {
            self.path.push(Seg { name, index: None });
            self.error(
                "RESOURCE_TYPE_MISMATCH",
                format!("resourceType is {name}, expected {want}"),
            );
            self.path.pop();
        }
        if root {
            self.path.push(Seg { name, index: None });
            self.root_type = Some(name);
        }
        let marks = (self.contained_ids.len(), self.local_refs.len());
        let kept = if root && self.scan {
            self.object::<true>(ty, 0, 0, Spot::Root)?
        } else {
            self.object::<false>(ty, 0, 0, Spot::Below)?
        };
        if root {
            self.scanned.root = self.span(start, self.lx.pos);
        }
        // HealthLake stores the resource of a line under its id; resources
        // inside it (contained, in a Bundle) may have none.
        if root {
            match &kept.value {
                Some(id) => self.root_id = Some(id.clone()),
                None => self.error("MISSING_ID", format!("the {name} has no id")),
            }
        }
        if !contained && self.local_refs.len() > marks.1 {
            let refs: Vec<_> = self.local_refs.drain(marks.1..).collect();
            for (id, location) in refs {
                if !self.contained_ids[marks.0..].contains(&id) {
                    self.out.push(Finding {
                        severity: Severity::Error,
                        code: "REFERENCE_LOCAL_MISSING",
                        message: format!("#{id} names no contained resource"),
                        location,
                    });
                }
            }
        }
        if !contained {
            self.contained_ids.truncate(marks.0);
        }
        if root {
            self.path.pop();
        }
        Ok(kept.value)
    }

    /// An object of type `ty` at `pos`, held by an element with the given
    /// binding and reference targets; at `spot` for the scan. `SCAN`: the
    /// spot is not `Below`, one of the few objects whose members the scan
    /// records. A constant, so that the walk of every other object carries
    /// none of it: with the spot tested at run time in every object,
    /// `validate` (which makes no scan) ran 600 MB/s on Synthea instead of
    /// 640.
    fn object<const SCAN: bool>(
        &mut self,
        ty: TypeId,
        binding: u16,
        targets: u16,
        spot: Spot,
    ) -> R<Kept<'a>> {
        let spot = if SCAN { spot } else { Spot::Below };
        let tdef: &'static TypeDef = &TYPES[ty as usize];
        self.enter()?;
        self.lx.pos += 1;
        let arrays_mark = self.arrays.len();
        let mut kept = Kept::default();
        let mut seen_value: u128 = 0;
        let mut seen_ext: u128 = 0;
        // The key given for each choice slot seen (by its address).
        let mut chosen: [(u8, usize); 4] = [(u8::MAX, 0); 4];
        let mut n_chosen = 0;
        // A CodeableConcept under a required binding keeps its codings.
        let cc_binding = ty == T_CODEABLECONCEPT && binding != 0 && self.bindings;
        let (codings_mark, outer_capture) = (self.codings.len(), self.capture_depth);
        if cc_binding {
            // The codings: objects inside the `coding` array.
            self.capture_depth = self.lx.depth + 2;
        }
        let capture_coding = ty == T_CODING && self.lx.depth == outer_capture;

        self.ws();
        if self.peek() == Some(b'}') {
            self.lx.pos += 1;
            self.error("EMPTY_OBJECT", "an object must not be empty".into());
        } else {
            loop {
                let key_span = self.member_key()?;
                // Escapes in a property name: FHIR has none, so it is unknown.
                let key: &'a str = if key_span.escaped {
                    "\u{FFFD}"
                } else {
                    &self.text[key_span.start + 1..key_span.end - 1]
                };
                let value_at = self.lx.pos;
                let member = if !SCAN {
                    // In FHIR only resources have a meta: below the root,
                    // it is a nested resource's (as [`Scanner::watched`]).
                    if is_meta_key(self.lx.b, key_span) {
                        self.lx.nested_meta.push(value_at);
                    }
                    Member::None
                } else if key_span.escaped {
                    Member::None
                } else {
                    self.spot_ahead(spot, key)
                };
                if tdef.kind == Kind::Resource && key == "resourceType" {
                    // Checked by `resource`, which found it first.
                    self.skip_value()?;
                } else {
                    let (ext, name) = match key.strip_prefix('_') {
                        Some(n) => (true, n),
                        None => (false, key),
                    };
                    self.path.push(Seg {
                        name: key,
                        index: None,
                    });
                    match crate::model_types::lookup(ty, name.as_bytes()) {
                        Some(e) if !ext || (e.ty as usize) < ANY_RESOURCE as usize => {
                            let slot = &tdef.slots[e.slot as usize];
                            let bit = 1u128 << e.slot;
                            let mut other_choice = false;
                            if slot.choice {
                                match chosen[..n_chosen].iter().find(|c| c.0 == e.slot) {
                                    Some((_, other)) if *other != e.key.as_ptr() as usize => {
                                        other_choice = true;
                                        self.error(
                                            "CHOICE_MULTIPLE",
                                            format!(
                                                "{} has more than one of its types (one is {})",
                                                slot.name, e.key
                                            ),
                                        );
                                    }
                                    Some(_) => {}
                                    None if n_chosen < chosen.len() => {
                                        chosen[n_chosen] = (e.slot, e.key.as_ptr() as usize);
                                        n_chosen += 1;
                                    }
                                    None => {}
                                }
                            }
                            let seen = if ext { &mut seen_ext } else { &mut seen_value };
                            let again = *seen & bit != 0;
                            *seen |= bit;
                            if again && !other_choice {
                                self.error("DUPLICATE_KEY", format!("{key} is given twice"));
                            }
                            let keep = match e.keep {
                                Keep::No => false,
                                Keep::Id | Keep::Reference => true,
                                Keep::System | Keep::Code => capture_coding,
                            };
                            let value = self.element(tdef, e, ext, keep)?;
                            if keep && !ext {
                                if e.keep == Keep::System {
                                    kept.system = value;
                                } else {
                                    kept.value = value;
                                }
                            }
                        }
                        _ => {
                            self.error(
                                "UNKNOWN_ELEMENT",
                                format!("{} has no element {key}", tdef.name),
                            );
                            if SCAN && key_span.escaped {
                                self.scan_member(spot, key_span)?;
                            } else {
                                self.skip_value()?;
                            }
                        }
                    }
                    self.path.pop();
                }
                if SCAN && member != Member::None {
                    self.captured(spot, member, value_at);
                }
                if !self.more(b'}')? {
                    break;
                }
            }
        }

        // Required elements: a primitive is present with a value or an extension.
        let seen = seen_value | seen_ext;
        for &s in tdef.required {
            if seen & (1u128 << s) == 0 {
                let slot = &tdef.slots[s as usize];
                let location = self.location(slot.name);
                self.out.push(Finding {
                    severity: Severity::Error,
                    code: "REQUIRED_MISSING",
                    message: format!("{}.{} is required (min {})", tdef.name, slot.name, slot.min),
                    location,
                });
            }
        }
        self.pair_primitive_arrays(tdef, arrays_mark, seen_value, seen_ext);

        if ty == T_REFERENCE {
            if let Some(r) = &kept.value {
                self.check_reference(r.clone(), targets);
            }
        }
        if cc_binding {
            self.check_codeable_concept(binding, codings_mark);
            self.codings.truncate(codings_mark);
            self.capture_depth = outer_capture;
        }
        if capture_coding {
            self.codings.push((kept.system.take(), kept.value.take()));
        }
        self.lx.depth -= 1;
        Ok(kept)
    }

    /// The value of element `e` (or of `_e` when `ext`), at `pos`.
    #[inline(always)]
    fn element(
        &mut self,
        tdef: &'static TypeDef,
        e: &'static Elem,
        ext: bool,
        keep: bool,
    ) -> R<Option<Cow<'a, str>>> {
        let slot = &tdef.slots[e.slot as usize];
        let many = slot.max > 1;
        let primitive = (e.ty as usize) < ANY_RESOURCE as usize;
        let security = std::mem::take(&mut self.security_items);
        if self.peek() != Some(b'[') {
            if many {
                self.error(
                    "ARRAY_EXPECTED",
                    format!(
                        "{}.{} can repeat: its value must be an array",
                        tdef.name, slot.name
                    ),
                );
            }
            return self.item(e, ext, keep);
        }
        if !many {
            self.error(
                "ARRAY_NOT_ALLOWED",
                format!(
                    "{}.{} has at most one value: an array is not allowed",
                    tdef.name, slot.name
                ),
            );
        }
        self.enter()?;
        self.lx.pos += 1;
        self.ws();
        let mut n: u32 = 0;
        let mut nulls = Vec::new();
        if self.peek() == Some(b']') {
            self.lx.pos += 1;
            self.error("EMPTY_ARRAY", "an array must not be empty".into());
        } else {
            loop {
                self.ws();
                if let Some(seg) = self.path.last_mut() {
                    seg.index = Some(n);
                }
                let item_at = self.lx.pos;
                if security && self.peek() == Some(b'{') {
                    self.next_spot = Spot::Security;
                }
                if self.peek() == Some(b'n') {
                    self.null()?;
                    if primitive {
                        nulls.push(n);
                    } else {
                        self.error("NULL_NOT_ALLOWED", "null is not a value".into());
                    }
                } else {
                    self.item(e, ext, false)?;
                }
                if security {
                    self.security_entry(item_at);
                }
                n += 1;
                if !self.more(b']')? {
                    break;
                }
            }
            if let Some(seg) = self.path.last_mut() {
                seg.index = None;
            }
        }
        self.lx.depth -= 1;
        if many && n > 0 {
            if n > slot.max {
                self.error(
                    "CARDINALITY_MAX",
                    format!(
                        "{}.{} has {n} values, at most {} allowed",
                        tdef.name, slot.name, slot.max
                    ),
                );
            } else if n < slot.min {
                self.error(
                    "CARDINALITY_MIN",
                    format!(
                        "{}.{} has {n} values, at least {} required",
                        tdef.name, slot.name, slot.min
                    ),
                );
            }
        }
        if primitive && n > 0 {
            self.arrays.push(PrimArray {
                depth: self.lx.depth,
                slot: e.slot,
                ext,
                len: n,
                nulls,
            });
        }
        Ok(None)
    }

    /// One value of element `e` (not an array).
    fn item(&mut self, e: &'static Elem, ext: bool, keep: bool) -> R<Option<Cow<'a, str>>> {
        if self.peek() == Some(b'n') {
            self.null()?;
            self.error(
                "NULL_NOT_ALLOWED",
                "null is allowed only in an array of primitives paired with its _element".into(),
            );
            return Ok(None);
        }
        if ext {
            if self.peek() != Some(b'{') {
                self.error(
                    "WRONG_KIND",
                    "a primitive's _element must be an object".into(),
                );
                self.skip_value()?;
                return Ok(None);
            }
            self.object::<false>(T_ELEMENT, 0, 0, Spot::Below)?;
            return Ok(None);
        }
        let target = &TYPES[e.ty as usize];
        match target.kind {
            Kind::Prim => self.primitive(e, keep),
            _ if self.peek() != Some(b'{') => {
                self.error(
                    "WRONG_KIND",
                    format!(
                        "{} is a {}: its value must be an object",
                        self.here(),
                        target.name
                    ),
                );
                self.skip_value()?;
                Ok(None)
            }
            Kind::AnyResource => {
                let contained = e.key == "contained";
                let id = self.resource(None, contained)?;
                if contained {
                    if let Some(id) = id {
                        self.contained_ids.push(id);
                    }
                }
                Ok(None)
            }
            _ if self.next_spot != Spot::Below => {
                let spot = std::mem::replace(&mut self.next_spot, Spot::Below);
                Ok(self.object::<true>(e.ty, e.binding, e.targets, spot)?.value)
            }
            _ => Ok(self
                .object::<false>(e.ty, e.binding, e.targets, Spot::Below)?
                .value),
        }
    }

    /// A primitive value of element `e`, at `pos`.
    fn primitive(&mut self, e: &'static Elem, keep: bool) -> R<Option<Cow<'a, str>>> {
        let kind = primitive::json_kind(e.ty);
        let type_name = TYPES[e.ty as usize].name;
        let found = match self.peek() {
            Some(b'"') => JsonKind::String,
            Some(b't' | b'f') => JsonKind::Bool,
            Some(b'-' | b'0'..=b'9') => JsonKind::Number,
            _ => {
                self.error(
                    "WRONG_KIND",
                    format!(
                        "{} is a {type_name}: an object or array is not a value",
                        self.here()
                    ),
                );
                self.skip_value()?;
                return Ok(None);
            }
        };
        if found != kind {
            let want = match kind {
                JsonKind::String => "a JSON string",
                JsonKind::Number => "a JSON number",
                JsonKind::Bool => "true or false",
            };
            self.error(
                "WRONG_KIND",
                format!("{} is a {type_name}: its value must be {want}", self.here()),
            );
            self.skip_value()?;
            return Ok(None);
        }
        match kind {
            JsonKind::Bool => {
                self.skip_value()?;
                Ok(None)
            }
            JsonKind::Number => {
                let n = self.number()?;
                if let Err(why) = primitive::check_number(e.ty, &self.text[n.start..n.end]) {
                    self.error("INVALID_FORMAT", format!("the {type_name} value {why}"));
                }
                Ok(None)
            }
            JsonKind::String => {
                // Attachments carry large base64 payloads: checked in the
                // same pass that finds the end of the string.
                if e.ty == T_BASE64BINARY {
                    if let Some(end) = primitive::base64_body(&self.lx.b[self.lx.pos + 1..]) {
                        self.lx.pos += end + 2;
                        return Ok(None);
                    }
                }
                let span = self.string()?;
                if span.end - span.start == 2 {
                    self.error("EMPTY_STRING", "a string must not be empty".into());
                    return Ok(None);
                }
                let value = self.text_of(span);
                match primitive::check_string(e.ty, &value) {
                    Err(why) => {
                        self.error("INVALID_FORMAT", format!("the {type_name} value {why}"))
                    }
                    Ok(()) if e.ty == T_STRING && primitive::has_outer_whitespace(&value) => {
                        let location = self.location("");
                        self.out.push(Finding {
                            severity: Severity::Warning,
                            code: "STRING_WHITESPACE",
                            message: format!("the {type_name} value has leading or trailing whitespace (it SHOULD not)"),
                            location,
                        });
                    }
                    Ok(()) => {}
                }
                if matches!(e.ty, T_STRING | T_MARKDOWN)
                    && value.len() > primitive::MAX_STRING_BYTES
                {
                    self.error(
                        "STRING_TOO_LONG",
                        "longer than 1 MB, the limit of FHIR strings".into(),
                    );
                }
                if e.ty == T_CODE && e.binding != 0 && self.bindings {
                    let vs = &VALUE_SETS[e.binding as usize - 1];
                    if !vs.has_code(&value) {
                        self.error(
                            "CODE_NOT_IN_VALUE_SET",
                            format!(
                                "'{}' is not in the required value set {}",
                                clip(&value),
                                vs.url
                            ),
                        );
                    }
                }
                Ok(keep.then_some(value))
            }
        }
    }

    // ---- checks at the end of an object --------------------------------

    /// `x` and `_x` arrays: the same length, and every null in one paired
    /// with a value in the other.
    #[inline(never)]
    fn pair_primitive_arrays(
        &mut self,
        tdef: &TypeDef,
        mark: usize,
        seen_value: u128,
        seen_ext: u128,
    ) {
        // Usually: value arrays with no nulls and no `_x` arrays, nothing to pair.
        if self.arrays[mark..]
            .iter()
            .all(|a| !a.ext && a.nulls.is_empty())
        {
            self.arrays.truncate(mark);
            return;
        }
        let arrays: Vec<PrimArray> = self.arrays.drain(mark..).collect();
        for a in &arrays {
            if a.depth != self.lx.depth {
                continue;
            }
            let bit = 1u128 << a.slot;
            let name = tdef.slots[a.slot as usize].name;
            let other = arrays
                .iter()
                .find(|b| b.depth == a.depth && b.slot == a.slot && b.ext != a.ext);
            match other {
                // The other side, if present, is not an array: reported as
                // ARRAY_EXPECTED already.
                None if (if a.ext { seen_value } else { seen_ext }) & bit != 0 => {}
                None => {
                    if !a.nulls.is_empty() {
                        let key = if a.ext {
                            format!("_{name}")
                        } else {
                            name.to_string()
                        };
                        let location = self.location(&format!("{key}[{}]", a.nulls[0]));
                        self.out.push(Finding {
                            severity: Severity::Error,
                            code: "NULL_NOT_ALLOWED",
                            message: format!("null in {key} has no counterpart"),
                            location,
                        });
                    }
                }
                Some(b) if !a.ext => {
                    if a.len != b.len {
                        let location = self.location(&format!("_{name}"));
                        self.out.push(Finding {
                            severity: Severity::Error,
                            code: "PRIMITIVE_EXTENSION",
                            message: format!(
                                "{name} has {} items and _{name} has {}",
                                a.len, b.len
                            ),
                            location,
                        });
                    } else if let Some(i) = a.nulls.iter().find(|i| b.nulls.contains(i)) {
                        let location = self.location(&format!("{name}[{i}]"));
                        self.out.push(Finding {
                            severity: Severity::Error,
                            code: "NULL_NOT_ALLOWED",
                            message: format!("{name}[{i}] and _{name}[{i}] are both null"),
                            location,
                        });
                    }
                }
                Some(_) => {}
            }
        }
    }

    #[inline(never)]
    fn check_reference(&mut self, r: Cow<'a, str>, targets: u16) {
        let bad = |this: &mut Self, code: &'static str, message: String| {
            let location = this.location("reference");
            this.out.push(Finding {
                severity: Severity::Error,
                code,
                message,
                location,
            })
        };
        if let Some(local) = r.strip_prefix('#') {
            if !local.is_empty() {
                if !crate::is_valid_id(local) {
                    bad(
                        self,
                        "REFERENCE_FORMAT",
                        "a #local reference must name an id".into(),
                    );
                } else {
                    let location = self.location("reference");
                    let local = match &r {
                        Cow::Borrowed(s) => Cow::Borrowed(&s[1..]),
                        Cow::Owned(s) => Cow::Owned(s[1..].to_string()),
                    };
                    self.local_refs.push((local, location));
                }
            }
            return;
        }
        if r.starts_with("urn:uuid:") {
            if primitive::check_string(T_UUID, &r).is_err() {
                bad(
                    self,
                    "REFERENCE_FORMAT",
                    "not a valid urn:uuid: reference".into(),
                );
            }
            return;
        }
        if r.starts_with("urn:oid:") {
            if primitive::check_string(T_OID, &r).is_err() {
                bad(
                    self,
                    "REFERENCE_FORMAT",
                    "not a valid urn:oid: reference".into(),
                );
            }
            return;
        }
        let b = r.as_bytes();
        let space = primitive::has_space_or_control(b);
        let Slashes {
            first: first_slash,
            last,
            count: slashes,
            question,
        } = slashes(b);
        if space {
            bad(
                self,
                "REFERENCE_FORMAT",
                "a reference must not contain whitespace or control characters".into(),
            );
            return;
        }
        // A conditional reference, Type?query (Bulk Data exports such as
        // Synthea's carry them): the type must be one and allowed here.
        if let Some(q) = question.filter(|q| first_slash.is_none_or(|f| f > *q)) {
            let ty = &r[..q];
            match crate::model_types::resource_type_id(ty.as_bytes()) {
                Some(_) if q + 1 < r.len() => self.check_target(ty, targets),
                _ => bad(
                    self,
                    "REFERENCE_FORMAT",
                    "a conditional reference must be Type?query with an R4 resource type".into(),
                ),
            }
            return;
        }
        // scheme://… : a colon right before the first slash, and a second slash.
        let absolute =
            first_slash.is_some_and(|f| f > 0 && b[f - 1] == b':' && b.get(f + 1) == Some(&b'/'));
        // Type/id or Type/id/_history/vid, at the end of an absolute URL too.
        let segment = |from: Option<usize>, to: Option<usize>| {
            let start = from.map_or(0, |i| i + 1);
            &r[start.min(r.len())..to.unwrap_or(r.len()).max(start.min(r.len()))]
        };
        let history = last[1].is_some() && segment(last[1], last[0]) == "_history";
        let (id, ty) = if history {
            (
                segment(last[2], last[1]),
                last[2].map(|_| segment(last[3], last[2])),
            )
        } else {
            (
                segment(last[0], None),
                last[0].map(|_| segment(last[1], last[0])),
            )
        };
        let relative_parts = slashes + 1 - if history { 2 } else { 0 };
        let typed = ty.filter(|ty| {
            crate::model_types::resource_type_id(ty.as_bytes()).is_some() && crate::is_valid_id(id)
        });
        match typed {
            None if absolute => {}
            None => bad(
                self,
                "REFERENCE_FORMAT",
                "a relative reference must be Type/id with an R4 resource type and a valid id"
                    .into(),
            ),
            Some(ty) if absolute || relative_parts == 2 => self.check_target(ty, targets),
            Some(_) => bad(
                self,
                "REFERENCE_FORMAT",
                "a relative reference must be Type/id (or Type/id/_history/version)".into(),
            ),
        }
    }

    #[inline(never)]
    fn check_target(&mut self, ty: &str, targets: u16) {
        let allowed = TARGETS[targets as usize];
        if !allowed.is_empty() && allowed.binary_search(&ty).is_err() {
            let location = self.location("reference");
            self.out.push(Finding {
                severity: Severity::Error,
                code: "REFERENCE_TARGET_TYPE",
                message: format!("a reference to a {ty}; allowed: {}", allowed.join(", ")),
                location,
            });
        }
    }

    #[inline(never)]
    fn check_codeable_concept(&mut self, binding: u16, mark: usize) {
        let vs = &VALUE_SETS[binding as usize - 1];
        let codings = &self.codings[mark..];
        let ok = codings.iter().any(|(system, code)| match (system, code) {
            (Some(s), Some(c)) => vs.has(s, c),
            _ => false,
        });
        if !ok {
            let message = if codings.is_empty() {
                format!("no coding from the required value set {}", vs.url)
            } else {
                format!(
                    "none of the codings is in the required value set {}",
                    vs.url
                )
            };
            self.error("CODE_NOT_IN_VALUE_SET", message);
        }
    }
}

/// Where the slashes and the first `?` of a reference are.
struct Slashes {
    first: Option<usize>,
    /// The last four, the last first.
    last: [Option<usize>; 4],
    count: usize,
    question: Option<usize>,
}

/// [`Slashes`] of `b` (references are short: a plain loop beats memchr).
fn slashes(b: &[u8]) -> Slashes {
    let mut out = Slashes {
        first: None,
        last: [None; 4],
        count: 0,
        question: None,
    };
    for (i, &c) in b.iter().enumerate() {
        if c == b'/' {
            out.first.get_or_insert(i);
            out.last = [Some(i), out.last[0], out.last[1], out.last[2]];
            out.count += 1;
        } else if c == b'?' && out.question.is_none() {
            out.question = Some(i);
        }
    }
    out
}

/// A code or value shortened for a message.
fn clip(s: &str) -> Cow<'_, str> {
    match s.char_indices().nth(40) {
        Some((i, _)) => Cow::Owned(format!("{}…", &s[..i])),
        None => Cow::Borrowed(s),
    }
}

#[cfg(test)]
mod tests;
