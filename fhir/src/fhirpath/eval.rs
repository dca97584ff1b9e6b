//! Evaluation of an [`Expr`] over one resource's [`Doc`].
//!
//! Every value is a collection (`Vec<Value>`). Elements of the resource are
//! [`Value::Node`]s carrying their FHIR type from the generated model, which
//! is what makes choice elements work: `value` on an Observation finds
//! `valueQuantity` (type Quantity) or `valueString` (type string), and
//! `ofType(Quantity)` keeps the first. Primitive nodes become system values
//! (String, Integer, Decimal, Boolean, Date, DateTime, Time) when an
//! operator or function needs their value.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;

use super::doc::{Doc, NodeId};
use super::parse::{BinOp, Expr, ExprKind, Lit};
use crate::json::Kind as JsonKind;
use crate::model::{self, TYPES};
use crate::model_types::{self as mt, Kind as TypeKind, TypeId};

/// One item of a collection.
#[derive(Debug, Clone)]
pub enum Value<'a> {
    /// An element of the resource, with its type when the model knows it.
    Node(NodeId, Option<TypeId>),
    Bool(bool),
    Int(i64),
    /// A decimal and the number of digits after its point.
    Dec(f64, u8),
    Str(Cow<'a, str>),
    Date(Cow<'a, str>),
    DateTime(Cow<'a, str>),
    Time(Cow<'a, str>),
    /// Value, its digits after the point, and unit.
    Quantity(f64, u8, Cow<'a, str>),
}

pub type Collection<'a> = Vec<Value<'a>>;

/// A run-time error: a function given the wrong arguments, a collection
/// where one item was required.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalError {
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at offset {})", self.message, self.offset)
    }
}

impl std::error::Error for EvalError {}

fn fail<T>(e: &Expr, message: impl Into<String>) -> Result<T, EvalError> {
    Err(EvalError {
        offset: e.at,
        message: message.into(),
    })
}

/// `%name` values supplied by the caller (constants, `%rowIndex`).
pub trait Vars<'a> {
    fn var(&self, name: &str) -> Option<Collection<'a>>;
}

impl<'a> Vars<'a> for () {
    fn var(&self, _: &str) -> Option<Collection<'a>> {
        None
    }
}

/// Evaluates expressions over one document.
pub struct Evaluator<'d, 'a> {
    pub doc: &'d Doc<'a>,
    pub vars: &'d dyn Vars<'a>,
}

type R<'a> = Result<Collection<'a>, EvalError>;

/// The type of a resource object: from its `resourceType`.
pub fn resource_type_of(doc: &Doc<'_>, node: NodeId) -> Option<TypeId> {
    let name = doc.member_str(node, "resourceType")?;
    mt::resource_type_id(name.as_bytes())
}

/// A type of the model by name (`Quantity`, `string`, `Patient`).
pub fn type_named(name: &str) -> Option<TypeId> {
    static BY_NAME: std::sync::OnceLock<std::collections::HashMap<&'static str, TypeId>> =
        std::sync::OnceLock::new();
    BY_NAME
        .get_or_init(|| {
            let mut m = std::collections::HashMap::new();
            for (i, t) in TYPES.iter().enumerate() {
                if t.kind != TypeKind::Backbone {
                    m.entry(t.name).or_insert(i as TypeId);
                }
            }
            m
        })
        .get(name)
        .copied()
}

/// `FHIR.Quantity` and `System.String` without their namespace.
fn bare(name: &str) -> &str {
    name.strip_prefix("FHIR.")
        .or_else(|| name.strip_prefix("System."))
        .unwrap_or(name)
}

impl<'d, 'a> Evaluator<'d, 'a> {
    pub fn new(doc: &'d Doc<'a>, vars: &'d dyn Vars<'a>) -> Self {
        Evaluator { doc, vars }
    }

