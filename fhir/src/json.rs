//! The one JSON grammar of fhirflow: a strict (RFC 8259), non-allocating
//! lexer and scanner that records where things are.
//!
//! fhirflow never rewrites a resource by parsing and re-serialising it: a
//! curated line is its raw text plus explicit edits (DESIGN.md, "Lossless by
//! construction"). To edit text we need byte spans, and to reject bad input we
//! need full RFC 8259 validation, so this module does both in one pass:
//!
//! * [`scan_resource`] validates the whole line and returns the spans of the
//!   few members curation reads (`resourceType`, `id`, `meta.versionId`,
//!   `meta.lastUpdated`, `meta.security[*].system|code`), and where the
//!   metas of nested resources are (the same walk: no second pass).
//! * The validator ([`crate::validate`]) reads its tokens with the same
//!   [`Scanner`], so a text is valid JSON to one exactly when it is to the
//!   other, and a JSON error has one reason and one offset. Its
//!   [`crate::Validator::validate_scan`] also fills a [`Scanned`] on its way
//!   through the line, with the scanner's own rules, so that curation walks a
//!   line once when it validates it.
//! * Nesting is tracked with an explicit counter and no recursion, so a line
//!   nested a million levels deep is a [`JsonError::TooDeep`], never a stack
//!   overflow.
//!
//! serde_json was the rejected alternative: it allocates a tree (or needs a
//! visitor per shape) and does not give byte offsets of nested members.
//!
//! The input must already be valid UTF-8 (the caller checks that once per line
//! with `std::str::from_utf8`, which is faster than checking here byte by byte).

use std::fmt;

/// What went wrong, with the byte offset where it was noticed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// The text is not JSON.
    Syntax { offset: usize, reason: &'static str },
    /// The text ended inside a value: typically a line cut short.
    Truncated { offset: usize },
    /// More nested objects/arrays than the configured limit.
    TooDeep { offset: usize, limit: usize },
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::Syntax { offset, reason } => write!(f, "{reason} at byte {offset}"),
            JsonError::Truncated { offset } => {
                write!(f, "JSON ends early at byte {offset} (truncated line?)")
            }
            JsonError::TooDeep { offset, limit } => {
                write!(f, "nesting deeper than {limit} levels at byte {offset}")
            }
        }
    }
}

impl std::error::Error for JsonError {}

/// The JSON kind of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Object,
    Array,
    String,
    Number,
    Bool,
    Null,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Object => "object",
            Kind::Array => "array",
            Kind::String => "string",
            Kind::Number => "number",
            Kind::Bool => "boolean",
            Kind::Null => "null",
        }
    }
}

/// Where one value sits in the line: `start..end` covers the whole value
/// (quotes and brackets included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
    /// For strings: the content contains a backslash escape.
    pub escaped: bool,
}

impl Span {
    /// The raw text of the value.
    pub fn text<'a>(&self, src: &'a str) -> &'a str {
        &src[self.start..self.end]
    }

    /// For a string: its content between the quotes, still escaped.
    pub fn raw_str<'a>(&self, src: &'a str) -> Option<&'a str> {
        (self.kind == Kind::String).then(|| &src[self.start + 1..self.end - 1])
    }

    /// For a string: its decoded value (allocates only when escaped).
    pub fn decoded<'a>(&self, src: &'a str) -> Option<std::borrow::Cow<'a, str>> {
        let raw = self.raw_str(src)?;
        if !self.escaped {
            return Some(raw.into());
        }
        // Escaped strings are rare in the members we read; the text is
        // already known to be valid, so only a lone surrogate can fail.
        unescape(raw, true).map(Into::into)
    }

    /// Whether the string value equals `want` once decoded.
    pub fn str_eq(&self, src: &str, want: &str) -> bool {
        match self.raw_str(src) {
            Some(raw) if !self.escaped => raw == want,
            Some(_) => self.decoded(src).is_some_and(|d| d == want),
            None => false,
        }
    }
}

/// One element of `meta.security`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityEntry {
    pub span: Span,
    pub system: Option<Span>,
    pub code: Option<Span>,
}

impl Default for SecurityEntry {
    fn default() -> Self {
        SecurityEntry {
            span: Span {
                kind: Kind::Null,
                start: 0,
                end: 0,
                escaped: false,
            },
            system: None,
            code: None,
        }
    }
}

impl SecurityEntry {
    /// The value of member `m` of the entry (the last of each name counts).
    pub(crate) fn put(&mut self, m: Member, v: Span) {
        match m {
            Member::System => self.system = Some(v),
            Member::Code => self.code = Some(v),
            _ => {}
        }
    }
}

/// What curation needs of `meta`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    pub version_id: Option<Span>,
    pub last_updated: Option<Span>,
    pub security: Option<Span>,
    /// Elements of `security` (only when it is an array).
    pub security_entries: Vec<SecurityEntry>,
    /// Offset of the last member's end inside `meta`, or `None` when empty.
    pub last_member_end: Option<usize>,
}

/// The spans of one resource line. `root` is the top-level value; the other
/// fields are filled only when the root is an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    pub root: Span,
    pub resource_type: Option<Span>,
    pub id: Option<Span>,
    pub meta: Option<Span>,
    pub meta_fields: Meta,
    /// The name of a member we read that occurs twice (`id`, `meta`, ...).
    /// Duplicates are legal JSON but ambiguous: which `meta` carries the
    /// tenant label? Callers reject such lines.
    pub duplicate_member: Option<&'static str>,
    /// Where the values of members named `meta` below the root start, in
    /// text order: the metas of nested resources (`contained[]`,
    /// `Bundle.entry[].resource`, `Parameters.parameter[].resource`, at any
    /// depth; in FHIR only resources have a `meta`). Found by the same walk
    /// that validates the line; empty (no allocation) for a line without
    /// them. Read one with [`value_at`].
    pub nested_meta: Vec<usize>,
}

