//! A view as SQL for engines that hold FHIR in their own tables: Athena
//! (Trino) over fhirflow's Glue tables or HealthLake's, and DuckDB over
//! NDJSON files (which tests the translation against [`View::rows`]).
//!
//! One translator, three sources of a resource's elements:
//!
//! * fhirflow's `external_fhir_curated.<type>`: one `string` column per
//!   top-level element, lower-cased (Athena's OpenX JSON SerDe): an object
//!   or array as its JSON text, a primitive as its value's text;
//! * HealthLake's Iceberg tables: one table per resource type, one column
//!   per top-level element, complex elements as nested ROWs, elements of
//!   cardinality `0..*` as ARRAYs (AWS HealthLake developer guide,
//!   "Querying HealthLake data with SQL"), names lower-cased and
//!   `extension` kept as an array of JSON strings; each column is made JSON
//!   with `CAST(… AS JSON)` and walked with lower-cased names, and
//!   `extension` strings are parsed back;
//! * DuckDB's `read_ndjson_objects`: the resource as one JSON value.
//!
//! Every FHIRPath collection becomes a SQL array of JSON values; navigation
//! flattens (`transform` + `flatten`), `where` is `filter`, `first()` a slice,
//! and a column takes the first (only) value as text and casts it. forEach
//! is an `UNNEST … WITH ORDINALITY` join (LEFT JOIN … ON TRUE for
//! forEachOrNull), unionAll a `UNION ALL` of one SELECT per branch. What has
//! no translation (`repeat`, the boundary functions, functions outside the
//! shareable set) makes its column NULL with a note saying why.

use fhirflow_fhir::fhirpath::eval::type_arg;
use fhirflow_fhir::fhirpath::parse::{BinOp, Lit};
use fhirflow_fhir::fhirpath::{Expr, ExprKind, Value};
use fhirflow_fhir::model::TYPES;
use fhirflow_fhir::model_types::{Kind as TypeKind, TypeId, MANY};

use crate::check::ColumnKind;
use crate::definition::{Column, Iteration, Select, View};

/// What an Athena view reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// fhirflow's Glue tables (`external_fhir_curated`).
    Curated,
    /// HealthLake's own Iceberg tables.
    HealthLake,
}

