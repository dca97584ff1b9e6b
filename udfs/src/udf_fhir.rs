//! SQL: the FHIR helper functions analysts' rules call: reading elements by
//! path, references, codes, text-preserving edits, dates and a content hash.
//! Each function's documentation (signature, description, example) lives
//! next to its code below; `udfs/REFERENCE.md` is generated from it.
//!
//! The edit functions (`fhir_set`, `fhir_remove`, `fhir_trim`) return the
//! input column itself when no row changes, so a rule that rarely edits costs
//! a scan of the text, never a copy of it; over string views (what rules
//! read) they return views, and only the changed rows' texts are new.

use std::any::Any;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanBufferBuilder, Date32Builder, ListBuilder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, TimeUnit};
use chrono::{DateTime, NaiveDate};
use datafusion::common::{exec_err, Result};
use datafusion::logical_expr::{
    ColumnarValue, DocSection, Documentation, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature, TypeSignature, Volatility,
};
use sha2::{Digest, Sha256};

use crate::path::{self, FhirPath};
use crate::strings::{for_each_row, replace_views};

pub(crate) const SECTION: DocSection = DocSection {
    include: true,
    label: "FHIR functions",
    description: None,
};

type Eval = fn(&str, ScalarFunctionArgs) -> Result<ColumnarValue>;

/// One of this file's functions: its name, types, documentation and the
/// evaluation over a batch. Functions are the same when their names are.
#[derive(Debug)]
pub struct FhirFunction {
    name: &'static str,
    signature: Signature,
    returns: DataType,
    doc: Documentation,
    eval: Eval,
    /// An edit function: its result has the type of its first argument's
    /// string encoding (views stay views).
    edits: bool,
}

impl PartialEq for FhirFunction {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}
impl Eq for FhirFunction {}
impl std::hash::Hash for FhirFunction {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state)
    }
}

impl ScalarUDFImpl for FhirFunction {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn name(&self) -> &str {
        self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(match arg_types.first() {
            Some(DataType::Utf8View) if self.edits => DataType::Utf8View,
            _ => self.returns.clone(),
        })
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        (self.eval)(self.name, args)
    }
    fn documentation(&self) -> Option<&Documentation> {
        Some(&self.doc)
    }
}

fn strings(n: &[usize]) -> Signature {
    Signature::one_of(
        n.iter().map(|&n| TypeSignature::String(n)).collect(),
        Volatility::Immutable,
    )
}

fn doc(description: &str, syntax: &str, example: &str, args: &[(&str, &str)]) -> Documentation {
    let mut b = Documentation::builder(SECTION, description, syntax)
        .with_sql_example(format!("```sql\n{}\n```", example.trim()));
    for (name, text) in args {
        b = b.with_argument(*name, *text);
    }
    b.build()
}

const RESOURCE_ARG: (&str, &str) = ("resource", "A FHIR resource (or any JSON value) as text.");
const PATH_ARG: (&str, &str) = (
    "path",
    "A simple FHIRPath-like path: member names separated by dots (arrays are flattened), \
     an optional leading resource type, `[n]` to pick the n-th (0-based) value and \
     `descendants()` for every nested value. Choice elements are named as in JSON \
     (`valueQuantity`).",
);

