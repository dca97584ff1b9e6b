//! A ViewDefinition's JSON, read and checked into a [`View`].
//!
//! The text is read with the same span tree FHIRPath walks
//! ([`fhirflow_fhir::fhirpath::Doc`]), so every error knows the byte offset
//! it is about: the member that is wrong, or the place inside a FHIRPath
//! expression. [`ViewError::line_col`] turns it into a line and column.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use fhirflow_fhir::fhirpath::{self, Doc, Expr, NodeId, Value};
use fhirflow_fhir::json::Kind as JsonKind;
use fhirflow_fhir::model_types::{self, TypeId};

use crate::check::{self, ColumnKind};

/// What is wrong with a view, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewError {
    /// Byte offset in the view's text.
    pub offset: usize,
    /// Where in the view, as a path (`select[0].column[1].path`).
    pub at: String,
    pub message: String,
}

impl ViewError {
    /// 1-based line and column of the offset in `text`.
    pub fn line_col(&self, text: &str) -> (usize, usize) {
        let before = &text[..self.offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }
}

impl fmt::Display for ViewError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.at.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.at, self.message)
        }
    }
}

impl std::error::Error for ViewError {}

/// A FHIRPath expression of the view, parsed.
#[derive(Debug, Clone)]
pub struct Path {
    pub text: String,
    pub expr: Expr,
    /// Byte offset of the expression's first character in the view's text.
    pub offset: usize,
    /// Where in the view (`select[0].forEach`).
    pub at: String,
}

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub path: Path,
    /// The `type` the view gives, if any.
    pub declared: Option<String>,
    /// `ansi/type` from the column's tags.
    pub ansi: Option<String>,
    pub collection: bool,
    /// How values are written: from `type`, or inferred from the model.
    pub kind: ColumnKind,
    /// Index of the output column.
    pub out: usize,
}

#[derive(Debug, Clone)]
pub enum Iteration {
    None,
    ForEach(Path),
    ForEachOrNull(Path),
    Repeat(Vec<Path>),
}

#[derive(Debug, Clone)]
pub struct Select {
    pub columns: Vec<Column>,
    pub selects: Vec<Select>,
    pub iteration: Iteration,
    pub union_all: Vec<Select>,
}

/// One output column of the view, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputColumn {
    pub name: String,
    pub kind: ColumnKind,
    /// The FHIR type of its values: the `type` given, or the one the model
    /// infers (None when it cannot say). Picks the SQL type.
    pub fhir_type: Option<String>,
    pub collection: bool,
    pub ansi: Option<String>,
    pub description: Option<String>,
}

/// A checked ViewDefinition.
#[derive(Debug, Clone)]
pub struct View {
    pub name: Option<String>,
    /// The resource type, as the model spells it.
    pub resource: &'static str,
    pub resource_type: TypeId,
    pub constants: HashMap<String, Value<'static>>,
    pub wheres: Vec<Path>,
    pub select: Select,
    pub columns: Vec<OutputColumn>,
    /// What the model does not know (an element the type lacks): the view
    /// runs, and those paths give nothing. `fhirflow view check` reports them.
    pub warnings: Vec<ViewError>,
}

struct Reader<'d, 'a> {
    doc: &'d Doc<'a>,
    constants: HashMap<String, Value<'static>>,
    columns: Vec<OutputColumn>,
    /// Ranges of `columns` a later unionAll branch may name again.
    shared: Vec<std::ops::Range<usize>>,
}

fn err<T>(offset: usize, at: &str, message: impl Into<String>) -> Result<T, ViewError> {
    Err(ViewError {
        offset,
        at: at.to_string(),
        message: message.into(),
    })
}