/// Scans and fully validates `src` as one JSON value, recording the spans of the
/// members curation reads. Leading and trailing JSON whitespace is allowed.
pub fn scan_resource(src: &str, max_depth: usize) -> Result<Scanned, JsonError> {
    let mut s = Scanner::new(src, max_depth);
    s.ws();
    let mut out = Scanned::at(s.pos);
    let done = if s.peek() == Some(b'{') {
        s.resource_object(&mut out)
    } else {
        s.value().map(|root| out.root = root)
    };
    done.and_then(|()| s.finish()).map_err(|Stop| s.error())?;
    out.nested_meta = std::mem::take(&mut s.nested_meta);
    Ok(out)
}

impl Scanned {
    /// Nothing found yet, for a value at `pos`.
    pub(crate) fn at(pos: usize) -> Self {
        Scanned {
            root: Span {
                kind: Kind::Null,
                start: pos,
                end: pos,
                escaped: false,
            },
            resource_type: None,
            id: None,
            meta: None,
            meta_fields: Meta::default(),
            duplicate_member: None,
            nested_meta: Vec::new(),
        }
    }

    /// The value of member `m` of the root object, other than a `meta`
    /// object (see [`Scanned::put_meta`]): the last one given is kept, and
    /// a second one is noted.
    pub(crate) fn put_root(&mut self, m: Member, v: Span) {
        let (slot, name) = match m {
            Member::ResourceType => (&mut self.resource_type, "resourceType"),
            Member::Id => (&mut self.id, "id"),
            Member::Meta => (&mut self.meta, "meta"),
            _ => return,
        };
        if slot.is_some() {
            self.duplicate_member.get_or_insert(name);
        }
        *slot = Some(v);
    }

    /// The root's `meta` object, with what was read of it.
    pub(crate) fn put_meta(&mut self, span: Span, fields: Meta) {
        self.put_root(Member::Meta, span);
        self.meta_fields = fields;
    }
}

impl Meta {
    /// The value of member `m` of the root `meta` (a second one is noted
    /// in `dup`).
    pub(crate) fn put(&mut self, m: Member, v: Span, dup: &mut Option<&'static str>) {
        let slot = match m {
            Member::VersionId => &mut self.version_id,
            Member::LastUpdated => &mut self.last_updated,
            Member::Security => &mut self.security,
            _ => return,
        };
        if slot.is_some() {
            dup.get_or_insert("meta member");
        }
        *slot = Some(v);
    }
}

/// Validates `src` as exactly one JSON value and returns its span.
pub fn validate(src: &str, max_depth: usize) -> Result<Span, JsonError> {
    let mut s = Scanner::new(src, max_depth);
    s.ws();
    let v = s.value().and_then(|v| s.finish().map(|()| v));
    v.map_err(|Stop| s.error())
}

/// The members of the object at `obj`, as (key, value) spans in order.
/// `src` must already be validated (by [`validate`] or [`scan_resource`]);
/// on text that is not, the result stops at the first error.
pub fn members(src: &str, obj: Span) -> Vec<(Span, Span)> {
    let mut out = Vec::new();
    if obj.kind != Kind::Object {
        return out;
    }
    let mut s = Scanner::at(src, obj.start);
    let _ = s.object_members(|s, key| {
        out.push((key, s.value()?));
        Ok(())
    });
    out
}

/// The items of the array at `arr`, under the same conditions as [`members`].
pub fn items(src: &str, arr: Span) -> Vec<Span> {
    let mut out = Vec::new();
    if arr.kind != Kind::Array {
        return out;
    }
    let mut c = Cursor {
        s: Scanner::at(src, arr.start),
    };
    let mut next = c.enter().and_then(|_| c.next_item(true));
    while let Ok(true) = next {
        match c.value() {
            Ok(v) => out.push(v),
            Err(_) => break,
        }
        next = c.next_item(false);
    }
    out
}

/// The span of the value that starts at byte `at`, under the same conditions
/// as [`members`] (`at` from a scan of the same text, e.g.
/// [`Scanned::nested_meta`]).
pub fn value_at(src: &str, at: usize) -> Option<Span> {
    Scanner::at(src, at).value().ok()
}

/// The FHIRPath-style path from `root` down to the value that starts at
/// byte `at` (e.g. `entry[3].resource.meta.security[0]`), under the same
/// conditions as [`members`]. For error messages: it reads each container
/// on the way again, which a hot path should not do.
pub fn path_to(src: &str, root: Span, at: usize) -> String {
    let mut path = String::new();
    let mut here = root;
    while here.start != at {
        let next = match here.kind {
            Kind::Object => members(src, here)
                .into_iter()
                .find(|(_, v)| v.start <= at && at < v.end)
                .map(|(k, v)| {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(&String::from_utf8_lossy(&key_name(src.as_bytes(), k)));
                    v
                }),
            Kind::Array => items(src, here)
                .into_iter()
                .enumerate()
                .find(|(_, v)| v.start <= at && at < v.end)
                .map(|(i, v)| {
                    path.push_str(&format!("[{i}]"));
                    v
                }),
            _ => None,
        };
        match next {
            Some(v) => here = v,
            None => break,
        }
    }
    path
}

