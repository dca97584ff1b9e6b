//! The one walk ([`Validator::validate_scan`]) against the scanner
//! ([`scan_resource`]): the same spans or the same error on every line, and
//! the findings of [`Validator::validate`]. (A file of its own: the test of
//! `CODES` reads every upper-case literal of `validate.rs` as a code.)
use super::*;

/// The one walk's scan is the scanner's, span for span or error for
/// error, and its findings are `validate`'s.
#[track_caller]
fn same(v: &Validator, text: &str, expected: Option<&str>) {
    let (scan, findings) = v.validate_scan(text, expected);
    assert_eq!(scan, scan_resource(text, v.max_depth), "{text}");
    assert_eq!(findings, v.validate(text, expected), "{text}");
}

/// Lines that take every road of the walk where it records the scan:
/// escaped names at the root, in `meta` and in a security entry,
/// duplicates, members of the wrong kind, nested metas at every place,
/// unknown types, roots that are no object, whitespace, broken tails.
const EDGES: &[&str] = &[
    r#"{"resourceType":"Patient","id":"p","meta":{"versionId":"1","lastUpdated":"2024-01-01T00:00:00Z","security":[{"system":"s","code":"c"},{"code":"x"}]}}"#,
    r#"{"resourceType":"Patient","id":"p","m\u0065ta":{"security":[{"system":"s","code":"c"}]}}"#,
    r#"{"resourceType":"Patient","id":"p","m\u0065ta":7,"meta":{}}"#,
    r#"{"resourceType":"Patient","id":"p","meta":{"s\u0065curity":[{"system":"s","code":"c"}],"versionId":"1"}}"#,
    r#"{"resourceType":"Patient","id":"p","meta":{"versionId":"1","v\u0065rsionId":"2"}}"#,
    r#"{"resourceType":"Patient","id":"p","meta":{"security":[{"syst\u0065m":"s","c\u006fde":"c"},null,1,"x\u0041",{"meta":{}}]}}"#,
    r#"{"r\u0065sourceType":"Patient","id":"p"}"#,
    r#"{"resourceType":"Patient","\u0069d":"p"}"#,
    r#"{"resourceType":"Patient","id":"a","id":"b"}"#,
    r#"{"resourceType":"Patient","id":"a","meta":{},"meta":{"versionId":"2"}}"#,
    r#"{"resourceType":"Patient","id":"a","meta":{"versionId":"1"},"meta":7}"#,
    r#"{"resourceType":"Patient","id":"a","meta":[{"meta":1}]}"#,
    r#"{"resourceType":"Patient","id":"a","meta":{"security":{"meta":1}}}"#,
    r#"{"resourceType":"Patient","id":"a","meta":{"security":[{"code":"1"}],"security":{}}}"#,
    r#"{"resourceType":"Patient","id":"a","meta":{"security":[{"code":"1"}],"security":[]}}"#,
    r#"{"resourceType":"Patient","id":"a","meta":{"security":[{"code":"1","code":2,"system":[]}]}}"#,
    r#"{"resourceType":"Patient","id":"a","meta":{"security":[],"lastUpdated":7,"versionId":{"meta":1}}}"#,
    r#"{"resourceType":"Pasient","id":"a","meta":{"security":[{"code":"1"}]},"contained":[{"meta":{}}]}"#,
    r#"{"id":"a","meta":{"security":[{"code":"1"}]}}"#,
    r#"{"resourceType":7,"id":"a"}"#,
    r#"{"resourceType":"Patient","resourceType":{"meta":1},"id":"a"}"#,
    r#"{"id":"a","resourceType":"Patient"}"#,
    r#"[{"meta":1}]"#,
    r#""meta""#,
    r#"{}"#,
    r#"{"resourceType":"Bundle","id":"b","entry":[{"resource":{"resourceType":"Patient","id":"p","meta":{"security":[{"system":"s","code":"c"}]}}},{"resource":{"resourceType":"Nope","meta":{}}}]}"#,
    r#"{"resourceType":"Patient","id":"a","contained":[{"resourceType":"Patient","id":"c","meta":{"tag":[{"meta":2}]}}],"text":{"meta":3},"_id":{"meta":4}}"#,
    r#"{"resourceType":"Patient","id":"a","meta":{"tag":[{"meta":5}],"security":[{"system":"s","code":"c","meta":6,"extension":[{"meta":7}]}],"meta":8}}"#,
    r#"{"resourceType":"Patient","id":"a","contained":[{"resourceType":"Nope","m\u0065ta":1,"meta":2}]}"#,
    r#"{"resourceType":"Patient","id":"a","contained":[{"resourceType":"Patient","id":"c","m\u0065ta":{}}],"text":{"m\u0065ta":1}}"#,
    r#"{"resourceType":"Patient","id":"a"} x"#,
    r#"[1] x"#,
    " \t{\"resourceType\":\"Patient\",\"id\":\"a\"}\r\n",
    r#"{ "resourceType" : "Patient" , "id" : "a" , "meta" : { "versionId" : "1" , "security" : [ { "code" : "c" } , null ] } , "active" : true }"#,
    r#"{"resourceType":"Patient","id":"a","meta":{"security":[{"system":"s","code":"c"}]},"extension":[[[[[[1]]]]]]}"#,
    r#"{"resourceType":"Patient","id":"a","meta":{"security":[[[[[[1]]]]]]}}"#,
    r#"{"resourceType":"Patient","id":"a","meta":{"security":[{"system":"s","code":"c"}]"#,
    r#"{"resourceType":"Patient","id":"a","meta":{"security":[{"system":"s","code":"c\u12"}]}}"#,
    r#"{"resourceType":"Patient","id":"a\ud800","meta":{"versionId":"\ud83d\ude00"}}"#,
];