/// Every function of this file.
pub fn functions() -> Vec<ScalarUDF> {
    let f = |name, signature, returns, doc, eval| {
        ScalarUDF::new_from_impl(FhirFunction {
            name,
            signature,
            returns,
            doc,
            eval,
            edits: matches!(name, "fhir_set" | "fhir_remove" | "fhir_trim"),
        })
    };
    let list = DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
    vec![
        f(
            "fhir_get",
            strings(&[2]),
            DataType::Utf8,
            doc(
                "The first value at `path`: strings decoded, numbers and booleans as written, objects and arrays as their JSON text. NULL when there is none.",
                "fhir_get(resource, path)",
                "SELECT fhir_get(resource, 'name.family') AS family,\n       fhir_get(resource, 'Observation.valueQuantity.value') AS value\nFROM records;\n-- {\"resourceType\":\"Patient\",\"name\":[{\"family\":\"Chalmers\"}]} → Chalmers",
                &[RESOURCE_ARG, PATH_ARG],
            ),
            eval_get,
        ),
        f(
            "fhir_get_all",
            strings(&[2]),
            list,
            doc(
                "Every value at `path`, in document order, as a list of text (empty when there is none).",
                "fhir_get_all(resource, path)",
                "SELECT id, unnest(fhir_get_all(resource, 'descendants().reference')) AS reference\nFROM records;\n-- one row per reference anywhere in the resource",
                &[RESOURCE_ARG, PATH_ARG],
            ),
            eval_get_all,
        ),
        f(
            "fhir_ref_type",
            strings(&[1]),
            DataType::Utf8,
            doc(
                "The resource type of a reference (`Patient/123`, `https://server/fhir/Patient/123/_history/2`, or a Reference object's JSON). NULL for contained (`#…`) and `urn:` references and for text that is not a reference to an R4 resource type.",
                "fhir_ref_type(reference)",
                "SELECT fhir_ref_type('Patient/123');                       -- Patient\nSELECT fhir_ref_type(fhir_get(resource, 'subject')) FROM records;",
                &[("reference", "A reference string, or a Reference object as JSON text.")],
            ),
            eval_ref_type,
        ),
        f(
            "fhir_ref_id",
            strings(&[1]),
            DataType::Utf8,
            doc(
                "The id of a reference, under the same rules as `fhir_ref_type`.",
                "fhir_ref_id(reference)",
                "SELECT fhir_ref_id('https://h/fhir/Patient/123/_history/2'); -- 123",
                &[("reference", "A reference string, or a Reference object as JSON text.")],
            ),
            eval_ref_id,
        ),
        f(
            "fhir_code",
            strings(&[3]),
            DataType::Utf8,
            doc(
                "The `code` of the first Coding with `system` among the values at `path` (CodeableConcepts, whose codings are read, or Codings). NULL when there is none.",
                "fhir_code(resource, path, system)",
                "SELECT fhir_code(resource, 'code', 'http://loinc.org') AS loinc FROM records;\n-- {\"code\":{\"coding\":[{\"system\":\"http://loinc.org\",\"code\":\"8867-4\"}]}} → 8867-4",
                &[
                    RESOURCE_ARG,
                    PATH_ARG,
                    ("system", "The code system URI to look for."),
                ],
            ),
            eval_code,
        ),
        f(
            "fhir_set",
            strings(&[3]),
            DataType::Utf8,
            doc(
                "The resource with the element at `path` set to `value` (JSON text) in every object the path's parent selects, adding the member where it is missing. Only the changed element's bytes differ from the input. An error when `value` is not JSON.",
                "fhir_set(resource, path, value)",
                "SELECT * REPLACE (fhir_set(resource, 'status', '\"final\"') AS resource) FROM records;\n-- {\"status\":\"preliminary\",\"valueString\":\"1.50\"} → {\"status\":\"final\",\"valueString\":\"1.50\"}",
                &[
                    RESOURCE_ARG,
                    PATH_ARG,
                    ("value", "The new value as JSON text: `'\"text\"'`, `'1.50'`, `'{\"a\":1}'`."),
                ],
            ),
            eval_set,
        ),
        f(
            "fhir_remove",
            strings(&[2]),
            DataType::Utf8,
            doc(
                "The resource without the elements at `path` (a whole member, or one array item with `[n]`), each with the comma that separated it. Every other byte stays.",
                "fhir_remove(resource, path)",
                "SELECT * REPLACE (fhir_remove(resource, 'text') AS resource) FROM records;\n-- drops the narrative",
                &[RESOURCE_ARG, PATH_ARG],
            ),
            eval_remove,
        ),
        f(
            "fhir_trim",
            strings(&[2, 3, 4, 5, 6, 7, 8, 9]),
            DataType::Utf8,
            doc(
                "The resource with leading and trailing whitespace removed from every string at any of the paths (up to 8, matched in one pass). Strings without such whitespace, and every other byte, stay.",
                "fhir_trim(resource, path [, path ...])",
                "SELECT * REPLACE (fhir_trim(resource, 'identifier.value', 'descendants().identifier.value') AS resource) FROM records;\n-- {\"identifier\":[{\"value\":\" 42 \"}]} → {\"identifier\":[{\"value\":\"42\"}]}",
                &[RESOURCE_ARG, PATH_ARG],
            ),
            eval_trim,
        ),
        f(
            "fhir_instant",
            strings(&[1]),
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            doc(
                "A FHIR `instant`, `dateTime` or `date` as a UTC timestamp: offsets applied, partial dates (`2024`, `2024-03`) at the start of their period. NULL for text that is not one, including a time without a time zone.",
                "fhir_instant(text)",
                "SELECT fhir_instant('2024-03-01T10:00:00+02:00');  -- 2024-03-01T08:00:00Z\nSELECT * FROM records WHERE fhir_instant(fhir_get(resource, 'effectiveDateTime')) < now();",
                &[("text", "The date or time as FHIR writes it.")],
            ),
            eval_instant,
        ),
        f(
            "fhir_date",
            strings(&[1]),
            DataType::Date32,
            doc(
                "The calendar date of a FHIR `date`, `dateTime` or `instant` as written (no time-zone shift), partial dates at the first day of their period. NULL for text that is not one.",
                "fhir_date(text)",
                "SELECT fhir_date('1974-12');                      -- 1974-12-01\nSELECT fhir_date(fhir_get(resource, 'birthDate')) FROM records;",
                &[("text", "The date or time as FHIR writes it.")],
            ),
            eval_date,
        ),
        f(
            "fhir_hash",
            strings(&[1]),
            DataType::Utf8,
            doc(
                "A content hash of the resource: the hex SHA-256 of its canonical JSON (members sorted, no whitespace, strings re-encoded, numbers as written), leaving out `meta.versionId` and `meta.lastUpdated`. Two copies of a resource that differ only in formatting or server version hash equal. NULL when the text is not JSON.",
                "fhir_hash(resource)",
                "SELECT fhir_hash(resource), count(*) FROM records GROUP BY 1 HAVING count(*) > 1;",
                &[RESOURCE_ARG],
            ),
            eval_hash,
        ),
    ]
}

