//! A validating, non-allocating JSON scanner that records where things are.
//!
//! fhirflow never rewrites a resource by parsing and re-serialising it: a
//! curated line is its raw text plus explicit edits (DESIGN.md, "Lossless by
//! construction"). To edit text we need byte spans, and to reject bad input we
//! need full RFC 8259 validation, so this module does both in one pass:
//!
//! * [`scan_resource`] validates the whole line and returns the spans of the
//!   few members curation reads (`resourceType`, `id`, `meta.versionId`,
//!   `meta.lastUpdated`, `meta.security[*].system|code`).
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
        // Escaped strings are rare in the members we read; serde_json decodes
        // them correctly (surrogate pairs included) and the text is already
        // known to be valid.
        serde_json::from_str::<String>(self.text(src))
            .ok()
            .map(Into::into)
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
}

/// Scans and fully validates `src` as one JSON value, recording the spans of the
/// members curation reads. Leading and trailing JSON whitespace is allowed.
pub fn scan_resource(src: &str, max_depth: usize) -> Result<Scanned, JsonError> {
    let mut s = Scanner {
        b: src.as_bytes(),
        pos: 0,
        depth: 0,
        max_depth,
    };
    s.ws();
    let mut out = Scanned {
        root: Span {
            kind: Kind::Null,
            start: s.pos,
            end: s.pos,
            escaped: false,
        },
        resource_type: None,
        id: None,
        meta: None,
        meta_fields: Meta::default(),
        duplicate_member: None,
    };
    if s.peek() == Some(b'{') {
        s.resource_object(&mut out)?;
    } else {
        out.root = s.value()?;
    }
    s.ws();
    if s.pos != s.b.len() {
        return Err(s.syntax("unexpected text after the JSON value"));
    }
    Ok(out)
}

/// Validates `src` as exactly one JSON value and returns its span.
pub fn validate(src: &str, max_depth: usize) -> Result<Span, JsonError> {
    let mut s = Scanner {
        b: src.as_bytes(),
        pos: 0,
        depth: 0,
        max_depth,
    };
    s.ws();
    let v = s.value()?;
    s.ws();
    if s.pos != s.b.len() {
        return Err(s.syntax("unexpected text after the JSON value"));
    }
    Ok(v)
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
        let mut s = Scanner {
            b: src.as_bytes(),
            pos: 0,
            depth: 0,
            max_depth,
        };
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
        self.s.value()
    }

    /// At `{` or `[`: enters the container.
    pub fn enter(&mut self) -> Result<(), JsonError> {
        self.s.enter()?;
        self.s.pos += 1;
        self.s.ws();
        Ok(())
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
            self.s.next_item(b'}')?
        };
        if !more {
            self.s.depth -= 1;
            return Ok(None);
        }
        self.s.member_key().map(Some)
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
            self.s.next_item(b']')?
        };
        if !more {
            self.s.depth -= 1;
        }
        Ok(more)
    }

    /// After the top-level value: only whitespace may follow.
    pub fn finish(&mut self) -> Result<(), JsonError> {
        self.s.ws();
        if self.s.pos != self.s.b.len() {
            return Err(self.s.syntax("unexpected text after the JSON value"));
        }
        Ok(())
    }
}

/// A member name as bytes, decoded when it has escapes: `"m\u0065ta"` is
/// `meta` to every other JSON reader, so it must be to us too (otherwise a
/// second, hidden `meta` could carry another tenant's label past the check).
fn key_name(src: &[u8], key: Span) -> std::borrow::Cow<'_, [u8]> {
    let raw = &src[key.start + 1..key.end - 1];
    if !key.escaped {
        return raw.into();
    }
    let text = std::str::from_utf8(&src[key.start..key.end]).unwrap_or("\"");
    match serde_json::from_str::<String>(text) {
        Ok(s) => s.into_bytes().into(),
        Err(_) => raw.into(),
    }
}