/// The SQL, and what could not be translated.
#[derive(Debug, Clone)]
pub struct Translation {
    pub text: String,
    pub notes: Vec<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Dialect {
    Trino,
    DuckDb,
}

#[derive(Clone, Copy, PartialEq)]
enum Root {
    /// Element columns: JSON text (curated) or ROWs (HealthLake).
    Columns(Source),
    /// The resource as one JSON value in column `json`.
    Json,
}

/// `CREATE OR REPLACE VIEW "<database>"."<name>"` for Athena.
pub fn create_view(view: &View, name: &str, database: &str, source: Source) -> Translation {
    let table = match source {
        Source::Curated => format!(
            "\"external_fhir_curated\".{}",
            ident(&view.resource.to_ascii_lowercase())
        ),
        Source::HealthLake => format!(
            "{}.{}",
            ident(database),
            ident(&view.resource.to_ascii_lowercase())
        ),
    };
    let t = Translator::new(view, Dialect::Trino, Root::Columns(source));
    let (select, notes) = t.query(&table);
    Translation {
        text: format!(
            "CREATE OR REPLACE VIEW {}.{} AS\n{select}",
            ident(database),
            ident(name)
        ),
        notes,
    }
}

/// A SELECT for DuckDB over the NDJSON files `glob` matches.
pub fn duckdb_select(view: &View, glob: &str) -> Translation {
    let table = format!(
        "(SELECT json FROM read_ndjson_objects({}) WHERE json_extract_string(json, '$.resourceType') = {})",
        string(glob),
        string(view.resource)
    );
    let t = Translator::new(view, Dialect::DuckDb, Root::Json);
    let (text, notes) = t.query(&table);
    Translation { text, notes }
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn string(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A translated expression: a collection (array of JSON), or a scalar of
/// a SQL kind.
#[derive(Clone)]
enum Sql {
    Coll(String, Option<TypeId>),
    Scalar(String, ColumnKind),
}

/// Why an expression has no translation.
struct Untranslatable(String);

type T = Result<Sql, Untranslatable>;

/// One SELECT of the UNION ALL: its joins and its columns' expressions.
#[derive(Clone, Default)]
struct Plan {
    joins: Vec<String>,
    columns: Vec<(usize, String)>,
}

struct Translator<'v> {
    view: &'v View,
    dialect: Dialect,
    root: Root,
    notes: std::cell::RefCell<Vec<String>>,
    aliases: std::cell::Cell<usize>,
}

/// Where a path is evaluated: the resource, or an unnested item.
#[derive(Clone)]
struct Focus {
    /// None: the resource itself (its columns or its JSON).
    item: Option<String>,
    ty: Option<TypeId>,
    /// `%rowIndex` here.
    row_index: String,
}

impl<'v> Translator<'v> {
    fn new(view: &'v View, dialect: Dialect, root: Root) -> Self {
        Translator {
            view,
            dialect,
            root,
            notes: Default::default(),
            aliases: Default::default(),
        }
    }

    fn query(&self, table: &str) -> (String, Vec<String>) {
        let root = Focus {
            item: None,
            ty: Some(self.view.resource_type),
            row_index: "0".into(),
        };
        let plans = self.plans(&self.view.select, &root);
        let mut wheres = Vec::new();
        for w in &self.view.wheres {
            match self
                .expr(&w.expr, &root)
                .map(|s| self.scalar(s, ColumnKind::Bool))
            {
                Ok(b) => wheres.push(format!("({b})")),
                Err(Untranslatable(why)) => {
                    self.note(format!("where \"{}\" is left out: {why}", w.text))
                }
            }
        }
        let mut selects = Vec::new();
        for plan in plans {
            let mut cols = Vec::new();
            for (i, c) in self.view.columns.iter().enumerate() {
                let e = plan
                    .columns
                    .iter()
                    .find(|(o, _)| *o == i)
                    .map(|(_, e)| e.clone())
                    .unwrap_or_else(|| {
                        format!("CAST(NULL AS {})", self.sql_type(c.kind, c.collection))
                    });
                cols.push(format!("  {e} AS {}", ident(&c.name)));
            }
            let mut q = format!("SELECT\n{}\nFROM {table} AS r", cols.join(",\n"));
            for j in &plan.joins {
                q.push('\n');
                q.push_str(j);
            }
            if !wheres.is_empty() {
                q.push_str(&format!("\nWHERE {}", wheres.join(" AND ")));
            }
            selects.push(q);
        }
        (selects.join("\nUNION ALL\n"), self.notes.take())
    }

    fn note(&self, n: String) {
        self.notes.borrow_mut().push(n);
    }

    fn alias(&self) -> usize {
        let a = self.aliases.get() + 1;
        self.aliases.set(a);
        a
    }

    fn sql_type(&self, kind: ColumnKind, collection: bool) -> String {
        let one = match (kind, self.dialect) {
            (ColumnKind::Bool, _) => "BOOLEAN",
            (ColumnKind::Int, _) => "BIGINT",
            (ColumnKind::Dec, Dialect::Trino) => "DOUBLE",
            (ColumnKind::Dec, Dialect::DuckDb) => "DOUBLE",
            (_, _) => "VARCHAR",
        };
        match (collection, self.dialect) {
            (false, _) => one.to_string(),
            (true, Dialect::Trino) => format!("ARRAY({one})"),
            (true, Dialect::DuckDb) => format!("{one}[]"),
        }
    }

    /// The rows of a select as plans: its columns, times its nested
    /// selects' plans, times the union of its unionAll branches' plans,
    /// under its forEach join.
    fn plans(&self, s: &Select, focus: &Focus) -> Vec<Plan> {
        let mut base = Plan::default();
        let focus = match &s.iteration {
            Iteration::None => focus.clone(),
            Iteration::ForEach(p) | Iteration::ForEachOrNull(p) => {
                let outer = matches!(s.iteration, Iteration::ForEachOrNull(_));
                match self.expr(&p.expr, focus) {
                    Ok(e) => {
                        let (coll, ty) = self.coll(e);
                        let a = self.alias();
                        base.joins.push(self.unnest(&coll, a, outer));
                        Focus {
                            item: Some(format!("u{a}.item")),
                            ty,
                            row_index: format!("(u{a}.ord - 1)"),
                        }
                    }
                    Err(Untranslatable(why)) => {
                        self.note(format!(
                            "{} \"{}\" is not translated ({why}): its columns are NULL",
                            p.at, p.text
                        ));
                        return vec![base];
                    }
                }
            }
            Iteration::Repeat(paths) => {
                let names: Vec<&str> = paths.iter().map(|p| p.text.as_str()).collect();
                self.note(format!(
                    "repeat [{}] has no translation (it needs recursion): its columns are NULL",
                    names.join(", ")
                ));
                return vec![base];
            }
        };
        for c in &s.columns {
            base.columns.push((c.out, self.column(c, &focus)));
        }
        let mut plans = vec![base];
        for inner in &s.selects {
            plans = product(&plans, &self.plans(inner, &focus));
        }
        if !s.union_all.is_empty() {
            let branches: Vec<Plan> = s
                .union_all
                .iter()
                .flat_map(|b| self.plans(b, &focus))
                .collect();
            plans = product(&plans, &branches);
        }
        plans
    }

    fn unnest(&self, coll: &str, a: usize, outer: bool) -> String {
        match self.dialect {
            Dialect::Trino => {
                let u = format!("UNNEST({coll}) WITH ORDINALITY AS u{a}(item, ord)");
                if outer {
                    format!("LEFT JOIN {u} ON TRUE")
                } else {
                    format!("CROSS JOIN {u}")
                }
            }
            Dialect::DuckDb => {
                let u = format!(
                    "LATERAL (SELECT unnest(l) AS item, generate_subscripts(l, 1) AS ord FROM (SELECT {coll} AS l)) AS u{a}"
                );
                if outer {
                    format!("LEFT JOIN {u} ON TRUE")
                } else {
                    format!("CROSS JOIN {u}")
                }
            }
        }
    }

    fn column(&self, c: &Column, focus: &Focus) -> String {
        let kind = c.kind;
        match self.expr(&c.path.expr, focus) {
            Ok(e) if c.collection => {
                let (coll, _) = self.coll(e);
                let t = self.sql_type(kind, false);
                match self.dialect {
                    Dialect::Trino => {
                        format!("transform({coll}, x -> CAST({} AS {t}))", self.text_of("x"))
                    }
                    Dialect::DuckDb => format!(
                        "list_transform({coll}, lambda x: CAST({} AS {t}))",
                        self.text_of("x")
                    ),
                }
            }
            Ok(e) => self.scalar(e, kind),
            Err(Untranslatable(why)) => {
                self.note(format!(
                    "column {} (\"{}\"): {why}; it is NULL",
                    c.name, c.path.text
                ));
                format!("CAST(NULL AS {})", self.sql_type(kind, c.collection))
            }
        }
    }

    /// A JSON value's text: a string's content, other values as written.
    fn text_of(&self, j: &str) -> String {
        match self.dialect {
            Dialect::Trino => format!("json_extract_scalar({j}, '$')"),
            Dialect::DuckDb => format!("json_extract_string({j}, '$')"),
        }
    }

    /// An expression as a scalar of `kind`: the first value of a collection.
    fn scalar(&self, e: Sql, kind: ColumnKind) -> String {
        match e {
            Sql::Scalar(s, k) if k == kind || kind == ColumnKind::Json => s,
            Sql::Scalar(s, _) => format!("CAST({s} AS {})", self.sql_type(kind, false)),
            Sql::Coll(c, _) => {
                let first = match self.dialect {
                    Dialect::Trino => format!("element_at({c}, 1)"),
                    Dialect::DuckDb => format!("list_extract({c}, 1)"),
                };
                match kind {
                    ColumnKind::Json => match self.dialect {
                        Dialect::Trino => format!("json_format({first})"),
                        Dialect::DuckDb => format!("CAST({first} AS VARCHAR)"),
                    },
                    ColumnKind::Str => self.text_of(&first),
                    k => format!(
                        "CAST({} AS {})",
                        self.text_of(&first),
                        self.sql_type(k, false)
                    ),
                }
            }
        }
    }

    /// An expression as a collection (a scalar becomes a one-value array).
    fn coll(&self, e: Sql) -> (String, Option<TypeId>) {
        match e {
            Sql::Coll(c, t) => (c, t),
            Sql::Scalar(s, _) => match self.dialect {
                Dialect::Trino => (
                    format!("filter(ARRAY[CAST({s} AS JSON)], x -> x IS NOT NULL)"),
                    None,
                ),
                Dialect::DuckDb => (
                    format!("list_filter([to_json({s})], lambda x: x IS NOT NULL)"),
                    None,
                ),
            },
        }
    }

    /// A JSON value (possibly an array, possibly NULL) as an array of values.
    fn as_coll(&self, j: &str) -> String {
        match self.dialect {
            Dialect::Trino => format!(
                "(CASE WHEN {j} IS NULL THEN CAST(ARRAY[] AS ARRAY(JSON)) WHEN json_array_length({j}) IS NOT NULL THEN CAST({j} AS ARRAY(JSON)) ELSE ARRAY[{j}] END)"
            ),
            Dialect::DuckDb => format!(
                "(CASE WHEN {j} IS NULL THEN CAST([] AS JSON[]) WHEN json_type({j}) = 'ARRAY' THEN CAST({j} AS JSON[]) ELSE [{j}] END)"
            ),
        }
    }

    fn json_key(&self, key: &str) -> String {
        let k = match self.root {
            Root::Columns(Source::HealthLake) => key.to_ascii_lowercase(),
            _ => key.to_string(),
        };
        // FHIR element names are letters and digits: a plain path step.
        format!("'$.{k}'")
    }

    /// The keys `name` reaches in type `ty` (a choice reaches one per type),
    /// with each key's type; narrowed to `only` when given (`ofType`).
    fn keys(
        &self,
        ty: Option<TypeId>,
        name: &str,
        only: Option<&str>,
    ) -> Vec<(String, Option<TypeId>, bool)> {
        let Some(t) = ty else {
            return vec![(name.to_string(), None, true)];
        };
        let def = &TYPES[t as usize];
        let mut out = Vec::new();
        for e in def.elems {
            let slot = &def.slots[e.slot as usize];
            let hit = if slot.choice {
                slot.name.strip_suffix("[x]") == Some(name)
            } else {
                slot.name == name
            };
            let ety = &TYPES[e.ty as usize];
            if hit && only.is_none_or(|o| ety.name == o) && !e.key.starts_with('_') {
                let ty = (ety.kind != TypeKind::AnyResource).then_some(e.ty);
                out.push((e.key.to_string(), ty, slot.max == MANY));
            }
        }
        out
    }

    /// `name` (of type `only` when given) under each value of `base`.
    fn navigate(
        &self,
        base: Option<&str>,
        ty: Option<TypeId>,
        name: &str,
        only: Option<&str>,
    ) -> T {
        let keys = self.keys(ty, name, only);
        if keys.is_empty() {
            return Err(Untranslatable(format!("no element {name} here")));
        }
        let mut parts = Vec::new();
        let mut out_ty = None;
        for (key, kty, _many) in &keys {
            out_ty = if keys.len() == 1 { *kty } else { None };
            let reach = |x: &str| -> String {
                let v = match self.dialect {
                    Dialect::Trino => format!("json_extract({x}, {})", self.json_key(key)),
                    Dialect::DuckDb => format!("json_extract({x}, {})", self.json_key(key)),
                };
                self.extension_strings(key, self.as_coll(&v))
            };
            let part = match base {
                None => match self.root {
                    Root::Json => reach("r.json"),
                    Root::Columns(source) => {
                        let col = format!("r.{}", ident(&key.to_ascii_lowercase()));
                        let prim = kty.is_some_and(|t| TYPES[t as usize].kind == TypeKind::Prim);
                        let json = match (source, prim) {
                            // A primitive's text: strings as JSON strings,
                            // numbers and booleans parsed.
                            (Source::Curated, true) if is_text(*kty) => {
                                format!("CAST({col} AS JSON)")
                            }
                            (Source::Curated, _) => format!("json_parse({col})"),
                            (Source::HealthLake, _) => format!("CAST({col} AS JSON)"),
                        };
                        self.extension_strings(key, self.as_coll(&json))
                    }
                },
                Some(b) => match self.dialect {
                    Dialect::Trino => format!("flatten(transform({b}, x -> {}))", reach("x")),
                    Dialect::DuckDb => {
                        format!("flatten(list_transform({b}, lambda x: {}))", reach("x"))
                    }
                },
            };
            parts.push(part);
        }
        Ok(Sql::Coll(self.concat(parts), out_ty))
    }

    /// HealthLake keeps `extension` as an array of JSON strings: parsed back.
    fn extension_strings(&self, key: &str, coll: String) -> String {
        if key == "extension" && self.root == Root::Columns(Source::HealthLake) {
            format!("transform({coll}, s -> json_parse(json_extract_scalar(s, '$')))")
        } else {
            coll
        }
    }

    fn concat(&self, mut parts: Vec<String>) -> String {
        if parts.len() == 1 {
            return parts.pop().unwrap();
        }
        match self.dialect {
            Dialect::Trino => format!("concat({})", parts.join(", ")),
            Dialect::DuckDb => format!("flatten([{}])", parts.join(", ")),
        }
    }

    fn focus_coll(&self, focus: &Focus) -> Option<String> {
        focus.item.as_ref().map(|i| match self.dialect {
            Dialect::Trino => format!("filter(ARRAY[{i}], x -> x IS NOT NULL)"),
            Dialect::DuckDb => format!("list_filter([{i}], lambda x: x IS NOT NULL)"),
        })
    }

    fn expr(&self, e: &Expr, focus: &Focus) -> T {
        match &e.kind {
            ExprKind::Ident(name) => {
                if focus.item.is_none() && name == self.view.resource {
                    return Err(Untranslatable("the resource itself as a value".into()));
                }
                self.navigate(self.focus_coll(focus).as_deref(), focus.ty, name, None)
            }
            ExprKind::Member(base, name) => {
                let b = self.expr(base, focus)?;
                if let (ExprKind::Ident(t), true) = (&base.kind, focus.item.is_none()) {
                    if t == self.view.resource {
                        return self.navigate(None, focus.ty, name, None);
                    }
                }
                let (c, ty) = self.coll(b);
                self.navigate(Some(&c), ty, name, None)
            }
            ExprKind::Lit(l) => Ok(match l {
                Lit::Bool(b) => Sql::Scalar(b.to_string().to_uppercase(), ColumnKind::Bool),
                Lit::Int(i) => Sql::Scalar(i.to_string(), ColumnKind::Int),
                Lit::Dec(d, _) => Sql::Scalar(format!("{d}"), ColumnKind::Dec),
                Lit::Str(s) | Lit::Date(s) | Lit::DateTime(s) | Lit::Time(s) => {
                    Sql::Scalar(string(s), ColumnKind::Str)
                }
                Lit::Quantity(..) => return Err(Untranslatable("quantity literals".into())),
            }),
            ExprKind::Var(name) if name == "rowIndex" => {
                Ok(Sql::Scalar(focus.row_index.clone(), ColumnKind::Int))
            }
            ExprKind::Var(name) => match self.view.constants.get(name) {
                Some(Value::Bool(b)) => {
                    Ok(Sql::Scalar(b.to_string().to_uppercase(), ColumnKind::Bool))
                }
                Some(Value::Int(i)) => Ok(Sql::Scalar(i.to_string(), ColumnKind::Int)),
                Some(Value::Dec(d, _)) => Ok(Sql::Scalar(format!("{d}"), ColumnKind::Dec)),
                Some(Value::Str(s) | Value::Date(s) | Value::DateTime(s) | Value::Time(s)) => {
                    Ok(Sql::Scalar(string(s), ColumnKind::Str))
                }
                _ => Err(Untranslatable(format!("constant %{name}"))),
            },
            ExprKind::This => match self.focus_coll(focus) {
                Some(c) => Ok(Sql::Coll(c, focus.ty)),
                None => Err(Untranslatable("$this on the resource".into())),
            },
            ExprKind::Empty => Ok(Sql::Coll(
                match self.dialect {
                    Dialect::Trino => "CAST(ARRAY[] AS ARRAY(JSON))".into(),
                    Dialect::DuckDb => "CAST([] AS JSON[])".into(),
                },
                None,
            )),
            ExprKind::Indexer(base, i) => {
                let ExprKind::Lit(Lit::Int(n)) = i.kind else {
                    return Err(Untranslatable("an index that is not a number".into()));
                };
                let (c, ty) = self.coll(self.expr(base, focus)?);
                Ok(Sql::Coll(self.slice(&c, n + 1), ty))
            }
            ExprKind::Binary(op, l, r) => self.binary(*op, l, r, focus),
            ExprKind::Call { base, name, args } => {
                let input = match base {
                    Some(b) => self.expr(b, focus)?,
                    None => match self.focus_coll(focus) {
                        Some(c) => Sql::Coll(c, focus.ty),
                        None if name == "getResourceKey" => return Ok(self.resource_key()),
                        // The resource's own extensions: its `extension` column.
                        None if name == "extension" => Sql::Coll(String::new(), focus.ty),
                        None => return Err(Untranslatable(format!("{name}() on the resource"))),
                    },
                };
                self.call(base.as_deref(), name, args, input, focus)
            }
            ExprKind::Neg(inner) => {
                let v = self.scalar(self.expr(inner, focus)?, ColumnKind::Dec);
                Ok(Sql::Scalar(format!("(-{v})"), ColumnKind::Dec))
            }
            other => Err(Untranslatable(format!(
                "{other:?} has no SQL translation here"
            ))),
        }
    }

    fn slice(&self, c: &str, one_based: i64) -> String {
        match self.dialect {
            Dialect::Trino => format!("slice({c}, {one_based}, 1)"),
            Dialect::DuckDb => format!("{c}[{one_based}:{one_based}]"),
        }
    }

    fn resource_key(&self) -> Sql {
        match self.root {
            Root::Json => Sql::Scalar(
                "json_extract_string(r.json, '$.id')".into(),
                ColumnKind::Str,
            ),
            Root::Columns(_) => Sql::Scalar("r.\"id\"".into(), ColumnKind::Str),
        }
    }

    fn call(&self, base: Option<&Expr>, name: &str, args: &[Expr], input: Sql, focus: &Focus) -> T {
        let lambda = |f: &str, c: &str, body: &str| match self.dialect {
            Dialect::Trino => format!("{f}({c}, x -> {body})"),
            Dialect::DuckDb => format!("list_{f}({c}, lambda x: {body})"),
        };
        let len = |c: &str| match self.dialect {
            Dialect::Trino => format!("cardinality({c})"),
            Dialect::DuckDb => format!("len({c})"),
        };
        match name {
            "ofType" => {
                let ty = args
                    .first()
                    .and_then(type_arg)
                    .ok_or_else(|| Untranslatable("ofType without a type".into()))?;
                let bare = ty.rsplit('.').next().unwrap_or(&ty).to_string();
                // `value.ofType(Quantity)`: the choice key itself.
                if let Some(b) = base {
                    let (parent, member) = match &b.kind {
                        ExprKind::Ident(n) => (None, n),
                        ExprKind::Member(p, n) => (Some(p.as_ref()), n),
                        _ => return Err(Untranslatable("ofType() of a computed value".into())),
                    };
                    let (pc, pty) = match parent {
                        None => (self.focus_coll(focus), focus.ty),
                        Some(p) => {
                            let (c, t) = self.coll(self.expr(p, focus)?);
                            (Some(c), t)
                        }
                    };
                    return self.navigate(pc.as_deref(), pty, member, Some(&bare));
                }
                Err(Untranslatable("ofType() on the focus".into()))
            }
            "where" => {
                let (c, ty) = self.coll(input);
                let inner = Focus {
                    item: Some("x".into()),
                    ty,
                    row_index: focus.row_index.clone(),
                };
                let cond = self.scalar(self.expr(&args[0], &inner)?, ColumnKind::Bool);
                Ok(Sql::Coll(
                    lambda("filter", &c, &format!("coalesce({cond}, FALSE)")),
                    ty,
                ))
            }
            "exists" => {
                let input = if let Some(cond) = args.first() {
                    self.call(base, "where", std::slice::from_ref(cond), input, focus)?
                } else {
                    input
                };
                let (c, _) = self.coll(input);
                Ok(Sql::Scalar(format!("({} > 0)", len(&c)), ColumnKind::Bool))
            }
            "empty" => {
                let (c, _) = self.coll(input);
                Ok(Sql::Scalar(format!("({} = 0)", len(&c)), ColumnKind::Bool))
            }
            "count" => {
                let (c, _) = self.coll(input);
                Ok(Sql::Scalar(len(&c), ColumnKind::Int))
            }
            "first" => {
                let (c, ty) = self.coll(input);
                Ok(Sql::Coll(self.slice(&c, 1), ty))
            }
            "last" => {
                let (c, ty) = self.coll(input);
                Ok(Sql::Coll(self.slice(&c, -1), ty))
            }
            "not" => {
                let b = self.scalar(input, ColumnKind::Bool);
                Ok(Sql::Scalar(format!("(NOT {b})"), ColumnKind::Bool))
            }
            "join" => {
                let sep = match args.first().map(|a| &a.kind) {
                    None => String::new(),
                    Some(ExprKind::Lit(Lit::Str(s))) => s.clone(),
                    _ => return Err(Untranslatable("join() with a computed separator".into())),
                };
                let (c, _) = self.coll(input);
                let texts = lambda("transform", &c, &self.text_of("x"));
                Ok(Sql::Scalar(
                    match self.dialect {
                        Dialect::Trino => format!("array_join({texts}, {})", string(&sep)),
                        Dialect::DuckDb => format!("array_to_string({texts}, {})", string(&sep)),
                    },
                    ColumnKind::Str,
                ))
            }
            "extension" => {
                let url = match args.first().map(|a| &a.kind) {
                    Some(ExprKind::Lit(Lit::Str(url))) => url.clone(),
                    Some(ExprKind::Var(v)) => match self.view.constants.get(v) {
                        Some(Value::Str(url)) => url.to_string(),
                        _ => {
                            return Err(Untranslatable(format!(
                                "extension(%{v}) with a constant that is not a string"
                            )))
                        }
                    },
                    _ => return Err(Untranslatable("extension() with a computed url".into())),
                };
                let url = &url;
                let ext = match (&input, &focus.item, base) {
                    (Sql::Coll(c, ty), None, None) if c.is_empty() => {
                        self.navigate(None, *ty, "extension", None)?
                    }
                    _ => {
                        let (c, ty) = self.coll(input);
                        self.navigate(Some(&c), ty, "extension", None)?
                    }
                };
                let (ec, ety) = self.coll(ext);
                let url_of = match self.dialect {
                    Dialect::Trino => "json_extract_scalar(x, '$.url')",
                    Dialect::DuckDb => "json_extract_string(x, '$.url')",
                };
                Ok(Sql::Coll(
                    lambda("filter", &ec, &format!("{url_of} = {}", string(url))),
                    ety,
                ))
            }
            "getResourceKey" => Ok(self.resource_key()),
            "getReferenceKey" => {
                let want = args.first().and_then(type_arg);
                let (c, ty) = self.coll(input);
                let refs = self.navigate(Some(&c), ty, "reference", None)?;
                let r = self.scalar(refs, ColumnKind::Str);
                let pattern = "'([A-Za-z]+)/([^/]+?)(/_history/.*)?$'";
                let id = format!("regexp_extract({r}, {pattern}, 2)");
                Ok(Sql::Scalar(
                    match want {
                        Some(t) => format!(
                            "(CASE WHEN regexp_extract({r}, {pattern}, 1) = {} THEN {id} END)",
                            string(t.rsplit('.').next().unwrap_or(&t))
                        ),
                        None => id,
                    },
                    ColumnKind::Str,
                ))
            }
            other => Err(Untranslatable(format!("{other}() has no SQL translation"))),
        }
    }

    fn binary(&self, op: BinOp, l: &Expr, r: &Expr, focus: &Focus) -> T {
        use BinOp::*;
        let a = self.expr(l, focus)?;
        let b = self.expr(r, focus)?;
        let kind_of = |s: &Sql, other: &Sql| match (s, other) {
            (Sql::Scalar(_, k), _) => *k,
            (Sql::Coll(_, t), Sql::Scalar(_, k)) => t.map_or(*k, kind_for),
            (Sql::Coll(_, t), Sql::Coll(_, u)) => t.or(*u).map_or(ColumnKind::Str, kind_for),
        };
        Ok(match op {
            And | Or => {
                let (x, y) = (
                    self.scalar(a, ColumnKind::Bool),
                    self.scalar(b, ColumnKind::Bool),
                );
                Sql::Scalar(
                    format!("({x} {} {y})", if op == And { "AND" } else { "OR" }),
                    ColumnKind::Bool,
                )
            }
            Implies => {
                let (x, y) = (
                    self.scalar(a, ColumnKind::Bool),
                    self.scalar(b, ColumnKind::Bool),
                );
                Sql::Scalar(format!("((NOT {x}) OR {y})"), ColumnKind::Bool)
            }
            Eq | Ne | Lt | Gt | Le | Ge => {
                let k = kind_of(&a, &b);
                let k = if k == ColumnKind::Json {
                    ColumnKind::Str
                } else {
                    k
                };
                let (x, y) = (self.scalar(a, k), self.scalar(b, k));
                let sym = match op {
                    Eq => "=",
                    Ne => "<>",
                    _ => op.symbol(),
                };
                Sql::Scalar(format!("({x} {sym} {y})"), ColumnKind::Bool)
            }
            Add | Sub | Mul | Div => {
                let (x, y) = (
                    self.scalar(a, ColumnKind::Dec),
                    self.scalar(b, ColumnKind::Dec),
                );
                Sql::Scalar(format!("({x} {} {y})", op.symbol()), ColumnKind::Dec)
            }
            Concat => {
                let (x, y) = (
                    self.scalar(a, ColumnKind::Str),
                    self.scalar(b, ColumnKind::Str),
                );
                Sql::Scalar(
                    format!("concat(coalesce({x}, ''), coalesce({y}, ''))"),
                    ColumnKind::Str,
                )
            }
            Union => {
                let ((x, t), (y, _)) = (self.coll(a), self.coll(b));
                Sql::Coll(self.concat(vec![x, y]), t)
            }
            other => return Err(Untranslatable(format!("operator {}", other.symbol()))),
        })
    }
}

fn is_text(ty: Option<TypeId>) -> bool {
    ty.is_some_and(|t| ColumnKind::of_type_name(TYPES[t as usize].name) == ColumnKind::Str)
}

fn kind_for(t: TypeId) -> ColumnKind {
    ColumnKind::of_type_name(TYPES[t as usize].name)
}

fn product(a: &[Plan], b: &[Plan]) -> Vec<Plan> {
    let mut out = Vec::new();
    for x in a {
        for y in b {
            let mut p = x.clone();
            p.joins.extend(y.joins.iter().cloned());
            p.columns.extend(y.columns.iter().cloned());
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::Path;

    fn view(text: &str) -> View {
        View::parse(text).unwrap()
    }

    const DEMOGRAPHICS: &str = r#"{"resource": "Patient", "select": [{"column": [
        {"name": "id", "path": "getResourceKey()", "type": "string"},
        {"name": "gender", "path": "gender", "type": "code"},
        {"name": "birth_date", "path": "birthDate", "type": "date"},
        {"name": "family", "path": "name.where(use = 'official').family.first()", "type": "string"},
        {"name": "given", "path": "name.given.join(' ')", "type": "string"},
        {"name": "has_phone", "path": "telecom.where(system = 'phone').exists()", "type": "boolean"}]}]}"#;