/// A parsed path, reparsed only when a row's path text differs from the last.
#[derive(Default)]
struct PathCache {
    text: String,
    path: Option<FhirPath>,
}

impl PathCache {
    fn get(&mut self, name: &str, text: &str) -> Result<&FhirPath> {
        if self.path.is_none() || self.text != text {
            match text.parse::<FhirPath>() {
                Ok(p) => {
                    self.text = text.to_string();
                    self.path = Some(p);
                }
                Err(e) => return exec_err!("{name}: {e}"),
            }
        }
        Ok(self.path.as_ref().expect("set above"))
    }
}

/// Row by row into a Utf8 column; the first error stops the batch.
fn map_text<F>(name: &str, args: &ScalarFunctionArgs, mut f: F) -> Result<ColumnarValue>
where
    F: for<'r> FnMut(&[Option<&'r str>]) -> Result<Option<Cow<'r, str>>>,
{
    let mut out = StringBuilder::with_capacity(args.number_rows, 0);
    let mut err = None;
    for_each_row(name, args, |row| {
        if err.is_some() {
            return out.append_null();
        }
        match f(row) {
            Ok(v) => out.append_option(v),
            Err(e) => {
                err = Some(e);
                out.append_null()
            }
        }
    })?;
    match err {
        Some(e) => Err(e),
        None => Ok(ColumnarValue::Array(Arc::new(out.finish()))),
    }
}