/// Whether a member's key span names `name` (escapes decoded).
pub fn key_is(src: &str, key: Span, name: &str) -> bool {
    &*key_name(src.as_bytes(), key) == name.as_bytes()
}

/// Step-by-step reading of one JSON text, for walkers that decide per
/// member whether to descend or skip. Syntax is checked as it goes.
pub struct Cursor<'a> {
    s: Scanner<'a>,
}

impl<'a> Cursor<'a> {
    pub fn new(src: &'a str, max_depth: usize) -> Self {
        let mut s = Scanner::new(src, max_depth);
        s.ws();
        Cursor { s }
    }

    /// The kind of the value at the cursor.
    pub fn peek_kind(&self) -> Option<Kind> {
        Some(match self.s.peek()? {
            b'{' => Kind::Object,
            b'[' => Kind::Array,
            b'"' => Kind::String,
            b't' | b'f' => Kind::Bool,
            b'n' => Kind::Null,
            _ => Kind::Number,
        })
    }

    pub fn pos(&self) -> usize {
        self.s.pos
    }

    /// Reads (and checks) the whole value at the cursor.
    pub fn value(&mut self) -> Result<Span, JsonError> {
        let r = self.s.value();
        self.lifted(r)
    }

    /// At `{` or `[`: enters the container.
    pub fn enter(&mut self) -> Result<(), JsonError> {
        let r = self.s.enter();
        self.lifted(r)?;
        self.s.pos += 1;
        self.s.ws();
        Ok(())
    }

    fn lifted<T>(&mut self, r: Lex<T>) -> Result<T, JsonError> {
        r.map_err(|Stop| self.s.error())
    }

    /// Inside an object: the next member's key (the cursor then sits at its
    /// value), or None at the closing `}` (consumed). `first`: no member
    /// has been read yet.
    pub fn next_key(&mut self, first: bool) -> Result<Option<Span>, JsonError> {
        let more = if first {
            if self.s.peek() == Some(b'}') {
                self.s.pos += 1;
                false
            } else {
                true
            }
        } else {
            let r = self.s.next_item(b'}');
            self.lifted(r)?
        };
        if !more {
            self.s.depth -= 1;
            return Ok(None);
        }
        let r = self.s.member_key();
        self.lifted(r).map(Some)
    }

    /// Inside an array: whether another item follows (the cursor then sits
    /// at it); false at the closing `]` (consumed).
    pub fn next_item(&mut self, first: bool) -> Result<bool, JsonError> {
        let more = if first {
            if self.s.peek() == Some(b']') {
                self.s.pos += 1;
                false
            } else {
                true
            }
        } else {
            let r = self.s.next_item(b']');
            self.lifted(r)?
        };
        if !more {
            self.s.depth -= 1;
        }
        Ok(more)
    }

    /// After the top-level value: only whitespace may follow.
    pub fn finish(&mut self) -> Result<(), JsonError> {
        let r = self.s.finish();
        self.lifted(r)
    }
}

/// A member name as bytes, decoded when it has escapes: `"m\u0065ta"` is
/// `meta` to every other JSON reader, so it must be to us too (otherwise a
/// second, hidden `meta` could carry another tenant's label past the check).
pub(crate) fn key_name(src: &[u8], key: Span) -> std::borrow::Cow<'_, [u8]> {
    let raw = &src[key.start + 1..key.end - 1];
    if !key.escaped {
        return raw.into();
    }
    match std::str::from_utf8(raw)
        .ok()
        .and_then(|r| unescape(r, true))
    {
        Some(s) => s.into_bytes().into(),
        None => raw.into(),
    }
}

/// The text of a string's body (between its quotes), escapes decoded; the
/// lexer has checked them. A `\u` escape that is half of a surrogate pair
/// without its other half is no character: `None` when `strict` (as
/// serde_json and most JSON readers refuse such a string), U+FFFD otherwise
/// (the validator, which reports values, not their text).
pub(crate) fn unescape(raw: &str, strict: bool) -> Option<String> {
    let b = raw.as_bytes();
    let hex4 = |at: usize| -> Option<u32> {
        let h = std::str::from_utf8(b.get(at..at + 4)?).ok()?;
        u32::from_str_radix(h, 16).ok()
    };
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < b.len() {
        let next = b[i..]
            .iter()
            .position(|&c| c == b'\\')
            .map_or(b.len(), |p| i + p);
        out.push_str(&raw[i..next]);
        if next == b.len() {
            break;
        }
        let c = *b.get(next + 1)?;
        i = next + 2;
        let plain = match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = hex4(i)?;
                i += 4;
                let cp = match hi {
                    0xD800..=0xDBFF => {
                        let lo = (b.get(i..i + 2) == Some(b"\\u"))
                            .then(|| hex4(i + 2))
                            .flatten()
                            .filter(|lo| (0xDC00..0xE000).contains(lo));
                        lo.map(|lo| {
                            i += 6;
                            0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                        })
                    }
                    0xDC00..=0xDFFF => None,
                    cp => Some(cp),
                };
                match cp.and_then(char::from_u32) {
                    Some(ch) => ch,
                    None if strict => return None,
                    None => '\u{FFFD}',
                }
            }
            _ => return None,
        };
        out.push(plain);
    }
    Some(out)
}

/// The lexer: one JSON text, a position in it and the nesting depth. Every
/// reader of JSON in fhirflow reads its tokens through this (the scanner
/// below, [`Cursor`], the validator's walk).
pub(crate) struct Scanner<'a> {
    pub(crate) b: &'a [u8],
    pub(crate) pos: usize,
    pub(crate) depth: usize,
    max_depth: usize,
    /// Where [`Scanner::watched`] found members named `meta`.
    pub(crate) nested_meta: Vec<usize>,
    /// Why the text is not JSON, once a method has returned `Err(Stop)`.
    pub(crate) err: Option<JsonError>,
}