    const COMPONENTS: &str = r#"{"resource": "Observation", "select": [
        {"column": [{"name": "id", "path": "getResourceKey()", "type": "string"},
                    {"name": "patient", "path": "subject.getReferenceKey(Patient)", "type": "string"}]},
        {"forEach": "component", "column": [
            {"name": "i", "path": "%rowIndex", "type": "integer"},
            {"name": "code", "path": "code.coding.first().code", "type": "code"},
            {"name": "value", "path": "value.ofType(Quantity).value", "type": "decimal"},
            {"name": "unit", "path": "value.ofType(Quantity).unit", "type": "string"}]}]}"#;

    #[test]
    fn athena_sql_over_curated_and_healthlake_tables() {
        let t = create_view(
            &view(DEMOGRAPHICS),
            "demographics",
            "analytics",
            Source::Curated,
        );
        assert!(t.notes.is_empty(), "{:?}", t.notes);
        assert!(
            t.text
                .starts_with("CREATE OR REPLACE VIEW \"analytics\".\"demographics\" AS\nSELECT"),
            "{}",
            t.text
        );
        assert!(
            t.text
                .contains("FROM \"external_fhir_curated\".\"patient\" AS r"),
            "{}",
            t.text
        );
        assert!(t.text.contains("json_parse(r.\"name\")"), "{}", t.text);
        assert!(t.text.contains("CAST(r.\"gender\" AS JSON)"), "{}", t.text);
        assert!(t.text.contains("array_join("), "{}", t.text);
        let t = create_view(
            &view(COMPONENTS),
            "components",
            "healthlake_db",
            Source::HealthLake,
        );
        assert!(t.notes.is_empty(), "{:?}", t.notes);
        assert!(
            t.text
                .contains("FROM \"healthlake_db\".\"observation\" AS r"),
            "{}",
            t.text
        );
        assert!(t.text.contains("CROSS JOIN UNNEST("), "{}", t.text);
        assert!(
            t.text.contains("WITH ORDINALITY AS u1(item, ord)"),
            "{}",
            t.text
        );
        assert!(
            t.text.contains("'$.valuequantity'"),
            "lower-cased keys: {}",
            t.text
        );
        assert!(t.text.contains("(u1.ord - 1)"), "{}", t.text);
    }

    #[test]
    fn union_all_and_what_does_not_translate() {
        let v = view(
            r#"{"resource": "Patient", "select": [{"column": [{"name": "id", "path": "id"}]},
                {"unionAll": [{"forEach": "telecom", "column": [{"name": "v", "path": "value"}]},
                              {"forEach": "contact.telecom", "column": [{"name": "v", "path": "value"}]}]}]}"#,
        );
        let t = create_view(&v, "tel", "db", Source::Curated);
        assert_eq!(t.text.matches("UNION ALL").count(), 1, "{}", t.text);
        let v = view(
            r#"{"resource": "QuestionnaireResponse", "select": [{"column": [{"name": "id", "path": "id"}]},
                {"repeat": ["item"], "column": [{"name": "link", "path": "linkId"}]},
                {"column": [{"name": "b", "path": "authored.lowBoundary()"}]}]}"#,
        );
        let t = create_view(&v, "qr", "db", Source::Curated);
        assert_eq!(t.notes.len(), 2, "{:?}", t.notes);
        assert!(
            t.notes[0].contains("repeat [item] has no translation"),
            "{:?}",
            t.notes
        );
        assert!(
            t.notes[1].contains("column b")
                && t.notes[1].contains("lowBoundary() has no SQL translation"),
            "{:?}",
            t.notes
        );
        assert!(
            t.text.contains("CAST(NULL AS VARCHAR) AS \"link\""),
            "{}",
            t.text
        );
    }

    /// The rows of `sql` from DuckDB (the test suite's venv), as JSON.
    fn duckdb(sql: &str) -> Vec<serde_json::Value> {
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
        assert!(
            python.is_file(),
            "{} is missing: run tests/run.sh (it installs duckdb)",
            python.display()
        );
        let script = "import sys, json, duckdb\n\
            con = duckdb.connect()\n\
            cur = con.execute(sys.stdin.read())\n\
            cols = [d[0] for d in cur.description]\n\
            print(json.dumps([dict(zip(cols, r)) for r in cur.fetchall()], default=str))\n";
        let mut child = std::process::Command::new(&python)
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run python");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(sql.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "duckdb failed on\n{sql}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn canonical(v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::Number(n) => format!("{:.6}", n.as_f64().unwrap()),
            serde_json::Value::String(s) => match s.parse::<f64>() {
                Ok(f) if s.contains('.') => format!("{f:.6}"),
                _ => format!("{s:?}"),
            },
            other => other.to_string(),
        }
    }

    /// DuckDB's rows of the translation equal fhirflow's own rows.
    fn same_rows(text: &str, file: &Path) {
        let v = view(text);
        let t = duckdb_select(&v, file.to_str().unwrap());
        assert!(t.notes.is_empty(), "{:?}", t.notes);
        let lines: Vec<String> = std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        let ours = crate::suite::evaluate(&v, &lines).unwrap();
        let names = v.column_names();
        let mut a: Vec<String> = ours
            .iter()
            .map(|r| {
                r.iter()
                    .map(|c| canonical(&crate::suite::cell_json(c)))
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect();
        let mut b: Vec<String> = duckdb(&t.text)
            .iter()
            .map(|r| {
                names
                    .iter()
                    .map(|n| canonical(&r[*n]))
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect();
        a.sort();
        b.sort();
        assert!(!a.is_empty());
        assert_eq!(a.len(), b.len(), "{}", t.text);
        let differ: Vec<_> = a.iter().zip(&b).filter(|(x, y)| x != y).take(3).collect();
        assert!(differ.is_empty(), "{differ:?}\n{}", t.text);
    }

    fn shared(p: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data")
            .join(p)
    }

    /// Each default view (the repository's `queries/views/`) over the
    /// sample files of its type.
    #[test]
    fn the_default_views_translate_to_the_same_rows() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../queries/views");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let text = std::fs::read_to_string(&p).unwrap();
            let ty = view(&text).resource;
            let file = match ty {
                "Observation" => shared("pathling-r4/Observation.ndjson"),
                t => shared(&format!("synthea-10/{t}.000.ndjson")),
            };
            same_rows(&text, &file);
            n += 1;
        }
        assert_eq!(n, 6);
    }

    #[test]
    fn the_duckdb_translation_gives_fhirflow_s_rows() {
        same_rows(DEMOGRAPHICS, &shared("synthea-10/Patient.000.ndjson"));
        same_rows(COMPONENTS, &shared("pathling-r4/Observation.ndjson"));
        same_rows(
            r#"{"resource": "Encounter", "constant": [{"name": "amb", "valueCode": "AMB"}],
                "where": [{"path": "class.code = %amb"}],
                "select": [{"column": [{"name": "id", "path": "id", "type": "id"},
                    {"name": "patient", "path": "subject.getReferenceKey(Patient)", "type": "string"},
                    {"name": "start", "path": "period.start", "type": "dateTime"}]},
                  {"forEachOrNull": "reasonCode.coding", "column": [{"name": "reason", "path": "code", "type": "code"}]}]}"#,
            &shared("synthea-10/Encounter.000.ndjson"),
        );
        same_rows(
            r#"{"resource": "Patient", "constant": [{"name": "race", "valueUri": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"}],
                "select": [{"column": [{"name": "id", "path": "id"},
                  {"name": "race", "path": "extension(%race).extension('ombCategory').value.ofType(Coding).display.first()", "type": "string"},
                  {"name": "names", "path": "name.family.count()", "type": "integer"}]}]}"#,
            &shared("synthea-10/Patient.000.ndjson"),
        );
        same_rows(
            r#"{"resource": "Immunization", "select": [{"column": [{"name": "id", "path": "id"},
                {"name": "vaccine", "path": "vaccineCode.coding.where(system = 'http://hl7.org/fhir/sid/cvx').code.first()", "type": "code"},
                {"name": "primary", "path": "primarySource", "type": "boolean"}]}]}"#,
            &shared("synthea-10/Immunization.000.ndjson"),
        );
    }
}