/// For the edit functions: `f` returns the row's new text, or None when the
/// row is unchanged. With no change at all, the input column is returned;
/// over string views, only the changed rows' texts are new.
fn map_edits<F>(name: &str, args: ScalarFunctionArgs, mut f: F) -> Result<ColumnarValue>
where
    F: for<'r> FnMut(&'r str, &[Option<&'r str>]) -> Result<Option<String>>,
{
    let mut edits: Vec<(usize, String)> = Vec::new();
    // Rows whose arguments are all non-NULL (the others give NULL).
    let mut valid = BooleanBufferBuilder::new(args.number_rows);
    let mut err = None;
    let mut i = 0;
    for_each_row(name, &args, |row| {
        let all_set = row.iter().all(Option::is_some);
        valid.append(all_set);
        if let (None, true) = (&err, all_set) {
            match f(row[0].expect("checked"), row) {
                Ok(Some(new)) => edits.push((i, new)),
                Ok(None) => {}
                Err(e) => err = Some(e),
            }
        }
        i += 1;
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    let valid = NullBuffer::new(valid.finish());
    let input = &args.args[0];
    if let ColumnarValue::Array(a) = input {
        let extra_nulls = valid.null_count() > a.null_count();
        match a.data_type() {
            DataType::Utf8 | DataType::Utf8View if edits.is_empty() && !extra_nulls => {
                return Ok(ColumnarValue::Array(a.clone()));
            }
            DataType::Utf8View => {
                let new = edits.iter().map(|(i, text)| (*i, text.as_str()));
                let out = replace_views(a.as_string_view(), new, Some(&valid));
                return Ok(ColumnarValue::Array(Arc::new(out)));
            }
            _ => {}
        }
    }
    // The column again, with the changed rows' new text.
    let mut next = edits.into_iter().peekable();
    let mut i = 0;
    let out = map_text(name, &args, |row| {
        let here = i;
        i += 1;
        if row.iter().any(Option::is_none) {
            return Ok(None);
        }
        Ok(Some(match next.next_if(|(at, _)| *at == here) {
            Some((_, new)) => Cow::Owned(new),
            None => Cow::Borrowed(row[0].expect("checked")),
        }))
    })?;
    // A scalar view argument gives a view column, as `return_type` says.
    match (input.data_type(), out) {
        (DataType::Utf8View, ColumnarValue::Array(a)) => Ok(ColumnarValue::Array(
            arrow::compute::cast(&a, &DataType::Utf8View)?,
        )),
        (_, out) => Ok(out),
    }
}

fn eval_get(name: &str, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
    let mut cache = PathCache::default();
    map_text(name, &args, |row| {
        let (Some(resource), Some(p)) = (row[0], row[1]) else {
            return Ok(None);
        };
        let path = cache.get(name, p)?;
        Ok(path::select(resource, path)
            .into_iter()
            .find_map(|s| path::value_text(resource, s)))
    })
}

fn eval_get_all(name: &str, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
    let mut cache = PathCache::default();
    let mut out = ListBuilder::new(StringBuilder::new());
    let mut err = None;
    for_each_row(name, &args, |row| {
        let (Some(resource), Some(p), None) = (row[0], row[1], &err) else {
            return out.append_null();
        };
        match cache.get(name, p) {
            Ok(path) => {
                for s in path::select(resource, path) {
                    out.values().append_option(path::value_text(resource, s));
                }
                out.append(true);
            }
            Err(e) => {
                err = Some(e);
                out.append_null();
            }
        }
    })?;
    match err {
        Some(e) => Err(e),
        None => Ok(ColumnarValue::Array(Arc::new(out.finish()) as ArrayRef)),
    }
}

/// A reference string, or the `reference` of a Reference object's JSON.
fn reference_text(arg: &str) -> Option<Cow<'_, str>> {
    static REFERENCE: std::sync::LazyLock<FhirPath> =
        std::sync::LazyLock::new(|| "reference".parse().expect("a valid path"));
    if arg.trim_start().starts_with('{') {
        let span = path::select(arg, &REFERENCE).into_iter().next()?;
        path::value_text(arg, span)
    } else {
        Some(arg.into())
    }
}

fn ref_part(name: &str, args: ScalarFunctionArgs, id: bool) -> Result<ColumnarValue> {
    map_text(name, &args, |row| {
        let Some(r) = row[0].and_then(reference_text) else {
            return Ok(None);
        };
        Ok(path::parse_reference(&r).map(|(t, i)| Cow::Owned(if id { i } else { t }.to_string())))
    })
}

fn eval_ref_type(name: &str, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
    ref_part(name, args, false)
}

fn eval_ref_id(name: &str, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
    ref_part(name, args, true)
}

fn eval_code(name: &str, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
    let mut cache = PathCache::default();
    map_text(name, &args, |row| {
        let (Some(resource), Some(p), Some(system)) = (row[0], row[1], row[2]) else {
            return Ok(None);
        };
        let path = cache.get(name, p)?;
        Ok(path::code_by_system(resource, path, system))
    })
}

fn eval_set(name: &str, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
    let mut cache = PathCache::default();
    map_edits(name, args, |resource, row| {
        let path = cache.get(name, row[1].expect("checked"))?;
        match path::set(resource, path, row[2].expect("checked")) {
            Ok(v) => Ok(v),
            Err(e) => exec_err!("{name}: {e}"),
        }
    })
}

fn eval_remove(name: &str, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
    let mut cache = PathCache::default();
    map_edits(name, args, |resource, row| {
        let path = cache.get(name, row[1].expect("checked"))?;
        Ok(path::remove(resource, path))
    })
}

fn eval_trim(name: &str, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
    // The paths, parsed again only when a row's path texts differ.
    let mut texts: Vec<String> = Vec::new();
    let mut paths: Vec<FhirPath> = Vec::new();
    map_edits(name, args, |resource, row| {
        let row_paths = row[1..].iter().map(|p| p.expect("checked"));
        if !row_paths.clone().eq(texts.iter().map(String::as_str)) {
            texts = row_paths.map(str::to_string).collect();
            paths = texts
                .iter()
                .map(|t| t.parse::<FhirPath>())
                .collect::<std::result::Result<_, _>>()
                .or_else(|e| exec_err!("{name}: {e}"))?;
        }
        Ok(path::trim(resource, &paths))
    })
}

/// The date part of a FHIR date/dateTime/instant: (year, month, day), with
/// month and day 1 when the text leaves them out.
fn date_part(text: &str) -> Option<NaiveDate> {
    let t = text.trim();
    let date = t.split('T').next()?;
    let mut parts = date.split('-');
    let y = parts.next().filter(|y| y.len() == 4)?.parse().ok()?;
    let m = match parts.next() {
        Some(m) if m.len() == 2 => m.parse().ok()?,
        Some(_) => return None,
        None => 1,
    };
    let d = match parts.next() {
        Some(d) if d.len() == 2 => d.parse().ok()?,
        Some(_) => return None,
        None => 1,
    };
    if parts.next().is_some() || (date.len() < t.len() && date.len() != 10) {
        return None;
    }
    NaiveDate::from_ymd_opt(y, m, d)
}

/// Microseconds since the epoch, in UTC.
pub fn parse_instant(text: &str) -> Option<i64> {
    let t = text.trim();
    if t.contains('T') {
        return DateTime::parse_from_rfc3339(t)
            .ok()
            .map(|d| d.timestamp_micros());
    }
    Some(
        date_part(t)?
            .and_hms_opt(0, 0, 0)?
            .and_utc()
            .timestamp_micros(),
    )
}

fn eval_instant(name: &str, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
    let mut out = TimestampMicrosecondBuilder::with_capacity(args.number_rows).with_timezone("UTC");
    for_each_row(name, &args, |row| {
        out.append_option(row[0].and_then(parse_instant))
    })?;
    Ok(ColumnarValue::Array(Arc::new(out.finish())))
}

fn eval_date(name: &str, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("a date");
    let mut out = Date32Builder::with_capacity(args.number_rows);
    for_each_row(name, &args, |row| {
        let valid_time = |t: &str| !t.contains('T') || parse_instant(t).is_some();
        let day = row[0]
            .filter(|t| valid_time(t))
            .and_then(date_part)
            .map(|d| (d - epoch).num_days() as i32);
        out.append_option(day)
    })?;
    Ok(ColumnarValue::Array(Arc::new(out.finish())))
}

fn eval_hash(name: &str, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
    map_text(name, &args, |row| {
        let Some(canonical) = row[0].and_then(path::canonical_content) else {
            return Ok(None);
        };
        let digest = Sha256::digest(canonical.as_bytes());
        let mut hex = String::with_capacity(64);
        for b in digest {
            hex.push_str(&format!("{b:02x}"));
        }
        Ok(Some(hex.into()))
    })
}

/// `rule_param(name, default)`: a value the run's configuration gives the
/// rules (`[curate.rule_params]`), or `default` when it gives none.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct RuleParam {
    signature: Signature,
    values: BTreeMap<String, String>,
    doc: Documentation,
}

impl RuleParam {
    pub fn new(values: BTreeMap<String, String>) -> Self {
        RuleParam {
            signature: strings(&[2]),
            values,
            doc: doc(
                "A setting of the run for the rules: the value of `name` under `[curate.rule_params]` in the config file (or `--rule-param name=value`), else `default`. Constant for a run, so a rule's disabled branch costs nothing.",
                "rule_param(name, default)",
                "SELECT *, CASE WHEN rule_param('missing_patient', 'keep') = 'reject' THEN '…' END AS reject_reason\nFROM records;",
                &[
                    ("name", "The setting's name."),
                    ("default", "Its value when the configuration does not set it."),
                ],
            ),
        }
    }
}

impl ScalarUDFImpl for RuleParam {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn name(&self) -> &str {
        "rule_param"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        map_text("rule_param", &args, |row| {
            Ok(match row[0] {
                Some(n) => match self.values.get(n) {
                    Some(v) => Some(Cow::Owned(v.clone())),
                    None => row[1].map(Cow::Borrowed),
                },
                None => None,
            })
        })
    }
    fn documentation(&self) -> Option<&Documentation> {
        Some(&self.doc)
    }
}
