//! A view's rows for one resource, as the specification's processing model
//! says: a select's columns, times the rows of its nested selects, times
//! the rows of its unionAll branches, once per item of its forEach,
//! forEachOrNull or repeat (one all-null row for an empty forEachOrNull);
//! `%rowIndex` is the item's index in that iteration (0 outside one).

use std::fmt;

use fhirflow_fhir::fhirpath::{Collection, Doc, Evaluator, Value, Vars};
use fhirflow_fhir::json::Kind as JsonKind;

use crate::check::ColumnKind;
use crate::definition::{Column, Iteration, Path, Select, View};

/// One value of an output column.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Bool(bool),
    Int(i64),
    /// A decimal and the digits after its point.
    Dec(f64, u8),
    /// Text, or JSON text for a complex value.
    Str(String),
    /// For `collection: true` columns.
    List(Vec<Cell>),
}

/// A resource the view cannot be evaluated over, or a path that broke a
/// rule at run time (several values in a column without `collection`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunError {
    pub message: String,
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RunError {}

type Row = Vec<Cell>;

struct RowVars<'v> {
    view: &'v View,
    row_index: usize,
}

impl<'a> Vars<'a> for RowVars<'_> {
    fn var(&self, name: &str) -> Option<Collection<'a>> {
        if name == "rowIndex" {
            return Some(vec![Value::Int(self.row_index as i64)]);
        }
        self.view.constants.get(name).map(|v| vec![v.clone()])
    }
}

impl View {
    /// The rows of the view for one resource's JSON text, handed to `emit`
    /// one at a time. A resource of another type gives no rows.
    pub fn rows(&self, text: &str, emit: &mut dyn FnMut(Row)) -> Result<(), RunError> {
        let doc = Doc::parse(text).map_err(|e| RunError {
            message: format!("not JSON: {e}"),
        })?;
        let root = doc.root();
        if doc.kind(root) != JsonKind::Object
            || doc.member_str(root, "resourceType").as_deref() != Some(self.resource)
        {
            return Ok(());
        }
        let run = Run {
            view: self,
            doc: &doc,
        };
        let resource = run.evaluator(0).get().root();
        for w in &self.wheres {
            let v = run.eval(w, std::slice::from_ref(&resource), 0)?;
            match &v[..] {
                [] => return Ok(()),
                [x] => match run.evaluator(0).get().prim(x) {
                    Value::Bool(true) => {}
                    Value::Bool(false) => return Ok(()),
                    _ => {
                        return Err(RunError {
                            message: format!("{}: where path \"{}\" is not boolean", w.at, w.text),
                        })
                    }
                },
                _ => {
                    return Err(RunError {
                        message: format!(
                            "{}: where path \"{}\" gave {} values, not one boolean",
                            w.at,
                            w.text,
                            v.len()
                        ),
                    })
                }
            }
        }
        for row in run.select(&self.select, Some(resource), 0)? {
            emit(row);
        }
        Ok(())
    }
}

struct Run<'v, 'd, 'a> {
    view: &'v View,
    doc: &'d Doc<'a>,
}