/// A lexer method stopped: the text is not JSON. Why and where is kept in
/// the lexer ([`Scanner::error`]), so that results stay small (a
/// `Result<Span, JsonError>` is 40 bytes, built at every token of the walks).
#[derive(Debug)]
pub(crate) struct Stop;

pub(crate) type Lex<T> = Result<T, Stop>;

/// The containers open in a walk, innermost last, a bit each (1: object):
/// in one word while they are at most 64 deep, the deeper ones spilled to the
/// heap. A `Vec<bool>` cost an allocation for every container value, some 6%
/// of a scan's instructions on Synthea.
#[derive(Default)]
struct BitStack {
    top: u64,
    len: usize,
    spilled: Vec<u64>,
}

impl BitStack {
    #[inline(always)]
    fn push(&mut self, object: bool) {
        if self.len != 0 && self.len.is_multiple_of(64) {
            self.spilled.push(self.top);
            self.top = 0;
        }
        self.top = (self.top << 1) | object as u64;
        self.len += 1;
    }

    #[inline(always)]
    fn last(&self) -> Option<bool> {
        (self.len != 0).then_some(self.top & 1 == 1)
    }

    #[inline(always)]
    fn pop(&mut self) {
        self.top >>= 1;
        self.len -= 1;
        if self.len != 0 && self.len.is_multiple_of(64) {
            self.top = self.spilled.pop().unwrap_or(0);
        }
    }
}

/// Whether the member name at `key` is `meta`, escaped or not.
///
/// The six bytes `"meta"` at the key are the key `meta` (its closing quote
/// follows `a`, so it is not escaped), and a member `meta` with its colon
/// and value takes at least eight bytes. So: one word compare and a branch
/// that is almost never taken. Testing the key's length first costs more,
/// mispredicting on every other four-letter key (code, text, name, type, ...).
#[inline(always)]
pub(crate) fn is_meta_key(src: &[u8], key: Span) -> bool {
    const META: u64 = u64::from_le_bytes(*b"\"meta\"\0\0");
    let at = key.start;
    let meta = src
        .get(at..at + 8)
        .is_some_and(|w| u64::from_le_bytes(w.try_into().unwrap()) & 0xffff_ffff_ffff == META);
    (meta | key.escaped) && key_is_meta(src, key)
}

/// The rare case of [`is_meta_key`]: the key is `meta` or has escapes.
#[cold]
#[inline(never)]
fn key_is_meta(src: &[u8], key: Span) -> bool {
    &*key_name(src, key) == b"meta"
}

/// A member of one of the objects whose members the scan records: the root
/// resource, its `meta`, an entry of its `meta.security`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Member {
    /// Not in one of those objects.
    None,
    /// In one, but not a member the scan records.
    Other,
    ResourceType,
    Id,
    Meta,
    VersionId,
    LastUpdated,
    Security,
    System,
    Code,
}

impl Member {
    /// The member `name` (decoded) of the root object.
    pub(crate) fn of_root(name: &[u8]) -> Member {
        match name {
            b"resourceType" => Member::ResourceType,
            b"id" => Member::Id,
            b"meta" => Member::Meta,
            _ => Member::Other,
        }
    }

    /// The member `name` (decoded) of the root `meta`.
    pub(crate) fn of_meta(name: &[u8]) -> Member {
        match name {
            b"versionId" => Member::VersionId,
            b"lastUpdated" => Member::LastUpdated,
            b"security" => Member::Security,
            _ => Member::Other,
        }
    }

    /// The member `name` (decoded) of an entry of the root `meta.security`.
    pub(crate) fn of_security(name: &[u8]) -> Member {
        match name {
            b"system" => Member::System,
            b"code" => Member::Code,
            _ => Member::Other,
        }
    }
}

/// Bytes that end the fast path of a string: quote, backslash, control chars.
const fn string_stop_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
}
static STRING_STOP: [bool; 256] = string_stop_table();

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The high bit of each byte of `w` (little-endian) that is a quote, a
/// backslash or below 0x20. Exact up to the first such byte, which is all the
/// caller uses: a borrow can flag a byte after it, never one before.
#[inline(always)]
fn word_stops(w: u64) -> u64 {
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let quote = has_zero(w ^ (ONES * b'"' as u64));
    let backslash = has_zero(w ^ (ONES * b'\\' as u64));
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
    quote | backslash | control
}

impl<'a> Scanner<'a> {
    /// A scanner at the start of `src`.
    pub(crate) fn new(src: &'a str, max_depth: usize) -> Self {
        Scanner {
            b: src.as_bytes(),
            pos: 0,
            depth: 0,
            max_depth,
            nested_meta: Vec::new(),
            err: None,
        }
    }

    /// A scanner over validated text, at `pos`, without a depth limit.
    fn at(src: &'a str, pos: usize) -> Self {
        Scanner {
            pos,
            ..Scanner::new(src, usize::MAX)
        }
    }

    /// After the top-level value: only whitespace may follow.
    pub(crate) fn finish(&mut self) -> Lex<()> {
        self.ws();
        if self.pos != self.b.len() {
            return Err(self.syntax("unexpected text after the JSON value"));
        }
        Ok(())
    }

