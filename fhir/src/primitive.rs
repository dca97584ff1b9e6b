//! The formats of FHIR R4's primitive types, from the regular expressions and
//! rules of each type's StructureDefinition (https://hl7.org/fhir/R4/datatypes.html).
//! Written as byte checks rather than regexes: these run on every value.

use crate::model::*;
use crate::model_types::TypeId;

/// FHIR strings SHALL NOT exceed 1 MB (datatypes.html#string).
pub const MAX_STRING_BYTES: usize = 1024 * 1024;

/// `b` in every byte of a word, for the eight-bytes-at-a-time checks here and
/// in the validator.
pub(crate) const fn splat(b: u8) -> u64 {
    0x0101_0101_0101_0101u64 * b as u64
}

/// Which JSON kind a primitive type is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonKind {
    Bool,
    Number,
    String,
}

pub fn json_kind(ty: TypeId) -> JsonKind {
    match ty {
        T_BOOLEAN => JsonKind::Bool,
        T_DECIMAL | T_INTEGER | T_POSITIVEINT | T_UNSIGNEDINT => JsonKind::Number,
        _ => JsonKind::String,
    }
}

/// Checks a JSON number (already valid JSON number text) against an integer
/// or decimal type.
pub fn check_number(ty: TypeId, text: &str) -> Result<(), &'static str> {
    if ty == T_DECIMAL {
        return Ok(());
    }
    if text.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        return Err("is not an integer");
    }
    let v: i64 = match text.parse() {
        Ok(v) if (i32::MIN as i64..=i32::MAX as i64).contains(&v) => v,
        _ => return Err("is outside the 32-bit integer range"),
    };
    match ty {
        T_POSITIVEINT if v < 1 => Err("is not a positiveInt (1 or more)"),
        T_UNSIGNEDINT if v < 0 => Err("is not an unsignedInt (0 or more)"),
        _ => Ok(()),
    }
}

/// Checks the (unescaped) text of a string-based primitive. Empty strings are
/// reported by the caller.
pub fn check_string(ty: TypeId, s: &str) -> Result<(), &'static str> {
    let b = s.as_bytes();
    let ok = match ty {
        T_STRING | T_MARKDOWN => {
            if b.iter().all(|c| is_ws(*c)) {
                return Err("is only whitespace");
            }
            true
        }
        T_CODE => is_code(b),
        T_ID => crate::is_valid_id(s),
        T_URI | T_URL | T_CANONICAL => !has_space_or_control(b),
        T_OID => is_oid(b),
        T_UUID => is_uuid(b),
        T_DATE => is_date(b),
        T_DATETIME => is_date_time(b, false),
        T_INSTANT => is_date_time(b, true),
        T_TIME => is_time(b),
        T_BASE64BINARY => is_base64(b),
        T_XHTML => is_xhtml_div(s),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(match ty {
            T_CODE => "is not a code (no leading, trailing or repeated whitespace)",
            T_ID => "is not an id ([A-Za-z0-9-.]{1,64})",
            T_URI | T_URL | T_CANONICAL => "contains whitespace",
            T_OID => "is not an OID (urn:oid:…)",
            T_UUID => "is not a UUID (urn:uuid: and lower-case hex)",
            T_DATE => "is not a date (YYYY, YYYY-MM or YYYY-MM-DD)",
            T_DATETIME => "is not a dateTime (a date, or a date and time with a time zone)",
            T_INSTANT => "is not an instant (date and time to the second, with a time zone)",
            T_TIME => "is not a time (hh:mm:ss)",
            T_BASE64BINARY => "is not base64",
            T_XHTML => "is not an XHTML <div> element",
            _ => "is not valid",
        })
    }
}

/// Leading or trailing whitespace, which FHIR strings SHOULD not have
/// (datatypes.html#string).
pub fn has_outer_whitespace(s: &str) -> bool {
    let b = s.as_bytes();
    b.first().is_some_and(|c| is_ws(*c)) || b.last().is_some_and(|c| is_ws(*c))
}

/// Whether `b` has a space or a control character (tab, CR, LF among
/// them), eight bytes at a time.
pub(crate) fn has_space_or_control(b: &[u8]) -> bool {
    const LO: u64 = splat(0x01);
    const HI: u64 = splat(0x80);
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().unwrap());
        // A byte below 0x21 (the high bit of each byte is kept apart).
        if w.wrapping_sub(LO * 0x21) & !w & HI != 0 {
            return true;
        }
    }
    chunks.remainder().iter().any(|c| *c <= b' ')
}

fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

/// `[^\s]+( [^\s]+)*`
fn is_code(b: &[u8]) -> bool {
    let mut prev_space = true; // no leading space
    for &c in b {
        if matches!(c, b'\t' | b'\r' | b'\n') {
            return false;
        }
        if c == b' ' {
            if prev_space {
                return false;
            }
            prev_space = true;
        } else {
            prev_space = false;
        }
    }
    !prev_space
}