impl<'v, 'd, 'a> Run<'v, 'd, 'a> {
    fn evaluator(&self, row_index: usize) -> EvaluatorWith<'v, 'd, 'a> {
        EvaluatorWith {
            doc: self.doc,
            vars: RowVars {
                view: self.view,
                row_index,
            },
        }
    }

    fn eval(
        &self,
        p: &Path,
        focus: &[Value<'a>],
        row_index: usize,
    ) -> Result<Collection<'a>, RunError> {
        let ev = self.evaluator(row_index);
        ev.get().eval(&p.expr, focus).map_err(|e| RunError {
            message: format!("{}: \"{}\": {}", p.at, p.text, e),
        })
    }

    fn null_row(&self) -> Row {
        vec![Cell::Null; self.view.columns.len()]
    }

    /// The rows of `s` over `focus` (None: the null focus of an empty
    /// forEachOrNull, whose columns and nested selects are all null).
    fn select(
        &self,
        s: &Select,
        focus: Option<Value<'a>>,
        row_index: usize,
    ) -> Result<Vec<Row>, RunError> {
        let items: Vec<(Option<Value<'a>>, usize)> = match (&s.iteration, &focus) {
            (Iteration::None, _) => vec![(focus.clone(), row_index)],
            (_, None) => vec![(None, 0)],
            (Iteration::ForEach(p), Some(f)) => self
                .eval(p, std::slice::from_ref(f), row_index)?
                .into_iter()
                .enumerate()
                .map(|(i, v)| (Some(v), i))
                .collect(),
            (Iteration::ForEachOrNull(p), Some(f)) => {
                let items = self.eval(p, std::slice::from_ref(f), row_index)?;
                if items.is_empty() {
                    vec![(None, 0)]
                } else {
                    items
                        .into_iter()
                        .enumerate()
                        .map(|(i, v)| (Some(v), i))
                        .collect()
                }
            }
            (Iteration::Repeat(paths), Some(f)) => {
                let mut out = Vec::new();
                self.repeat(paths, f, row_index, &mut out, 0)?;
                out.into_iter()
                    .enumerate()
                    .map(|(i, v)| (Some(v), i))
                    .collect()
            }
        };
        let mut rows = Vec::new();
        for (item, index) in items {
            let mut row = self.null_row();
            let focus: &[Value<'a>] = match &item {
                Some(v) => std::slice::from_ref(v),
                None => &[],
            };
            for c in &s.columns {
                row[c.out] = self.cell(c, focus, index)?;
            }
            let mut part = vec![row];
            if item.is_some() {
                for inner in &s.selects {
                    let inner_rows = self.select(inner, item.clone(), index)?;
                    part = product(part, &inner_rows);
                }
                if !s.union_all.is_empty() {
                    let mut branches = Vec::new();
                    for b in &s.union_all {
                        branches.extend(self.select(b, item.clone(), index)?);
                    }
                    part = product(part, &branches);
                }
            }
            rows.extend(part);
        }
        Ok(rows)
    }

    /// Depth first, each node before what the paths reach from it.
    fn repeat(
        &self,
        paths: &[Path],
        node: &Value<'a>,
        row_index: usize,
        out: &mut Vec<Value<'a>>,
        depth: usize,
    ) -> Result<(), RunError> {
        if depth > fhirflow_fhir::fhirpath::doc::MAX_DEPTH {
            return Ok(());
        }
        for p in paths {
            for child in self.eval(p, std::slice::from_ref(node), row_index)? {
                out.push(child.clone());
                self.repeat(paths, &child, row_index, out, depth + 1)?;
            }
        }
        Ok(())
    }

    fn cell(&self, c: &Column, focus: &[Value<'a>], row_index: usize) -> Result<Cell, RunError> {
        let values = self.eval(&c.path, focus, row_index)?;
        if c.collection {
            let cells = values
                .iter()
                .map(|v| self.value_cell(c, v))
                .collect::<Result<_, _>>()?;
            return Ok(Cell::List(cells));
        }
        match &values[..] {
            [] => Ok(Cell::Null),
            [v] => self.value_cell(c, v),
            _ => Err(RunError {
                message: format!(
                    "column '{}': \"{}\" gave {} values; a column holds one unless it says \"collection\": true",
                    c.name,
                    c.path.text,
                    values.len()
                ),
            }),
        }
    }

    fn value_cell(&self, c: &Column, v: &Value<'a>) -> Result<Cell, RunError> {
        let ev = self.evaluator(0);
        let ev = ev.get();
        let p = ev.prim(v);
        let wrong = || RunError {
            message: format!(
                "column '{}': \"{}\" gave a {}, not a {:?}",
                c.name,
                c.path.text,
                ev.type_name(v),
                c.kind
            ),
        };
        Ok(match c.kind {
            ColumnKind::Bool => match p {
                Value::Bool(b) => Cell::Bool(b),
                _ => return Err(wrong()),
            },
            ColumnKind::Int => match p {
                Value::Int(i) => Cell::Int(i),
                Value::Dec(d, _) if d.fract() == 0.0 && d.abs() < 9.0e15 => Cell::Int(d as i64),
                _ => return Err(wrong()),
            },
            ColumnKind::Dec => match p {
                Value::Int(i) => Cell::Dec(i as f64, 0),
                Value::Dec(d, s) | Value::Quantity(d, s, _) => Cell::Dec(d, s),
                _ => return Err(wrong()),
            },
            ColumnKind::Str | ColumnKind::Json => match (&p, ev.to_text(&p)) {
                (Value::Node(n, _), _) => Cell::Str(self.doc.text(*n).to_string()),
                (_, Some(t)) if c.kind == ColumnKind::Str => Cell::Str(t),
                (_, Some(t)) => Cell::Str(json_text(&p, t)),
                (_, None) => return Err(wrong()),
            },
        })
    }
}

/// A primitive as JSON text, for a JSON column.
fn json_text(v: &Value<'_>, text: String) -> String {
    match v {
        Value::Bool(_) | Value::Int(_) | Value::Dec(..) => text,
        _ => {
            let mut out = String::with_capacity(text.len() + 2);
            out.push('"');
            for c in text.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
    }
}

/// Every row of `a` joined with every row of `b` (their columns are
/// disjoint: a cell set in `b` fills the same cell of `a`).
fn product(a: Vec<Row>, b: &[Row]) -> Vec<Row> {
    let mut out = Vec::with_capacity(a.len() * b.len());
    for ra in &a {
        for rb in b {
            let mut r = ra.clone();
            for (i, cell) in rb.iter().enumerate() {
                if *cell != Cell::Null {
                    r[i] = cell.clone();
                }
            }
            out.push(r);
        }
    }
    out
}

/// The document and the variables of one row: lends an evaluator.
struct EvaluatorWith<'v, 'd, 'a> {
    doc: &'d Doc<'a>,
    vars: RowVars<'v>,
}

impl<'d, 'a> EvaluatorWith<'_, 'd, 'a> {
    fn get(&self) -> Evaluator<'_, 'a> {
        Evaluator::new(self.doc, &self.vars)
    }
}