impl View {
    /// Reads and checks a ViewDefinition from its JSON text.
    pub fn parse(text: &str) -> Result<View, ViewError> {
        let doc = Doc::parse(text).map_err(|e| ViewError {
            offset: match e {
                fhirflow_fhir::json::JsonError::Syntax { offset, .. }
                | fhirflow_fhir::json::JsonError::Truncated { offset }
                | fhirflow_fhir::json::JsonError::TooDeep { offset, .. } => offset,
            },
            at: String::new(),
            message: format!("not JSON: {e}"),
        })?;
        let root = doc.root();
        if doc.kind(root) != JsonKind::Object {
            return err(0, "", "a ViewDefinition is a JSON object");
        }
        let mut r = Reader {
            doc: &doc,
            constants: HashMap::new(),
            columns: Vec::new(),
            shared: Vec::new(),
        };
        if let Some(rt) = doc.member(root, "resourceType") {
            if doc.str(rt).as_deref() != Some("ViewDefinition") {
                return err(doc.offset(rt), "resourceType", "must be \"ViewDefinition\"");
            }
        }
        let name = r.opt_str(root, "name", "name")?;
        let Some(res) = doc.member(root, "resource") else {
            return err(
                0,
                "",
                "'resource' is missing: a view needs the resource type it reads",
            );
        };
        let res_name = r.string(res, "resource")?;
        let Some(resource_type) = model_types::resource_type_id(res_name.as_bytes()) else {
            return err(
                doc.offset(res),
                "resource",
                format!("'{res_name}' is not a FHIR R4 resource type"),
            );
        };
        let resource = fhirflow_fhir::model::TYPES[resource_type as usize].name;
        if let Some(cs) = doc.member(root, "constant") {
            for (i, c) in r.array(cs, "constant")?.into_iter().enumerate() {
                r.constant(c, &format!("constant[{i}]"))?;
            }
        }
        let mut wheres = Vec::new();
        if let Some(ws) = doc.member(root, "where") {
            for (i, w) in r.array(ws, "where")?.into_iter().enumerate() {
                let at = format!("where[{i}]");
                let Some(p) = doc.member(w, "path") else {
                    return err(doc.offset(w), &at, "'path' is missing");
                };
                wheres.push(r.path(p, &format!("{at}.path"))?);
            }
        }
        let Some(sel) = doc.member(root, "select") else {
            return err(
                0,
                "",
                "'select' is missing: a view needs at least one column",
            );
        };
        let selects = r.array(sel, "select")?;
        if selects.is_empty() {
            return err(
                doc.offset(sel),
                "select",
                "a view needs at least one select",
            );
        }
        let mut top = Vec::new();
        for (i, s) in selects.into_iter().enumerate() {
            top.push(r.select(s, &format!("select[{i}]"))?);
        }
        let mut view = View {
            name,
            resource,
            resource_type,
            constants: r.constants,
            wheres,
            select: Select {
                columns: Vec::new(),
                selects: top,
                iteration: Iteration::None,
                union_all: Vec::new(),
            },
            columns: r.columns,
            warnings: Vec::new(),
        };
        check::check_view(&mut view)?;
        Ok(view)
    }

    /// The names of the output columns, in order.
    pub fn column_names(&self) -> Vec<&str> {
        self.columns.iter().map(|c| c.name.as_str()).collect()
    }
}

impl Reader<'_, '_> {
    fn string(&self, n: NodeId, at: &str) -> Result<String, ViewError> {
        match (self.doc.kind(n), self.doc.str(n)) {
            (JsonKind::String, Some(s)) => Ok(s.into_owned()),
            _ => err(self.doc.offset(n), at, "must be a string"),
        }
    }

    fn opt_str(&self, obj: NodeId, key: &str, at: &str) -> Result<Option<String>, ViewError> {
        self.doc
            .member(obj, key)
            .map(|n| self.string(n, at))
            .transpose()
    }

    fn array(&self, n: NodeId, at: &str) -> Result<Vec<NodeId>, ViewError> {
        if self.doc.kind(n) != JsonKind::Array {
            return err(self.doc.offset(n), at, "must be an array");
        }
        let items: Vec<NodeId> = self.doc.children(n).collect();
        for (i, item) in items.iter().enumerate() {
            if self.doc.kind(*item) != JsonKind::Object {
                return err(
                    self.doc.offset(*item),
                    &format!("{at}[{i}]"),
                    "must be an object",
                );
            }
        }
        Ok(items)
    }