struct Scanner<'a> {
    b: &'a [u8],
    pos: usize,
    depth: usize,
    max_depth: usize,
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

/// True when any byte of `w` is a quote, a backslash or below 0x20.
#[inline(always)]
fn word_has_stop(w: u64) -> bool {
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let quote = has_zero(w ^ (ONES * b'"' as u64));
    let backslash = has_zero(w ^ (ONES * b'\\' as u64));
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
    (quote | backslash | control) != 0
}

impl<'a> Scanner<'a> {
    /// A scanner over validated text, at `pos`, without a depth limit.
    fn at(src: &'a str, pos: usize) -> Self {
        Scanner {
            b: src.as_bytes(),
            pos,
            depth: 0,
            max_depth: usize::MAX,
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn syntax(&self, reason: &'static str) -> JsonError {
        if self.pos >= self.b.len() {
            JsonError::Truncated { offset: self.pos }
        } else {
            JsonError::Syntax {
                offset: self.pos,
                reason,
            }
        }
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(c) = self.peek() {
            if matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    #[inline]
    fn expect(&mut self, c: u8, reason: &'static str) -> Result<(), JsonError> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.syntax(reason))
        }
    }

    fn enter(&mut self) -> Result<(), JsonError> {
        self.depth += 1;
        if self.depth > self.max_depth {
            return Err(JsonError::TooDeep {
                offset: self.pos,
                limit: self.max_depth,
            });
        }
        Ok(())
    }

    /// A string starting at the current `"`. Returns its span.
    #[inline]
    fn string(&mut self) -> Result<Span, JsonError> {
        let start = self.pos;
        self.pos += 1; // opening quote
        let b = self.b;
        let mut escaped = false;
        loop {
            // Fast path: eight bytes at a time while none needs a closer look.
            while self.pos + 8 <= b.len() {
                let w = u64::from_le_bytes(b[self.pos..self.pos + 8].try_into().unwrap());
                if word_has_stop(w) {
                    break;
                }
                self.pos += 8;
            }
            while self.pos < b.len() && !STRING_STOP[b[self.pos] as usize] {
                self.pos += 1;
            }
            match self.peek() {
                None => return Err(JsonError::Truncated { offset: self.pos }),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(Span {
                        kind: Kind::String,
                        start,
                        end: self.pos,
                        escaped,
                    });
                }
                Some(b'\\') => {
                    escaped = true;
                    self.pos += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            self.pos += 1
                        }
                        Some(b'u') => {
                            self.pos += 1;
                            for _ in 0..4 {
                                match self.peek() {
                                    Some(c) if c.is_ascii_hexdigit() => self.pos += 1,
                                    _ => return Err(self.syntax("invalid \\u escape in string")),
                                }
                            }
                        }
                        _ => return Err(self.syntax("invalid escape in string")),
                    }
                }
                Some(_) => return Err(self.syntax("control character in string")),
            }
        }
    }

    fn digits(&mut self) -> usize {
        let from = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - from
    }