/// `urn:oid:[0-2](\.(0|[1-9][0-9]*))+`
fn is_oid(b: &[u8]) -> bool {
    let Some(rest) = b.strip_prefix(b"urn:oid:") else {
        return false;
    };
    if rest.len() < 3 || !matches!(rest[0], b'0'..=b'2') || rest[1] != b'.' {
        return false;
    }
    rest[2..].split(|c| *c == b'.').all(|arc| {
        !arc.is_empty() && arc.iter().all(u8::is_ascii_digit) && (arc.len() == 1 || arc[0] != b'0')
    })
}

/// `urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`
fn is_uuid(b: &[u8]) -> bool {
    let Some(rest) = b.strip_prefix(b"urn:uuid:") else {
        return false;
    };
    rest.len() == 36
        && rest.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => matches!(c, b'0'..=b'9' | b'a'..=b'f'),
        })
}

fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0, |n, c| n * 10 + (c - b'0') as u32))
}

/// `YYYY(-MM(-DD)?)?` with a real calendar date; the length of the part read.
fn date_prefix(b: &[u8]) -> Option<usize> {
    let year = digits(b.get(..4)?)?;
    if year == 0 {
        return None;
    }
    if b.get(4) != Some(&b'-') {
        return Some(4);
    }
    let month = digits(b.get(5..7)?)?;
    if !(1..=12).contains(&month) {
        return None;
    }
    if b.get(7) != Some(&b'-') {
        return Some(7);
    }
    let day = digits(b.get(8..10)?)?;
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    (1..=days).contains(&day).then_some(10)
}

fn is_date(b: &[u8]) -> bool {
    date_prefix(b) == Some(b.len())
}

/// `hh:mm:ss(.f+)?`; the length read.
fn time_prefix(b: &[u8]) -> Option<usize> {
    let (h, m, s) = (
        digits(b.get(0..2)?)?,
        digits(b.get(3..5)?)?,
        digits(b.get(6..8)?)?,
    );
    if b[2] != b':' || b[5] != b':' || h > 23 || m > 59 || s > 60 {
        return None;
    }
    if b.get(8) == Some(&b'.') {
        let frac = b[9..].iter().take_while(|c| c.is_ascii_digit()).count();
        return (frac > 0).then_some(9 + frac);
    }
    Some(8)
}

fn is_time(b: &[u8]) -> bool {
    time_prefix(b) == Some(b.len())
}

/// `Z` or `(+|-)hh:mm` up to `14:00`.
fn is_zone(b: &[u8]) -> bool {
    if b == b"Z" {
        return true;
    }
    if b.len() != 6 || !matches!(b[0], b'+' | b'-') || b[3] != b':' {
        return false;
    }
    match (digits(&b[1..3]), digits(&b[4..6])) {
        (Some(h), Some(m)) => (h < 14 && m < 60) || (h == 14 && m == 0),
        _ => false,
    }
}

/// dateTime: a date of any precision, or a full date, a time and a zone.
/// instant: the latter only.
fn is_date_time(b: &[u8], instant: bool) -> bool {
    let Some(d) = date_prefix(b) else {
        return false;
    };
    if d == b.len() {
        return !instant;
    }
    if d != 10 || b[10] != b'T' {
        return false;
    }
    let rest = &b[11..];
    match time_prefix(rest) {
        Some(t) => is_zone(&rest[t..]),
        None => false,
    }
}

/// For the body of a JSON string that starts `b` (after its opening quote):
/// the length of the body when it is valid base64 with no escapes, so that
/// the closing quote is at that index; None when it is anything else (the
/// caller then takes the general path, which says what is wrong).
/// Eight bytes at a time: this runs over every attachment's payload.
pub fn base64_body(b: &[u8]) -> Option<usize> {
    const HIGH: u64 = splat(0x80);
    // For bytes below 0x80: the high bit of each byte in lo..=hi (no carry
    // crosses a byte, as every sum stays below 0x100).
    let in_range = |w: u64, lo: u8, hi: u8| {
        w.wrapping_add(splat(0x80 - lo)) & !w.wrapping_add(splat(0x7f - hi)) & HIGH
    };
    let (mut i, mut n) = (0usize, 0usize);
    loop {
        while let Some(c) = b.get(i..i + 8) {
            let w = u64::from_le_bytes(c.try_into().unwrap());
            if w & HIGH != 0 {
                break;
            }
            let ok = in_range(w | splat(0x20), b'a', b'z')  // letters, either case
                | in_range(w, b'/', b'9')                // '/' and digits
                | in_range(w, b'+', b'+')
                | in_range(w, b'=', b'=');
            if ok != HIGH {
                break;
            }
            i += 8;
            n += 8;
        }
        match b.get(i)? {
            b'"' => return (n > 0 && n % 4 == 0).then_some(i),
            c if c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=') => n += 1,
            // Whitespace is allowed between groups; written as escapes in JSON.
            _ => return None,
        }
        i += 1;
    }
}