    fn path(&self, n: NodeId, at: &str) -> Result<Path, ViewError> {
        let text = self.string(n, at)?;
        // The expression starts after the opening quote (escapes inside a
        // path are rare; offsets past one are approximate).
        let base = self.doc.offset(n) + 1;
        let expr = fhirpath::parse(&text).map_err(|e| ViewError {
            offset: base + e.offset,
            at: at.to_string(),
            message: format!(
                "FHIRPath: {} at character {} of \"{text}\"",
                e.message,
                e.offset + 1
            ),
        })?;
        Ok(Path {
            text,
            expr,
            offset: base,
            at: at.to_string(),
        })
    }

    fn constant(&mut self, c: NodeId, at: &str) -> Result<(), ViewError> {
        let doc = self.doc;
        let Some(name_node) = doc.member(c, "name") else {
            return err(doc.offset(c), at, "a constant needs a 'name'");
        };
        let name = self.string(name_node, &format!("{at}.name"))?;
        let values: Vec<NodeId> = doc
            .children(c)
            .filter(|m| {
                doc.key(*m)
                    .is_some_and(|k| k.starts_with("value") && k.len() > 5)
            })
            .collect();
        let [v] = values[..] else {
            return err(
                doc.offset(c),
                at,
                format!("constant '{name}' needs exactly one value[x]"),
            );
        };
        let key = doc.key(v).unwrap_or_default();
        let ty = &key[5..];
        let at_v = format!("{at}.{key}");
        let owned = |s: Cow<'_, str>| Cow::Owned(s.into_owned());
        let text = doc.text(v);
        let value: Value<'static> = match (ty, doc.kind(v)) {
            ("Boolean", JsonKind::Bool) => Value::Bool(text == "true"),
            ("Integer" | "PositiveInt" | "UnsignedInt" | "Integer64", JsonKind::Number) => {
                match text.parse() {
                    Ok(i) => Value::Int(i),
                    Err(_) => return err(doc.offset(v), &at_v, "must be an integer"),
                }
            }
            ("Decimal", JsonKind::Number) => match text.parse() {
                Ok(d) => Value::Dec(d, fhirpath::eval::scale_of(text)),
                Err(_) => return err(doc.offset(v), &at_v, "must be a decimal"),
            },
            ("Date", JsonKind::String) => Value::Date(owned(doc.str(v).unwrap_or_default())),
            ("DateTime" | "Instant", JsonKind::String) => {
                Value::DateTime(owned(doc.str(v).unwrap_or_default()))
            }
            ("Time", JsonKind::String) => Value::Time(owned(doc.str(v).unwrap_or_default())),
            (
                "String" | "Code" | "Id" | "Uri" | "Url" | "Canonical" | "Oid" | "Uuid"
                | "Markdown" | "Base64Binary",
                JsonKind::String,
            ) => Value::Str(owned(doc.str(v).unwrap_or_default())),
            _ => {
                return err(
                    doc.offset(v),
                    &at_v,
                    format!(
                        "a constant of type value{ty} with a JSON {} is not supported",
                        doc.kind(v).name()
                    ),
                )
            }
        };
        if self.constants.insert(name.clone(), value).is_some() {
            return err(
                doc.offset(c),
                at,
                format!("constant '{name}' is defined twice"),
            );
        }
        Ok(())
    }

    fn select(&mut self, s: NodeId, at: &str) -> Result<Select, ViewError> {
        let doc = self.doc;
        for m in doc.children(s) {
            let key = doc.key(m).unwrap_or_default();
            if !matches!(
                key.as_ref(),
                "column"
                    | "select"
                    | "forEach"
                    | "forEachOrNull"
                    | "repeat"
                    | "unionAll"
                    | "description"
            ) {
                return err(
                    doc.offset(m),
                    at,
                    format!("unknown member '{key}' in a select"),
                );
            }
        }
        let mut iterations = Vec::new();
        if let Some(p) = doc.member(s, "forEach") {
            iterations.push(Iteration::ForEach(self.path(p, &format!("{at}.forEach"))?));
        }
        if let Some(p) = doc.member(s, "forEachOrNull") {
            iterations.push(Iteration::ForEachOrNull(
                self.path(p, &format!("{at}.forEachOrNull"))?,
            ));
        }
        if let Some(r) = doc.member(s, "repeat") {
            let rat = format!("{at}.repeat");
            if doc.kind(r) != JsonKind::Array || doc.children(r).next().is_none() {
                return err(
                    doc.offset(r),
                    &rat,
                    "must be a non-empty array of FHIRPath expressions",
                );
            }
            let paths = doc
                .children(r)
                .enumerate()
                .map(|(i, p)| self.path(p, &format!("{rat}[{i}]")))
                .collect::<Result<_, _>>()?;
            iterations.push(Iteration::Repeat(paths));
        }
        if iterations.len() > 1 {
            return err(
                doc.offset(s),
                at,
                "a select takes only one of forEach, forEachOrNull and repeat",
            );
        }
        let iteration = iterations.pop().unwrap_or(Iteration::None);
        let mut columns = Vec::new();
        if let Some(cs) = doc.member(s, "column") {
            let cat = format!("{at}.column");
            let items = self.array(cs, &cat)?;
            if items.is_empty() {
                return err(doc.offset(cs), &cat, "must not be empty");
            }
            for (i, c) in items.into_iter().enumerate() {
                columns.push(self.column(c, &format!("{cat}[{i}]"))?);
            }
        }
        let mut selects = Vec::new();
        if let Some(ss) = doc.member(s, "select") {
            for (i, inner) in self
                .array(ss, &format!("{at}.select"))?
                .into_iter()
                .enumerate()
            {
                selects.push(self.select(inner, &format!("{at}.select[{i}]"))?);
            }
        }
        let mut union_all = Vec::new();
        if let Some(us) = doc.member(s, "unionAll") {
            let uat = format!("{at}.unionAll");
            let before = self.columns.len();
            let mut first_names: Option<Vec<String>> = None;
            for (i, u) in self.array(us, &uat)?.into_iter().enumerate() {
                let bat = format!("{uat}[{i}]");
                let mark = self.columns.len();
                if i > 0 {
                    self.shared.push(before..mark);
                }
                let branch = self.select(u, &bat);
                if i > 0 {
                    self.shared.pop();
                }
                let mut branch = branch?;
                let names: Vec<String> = self.columns[mark..]
                    .iter()
                    .map(|c| c.name.clone())
                    .collect();
                match &first_names {
                    None => first_names = Some(names),
                    Some(first) => {
                        if *first != names {
                            return err(
                                doc.offset(u),
                                &bat,
                                format!(
                                    "unionAll branches must have the same columns in the same order: [{}] here, [{}] in the first",
                                    names.join(", "),
                                    first.join(", ")
                                ),
                            );
                        }
                        // This branch writes the first branch's columns.
                        self.columns.truncate(mark);
                        remap(&mut branch, mark, before);
                    }
                }
                union_all.push(branch);
            }
        }
        if columns.is_empty() && selects.is_empty() && union_all.is_empty() {
            return err(
                doc.offset(s),
                at,
                "a select needs a column, a select or a unionAll",
            );
        }
        Ok(Select {
            columns,
            selects,
            iteration,
            union_all,
        })
    }

    fn column(&mut self, c: NodeId, at: &str) -> Result<Column, ViewError> {
        let doc = self.doc;
        let Some(n) = doc.member(c, "name") else {
            return err(doc.offset(c), at, "a column needs a 'name'");
        };
        let name = self.string(n, &format!("{at}.name"))?;
        let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return err(
                doc.offset(n),
                &format!("{at}.name"),
                format!("column name '{name}' must start with a letter and hold only letters, digits and _"),
            );
        }
        let shared = |i: usize| self.shared.iter().any(|r| r.contains(&i));
        if self
            .columns
            .iter()
            .enumerate()
            .any(|(i, o)| o.name == name && !shared(i))
        {
            return err(
                doc.offset(n),
                &format!("{at}.name"),
                format!("column name '{name}' is used twice"),
            );
        }
        let Some(p) = doc.member(c, "path") else {
            return err(doc.offset(c), at, format!("column '{name}' needs a 'path'"));
        };
        let path = self.path(p, &format!("{at}.path"))?;
        let declared = self.opt_str(c, "type", &format!("{at}.type"))?;
        let collection = match doc.member(c, "collection") {
            None => false,
            Some(b) if doc.kind(b) == JsonKind::Bool => doc.text(b) == "true",
            Some(b) => {
                return err(
                    doc.offset(b),
                    &format!("{at}.collection"),
                    "must be true or false",
                )
            }
        };
        let mut ansi = None;
        // `tag` is the element's name; the specification's own example
        // spells it `tags`.
        if let Some(tags) = doc.member(c, "tag").or_else(|| doc.member(c, "tags")) {
            for t in self.array(tags, &format!("{at}.tag"))? {
                if doc.member_str(t, "name").as_deref() == Some("ansi/type") {
                    let value = doc
                        .member_str(t, "value")
                        .map(Cow::into_owned)
                        .unwrap_or_default();
                    if crate::batch::sql_type(&value).is_none() {
                        return err(
                            doc.offset(t),
                            &format!("{at}.tag"),
                            format!("ansi/type '{value}' is not a type fhirflow writes (BOOLEAN, INT, BIGINT, SMALLINT, DOUBLE, REAL, DECIMAL(p,s), DATE, TIMESTAMP [WITH TIME ZONE], CHARACTER VARYING, VARCHAR)"),
                        );
                    }
                    ansi = Some(value);
                }
            }
        }
        let description = doc.member_str(c, "description").map(Cow::into_owned);
        let out = self.columns.len();
        self.columns.push(OutputColumn {
            name: name.clone(),
            kind: ColumnKind::Str,
            fhir_type: None,
            collection,
            ansi: ansi.clone(),
            description,
        });
        Ok(Column {
            name,
            path,
            declared,
            ansi,
            collection,
            kind: ColumnKind::Str,
            out,
        })
    }
}