    fn number(&mut self) -> Result<Span, JsonError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.syntax("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.syntax("invalid number: digits expected after '.'"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.syntax("invalid number: digits expected in exponent"));
            }
        }
        Ok(Span {
            kind: Kind::Number,
            start,
            end: self.pos,
            escaped: false,
        })
    }

    fn literal(&mut self, word: &'static [u8], kind: Kind) -> Result<Span, JsonError> {
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
            Err(JsonError::Truncated {
                offset: self.b.len(),
            })
        } else {
            Err(self.syntax("invalid literal"))
        }
    }

    /// Any value, validated without recursion: open containers are a stack of
    /// bits (true = object), so a level of nesting costs a byte, not a frame.
    fn value(&mut self) -> Result<Span, JsonError> {
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
            None => return Err(JsonError::Truncated { offset: self.pos }),
            Some(_) => return Err(self.syntax("expected a JSON value")),
        };
        let mut stack: Vec<bool> = Vec::new();
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
                        self.member_key()?;
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
                None => return Err(JsonError::Truncated { offset: self.pos }),
                Some(_) => return Err(self.syntax("expected a JSON value")),
            }
            // The value is complete: close containers until one continues.
            loop {
                let Some(&is_obj) = stack.last() else {
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
                            self.member_key()?;
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
                    None => return Err(JsonError::Truncated { offset: self.pos }),
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

    /// After an item of a container closed by `close`: true when a comma
    /// says another item follows, false when the container ends here.
    fn next_item(&mut self, close: u8) -> Result<bool, JsonError> {
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
    fn member_key(&mut self) -> Result<Span, JsonError> {
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
        mut on_member: impl FnMut(&mut Self, Span) -> Result<(), JsonError>,
    ) -> Result<(Span, Option<usize>), JsonError> {
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

    fn resource_object(&mut self, out: &mut Scanned) -> Result<(), JsonError> {
        fn put(
            slot: &mut Option<Span>,
            v: Span,
            name: &'static str,
            dup: &mut Option<&'static str>,
        ) {
            if slot.is_some() {
                dup.get_or_insert(name);
            }
            *slot = Some(v);
        }
        let src = self.b;
        let mut dup: Option<&'static str> = None;
        let (root, _) = self.object_members(|s, key| {
            match &*key_name(src, key) {
                b"resourceType" => {
                    let v = s.value()?;
                    put(&mut out.resource_type, v, "resourceType", &mut dup);
                }
                b"id" => {
                    let v = s.value()?;
                    put(&mut out.id, v, "id", &mut dup);
                }
                b"meta" if s.peek() == Some(b'{') => {
                    let mut meta = Meta::default();
                    let (span, last) = s.meta_object(&mut meta, &mut dup)?;
                    meta.last_member_end = last;
                    put(&mut out.meta, span, "meta", &mut dup);
                    out.meta_fields = meta;
                }
                b"meta" => {
                    let v = s.value()?;
                    put(&mut out.meta, v, "meta", &mut dup);
                }
                _ => {
                    s.value()?;
                }
            }
            Ok(())
        })?;
        out.root = root;
        out.duplicate_member = dup;
        Ok(())
    }

    fn meta_object(
        &mut self,
        meta: &mut Meta,
        dup: &mut Option<&'static str>,
    ) -> Result<(Span, Option<usize>), JsonError> {
        let src = self.b;
        self.object_members(|s, key| {
            let name = key_name(src, key);
            let slot = match &*name {
                b"versionId" => &mut meta.version_id,
                b"lastUpdated" => &mut meta.last_updated,
                b"security" => &mut meta.security,
                _ => {
                    s.value()?;
                    return Ok(());
                }
            };
            if slot.is_some() {
                dup.get_or_insert("meta member");
            }
            if &*name == b"security" && s.peek() == Some(b'[') {
                meta.security_entries.clear();
                *slot = Some(s.security_array(&mut meta.security_entries)?);
            } else {
                *slot = Some(s.value()?);
            }
            Ok(())
        })
    }

    fn security_array(&mut self, entries: &mut Vec<SecurityEntry>) -> Result<Span, JsonError> {
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
                    let mut system = None;
                    let mut code = None;
                    let (span, _) = self.object_members(|s, key| {
                        let v = s.value()?;
                        match &*key_name(src, key) {
                            b"system" => system = Some(v),
                            b"code" => code = Some(v),
                            _ => {}
                        }
                        Ok(())
                    })?;
                    SecurityEntry { span, system, code }
                } else {
                    SecurityEntry {
                        span: self.value()?,
                        system: None,
                        code: None,
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
    fn swar_stop_detection_matches_bytewise() {
        for b in 0u8..=255 {
            let w = u64::from_le_bytes([b'a', b'a', b'a', b, b'a', b'a', b'a', b'a']);
            assert_eq!(word_has_stop(w), STRING_STOP[b as usize], "byte {b}");
        }
    }
}