/// `(\s*([0-9a-zA-Z\+/=]){4}\s*)+`
fn is_base64(b: &[u8]) -> bool {
    // 1: a base64 character, 0: whitespace, 2: anything else.
    const CLASS: [u8; 256] = {
        let mut t = [2u8; 256];
        let mut c = 0;
        while c < 256 {
            let b = c as u8;
            if b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=' {
                t[c] = 1;
            } else if b == b' ' || b == b'\t' || b == b'\r' || b == b'\n' {
                t[c] = 0;
            }
            c += 1;
        }
        t
    };
    let (mut n, mut bad) = (0usize, 0u8);
    for &c in b {
        let k = CLASS[c as usize];
        n += (k & 1) as usize;
        bad |= k & 2;
    }
    bad == 0 && n > 0 && n % 4 == 0
}

/// Narrative.div: an XHTML `<div>` element (the namespace is the reader's
/// business; the element name and that it is closed are checked).
fn is_xhtml_div(s: &str) -> bool {
    let t = s.trim_matches(|c: char| c.is_ascii_whitespace());
    t.starts_with("<div")
        && matches!(
            t.as_bytes().get(4),
            Some(b' ' | b'>' | b'/' | b'\t' | b'\r' | b'\n')
        )
        && (t.ends_with("</div>") || t.ends_with("/>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times() {
        for ok in ["2020", "2020-02", "2020-02-29", "0001-01-01"] {
            assert!(is_date(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "0000",
            "2019-02-29",
            "2020-13",
            "2020-1-01",
            "20200101",
            "2020-02-30",
            "",
        ] {
            assert!(!is_date(bad.as_bytes()), "{bad}");
        }
        for ok in [
            "2020",
            "2020-01-02T10:11:12Z",
            "2020-01-02T10:11:12.123+14:00",
        ] {
            assert!(is_date_time(ok.as_bytes(), false), "{ok}");
        }
        for bad in [
            "2020-01-02T10:11:12",
            "2020-01T10:11:12Z",
            "2020-01-02T24:00:00Z",
            "2020-01-02T10:11Z",
        ] {
            assert!(!is_date_time(bad.as_bytes(), false), "{bad}");
        }
        assert!(!is_date_time(b"2020-01-02", true));
        assert!(is_date_time(b"2020-01-02T00:00:00.5-05:00", true));
        assert!(is_time(b"23:59:60") && !is_time(b"23:59") && !is_time(b"12:00:00."));
    }

    #[test]
    fn identifiers() {
        assert!(is_code(b"a b") && !is_code(b" a") && !is_code(b"a ") && !is_code(b"a  b"));
        assert!(
            is_oid(b"urn:oid:1.2.840.10008") && !is_oid(b"urn:oid:3.1") && !is_oid(b"urn:oid:1.02")
        );
        assert!(is_uuid(b"urn:uuid:c757873d-ec9a-4326-a141-556f43239520"));
        assert!(!is_uuid(b"urn:uuid:C757873D-EC9A-4326-A141-556F43239520"));
        assert!(has_space_or_control(b"http://a.example/x y") && has_space_or_control(b"a\tb"));
        assert!(!has_space_or_control(
            b"http://a.example/path/\xc3\xa9/more"
        ));
        assert_eq!(base64_body(b"aGVsbG8gd29ybGQhIQ==\",x"), Some(20));
        assert_eq!(base64_body(b"aGVsbG8gd29ybGQhIQ=\",x"), None); // 19 characters
        assert_eq!(base64_body(b"aGVsbG8g\\nd29y\""), None); // an escape: the general path
        assert_eq!(base64_body(b"aGVs*G8g\""), None);
        assert_eq!(base64_body(b"aGVsbG8gd29ybGQh"), None); // no closing quote
        assert!(is_base64(b"aGk=\n") && !is_base64(b"aGk") && !is_base64(b"a*k="));
        assert!(is_xhtml_div(
            "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"
        ));
        assert!(!is_xhtml_div("<p>x</p>") && !is_xhtml_div("<divx></divx>"));
        assert_eq!(check_number(T_INTEGER, "1.0"), Err("is not an integer"));
        assert!(
            check_number(T_POSITIVEINT, "0").is_err() && check_number(T_UNSIGNEDINT, "0").is_ok()
        );
        assert!(check_number(T_INTEGER, "2147483648").is_err());
    }
}