    #[inline]
    pub(crate) fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    /// The text is not JSON at the current position (or ends there).
    #[cold]
    pub(crate) fn syntax(&mut self, reason: &'static str) -> Stop {
        let e = if self.pos >= self.b.len() {
            JsonError::Truncated { offset: self.pos }
        } else {
            JsonError::Syntax {
                offset: self.pos,
                reason,
            }
        };
        self.fail(e)
    }

    #[cold]
    pub(crate) fn fail(&mut self, e: JsonError) -> Stop {
        self.err = Some(e);
        Stop
    }

    /// Why the walk stopped (after an `Err(Stop)`).
    pub(crate) fn error(&mut self) -> JsonError {
        self.err
            .take()
            .unwrap_or(JsonError::Truncated { offset: self.pos })
    }

    #[inline]
    pub(crate) fn ws(&mut self) {
        while let Some(c) = self.peek() {
            if matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    #[inline]
    pub(crate) fn expect(&mut self, c: u8, reason: &'static str) -> Lex<()> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.syntax(reason))
        }
    }

    #[inline]
    pub(crate) fn enter(&mut self) -> Lex<()> {
        self.depth += 1;
        if self.depth > self.max_depth {
            let e = JsonError::TooDeep {
                offset: self.pos,
                limit: self.max_depth,
            };
            return Err(self.fail(e));
        }
        Ok(())
    }

    /// A string starting at the current `"`. Returns its span.
    ///
    /// The position is kept in a local and stored once (the validator's
    /// loop): through `&mut self` the compiler keeps `self.pos` in memory,
    /// and with a store per word and a table loop for the bytes after the
    /// last whole word (the scanner's former loop) [`scan_resource`] ran
    /// 1.45 GB/s on Synthea instead of 2.0. The word test is the one both
    /// had ([`word_stops`]).
    #[inline(always)]
    pub(crate) fn string(&mut self) -> Lex<Span> {
        let b = self.b;
        let start = self.pos;
        let mut i = start + 1; // after the opening quote
        let mut escaped = false;
        loop {
            // Fast path: eight bytes at a time while none needs a closer look.
            while i + 8 <= b.len() {
                let w = u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
                let stops = word_stops(w);
                if stops != 0 {
                    // Straight to the first stop byte: most strings (keys,
                    // codes, ids) end within their first word.
                    i += (stops.trailing_zeros() / 8) as usize;
                    break;
                }
                i += 8;
            }
            match b.get(i) {
                None => {
                    self.pos = i;
                    return Err(self.fail(JsonError::Truncated { offset: i }));
                }
                Some(b'"') => {
                    self.pos = i + 1;
                    return Ok(Span {
                        kind: Kind::String,
                        start,
                        end: i + 1,
                        escaped,
                    });
                }
                Some(b'\\') => {
                    escaped = true;
                    match b.get(i + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                        Some(b'u') => {
                            for k in i + 2..i + 6 {
                                if !b.get(k).is_some_and(u8::is_ascii_hexdigit) {
                                    self.pos = k;
                                    return Err(self.syntax("invalid \\u escape in string"));
                                }
                            }
                            i += 6;
                        }
                        _ => {
                            self.pos = i + 1;
                            return Err(self.syntax("invalid escape in string"));
                        }
                    }
                }
                Some(&c) if STRING_STOP[c as usize] => {
                    self.pos = i;
                    return Err(self.syntax("control character in string"));
                }
                Some(_) => i += 1,
            }
        }
    }

    /// A number at the current position. As in [`Scanner::string`], the
    /// position is kept in a local.
    #[inline]
    pub(crate) fn number(&mut self) -> Lex<Span> {
        let b = self.b;
        let start = self.pos;
        let digits = |i: &mut usize| {
            let from = *i;
            while b.get(*i).is_some_and(u8::is_ascii_digit) {
                *i += 1;
            }
            *i - from
        };
        let mut i = start;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        let bad = |this: &mut Self, at: usize, reason: &'static str| {
            this.pos = at;
            Err(this.syntax(reason))
        };
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                digits(&mut i);
            }
            _ => return bad(self, i, "invalid number"),
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            if digits(&mut i) == 0 {
                return bad(self, i, "invalid number: digits expected after '.'");
            }
        }
        if let Some(b'e' | b'E') = b.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = b.get(i) {
                i += 1;
            }
            if digits(&mut i) == 0 {
                return bad(self, i, "invalid number: digits expected in exponent");
            }
        }
        self.pos = i;
        Ok(Span {
            kind: Kind::Number,
            start,
            end: i,
            escaped: false,
        })
    }

    #[inline]
    pub(crate) fn literal(&mut self, word: &'static [u8], kind: Kind) -> Lex<Span> {
        let start = self.pos;
        let end = start + word.len();
        if end <= self.b.len() && &self.b[start..end] == word {
            self.pos = end;
            Ok(Span {
                kind,
                start,
                end,
                escaped: false,
            })
        } else if self.b.len() < end && word.starts_with(&self.b[start..]) {
            Err(self.fail(JsonError::Truncated {
                offset: self.b.len(),
            }))
        } else {
            Err(self.syntax("invalid literal"))
        }
    }

    /// Any value, validated without recursion (see [`Scanner::walk`]).
    pub(crate) fn value(&mut self) -> Lex<Span> {
        self.walk::<false>()
    }

    /// [`Scanner::value`], also noting in `self.nested_meta` where the value
    /// of each member named `meta` in it starts.
    pub(crate) fn watched(&mut self) -> Lex<Span> {
        self.walk::<true>()
    }

    /// The value at the cursor, validated without recursion: open containers
    /// are a stack of bits ([`BitStack`]), so a level of nesting costs a bit,
    /// not a call frame.
    ///
    /// With `WATCH`, each member key is also checked for `meta`: in FHIR
    /// only resources have one, so below the root it is a nested resource's
    /// (`contained[]`, `entry[].resource`, `parameter[].resource`, at any
    /// depth), and its labels must be checked. Only the offset is kept: the
    /// few nested metas are read again by whoever needs them, which keeps the
    /// cost to one compare per key (tracking what each value is during the
    /// walk, to record the codings themselves, measured 13% slower on
    /// Synthea and the R4 examples). Without `WATCH` the check compiles away.
    #[inline(always)]
    fn walk<const WATCH: bool>(&mut self) -> Lex<Span> {
        let start = self.pos;
        let kind = match self.peek() {
            Some(b'{') => Kind::Object,
            Some(b'[') => Kind::Array,
            // Scalars return their own span (a string's carries `escaped`).
            Some(b'"') => return self.string(),
            Some(b'-' | b'0'..=b'9') => return self.number(),
            Some(b't') => return self.literal(b"true", Kind::Bool),
            Some(b'f') => return self.literal(b"false", Kind::Bool),
            Some(b'n') => return self.literal(b"null", Kind::Null),
            None => return Err(self.fail(JsonError::Truncated { offset: self.pos })),
            Some(_) => return Err(self.syntax("expected a JSON value")),
        };
        let mut stack = BitStack::default();
        loop {
            // One value at the current position.
            match self.peek() {
                Some(b'{') => {
                    self.enter()?;
                    self.pos += 1;
                    self.ws();
                    if self.peek() == Some(b'}') {
                        self.pos += 1;
                        self.depth -= 1;
                    } else {
                        stack.push(true);
                        self.member_key_watched::<WATCH>()?;
                        continue;
                    }
                }
                Some(b'[') => {
                    self.enter()?;
                    self.pos += 1;
                    self.ws();
                    if self.peek() == Some(b']') {
                        self.pos += 1;
                        self.depth -= 1;
                    } else {
                        stack.push(false);
                        continue;
                    }
                }
                Some(b'"') => {
                    self.string()?;
                }
                Some(b'-' | b'0'..=b'9') => {
                    self.number()?;
                }
                Some(b't') => {
                    self.literal(b"true", Kind::Bool)?;
                }
                Some(b'f') => {
                    self.literal(b"false", Kind::Bool)?;
                }
                Some(b'n') => {
                    self.literal(b"null", Kind::Null)?;
                }
                None => return Err(self.fail(JsonError::Truncated { offset: self.pos })),
                Some(_) => return Err(self.syntax("expected a JSON value")),
            }
            // The value is complete: close containers until one continues.
            loop {
                let Some(is_obj) = stack.last() else {
                    return Ok(Span {
                        kind,
                        start,
                        end: self.pos,
                        escaped: false,
                    });
                };
                self.ws();
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        self.ws();
                        if is_obj {
                            self.member_key_watched::<WATCH>()?;
                        }
                        break;
                    }
                    Some(b'}') if is_obj => {
                        self.pos += 1;
                        self.depth -= 1;
                        stack.pop();
                    }
                    Some(b']') if !is_obj => {
                        self.pos += 1;
                        self.depth -= 1;
                        stack.pop();
                    }
                    None => return Err(self.fail(JsonError::Truncated { offset: self.pos })),
                    Some(_) => {
                        return Err(self.syntax(if is_obj {
                            "expected ',' or '}' in object"
                        } else {
                            "expected ',' or ']' in array"
                        }))
                    }
                }
            }
        }
    }

    /// [`Scanner::member_key`]; with `WATCH`, also notes where the value
    /// starts when the key is `meta` (escaped or not).
    #[inline(always)]
    fn member_key_watched<const WATCH: bool>(&mut self) -> Lex<()> {
        if !WATCH {
            self.member_key()?;
            return Ok(());
        }
        // The six bytes `"meta"` at the key are the key `meta` (its closing
        // quote follows `a`, so it is not escaped), and a member `meta` with
        // its colon and value takes at least eight bytes. So: one word
        // compare and a branch that is almost never taken. Testing the key's
        // length first costs more, mispredicting on every other four-letter
        // key (code, text, name, type, ...).
        let key = self.member_key()?;
        if is_meta_key(self.b, key) {
            self.nested_meta.push(self.pos);
        }
        Ok(())
    }

    /// After an item of a container closed by `close`: true when a comma
    /// says another item follows, false when the container ends here.
    #[inline]
    pub(crate) fn next_item(&mut self, close: u8) -> Lex<bool> {
        self.ws();
        match self.peek() {
            Some(b',') => {
                self.pos += 1;
                self.ws();
                Ok(true)
            }
            Some(c) if c == close => {
                self.pos += 1;
                Ok(false)
            }
            _ => Err(self.syntax(if close == b'}' {
                "expected ',' or '}' in object"
            } else {
                "expected ',' or ']' in array"
            })),
        }
    }

    /// At a member's key: the key string, whitespace, colon, whitespace.
    #[inline(always)]
    pub(crate) fn member_key(&mut self) -> Lex<Span> {
        if self.peek() != Some(b'"') {
            return Err(self.syntax("expected a member name in object"));
        }
        let k = self.string()?;
        self.ws();
        self.expect(b':', "expected ':' after member name")?;
        self.ws();
        Ok(k)
    }

    /// Walks the members of an object at the current `{`, calling `on_member`
    /// with each key span; `on_member` must consume the member's value.
    fn object_members(
        &mut self,
        mut on_member: impl FnMut(&mut Self, Span) -> Lex<()>,
    ) -> Lex<(Span, Option<usize>)> {
        let start = self.pos;
        self.enter()?;
        self.pos += 1;
        self.ws();
        let mut last_end = None;
        if self.peek() == Some(b'}') {
            self.pos += 1;
        } else {
            loop {
                let key = self.member_key()?;
                on_member(self, key)?;
                last_end = Some(self.pos);
                if !self.next_item(b'}')? {
                    break;
                }
            }
        }
        self.depth -= 1;
        Ok((
            Span {
                kind: Kind::Object,
                start,
                end: self.pos,
                escaped: false,
            },
            last_end,
        ))
    }

    pub(crate) fn resource_object(&mut self, out: &mut Scanned) -> Lex<()> {
        let src = self.b;
        let (root, _) =
            self.object_members(|s, key| s.resource_member(&key_name(src, key), out))?;
        out.root = root;
        Ok(())
    }

    /// The value of a member of the root object named `name` (decoded),
    /// into `out` when curation reads it. The validator's walk calls this
    /// too, for a member it cannot map to the model by its raw name.
    pub(crate) fn resource_member(&mut self, name: &[u8], out: &mut Scanned) -> Lex<()> {
        let m = Member::of_root(name);
        if m == Member::Meta && self.peek() == Some(b'{') {
            let mut meta = Meta::default();
            let (span, last) = self.meta_object(&mut meta, &mut out.duplicate_member)?;
            meta.last_member_end = last;
            out.put_meta(span, meta);
        } else {
            let v = self.watched()?;
            out.put_root(m, v);
        }
        Ok(())
    }

    fn meta_object(
        &mut self,
        meta: &mut Meta,
        dup: &mut Option<&'static str>,
    ) -> Lex<(Span, Option<usize>)> {
        let src = self.b;
        self.object_members(|s, key| s.meta_member(&key_name(src, key), meta, dup))
    }

    /// The value of a member of the root `meta` named `name` (decoded), into
    /// `meta` when curation reads it; as [`Scanner::resource_member`].
    pub(crate) fn meta_member(
        &mut self,
        name: &[u8],
        meta: &mut Meta,
        dup: &mut Option<&'static str>,
    ) -> Lex<()> {
        let m = Member::of_meta(name);
        let v = if m == Member::Security && self.peek() == Some(b'[') {
            meta.security_entries.clear();
            self.security_array(&mut meta.security_entries)?
        } else {
            self.watched()?
        };
        meta.put(m, v, dup);
        Ok(())
    }

    fn security_array(&mut self, entries: &mut Vec<SecurityEntry>) -> Lex<Span> {
        let start = self.pos;
        self.enter()?;
        self.pos += 1;
        self.ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
        } else {
            loop {
                let src = self.b;
                let entry = if self.peek() == Some(b'{') {
                    let mut entry = SecurityEntry::default();
                    let (span, _) = self.object_members(|s, key| {
                        s.security_member(&key_name(src, key), &mut entry)
                    })?;
                    entry.span = span;
                    entry
                } else {
                    SecurityEntry {
                        span: self.watched()?,
                        ..SecurityEntry::default()
                    }
                };
                entries.push(entry);
                if !self.next_item(b']')? {
                    break;
                }
            }
        }
        self.depth -= 1;
        Ok(Span {
            kind: Kind::Array,
            start,
            end: self.pos,
            escaped: false,
        })
    }

    /// The value of a member of a root `meta.security` entry named `name`
    /// (decoded), into `entry`; as [`Scanner::resource_member`].
    pub(crate) fn security_member(&mut self, name: &[u8], entry: &mut SecurityEntry) -> Lex<()> {
        let v = self.watched()?;
        entry.put(Member::of_security(name), v);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) {
        validate(s, 64).unwrap_or_else(|e| panic!("{s:?} should be valid: {e}"));
    }
    fn bad(s: &str) -> JsonError {
        validate(s, 64).expect_err(s)
    }

    #[test]
    fn accepts_valid_json() {
        for s in [
            "{}",
            "[]",
            "0",
            "-0.5e+10",
            "1E-22",
            "6.0",
            "\"a\\u00e9\\n\"",
            "true",
            "null",
            " {\"a\" : [1, {\"b\":[]}, \"x\"], \"c\":{} } ",
            "[[[[]]]]",
            "{\"é\":\"日本\"}",
        ] {
            ok(s);
        }
    }

    #[test]
    fn rejects_invalid_json() {
        for s in [
            "{",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "01",
            "1.",
            "1e",
            "-",
            "tru",
            "nul",
            "\"\\x\"",
            "\"a\u{1}\"",
            "{} {}",
            "{a:1}",
            "[1 2]",
            "\"\\u12\"",
            "{\"a\":}",
        ] {
            bad(s);
        }
        assert!(matches!(bad("{\"a\":[1,2"), JsonError::Truncated { .. }));
        assert!(matches!(bad("{\"a\":\"xy"), JsonError::Truncated { .. }));
        assert!(matches!(bad("[tr"), JsonError::Truncated { .. }));
    }

    #[test]
    fn depth_is_limited_without_recursion() {
        let deep = "[".repeat(1_000_000) + &"]".repeat(1_000_000);
        assert!(matches!(
            validate(&deep, 100),
            Err(JsonError::TooDeep { limit: 100, .. })
        ));
        // Objects and arrays in turn, past the 64 levels the walk keeps in
        // a word: each closer must still match its opener.
        let mixed = "{\"a\":[".repeat(100) + "1" + &"]}".repeat(100);
        assert!(validate(&mixed, 200).is_ok());
        for bad in [
            "{\"a\":[".repeat(100) + "1" + &"]}".repeat(40) + "}]" + &"]}".repeat(59),
            "{\"a\":[".repeat(100) + "1" + &"]}".repeat(70) + "}]" + &"]}".repeat(29),
        ] {
            assert!(validate(&bad, 200).is_err());
        }
        let obj = "{\"a\":".repeat(50) + "1" + &"}".repeat(50);
        assert!(validate(&obj, 50).is_ok());
        assert!(validate(&obj, 49).is_err());
        // The resource scanner counts the levels it walks by hand the same way.
        let deep_meta = format!(
            "{{\"meta\":{{\"security\":[{}]}}}}",
            "[".repeat(10) + &"]".repeat(10)
        );
        assert!(scan_resource(&deep_meta, 13).is_ok());
        assert!(scan_resource(&deep_meta, 12).is_err());
    }

    #[test]
    fn records_spans_of_resource_members() {
        let src = r#"{"resourceType":"Patient","id":"p1","meta":{"versionId":"3","lastUpdated":"2024-01-01T00:00:00Z","security":[{"system":"s","code":"c"},{"code":"x"}]},"x":[1]}"#;
        let r = scan_resource(src, 64).unwrap();
        assert_eq!(r.root.kind, Kind::Object);
        assert!(r.resource_type.unwrap().str_eq(src, "Patient"));
        assert_eq!(r.id.unwrap().raw_str(src), Some("p1"));
        let m = &r.meta_fields;
        assert_eq!(m.version_id.unwrap().raw_str(src), Some("3"));
        assert_eq!(m.security_entries.len(), 2);
        assert_eq!(m.security_entries[0].code.unwrap().raw_str(src), Some("c"));
        assert_eq!(m.security_entries[1].system, None);
        // The end of meta's last member: where a new member is inserted.
        let end = m.last_member_end.unwrap();
        assert!(src[..end].ends_with("}]"));
        assert_eq!(&src[end..end + 1], "}");
        assert_eq!(r.duplicate_member, None);
    }

    #[test]
    fn flags_duplicate_members_and_decodes_escapes() {
        let src = r#"{"id":"a","id":"b"}"#;
        assert_eq!(scan_resource(src, 8).unwrap().duplicate_member, Some("id"));
        let src = r#"{"m\u0065ta":{},"meta":{}}"#;
        assert_eq!(
            scan_resource(src, 8).unwrap().duplicate_member,
            Some("meta")
        );
        let src = r#"{"resourceType":"Pat\u0069ent"}"#;
        let r = scan_resource(src, 8).unwrap();
        assert!(r.resource_type.unwrap().str_eq(src, "Patient"));
    }

    #[test]
    fn finds_the_metas_of_nested_resources_in_the_same_walk() {
        let src = r#"{"resourceType":"Bundle","meta":{"security":[{"system":"top","code":"t"}]},"entry":[{"resource":{"id":"a","meta":{"security":[{"system":"s","code":"c"}]},"contained":[{"m\u0065ta":{"tag":[]}}]}},{"metadata":1,"x":{"meta":7},"y":"meta"}],"z":{"meta":{}}}"#;
        let r = scan_resource(src, 64).unwrap();
        // Not the top-level meta; every `meta` member below it, escaped or
        // not, whatever its value; not keys that start with `meta`, nor
        // strings.
        let metas: Vec<&str> = r
            .nested_meta
            .iter()
            .map(|&at| value_at(src, at).unwrap().text(src))
            .collect();
        assert_eq!(
            metas,
            [
                r#"{"security":[{"system":"s","code":"c"}]}"#,
                r#"{"tag":[]}"#,
                "7",
                "{}"
            ]
        );
        assert_eq!(r.meta_fields.security_entries.len(), 1);
        let coding = src.find(r#"{"system":"s""#).unwrap();
        assert_eq!(
            path_to(src, r.root, coding),
            "entry[0].resource.meta.security[0]"
        );
        let tag = src.find(r#"{"tag""#).unwrap();
        assert_eq!(
            path_to(src, r.root, tag),
            "entry[0].resource.contained[0].meta"
        );
        // Plain validation walks the same text to the same end.
        assert_eq!(validate(src, 64).unwrap(), r.root);
        let plain = r#"{"resourceType":"Patient","id":"p","meta":{},"name":[{"family":"x"}]}"#;
        assert!(scan_resource(plain, 64).unwrap().nested_meta.is_empty());
        // A `meta` key at the very end of a (truncated) line is an error, not
        // a read past the end.
        assert!(scan_resource(r#"{"a":{"meta""#, 64).is_err());
    }

    #[test]
    fn swar_stop_detection_matches_bytewise() {
        // The first stop byte, at every position, after any other bytes.
        let first = |w: [u8; 8]| w.iter().position(|&c| STRING_STOP[c as usize]);
        let found = |w: [u8; 8]| {
            let m = word_stops(u64::from_le_bytes(w));
            (m != 0).then(|| (m.trailing_zeros() / 8) as usize)
        };
        for b in 0u8..=255 {
            for at in 0..8 {
                for fill in [b'a', 0x80, 0xff, b'!', b'#', b'[', b']', 0x21, 0x20] {
                    let mut w = [fill; 8];
                    w[at] = b;
                    // Bytes after `at` that are stops too, or just below.
                    for tail in [fill, 0x00, b'"', 0x1f] {
                        if at < 7 {
                            w[at + 1..].fill(tail);
                        }
                        assert_eq!(found(w), first(w), "{w:?}");
                    }
                }
            }
        }
    }
}