#[test]
fn the_one_walk_scans_as_the_scanner() {
    for depth in [3, 4, 5, 6, 128] {
        let v = Validator::new(Level::Strict, depth);
        for text in EDGES {
            same(&v, text, Some("Patient"));
            same(&v, text, None);
        }
    }
}

/// Every cut and many one-byte edits of real lines: errors at every
/// place the walk can stop, with the same reason and offset.
#[test]
fn the_one_walk_stops_where_the_scanner_stops() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/synthea-10");
    let mut lines: Vec<String> = EDGES.iter().map(|s| s.to_string()).collect();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
        .collect();
    paths.sort();
    for p in paths {
        let text = std::fs::read_to_string(p).unwrap();
        // The shortest lines of each file, to keep the test quick.
        let mut ls: Vec<&str> = text.lines().collect();
        ls.sort_by_key(|l| l.len());
        lines.extend(ls.iter().take(2).map(|l| l.to_string()));
    }
    let v = Validator::new(Level::Strict, 128);
    let shallow = Validator::new(Level::Strict, 4);
    for line in &lines {
        for cut in (0..line.len()).filter(|&i| line.is_char_boundary(i)) {
            same(&v, &line[..cut], None);
        }
        let b = line.as_bytes();
        for at in (0..b.len()).filter(|&i| b[i].is_ascii()) {
            for c in [
                b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b' ', b'0', b'n', 0x01,
            ] {
                let mut edited = b.to_vec();
                edited[at] = c;
                let Ok(edited) = std::str::from_utf8(&edited) else {
                    continue;
                };
                same(&v, edited, None);
            }
        }
        same(&shallow, line, None);
    }
}

/// The whole sample and every R4 example: the scan and the findings.
#[test]
fn the_one_walk_scans_real_data_as_the_scanner() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let v = Validator::new(Level::Strict, 128);
    let mut n = 0;
    for dir in ["../tests/data/synthea-10", "../../shared/data/r4-examples"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.extension().is_none_or(|e| e != "ndjson") {
                continue;
            }
            for line in std::fs::read_to_string(&p).unwrap().lines() {
                same(&v, line, None);
                n += 1;
            }
        }
    }
    assert!(n >= 7_000, "{n} lines");
}