/// Points the columns of a later unionAll branch at the first branch's
/// output columns: columns numbered from `from` become `to`, in order.
fn remap(s: &mut Select, from: usize, to: usize) {
    for c in &mut s.columns {
        c.out = c.out - from + to;
    }
    for inner in s.selects.iter_mut().chain(s.union_all.iter_mut()) {
        remap(inner, from, to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> (String, (usize, usize)) {
        let e = View::parse(text).unwrap_err();
        (e.to_string(), e.line_col(text))
    }

    #[test]
    fn errors_say_where() {
        let (m, at) = error("{\"resource\": \"Patient\",\n \"select\": [{\"column\": [{\"name\": \"a b\", \"path\": \"id\"}]}]}");
        assert!(
            m.starts_with("select[0].column[0].name: column name 'a b'"),
            "{m}"
        );
        assert_eq!(at, (2, 34));
        let (m, at) = error("{\"resource\": \"Patien\", \"select\": []}");
        assert!(m.contains("'Patien' is not a FHIR R4 resource type"), "{m}");
        assert_eq!(at, (1, 14));
        let (m, _) = error(
            r#"{"resource": "Patient", "select": [{"column": [{"name": "a", "path": "id"}, {"name": "a", "path": "id"}]}]}"#,
        );
        assert!(m.contains("column name 'a' is used twice"), "{m}");
        let (m, _) = error(
            r#"{"resource": "Patient", "select": [{"forEach": "name", "forEachOrNull": "name", "column": [{"name": "a", "path": "family"}]}]}"#,
        );
        assert!(m.contains("only one of forEach"), "{m}");
        let (m, _) = error(
            r#"{"resource": "Patient", "select": [{"column": [{"name": "a", "path": "id.foo()"}]}]}"#,
        );
        assert!(m.contains("unknown function foo()"), "{m}");
        let (m, _) = error(
            r#"{"resource": "Patient", "select": [{"column": [{"name": "a", "path": "%nope"}]}]}"#,
        );
        assert!(m.contains("constant %nope is not defined"), "{m}");
        let (m, _) = error(
            r#"{"resource": "Patient", "select": [{"unionAll": [{"column": [{"name": "a", "path": "id"}]}, {"column": [{"name": "b", "path": "id"}]}]}]}"#,
        );
        assert!(
            m.contains("unionAll branches must have the same columns"),
            "{m}"
        );
        let (m, at) = error("{\"resource\": \"Patient\", \"select\": [{\"column\": [{\"name\": \"a\", \"path\": \"name.where(\"}]}]}");
        assert!(m.contains("FHIRPath: the expression ends early"), "{m}");
        assert_eq!(at, (1, 82));
    }

    #[test]
    fn columns_without_a_type_get_the_model_s() {
        let v = View::parse(
            r#"{"resource": "Observation", "select": [{"column": [
                {"name": "id", "path": "id"},
                {"name": "v", "path": "value.ofType(Quantity).value"},
                {"name": "q", "path": "value.ofType(Quantity)"},
                {"name": "n", "path": "component.count()"},
                {"name": "b", "path": "component.exists()"},
                {"name": "s", "path": "status"}]}]}"#,
        )
        .unwrap();
        let kinds: Vec<ColumnKind> = v.columns.iter().map(|c| c.kind).collect();
        use ColumnKind::*;
        assert_eq!(kinds, [Str, Dec, Json, Int, Bool, Str]);
        assert!(v.warnings.is_empty());
        let v = View::parse(r#"{"resource": "Patient", "select": [{"column": [{"name": "x", "path": "name.famly"}]}]}"#).unwrap();
        assert_eq!(v.warnings.len(), 1);
        assert!(v.warnings[0]
            .message
            .contains("HumanName has no element 'famly'"));
    }

    #[test]
    fn rows_by_the_processing_model() {
        let v = View::parse(
            r#"{"resource": "Patient", "select": [
                {"column": [{"name": "id", "path": "id"}]},
                {"forEachOrNull": "name", "column": [{"name": "i", "path": "%rowIndex"}, {"name": "family", "path": "family"}],
                 "select": [{"forEach": "given", "column": [{"name": "given", "path": "$this"}]}]}]}"#,
        )
        .unwrap();
        let mut rows = Vec::new();
        let p = r#"{"resourceType": "Patient", "id": "p", "name": [{"family": "A", "given": ["x", "y"]}, {"family": "B"}]}"#;
        v.rows(p, &mut |r| rows.push(r)).unwrap();
        use crate::run::Cell::*;
        let s = |x: &str| Str(x.into());
        assert_eq!(
            rows,
            vec![
                vec![s("p"), Int(0), s("A"), s("x")],
                vec![s("p"), Int(0), s("A"), s("y")]
            ]
        );
        rows.clear();
        v.rows(r#"{"resourceType": "Patient", "id": "q"}"#, &mut |r| {
            rows.push(r)
        })
        .unwrap();
        assert_eq!(rows, vec![vec![s("q"), Int(0), Null, Null]]);
        rows.clear();
        v.rows(r#"{"resourceType": "Observation", "id": "o"}"#, &mut |r| {
            rows.push(r)
        })
        .unwrap();
        assert!(rows.is_empty(), "another type gives no rows");
        let e = v
            .rows("{\"resourceType\": \"Patient\", \"id\": ", &mut |_| {})
            .unwrap_err();
        assert!(e.message.starts_with("not JSON"), "{e}");
    }
}
