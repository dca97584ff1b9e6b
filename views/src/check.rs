//! The types of a view's FHIRPath expressions, from the generated model:
//! a path that names an element its type does not have, calls an unknown
//! function or uses an undefined constant is an error before any data is
//! read, and a column without a `type` gets the type its path yields.

use fhirflow_fhir::fhirpath::eval::type_arg;
use fhirflow_fhir::fhirpath::parse::{BinOp, Lit};
use fhirflow_fhir::fhirpath::{Expr, ExprKind};
use fhirflow_fhir::model::TYPES;
use fhirflow_fhir::model_types::{Kind as TypeKind, TypeId};

use crate::definition::{Iteration, Path, Select, View, ViewError};

/// How a column's values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Bool,
    Int,
    Dec,
    /// Text: strings, codes, URIs, and dates and times as written (their
    /// precision varies, so they are not forced into a SQL date).
    Str,
    /// A complex element, as its JSON text.
    Json,
}

impl ColumnKind {
    /// The kind for a FHIR type name (`type` of a column).
    pub fn of_type_name(name: &str) -> ColumnKind {
        match name.rsplit('/').next().unwrap_or(name) {
            "boolean" | "Boolean" => ColumnKind::Bool,
            "integer" | "positiveInt" | "unsignedInt" | "integer64" | "Integer" => ColumnKind::Int,
            "decimal" | "Decimal" => ColumnKind::Dec,
            "string" | "code" | "id" | "uri" | "url" | "canonical" | "oid" | "uuid"
            | "markdown" | "base64Binary" | "xhtml" | "date" | "dateTime" | "instant" | "time"
            | "String" | "Date" | "DateTime" | "Time" => ColumnKind::Str,
            _ => ColumnKind::Json,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum T {
    Fhir(TypeId),
    /// A system type by its FHIR primitive equivalent (`boolean`, `string`).
    Sys(&'static str),
    /// A resource of a type not known until run time (`contained`).
    AnyResource,
}

/// The possible types of a collection's items; `unknown` when the model
/// cannot say (the types are then not checked further).
#[derive(Debug, Clone, Default)]
struct Types {
    set: Vec<T>,
    unknown: bool,
}

impl Types {
    fn one(t: T) -> Types {
        Types {
            set: vec![t],
            unknown: false,
        }
    }
    fn sys(name: &'static str) -> Types {
        Types::one(T::Sys(name))
    }
    fn unknown() -> Types {
        Types {
            set: Vec::new(),
            unknown: true,
        }
    }
    fn add(&mut self, t: T) {
        if !self.set.contains(&t) {
            self.set.push(t);
        }
    }
    fn union(mut self, other: Types) -> Types {
        for t in other.set {
            self.add(t);
        }
        self.unknown |= other.unknown;
        self
    }
}

fn name_of(t: T) -> &'static str {
    match t {
        T::Fhir(id) => TYPES[id as usize].name,
        T::Sys(n) => n,
        T::AnyResource => "Resource",
    }
}

struct Checker<'v> {
    view: &'v View,
    path: &'v Path,
    /// Names the model does not know: the path still runs (FHIRPath gives
    /// an empty collection for them), so they are warnings, not errors.
    warnings: &'v std::cell::RefCell<Vec<ViewError>>,
}

impl Checker<'_> {
    fn error(&self, e: &Expr, message: String) -> ViewError {
        ViewError {
            offset: self.path.offset + e.at,
            at: self.path.at.clone(),
            message: format!(
                "{message} (at character {} of \"{}\")",
                e.at + 1,
                self.path.text
            ),
        }
    }

    fn child(&self, e: &Expr, input: &Types, name: &str) -> Result<Types, ViewError> {
        let mut out = Types {
            set: Vec::new(),
            unknown: input.unknown,
        };
        let mut known_miss = Vec::new();
        for &t in &input.set {
            match t {
                T::Fhir(id) => {
                    let def = &TYPES[id as usize];
                    if def.kind == TypeKind::Resource && def.name == name && e_is_first(e) {
                        out.add(t);
                        continue;
                    }
                    if def.kind == TypeKind::Prim {
                        // `id` and `extension` of primitives are not walked.
                        out.unknown = true;
                        continue;
                    }
                    let mut hit = false;
                    for elem in def.elems {
                        let slot = &def.slots[elem.slot as usize];
                        let matches = if slot.choice {
                            slot.name.strip_suffix("[x]") == Some(name)
                        } else {
                            slot.name == name
                        };
                        if matches {
                            hit = true;
                            if TYPES[elem.ty as usize].kind == TypeKind::AnyResource {
                                out.add(T::AnyResource);
                            } else {
                                out.add(T::Fhir(elem.ty));
                            }
                        }
                    }
                    if !hit {
                        known_miss.push(def.name);
                    }
                }
                T::AnyResource => out.unknown = true,
                T::Sys(_) => known_miss.push(name_of(t)),
            }
        }
        if out.set.is_empty() && !out.unknown && !known_miss.is_empty() {
            let w = self.error(
                e,
                format!("{} has no element '{name}'", known_miss.join(" or ")),
            );
            self.warnings.borrow_mut().push(w);
            out.unknown = true;
        }
        Ok(out)
    }

    fn infer(&self, e: &Expr, input: &Types) -> Result<Types, ViewError> {
        Ok(match &e.kind {
            ExprKind::Empty => Types::default(),
            ExprKind::Lit(l) => Types::sys(match l {
                Lit::Bool(_) => "boolean",
                Lit::Int(_) => "integer",
                Lit::Dec(..) => "decimal",
                Lit::Str(_) => "string",
                Lit::Date(_) => "date",
                Lit::DateTime(_) => "dateTime",
                Lit::Time(_) => "time",
                Lit::Quantity(..) => "Quantity",
            }),
            ExprKind::This => input.clone(),
            ExprKind::Index => Types::sys("integer"),
            ExprKind::Total => Types::unknown(),
            ExprKind::Var(name) => match name.as_str() {
                "rowIndex" => Types::sys("integer"),
                "resource" | "rootResource" | "context" => {
                    Types::one(T::Fhir(self.view.resource_type))
                }
                "ucum" | "sct" | "loinc" => Types::sys("string"),
                _ => match self.view.constants.get(name) {
                    Some(v) => Types::sys(match v {
                        fhirflow_fhir::fhirpath::Value::Bool(_) => "boolean",
                        fhirflow_fhir::fhirpath::Value::Int(_) => "integer",
                        fhirflow_fhir::fhirpath::Value::Dec(..) => "decimal",
                        fhirflow_fhir::fhirpath::Value::Date(_) => "date",
                        fhirflow_fhir::fhirpath::Value::DateTime(_) => "dateTime",
                        fhirflow_fhir::fhirpath::Value::Time(_) => "time",
                        _ => "string",
                    }),
                    None => return Err(self.error(e, format!("constant %{name} is not defined"))),
                },
            },
            ExprKind::Ident(name) => self.child(e, input, name)?,
            ExprKind::Member(base, name) => {
                let b = self.infer(base, input)?;
                self.child(e, &b, name)?
            }
            ExprKind::Indexer(base, i) => {
                self.infer(i, input)?;
                self.infer(base, input)?
            }
            ExprKind::Neg(inner) => self.infer(inner, input)?,
            ExprKind::Is(inner, _) => {
                self.infer(inner, input)?;
                Types::sys("boolean")
            }
            ExprKind::As(inner, ty) => {
                let i = self.infer(inner, input)?;
                narrow(&i, ty)
            }
            ExprKind::Binary(op, l, r) => {
                let a = self.infer(l, input)?;
                let b = self.infer(r, input)?;
                use BinOp::*;
                match op {
                    Union => a.union(b),
                    Concat => Types::sys("string"),
                    Add | Sub | Mul | Div | IntDiv | Mod => {
                        let all = |t: &Types, n: &str| {
                            !t.unknown
                                && !t.set.is_empty()
                                && t.set.iter().all(|x| {
                                    name_of(*x) == n
                                        || (n == "integer"
                                            && matches!(name_of(*x), "positiveInt" | "unsignedInt"))
                                })
                        };
                        if *op == Add && all(&a, "string") {
                            Types::sys("string")
                        } else if all(&a, "integer") && all(&b, "integer") && *op != Div {
                            Types::sys("integer")
                        } else {
                            Types::sys("decimal")
                        }
                    }
                    _ => Types::sys("boolean"),
                }
            }
            ExprKind::Call { base, name, args } => {
                let input = match base {
                    Some(b) => self.infer(b, input)?,
                    None => input.clone(),
                };
                self.call(e, name, args, input)?
            }
        })
    }

    fn call(&self, e: &Expr, name: &str, args: &[Expr], input: Types) -> Result<Types, ViewError> {
        let type_of_arg = |i: usize| -> Result<String, ViewError> {
            args.get(i)
                .and_then(type_arg)
                .ok_or_else(|| self.error(e, format!("{name}() needs a type name")))
        };
        // Arguments evaluated per item of the input.
        let per_item = |i: usize| -> Result<Types, ViewError> {
            match args.get(i) {
                Some(a) => self.infer(a, &input),
                None => Ok(Types::default()),
            }
        };
        Ok(match name {
            "where" | "exists" | "all" => {
                per_item(0)?;
                if name == "where" {
                    input
                } else {
                    Types::sys("boolean")
                }
            }
            "first" | "last" | "tail" | "skip" | "take" | "single" | "distinct" | "lowBoundary"
            | "highBoundary" => {
                for a in args {
                    self.infer(a, &input)?;
                }
                input
            }
            "select" => per_item(0)?,
            "repeat" => {
                let more = per_item(0)?;
                input.clone().union(more)
            }
            "ofType" | "as" => narrow(&input, &type_of_arg(0)?),
            "is" => {
                type_of_arg(0)?;
                Types::sys("boolean")
            }
            "empty" | "not" | "hasValue" | "allTrue" | "anyTrue" | "allFalse" | "anyFalse"
            | "startsWith" | "endsWith" | "contains" | "matches" => {
                for a in args {
                    self.infer(a, &input)?;
                }
                Types::sys("boolean")
            }
            "count" | "length" | "indexOf" | "toInteger" => Types::sys("integer"),
            "toDecimal" => Types::sys("decimal"),
            "join" | "toString" | "upper" | "lower" | "trim" | "replace" | "substring"
            | "getResourceKey" => Types::sys("string"),
            "getReferenceKey" => {
                if let Some(a) = args.first() {
                    let t = type_arg(a).ok_or_else(|| {
                        self.error(a, "getReferenceKey() needs a resource type name".into())
                    })?;
                    if fhirflow_fhir::resource_type(t.trim_start_matches("FHIR.")).is_none() {
                        return Err(self.error(a, format!("'{t}' is not a resource type")));
                    }
                }
                Types::sys("string")
            }
            "extension" => {
                per_item(0)?;
                Types::one(T::Fhir(extension_type()))
            }
            "iif" => {
                per_item(0)?;
                let a = per_item(1)?;
                a.union(per_item(2)?)
            }
            _ => return Err(self.error(e, format!("unknown function {name}()"))),
        })
    }
}

/// Whether a navigation is the first step of its path (where a resource
/// type name means the focus itself).
fn e_is_first(e: &Expr) -> bool {
    matches!(e.kind, ExprKind::Ident(_))
}

fn extension_type() -> TypeId {
    fhirflow_fhir::fhirpath::eval::type_named("Extension").expect("Extension is in the model")
}

/// The input's types narrowed to `ty` (`ofType`).
fn narrow(input: &Types, ty: &str) -> Types {
    let bare = ty.rsplit('.').next().unwrap_or(ty);
    let mut out = Types::default();
    for &t in &input.set {
        let n = name_of(t);
        if n == bare || n.eq_ignore_ascii_case(bare) {
            out.add(t);
        }
    }
    if out.set.is_empty() {
        // Unknown at check time: a contained resource, a system type.
        match fhirflow_fhir::fhirpath::eval::type_named(bare) {
            Some(id) => out.add(T::Fhir(id)),
            None => out.unknown = true,
        }
    }
    out
}

/// The column kind for inferred types.
fn kind_of(types: &Types) -> ColumnKind {
    if types.unknown || types.set.is_empty() {
        return ColumnKind::Str;
    }
    let kinds: Vec<ColumnKind> = types
        .set
        .iter()
        .map(|t| ColumnKind::of_type_name(name_of(*t)))
        .collect();
    if kinds.iter().all(|k| *k == kinds[0]) {
        kinds[0]
    } else if kinds
        .iter()
        .all(|k| matches!(k, ColumnKind::Int | ColumnKind::Dec))
    {
        ColumnKind::Dec
    } else if kinds.contains(&ColumnKind::Json) {
        ColumnKind::Json
    } else {
        ColumnKind::Str
    }
}

fn is_boolean(types: &Types) -> bool {
    types.unknown || types.set.is_empty() || types.set.iter().any(|t| name_of(*t) == "boolean")
}

/// Checks every path of the view against the model and sets each column's
/// kind.
pub fn check_view(view: &mut View) -> Result<(), ViewError> {
    let warnings = std::cell::RefCell::new(Vec::new());
    let root = Types::one(T::Fhir(view.resource_type));
    for w in &view.wheres {
        let c = Checker {
            view,
            path: w,
            warnings: &warnings,
        };
        let t = c.infer(&w.expr, &root)?;
        if !is_boolean(&t) {
            let names: Vec<&str> = t.set.iter().map(|t| name_of(*t)).collect();
            return Err(ViewError {
                offset: w.offset,
                at: w.at.clone(),
                message: format!(
                    "a where path must be boolean; \"{}\" is {}",
                    w.text,
                    names.join(" or ")
                ),
            });
        }
    }
    let mut select = std::mem::replace(
        &mut view.select,
        Select {
            columns: Vec::new(),
            selects: Vec::new(),
            iteration: Iteration::None,
            union_all: Vec::new(),
        },
    );
    let r = check_select(view, &mut select, &root, &warnings);
    view.select = select;
    view.warnings = warnings.into_inner();
    r
}

fn check_select(
    view: &mut View,
    s: &mut Select,
    focus: &Types,
    warnings: &std::cell::RefCell<Vec<ViewError>>,
) -> Result<(), ViewError> {
    let focus = match &s.iteration {
        Iteration::None => focus.clone(),
        Iteration::ForEach(p) | Iteration::ForEachOrNull(p) => Checker {
            view,
            path: p,
            warnings,
        }
        .infer(&p.expr, focus)?,
        Iteration::Repeat(paths) => {
            // The items are what the paths yield, and what they yield from
            // those: two rounds reach a recursive element's types (item.item).
            // A path that only applies to what the paths yield (answer.item
            // under item) is not a warning against the focus.
            let mut all = Types::default();
            for _ in 0..2 {
                let from = focus.clone().union(all.clone());
                let quiet = std::cell::RefCell::new(Vec::new());
                for p in paths {
                    all = all.union(
                        Checker {
                            view,
                            path: p,
                            warnings: &quiet,
                        }
                        .infer(&p.expr, &from)?,
                    );
                }
            }
            let from = focus.clone().union(all.clone());
            for p in paths {
                all = all.union(
                    Checker {
                        view,
                        path: p,
                        warnings,
                    }
                    .infer(&p.expr, &from)?,
                );
            }
            all
        }
    };
    for c in &mut s.columns {
        let types = Checker {
            view,
            path: &c.path,
            warnings,
        }
        .infer(&c.path.expr, &focus)?;
        c.kind = match &c.declared {
            Some(t) => ColumnKind::of_type_name(t),
            None => kind_of(&types),
        };
        let fhir_type = match &c.declared {
            Some(t) => Some(t.rsplit('/').next().unwrap_or(t).to_string()),
            None if !types.unknown && types.set.len() == 1 => {
                Some(name_of(types.set[0]).to_string())
            }
            None => None,
        };
        let out = &mut view.columns[c.out];
        out.kind = c.kind;
        // unionAll branches share the column: the first branch's type stands.
        if out.fhir_type.is_none() {
            out.fhir_type = fhir_type;
        }
    }
    for inner in s.selects.iter_mut().chain(s.union_all.iter_mut()) {
        check_select(view, inner, &focus, warnings)?;
    }
    Ok(())
}