    /// The resource at the root of the document, typed.
    pub fn root(&self) -> Value<'a> {
        let root = self.doc.root();
        Value::Node(root, resource_type_of(self.doc, root))
    }

    /// Evaluates `e` with `focus` as its input collection (`$this`).
    pub fn eval(&self, e: &Expr, focus: &[Value<'a>]) -> R<'a> {
        self.eval_in(e, focus, None)
    }

    fn eval_in(&self, e: &Expr, focus: &[Value<'a>], index: Option<usize>) -> R<'a> {
        Ok(match &e.kind {
            ExprKind::Empty => Vec::new(),
            ExprKind::Lit(l) => vec![literal(l)],
            ExprKind::This => focus.to_vec(),
            ExprKind::Index => match index {
                Some(i) => vec![Value::Int(i as i64)],
                None => Vec::new(),
            },
            ExprKind::Total => return fail(e, "$total is only defined in aggregate()"),
            ExprKind::Var(name) => match name.as_str() {
                "resource" | "rootResource" | "context" => vec![self.root()],
                "ucum" => vec![Value::Str("http://unitsofmeasure.org".into())],
                "sct" => vec![Value::Str("http://snomed.info/sct".into())],
                "loinc" => vec![Value::Str("http://loinc.org".into())],
                _ => match self.vars.var(name) {
                    Some(v) => v,
                    None => return fail(e, format!("%{name} is not defined")),
                },
            },
            ExprKind::Ident(name) => {
                let mut out = Vec::new();
                for v in focus {
                    if self.is_resource_named(v, name) {
                        out.push(v.clone());
                    } else {
                        self.children(v, name, &mut out);
                    }
                }
                out
            }
            ExprKind::Member(base, name) => {
                let base = self.eval_in(base, focus, index)?;
                let mut out = Vec::new();
                for v in &base {
                    self.children(v, name, &mut out);
                }
                out
            }
            ExprKind::Indexer(base, i) => {
                let base = self.eval_in(base, focus, index)?;
                let i = self.eval_in(i, focus, index)?;
                match self.singleton(e, &i)?.map(|v| self.prim(v)) {
                    None => Vec::new(),
                    Some(Value::Int(i)) => match usize::try_from(i) {
                        Ok(i) => base.into_iter().nth(i).into_iter().collect(),
                        Err(_) => Vec::new(),
                    },
                    Some(_) => return fail(e, "an index must be an integer"),
                }
            }
            ExprKind::Neg(inner) => {
                let v = self.eval_in(inner, focus, index)?;
                match self.singleton(e, &v)?.map(|v| self.prim(v)) {
                    None => Vec::new(),
                    Some(Value::Int(i)) => vec![Value::Int(-i)],
                    Some(Value::Dec(d, s)) => vec![Value::Dec(-d, s)],
                    Some(Value::Quantity(d, s, u)) => vec![Value::Quantity(-d, s, u)],
                    Some(_) => return fail(e, "unary minus needs a number"),
                }
            }
            ExprKind::Is(inner, ty) => {
                let v = self.eval_in(inner, focus, index)?;
                if v.len() > 1 {
                    return fail(e, "'is' needs a single item");
                }
                v.first()
                    .map(|v| Value::Bool(self.is_type(v, ty)))
                    .into_iter()
                    .collect()
            }
            ExprKind::As(inner, ty) => {
                let v = self.eval_in(inner, focus, index)?;
                v.into_iter().filter(|v| self.is_type(v, ty)).collect()
            }
            ExprKind::Binary(op, l, r) => self.binary(e, *op, l, r, focus, index)?,
            ExprKind::Call { base, name, args } => {
                let input = match base {
                    Some(b) => self.eval_in(b, focus, index)?,
                    None => focus.to_vec(),
                };
                self.call(e, name, args, input, focus, index)?
            }
        })
    }

    fn is_resource_named(&self, v: &Value<'a>, name: &str) -> bool {
        match v {
            Value::Node(_, Some(t)) => {
                let def = &TYPES[*t as usize];
                def.kind == TypeKind::Resource && def.name == name
            }
            Value::Node(n, None) => self
                .doc
                .member_str(*n, "resourceType")
                .is_some_and(|t| t == name),
            _ => false,
        }
    }

    /// The children of `v` named `name` (choice elements match their
    /// typed keys), flattening arrays.
    fn children(&self, v: &Value<'a>, name: &str, out: &mut Collection<'a>) {
        let Value::Node(node, ty) = v else { return };
        let doc = self.doc;
        if doc.kind(*node) != JsonKind::Object {
            return;
        }
        for child in doc.children(*node) {
            let Some(key) = doc.key(child) else { continue };
            // Only `name` itself or a choice key `nameType` can match: most
            // members are passed over without a model lookup.
            if !key.starts_with(name) {
                continue;
            }
            let child_ty = match ty {
                Some(t) => {
                    let Some(elem) = mt::lookup(*t, key.as_bytes()) else {
                        continue;
                    };
                    let slot = &TYPES[*t as usize].slots[elem.slot as usize];
                    let hit = if slot.choice {
                        slot.name.strip_suffix("[x]") == Some(name)
                    } else {
                        slot.name == name
                    };
                    if !hit {
                        continue;
                    }
                    Some(elem.ty)
                }
                None => {
                    if key != name && !is_choice_key(&key, name) {
                        continue;
                    }
                    None
                }
            };
            let push = |n: NodeId, out: &mut Collection<'a>| {
                if doc.kind(n) == JsonKind::Null {
                    return;
                }
                let t = match child_ty {
                    Some(t) if TYPES[t as usize].kind == TypeKind::AnyResource => {
                        resource_type_of(doc, n)
                    }
                    t => t,
                };
                out.push(Value::Node(n, t));
            };
            if doc.kind(child) == JsonKind::Array {
                for item in doc.children(child) {
                    push(item, out);
                }
            } else {
                push(child, out);
            }
        }
    }

    /// The FHIR or system type name of an item.
    pub fn type_name(&self, v: &Value<'a>) -> Cow<'static, str> {
        match v {
            Value::Node(_, Some(t)) => TYPES[*t as usize].name.into(),
            Value::Node(n, None) => match self.doc.kind(*n) {
                JsonKind::String => "string".into(),
                JsonKind::Bool => "boolean".into(),
                JsonKind::Number if self.doc.text(*n).contains(['.', 'e', 'E']) => "decimal".into(),
                JsonKind::Number => "integer".into(),
                _ => match self.doc.member_str(*n, "resourceType") {
                    Some(t) => t.into_owned().into(),
                    None => "Element".into(),
                },
            },
            Value::Bool(_) => "Boolean".into(),
            Value::Int(_) => "Integer".into(),
            Value::Dec(..) => "Decimal".into(),
            Value::Str(_) => "String".into(),
            Value::Date(_) => "Date".into(),
            Value::DateTime(_) => "DateTime".into(),
            Value::Time(_) => "Time".into(),
            Value::Quantity(..) => "Quantity".into(),
        }
    }

    fn is_type(&self, v: &Value<'a>, ty: &str) -> bool {
        let want = bare(ty);
        let have = self.type_name(v);
        if have == want {
            return true;
        }
        match v {
            // A system value against a FHIR primitive name, or the reverse.
            Value::Node(..) => {
                matches!(want, "Resource" | "DomainResource")
                    && matches!(v, Value::Node(_, Some(t)) if TYPES[*t as usize].kind == TypeKind::Resource)
            }
            _ => have.eq_ignore_ascii_case(want),
        }
    }

    /// A primitive node as its system value; other items unchanged.
    pub fn prim(&self, v: &Value<'a>) -> Value<'a> {
        let Value::Node(n, ty) = v else {
            return v.clone();
        };
        let doc = self.doc;
        match doc.kind(*n) {
            JsonKind::Bool => Value::Bool(doc.text(*n) == "true"),
            JsonKind::Number => {
                let text = doc.text(*n);
                let integral = match ty {
                    Some(t) => matches!(
                        *t,
                        model::T_INTEGER | model::T_POSITIVEINT | model::T_UNSIGNEDINT
                    ),
                    None => !text.contains(['.', 'e', 'E']),
                };
                match (integral, text.parse::<i64>()) {
                    (true, Ok(i)) => Value::Int(i),
                    _ => Value::Dec(text.parse().unwrap_or(f64::NAN), scale_of(text)),
                }
            }
            JsonKind::String => {
                let s = doc.str(*n).unwrap_or_default();
                match ty {
                    Some(model::T_DATE) => Value::Date(s),
                    Some(model::T_DATETIME) | Some(model::T_INSTANT) => Value::DateTime(s),
                    Some(model::T_TIME) => Value::Time(s),
                    _ => Value::Str(s),
                }
            }
            JsonKind::Object if ty.is_some_and(is_quantity_type) => {
                let value = doc.member(*n, "value").map(|m| doc.text(m));
                match value {
                    Some(text) => Value::Quantity(
                        text.parse().unwrap_or(f64::NAN),
                        scale_of(text),
                        doc.member_str(*n, "code")
                            .or_else(|| doc.member_str(*n, "unit"))
                            .unwrap_or_default(),
                    ),
                    None => v.clone(),
                }
            }
            _ => v.clone(),
        }
    }

    /// The only item of `c`, or None when empty; an error when there are more.
    fn singleton<'c>(
        &self,
        e: &Expr,
        c: &'c [Value<'a>],
    ) -> Result<Option<&'c Value<'a>>, EvalError> {
        match c {
            [] => Ok(None),
            [v] => Ok(Some(v)),
            _ => fail(e, format!("expected a single item, found {}", c.len())),
        }
    }

    /// A collection as a boolean: empty is unknown; one boolean is itself;
    /// one other item is true (the specification's singleton evaluation).
    fn truth(&self, e: &Expr, c: &[Value<'a>]) -> Result<Option<bool>, EvalError> {
        Ok(match self.singleton(e, c)? {
            None => None,
            Some(v) => match self.prim(v) {
                Value::Bool(b) => Some(b),
                _ => Some(true),
            },
        })
    }

    fn string_arg(
        &self,
        call: &Expr,
        args: &[Expr],
        i: usize,
        focus: &[Value<'a>],
    ) -> Result<Option<String>, EvalError> {
        let Some(a) = args.get(i) else {
            return Ok(None);
        };
        let v = self.eval(a, focus)?;
        match self.singleton(call, &v)?.map(|v| self.prim(v)) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s.into_owned())),
            Some(_) => fail(a, "expected a string argument"),
        }
    }

    fn int_arg(
        &self,
        call: &Expr,
        args: &[Expr],
        i: usize,
        focus: &[Value<'a>],
    ) -> Result<Option<i64>, EvalError> {
        let Some(a) = args.get(i) else {
            return Ok(None);
        };
        let v = self.eval(a, focus)?;
        match self.singleton(call, &v)?.map(|v| self.prim(v)) {
            None => Ok(None),
            Some(Value::Int(n)) => Ok(Some(n)),
            Some(_) => fail(a, "expected an integer argument"),
        }
    }

    fn binary(
        &self,
        e: &Expr,
        op: BinOp,
        l: &Expr,
        r: &Expr,
        focus: &[Value<'a>],
        index: Option<usize>,
    ) -> R<'a> {
        use BinOp::*;
        // Boolean operators decide on the left side first where they can.
        if matches!(op, And | Or | Xor | Implies) {
            let a = self.eval_in(l, focus, index)?;
            let a = self.truth(e, &a)?;
            let short = match (op, a) {
                (And, Some(false)) => Some(false),
                (Or, Some(true)) => Some(true),
                (Implies, Some(false)) => Some(true),
                _ => None,
            };
            if let Some(s) = short {
                return Ok(vec![Value::Bool(s)]);
            }
            let b = self.eval_in(r, focus, index)?;
            let b = self.truth(e, &b)?;
            let out = match op {
                And => match (a, b) {
                    (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                },
                Or => match (a, b) {
                    (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                },
                Xor => match (a, b) {
                    (Some(x), Some(y)) => Some(x != y),
                    _ => None,
                },
                _ => match (a, b) {
                    (Some(true), Some(y)) => Some(y),
                    (None, Some(true)) => Some(true),
                    _ => None,
                },
            };
            return Ok(out.map(Value::Bool).into_iter().collect());
        }
        let a = self.eval_in(l, focus, index)?;
        let b = self.eval_in(r, focus, index)?;
        match op {
            Union => {
                let mut out: Collection<'a> = Vec::new();
                for v in a.into_iter().chain(b) {
                    if !out.iter().any(|o| self.equal(o, &v) == Some(true)) {
                        out.push(v);
                    }
                }
                Ok(out)
            }
            Eq | Ne | Equiv | NotEquiv => {
                let equiv = matches!(op, Equiv | NotEquiv);
                let r = if a.is_empty() || b.is_empty() {
                    if equiv {
                        Some(a.is_empty() && b.is_empty())
                    } else {
                        None
                    }
                } else if a.len() != b.len() {
                    Some(false)
                } else {
                    let mut all = Some(true);
                    for (x, y) in a.iter().zip(&b) {
                        let r = if equiv {
                            Some(self.equivalent(x, y))
                        } else {
                            self.equal(x, y)
                        };
                        match r {
                            Some(true) => {}
                            Some(false) => {
                                all = Some(false);
                                break;
                            }
                            None => all = None,
                        }
                    }
                    all
                };
                let r = if matches!(op, Ne | NotEquiv) {
                    r.map(|b| !b)
                } else {
                    r
                };
                Ok(r.map(Value::Bool).into_iter().collect())
            }
            Lt | Gt | Le | Ge => {
                let (Some(x), Some(y)) = (self.singleton(e, &a)?, self.singleton(e, &b)?) else {
                    return Ok(Vec::new());
                };
                let ord = match self.compare(&self.prim(x), &self.prim(y)) {
                    Ok(o) => o,
                    Err(()) => {
                        return fail(
                            e,
                            format!(
                                "cannot compare {} with {}",
                                self.type_name(x),
                                self.type_name(y)
                            ),
                        )
                    }
                };
                Ok(ord
                    .map(|o| {
                        Value::Bool(match op {
                            Lt => o == Ordering::Less,
                            Gt => o == Ordering::Greater,
                            Le => o != Ordering::Greater,
                            _ => o != Ordering::Less,
                        })
                    })
                    .into_iter()
                    .collect())
            }
            In | Contains => {
                let (item, coll) = if op == In { (&a, &b) } else { (&b, &a) };
                let Some(x) = self.singleton(e, item)? else {
                    return Ok(Vec::new());
                };
                Ok(vec![Value::Bool(
                    coll.iter().any(|y| self.equal(x, y) == Some(true)),
                )])
            }
            Concat => {
                let text = |c: &Collection<'a>| -> Result<String, EvalError> {
                    Ok(match self.singleton(e, c)? {
                        None => String::new(),
                        Some(v) => self.to_text(v).unwrap_or_default(),
                    })
                };
                Ok(vec![Value::Str(
                    format!("{}{}", text(&a)?, text(&b)?).into(),
                )])
            }
            Add | Sub | Mul | Div | IntDiv | Mod => {
                let (Some(x), Some(y)) = (self.singleton(e, &a)?, self.singleton(e, &b)?) else {
                    return Ok(Vec::new());
                };
                self.arithmetic(e, op, &self.prim(x), &self.prim(y))
            }
            And | Or | Xor | Implies => unreachable!("handled above"),
        }
    }

    fn arithmetic(&self, e: &Expr, op: BinOp, x: &Value<'a>, y: &Value<'a>) -> R<'a> {
        use BinOp::*;
        if let (Value::Str(a), Value::Str(b), Add) = (x, y, op) {
            return Ok(vec![Value::Str(format!("{a}{b}").into())]);
        }
        if let (Value::Int(a), Value::Int(b)) = (x, y) {
            let r = match op {
                Add => a.checked_add(*b),
                Sub => a.checked_sub(*b),
                Mul => a.checked_mul(*b),
                IntDiv => a.checked_div(*b),
                Mod => a.checked_rem(*b),
                _ => {
                    return Ok(if *b == 0 {
                        Vec::new()
                    } else {
                        vec![Value::Dec(*a as f64 / *b as f64, 8)]
                    })
                }
            };
            return Ok(r.map(Value::Int).into_iter().collect());
        }
        let num = |v: &Value<'a>| match v {
            Value::Int(i) => Some((*i as f64, 0u8)),
            Value::Dec(d, s) => Some((*d, *s)),
            _ => None,
        };
        let (Some((a, sa)), Some((b, sb))) = (num(x), num(y)) else {
            return fail(
                e,
                format!(
                    "'{}' needs numbers, not {} and {}",
                    op.symbol(),
                    self.type_name(x),
                    self.type_name(y)
                ),
            );
        };
        let scale = sa.max(sb);
        let r = match op {
            Add => Some((a + b, scale)),
            Sub => Some((a - b, scale)),
            Mul => Some((a * b, sa + sb)),
            Div => (b != 0.0).then(|| (a / b, 8)),
            IntDiv => (b != 0.0).then(|| ((a / b).trunc(), 0)),
            Mod => (b != 0.0).then(|| (a % b, scale)),
            _ => None,
        };
        Ok(match (op, r) {
            (IntDiv, Some((v, _))) => vec![Value::Int(v as i64)],
            (_, Some((v, s))) => vec![Value::Dec(v, s)],
            _ => Vec::new(),
        })
    }

    /// `=` of two items: None when it cannot be decided (dates of different
    /// precisions).
    pub fn equal(&self, x: &Value<'a>, y: &Value<'a>) -> Option<bool> {
        let (px, py) = (self.prim(x), self.prim(y));
        match (&px, &py) {
            (Value::Node(a, _), Value::Node(b, _)) => Some(
                a == b || canonical_json(self.doc.text(*a)) == canonical_json(self.doc.text(*b)),
            ),
            (Value::Node(..), _) | (_, Value::Node(..)) => Some(false),
            _ => match self.compare(&px, &py) {
                Ok(Some(o)) => Some(o == Ordering::Equal),
                Ok(None) => None,
                Err(()) => Some(false),
            },
        }
    }

    fn equivalent(&self, x: &Value<'a>, y: &Value<'a>) -> bool {
        match (self.prim(x), self.prim(y)) {
            (Value::Str(a), Value::Str(b)) => {
                let norm = |s: &str| {
                    s.split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                        .to_lowercase()
                };
                norm(&a) == norm(&b)
            }
            (a, b) => self.equal(&a, &b).unwrap_or(false),
        }
    }

    /// Order of two system values: Err when they are not comparable, Ok(None)
    /// when the answer is unknown (temporal values of different precision).
    fn compare(&self, x: &Value<'a>, y: &Value<'a>) -> Result<Option<Ordering>, ()> {
        let num = |v: &Value<'a>| match v {
            Value::Int(i) => Some(*i as f64),
            Value::Dec(d, _) => Some(*d),
            _ => None,
        };
        if let (Some(a), Some(b)) = (num(x), num(y)) {
            return Ok(a.partial_cmp(&b));
        }
        match (x, y) {
            (Value::Str(a), Value::Str(b)) => Ok(Some(a.cmp(b))),
            (Value::Bool(a), Value::Bool(b)) => Ok(Some(a.cmp(b))),
            (Value::Quantity(a, _, ua), Value::Quantity(b, _, ub)) if ua == ub => {
                Ok(a.partial_cmp(b))
            }
            (Value::Date(a) | Value::DateTime(a), Value::Date(b) | Value::DateTime(b)) => {
                Ok(super::temporal::compare(a, b))
            }
            (Value::Time(a), Value::Time(b)) => Ok(super::temporal::compare_time(a, b)),
            _ => Err(()),
        }
    }

    /// The text of a primitive item (`toString()`), None for complex ones.
    pub fn to_text(&self, v: &Value<'a>) -> Option<String> {
        Some(match self.prim(v) {
            Value::Str(s) | Value::Date(s) | Value::DateTime(s) | Value::Time(s) => s.into_owned(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Dec(d, s) => format_decimal(d, s),
            Value::Quantity(d, s, u) => format!("{} '{u}'", format_decimal(d, s)),
            Value::Node(..) => return None,
        })
    }

    fn call(
        &self,
        e: &Expr,
        name: &str,
        args: &[Expr],
        input: Collection<'a>,
        focus: &[Value<'a>],
        index: Option<usize>,
    ) -> R<'a> {
        let arity = |lo: usize, hi: usize| -> Result<(), EvalError> {
            if args.len() < lo || args.len() > hi {
                let want = if lo == hi {
                    format!("{lo}")
                } else {
                    format!("{lo} to {hi}")
                };
                return fail(
                    e,
                    format!("{name}() takes {want} argument(s), not {}", args.len()),
                );
            }
            Ok(())
        };
        let one_bool = |b: bool| Ok(vec![Value::Bool(b)]);
        match name {
            "empty" => {
                arity(0, 0)?;
                one_bool(input.is_empty())
            }
            "exists" => {
                arity(0, 1)?;
                if let Some(c) = args.first() {
                    let kept = self.filter(e, c, input)?;
                    one_bool(!kept.is_empty())
                } else {
                    one_bool(!input.is_empty())
                }
            }
            "all" => {
                arity(1, 1)?;
                for (i, v) in input.iter().enumerate() {
                    let r = self.eval_in(&args[0], std::slice::from_ref(v), Some(i))?;
                    if self.truth(e, &r)? != Some(true) {
                        return one_bool(false);
                    }
                }
                one_bool(true)
            }
            "allTrue" | "anyTrue" | "allFalse" | "anyFalse" => {
                arity(0, 0)?;
                let want = name.ends_with("True");
                let bools: Vec<bool> = input
                    .iter()
                    .filter_map(|v| match self.prim(v) {
                        Value::Bool(b) => Some(b),
                        _ => None,
                    })
                    .collect();
                one_bool(if name.starts_with("all") {
                    bools.iter().all(|b| *b == want)
                } else {
                    bools.contains(&want)
                })
            }
            "where" => {
                arity(1, 1)?;
                self.filter(e, &args[0], input)
            }
            "select" => {
                arity(1, 1)?;
                let mut out = Vec::new();
                for (i, v) in input.iter().enumerate() {
                    out.extend(self.eval_in(&args[0], std::slice::from_ref(v), Some(i))?);
                }
                Ok(out)
            }
            "repeat" => {
                arity(1, 1)?;
                let mut out: Collection<'a> = Vec::new();
                let mut frontier = input;
                while !frontier.is_empty() {
                    let mut next = Vec::new();
                    for (i, v) in frontier.iter().enumerate() {
                        for r in self.eval_in(&args[0], std::slice::from_ref(v), Some(i))? {
                            if !out.iter().any(|o| same_node(o, &r)) {
                                out.push(r.clone());
                                next.push(r);
                            }
                        }
                    }
                    frontier = next;
                }
                Ok(out)
            }
            "ofType" => {
                arity(1, 1)?;
                let ty = type_arg(&args[0]).ok_or_else(|| EvalError {
                    offset: args[0].at,
                    message: "ofType() needs a type name".into(),
                })?;
                Ok(input.into_iter().filter(|v| self.is_type(v, &ty)).collect())
            }
            "is" | "as" => {
                arity(1, 1)?;
                let ty = type_arg(&args[0]).ok_or_else(|| EvalError {
                    offset: args[0].at,
                    message: format!("{name}() needs a type name"),
                })?;
                if name == "as" {
                    return Ok(input.into_iter().filter(|v| self.is_type(v, &ty)).collect());
                }
                match self.singleton(e, &input)? {
                    None => Ok(Vec::new()),
                    Some(v) => one_bool(self.is_type(v, &ty)),
                }
            }
            "first" => {
                arity(0, 0)?;
                Ok(input.into_iter().take(1).collect())
            }
            "last" => {
                arity(0, 0)?;
                Ok(input.into_iter().last().into_iter().collect())
            }
            "tail" => {
                arity(0, 0)?;
                Ok(input.into_iter().skip(1).collect())
            }
            "skip" | "take" => {
                arity(1, 1)?;
                let n = self.int_arg(e, args, 0, focus)?.unwrap_or(0).max(0) as usize;
                Ok(if name == "skip" {
                    input.into_iter().skip(n).collect()
                } else {
                    input.into_iter().take(n).collect()
                })
            }
            "single" => {
                arity(0, 0)?;
                Ok(self.singleton(e, &input)?.cloned().into_iter().collect())
            }
            "count" => {
                arity(0, 0)?;
                Ok(vec![Value::Int(input.len() as i64)])
            }
            "distinct" => {
                arity(0, 0)?;
                let mut out: Collection<'a> = Vec::new();
                for v in input {
                    if !out.iter().any(|o| self.equal(o, &v) == Some(true)) {
                        out.push(v);
                    }
                }
                Ok(out)
            }
            "not" => {
                arity(0, 0)?;
                Ok(self
                    .truth(e, &input)?
                    .map(|b| Value::Bool(!b))
                    .into_iter()
                    .collect())
            }
            "hasValue" => {
                arity(0, 0)?;
                one_bool(matches!(&input[..], [v] if !matches!(self.prim(v), Value::Node(..))))
            }
            "iif" => {
                arity(2, 3)?;
                let c = self.eval_in(&args[0], &input, index)?;
                if self.truth(e, &c)? == Some(true) {
                    self.eval_in(&args[1], focus, index)
                } else if let Some(otherwise) = args.get(2) {
                    self.eval_in(otherwise, focus, index)
                } else {
                    Ok(Vec::new())
                }
            }
            "extension" => {
                arity(1, 1)?;
                let url = self.string_arg(e, args, 0, focus)?;
                let mut out = Vec::new();
                for v in &input {
                    let mut exts = Vec::new();
                    self.children(v, "extension", &mut exts);
                    for x in exts {
                        let Value::Node(n, _) = x else { continue };
                        if url.as_deref().is_some_and(|u| {
                            self.doc.member_str(n, "url").is_some_and(|have| have == u)
                        }) {
                            out.push(x);
                        }
                    }
                }
                Ok(out)
            }
            "join" => {
                arity(0, 1)?;
                let sep = self.string_arg(e, args, 0, focus)?.unwrap_or_default();
                let parts: Vec<String> = input.iter().filter_map(|v| self.to_text(v)).collect();
                Ok(vec![Value::Str(parts.join(&sep).into())])
            }
            "getResourceKey" => {
                arity(0, 0)?;
                let mut out = Vec::new();
                for v in &input {
                    if let Value::Node(n, _) = v {
                        if let Some(id) = self.doc.member_str(*n, "id") {
                            out.push(Value::Str(id));
                        }
                    }
                }
                Ok(out)
            }
            "getReferenceKey" => {
                arity(0, 1)?;
                let want = match args.first() {
                    Some(a) => Some(type_arg(a).ok_or_else(|| EvalError {
                        offset: a.at,
                        message: "getReferenceKey() needs a resource type name".into(),
                    })?),
                    None => None,
                };
                let mut out = Vec::new();
                for v in &input {
                    let Value::Node(n, _) = v else { continue };
                    let Some(reference) = self.doc.member_str(*n, "reference") else {
                        continue;
                    };
                    if let Some((ty, id)) = reference_parts(&reference) {
                        if want.as_deref().is_none_or(|w| bare(w) == ty) {
                            out.push(Value::Str(id.to_string().into()));
                        }
                    }
                }
                Ok(out)
            }
            "lowBoundary" | "highBoundary" => {
                arity(0, 1)?;
                let high = name == "highBoundary";
                let Some(v) = self.singleton(e, &input)? else {
                    return Ok(Vec::new());
                };
                Ok(super::temporal::boundary(&self.prim(v), high)
                    .into_iter()
                    .collect())
            }
            "toString" => {
                arity(0, 0)?;
                Ok(match self.singleton(e, &input)? {
                    Some(v) => self
                        .to_text(v)
                        .map(|s| Value::Str(s.into()))
                        .into_iter()
                        .collect(),
                    None => Vec::new(),
                })
            }
            "toInteger" => {
                arity(0, 0)?;
                Ok(match self.singleton(e, &input)?.map(|v| self.prim(v)) {
                    Some(Value::Int(i)) => vec![Value::Int(i)],
                    Some(Value::Str(s)) => s.parse().map(Value::Int).into_iter().collect(),
                    Some(Value::Bool(b)) => vec![Value::Int(b as i64)],
                    _ => Vec::new(),
                })
            }
            "toDecimal" => {
                arity(0, 0)?;
                Ok(match self.singleton(e, &input)?.map(|v| self.prim(v)) {
                    Some(Value::Int(i)) => vec![Value::Dec(i as f64, 0)],
                    Some(Value::Dec(d, s)) => vec![Value::Dec(d, s)],
                    Some(Value::Str(s)) => s
                        .parse()
                        .map(|d| Value::Dec(d, scale_of(&s)))
                        .into_iter()
                        .collect(),
                    Some(Value::Bool(b)) => vec![Value::Dec(b as i64 as f64, 1)],
                    _ => Vec::new(),
                })
            }
            "startsWith" | "endsWith" | "contains" | "matches" | "indexOf" | "replace"
            | "substring" | "length" | "upper" | "lower" | "trim" => {
                self.string_function(e, name, args, &input, focus)
            }
            _ => fail(e, format!("unknown function {name}()")),
        }
    }

    fn string_function(
        &self,
        e: &Expr,
        name: &str,
        args: &[Expr],
        input: &[Value<'a>],
        focus: &[Value<'a>],
    ) -> R<'a> {
        let Some(v) = self.singleton(e, input)? else {
            return Ok(Vec::new());
        };
        let Value::Str(s) = self.prim(v) else {
            return fail(e, format!("{name}() needs a string"));
        };
        let arg = |i: usize| self.string_arg(e, args, i, focus);
        let b = |x: bool| Ok(vec![Value::Bool(x)]);
        let chars: Vec<char>;
        match name {
            "startsWith" => match arg(0)? {
                Some(p) => b(s.starts_with(&p)),
                None => Ok(Vec::new()),
            },
            "endsWith" => match arg(0)? {
                Some(p) => b(s.ends_with(&p)),
                None => Ok(Vec::new()),
            },
            "contains" => match arg(0)? {
                Some(p) => b(s.contains(&p)),
                None => Ok(Vec::new()),
            },
            "matches" => match arg(0)? {
                // Without a regular expression engine in this crate, only a
                // literal pattern is supported.
                Some(p)
                    if !p.contains(['.', '*', '+', '?', '[', '(', '|', '^', '$', '\\', '{']) =>
                {
                    b(s == p)
                }
                Some(_) => fail(e, "matches() supports literal patterns only"),
                None => Ok(Vec::new()),
            },
            "indexOf" => match arg(0)? {
                Some(p) => Ok(vec![Value::Int(
                    s.find(&p).map_or(-1, |i| s[..i].chars().count() as i64),
                )]),
                None => Ok(Vec::new()),
            },
            "replace" => match (arg(0)?, arg(1)?) {
                (Some(p), Some(r)) => Ok(vec![Value::Str(s.replace(&p, &r).into())]),
                _ => Ok(Vec::new()),
            },
            "substring" => {
                chars = s.chars().collect();
                let start = self.int_arg(e, args, 0, focus)?.unwrap_or(0);
                if start < 0 || start as usize >= chars.len() {
                    return Ok(Vec::new());
                }
                let len = self
                    .int_arg(e, args, 1, focus)?
                    .map_or(chars.len(), |l| l.max(0) as usize);
                let end = (start as usize).saturating_add(len).min(chars.len());
                Ok(vec![Value::Str(
                    chars[start as usize..end].iter().collect::<String>().into(),
                )])
            }
            "length" => Ok(vec![Value::Int(s.chars().count() as i64)]),
            "upper" => Ok(vec![Value::Str(s.to_uppercase().into())]),
            "lower" => Ok(vec![Value::Str(s.to_lowercase().into())]),
            _ => Ok(vec![Value::Str(s.trim().to_string().into())]),
        }
    }

    /// The items of `input` for which `criteria` is true (`where`).
    fn filter(&self, e: &Expr, criteria: &Expr, input: Collection<'a>) -> R<'a> {
        let mut out = Vec::new();
        for (i, v) in input.into_iter().enumerate() {
            let r = self.eval_in(criteria, std::slice::from_ref(&v), Some(i))?;
            if self.truth(e, &r)? == Some(true) {
                out.push(v);
            }
        }
        Ok(out)
    }
}

fn same_node(a: &Value<'_>, b: &Value<'_>) -> bool {
    matches!((a, b), (Value::Node(x, _), Value::Node(y, _)) if x == y)
}

/// The type name given as a function argument (`ofType(Quantity)`).
pub fn type_arg(e: &Expr) -> Option<String> {
    match &e.kind {
        ExprKind::Ident(n) => Some(n.clone()),
        ExprKind::Member(base, n) => type_arg(base).map(|b| format!("{b}.{n}")),
        _ => None,
    }
}

/// (type, id) of a relative or absolute literal reference
/// (`Patient/1`, `http://x/fhir/Patient/1/_history/2`).
pub fn reference_parts(reference: &str) -> Option<(&str, &str)> {
    let r = match reference.find("/_history/") {
        Some(i) => &reference[..i],
        None => reference,
    };
    let mut parts = r.rsplit('/');
    let id = parts.next()?;
    let ty = parts.next()?;
    (mt::resource_type_id(ty.as_bytes()).is_some() && !id.is_empty()).then_some((ty, id))
}

fn is_choice_key(key: &str, name: &str) -> bool {
    key.len() > name.len()
        && key.starts_with(name)
        && key.as_bytes()[name.len()].is_ascii_uppercase()
}

fn is_quantity_type(t: TypeId) -> bool {
    matches!(
        TYPES[t as usize].name,
        "Quantity" | "Age" | "Count" | "Distance" | "Duration" | "SimpleQuantity" | "MoneyQuantity"
    )
}

fn literal<'a>(l: &Lit) -> Value<'a> {
    match l {
        Lit::Bool(b) => Value::Bool(*b),
        Lit::Int(i) => Value::Int(*i),
        Lit::Dec(d, s) => Value::Dec(*d, *s),
        Lit::Str(s) => Value::Str(Cow::Owned(s.clone())),
        Lit::Date(s) => Value::Date(Cow::Owned(s.clone())),
        Lit::DateTime(s) => Value::DateTime(Cow::Owned(s.clone())),
        Lit::Time(s) => Value::Time(Cow::Owned(s.clone())),
        Lit::Quantity(d, s, u) => Value::Quantity(*d, *s, Cow::Owned(u.clone())),
    }
}

/// Digits after the point of a JSON number as written.
pub fn scale_of(text: &str) -> u8 {
    let mantissa = text.split(['e', 'E']).next().unwrap_or(text);
    mantissa
        .split_once('.')
        .map_or(0, |(_, f)| f.len().min(u8::MAX as usize) as u8)
}

/// A decimal with `scale` digits after the point, trailing zeros kept as
/// the precision says.
pub fn format_decimal(d: f64, scale: u8) -> String {
    format!("{d:.*}", scale as usize)
}

/// JSON text with insignificant whitespace removed, for comparing complex
/// values (member order is kept: FHIR JSON writers agree on it).
fn canonical_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_str = false;
    let mut esc = false;
    for c in text.chars() {
        if in_str {
            out.push(c);
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}
