//! FHIRPath text to an [`Expr`] tree: a lexer and a precedence-climbing
//! parser for the grammar of the FHIRPath N1 specification
//! (<http://hl7.org/fhirpath/N1/grammar.html>), without the parts no
//! ViewDefinition or invariant uses (type specifiers beyond a qualified
//! name, `$total`'s aggregate context).
//!
//! Every node keeps the byte offset it starts at, so that an error found
//! later (an unknown element, a wrong argument) can point into the text.

use std::fmt;

/// A syntax error: what was wrong and the byte offset where it was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at offset {}", self.message, self.offset)
    }
}

impl std::error::Error for ParseError {}

/// A literal, as written.
#[derive(Debug, Clone, PartialEq)]
pub enum Lit {
    Bool(bool),
    Int(i64),
    /// The value and the number of digits after the point (a decimal's
    /// precision, which `lowBoundary` and `highBoundary` read).
    Dec(f64, u8),
    Str(String),
    /// `@2020-01-01`, without the `@`.
    Date(String),
    /// `@2020-01-01T10:00`, without the `@`.
    DateTime(String),
    /// `@T10:00`, without the `@T`.
    Time(String),
    /// `5 'mg'` or `5 days`.
    Quantity(f64, u8, String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Mul,
    Div,
    IntDiv,
    Mod,
    Add,
    Sub,
    Concat,
    Union,
    Lt,
    Gt,
    Le,
    Ge,
    Eq,
    Ne,
    Equiv,
    NotEquiv,
    In,
    Contains,
    And,
    Or,
    Xor,
    Implies,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        use BinOp::*;
        match self {
            Mul => "*",
            Div => "/",
            IntDiv => "div",
            Mod => "mod",
            Add => "+",
            Sub => "-",
            Concat => "&",
            Union => "|",
            Lt => "<",
            Gt => ">",
            Le => "<=",
            Ge => ">=",
            Eq => "=",
            Ne => "!=",
            Equiv => "~",
            NotEquiv => "!~",
            In => "in",
            Contains => "contains",
            And => "and",
            Or => "or",
            Xor => "xor",
            Implies => "implies",
        }
    }

    /// Binding strength: higher binds tighter (the specification's
    /// precedence table, read bottom up).
    fn precedence(self) -> u8 {
        use BinOp::*;
        match self {
            Mul | Div | IntDiv | Mod => 10,
            Add | Sub | Concat => 9,
            Union => 7,
            Lt | Gt | Le | Ge => 6,
            Eq | Ne | Equiv | NotEquiv => 5,
            In | Contains => 4,
            And => 3,
            Or | Xor => 2,
            Implies => 1,
        }
    }
}

/// One node of an expression, with the offset it starts at.
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    pub at: usize,
    pub kind: ExprKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    /// `{}`
    Empty,
    Lit(Lit),
    /// `$this`
    This,
    /// `$index`
    Index,
    /// `$total`
    Total,
    /// `%name` (a constant, `%rowIndex`, `%resource`, ...).
    Var(String),
    /// A name: navigation from the focus (`name`), or, first in a path, the
    /// resource type of the focus (`Patient.name`).
    Ident(String),
    /// `base.name` where `name` is not a call.
    Member(Box<Expr>, String),
    /// `base.f(args)`, or `f(args)` on the focus when `base` is None.
    Call {
        base: Option<Box<Expr>>,
        name: String,
        args: Vec<Expr>,
    },
    /// `base[index]`
    Indexer(Box<Expr>, Box<Expr>),
    /// Unary minus (unary plus is dropped when parsed).
    Neg(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `x is T`
    Is(Box<Expr>, String),
    /// `x as T`
    As(Box<Expr>, String),
}

/// Parses a whole FHIRPath expression.
pub fn parse(text: &str) -> Result<Expr, ParseError> {
    let tokens = lex(text)?;
    let mut p = Parser {
        tokens,
        i: 0,
        end: text.len(),
    };
    let e = p.expr(0)?;
    match p.peek() {
        None => Ok(e),
        Some(t) => Err(p.error_at(t.at, format!("unexpected {}", t.tok.describe()))),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// A back-quoted identifier: never a keyword.
    Quoted(String),
    Str(String),
    /// The digits as written.
    Num(String),
    DateTime(String),
    Time(String),
    Var(String),
    Special(&'static str),
    Sym(&'static str),
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) | Tok::Quoted(s) => format!("'{s}'"),
            Tok::Str(s) => format!("string '{s}'"),
            Tok::Num(s) => format!("number {s}"),
            Tok::DateTime(s) => format!("@{s}"),
            Tok::Time(s) => format!("@T{s}"),
            Tok::Var(s) => format!("%{s}"),
            Tok::Special(s) | Tok::Sym(s) => format!("'{s}'"),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    at: usize,
    tok: Tok,
}

const SYMBOLS: [&str; 20] = [
    "<=", ">=", "!=", "!~", "(", ")", "[", "]", "{", "}", ".", ",", "+", "-", "*", "/", "&", "|",
    "<", ">",
];

fn lex(text: &str) -> Result<Vec<Token>, ParseError> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |at: usize, m: &str| ParseError {
        offset: at,
        message: m.to_string(),
    };
    while i < b.len() {
        let c = b[i];
        let at = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            match text[i + 2..].find("*/") {
                Some(n) => i += n + 4,
                None => return Err(err(at, "unterminated comment")),
            }
            continue;
        }
        let tok = if c.is_ascii_alphabetic() || c == b'_' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            Tok::Ident(text[at..i].to_string())
        } else if c.is_ascii_digit() {
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
            }
            Tok::Num(text[at..i].to_string())
        } else if c == b'\'' || c == b'`' {
            let (s, n) = quoted(text, i).ok_or_else(|| err(at, "unterminated string"))?;
            i = n;
            if c == b'`' {
                Tok::Quoted(s)
            } else {
                Tok::Str(s)
            }
        } else if c == b'$' {
            i += 1;
            while i < b.len() && b[i].is_ascii_alphanumeric() {
                i += 1;
            }
            match &text[at..i] {
                "$this" => Tok::Special("this"),
                "$index" => Tok::Special("index"),
                "$total" => Tok::Special("total"),
                other => return Err(err(at, &format!("unknown variable {other}"))),
            }
        } else if c == b'%' {
            i += 1;
            if b.get(i).is_some_and(|&c| c == b'\'' || c == b'`') {
                let (s, n) = quoted(text, i).ok_or_else(|| err(at, "unterminated name"))?;
                i = n;
                Tok::Var(s)
            } else {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                if start == i {
                    return Err(err(at, "a name must follow %"));
                }
                Tok::Var(text[start..i].to_string())
            }
        } else if c == b'@' {
            i += 1;
            let time = b.get(i) == Some(&b'T');
            if time {
                i += 1;
            }
            let start = i;
            while i < b.len()
                && (b[i].is_ascii_digit()
                    || matches!(b[i], b'-' | b':' | b'.' | b'T' | b'Z' | b'+'))
            {
                // `+` and `-` inside a date-time are its offset; a `-` or
                // `+` after a space is an operator, which the loop never sees.
                i += 1;
            }
            if start == i && !time {
                return Err(err(at, "a date or time must follow @"));
            }
            let s = text[start..i].to_string();
            if time {
                Tok::Time(s)
            } else {
                Tok::DateTime(s)
            }
        } else if c == b'=' {
            i += 1;
            Tok::Sym("=")
        } else if c == b'~' {
            i += 1;
            Tok::Sym("~")
        } else {
            match SYMBOLS.iter().find(|s| text[i..].starts_with(**s)) {
                Some(s) => {
                    i += s.len();
                    Tok::Sym(s)
                }
                None => {
                    let ch = text[i..].chars().next().unwrap_or('?');
                    return Err(err(at, &format!("unexpected character '{ch}'")));
                }
            }
        };
        out.push(Token { at, tok });
    }
    Ok(out)
}

/// A string in `'…'` or `` `…` `` starting at `i`, with FHIRPath's escapes
/// decoded; and the offset after it.
fn quoted(text: &str, i: usize) -> Option<(String, usize)> {
    let b = text.as_bytes();
    let q = b[i];
    let mut s = String::new();
    let mut j = i + 1;
    loop {
        let c = *b.get(j)?;
        if c == q {
            return Some((s, j + 1));
        }
        if c == b'\\' {
            let e = *b.get(j + 1)?;
            j += 2;
            match e {
                b'n' => s.push('\n'),
                b'r' => s.push('\r'),
                b't' => s.push('\t'),
                b'f' => s.push('\u{c}'),
                b'u' => {
                    let hex = text.get(j..j + 4)?;
                    let cp = u32::from_str_radix(hex, 16).ok()?;
                    s.push(char::from_u32(cp)?);
                    j += 4;
                }
                other => s.push(other as char),
            }
            continue;
        }
        let ch = text[j..].chars().next()?;
        s.push(ch);
        j += ch.len_utf8();
    }
}

struct Parser {
    tokens: Vec<Token>,
    i: usize,
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.i)
    }

    fn at(&self) -> usize {
        self.peek().map_or(self.end, |t| t.at)
    }

    fn error_at(&self, offset: usize, message: String) -> ParseError {
        ParseError { offset, message }
    }

    fn is_sym(&self, s: &str) -> bool {
        matches!(self.peek(), Some(Token { tok: Tok::Sym(t), .. }) if *t == s)
    }

    fn expect(&mut self, s: &str) -> Result<(), ParseError> {
        if self.is_sym(s) {
            self.i += 1;
            Ok(())
        } else {
            let found = self
                .peek()
                .map_or("the end".to_string(), |t| t.tok.describe());
            Err(self.error_at(self.at(), format!("expected '{s}', found {found}")))
        }
    }

    /// The binary operator at the cursor, if any.
    fn binop(&self) -> Option<BinOp> {
        use BinOp::*;
        Some(match &self.peek()?.tok {
            Tok::Sym(s) => match *s {
                "*" => Mul,
                "/" => Div,
                "+" => Add,
                "-" => Sub,
                "&" => Concat,
                "|" => Union,
                "<" => Lt,
                ">" => Gt,
                "<=" => Le,
                ">=" => Ge,
                "=" => Eq,
                "!=" => Ne,
                "~" => Equiv,
                "!~" => NotEquiv,
                _ => return None,
            },
            Tok::Ident(s) => match s.as_str() {
                "div" => IntDiv,
                "mod" => Mod,
                "in" => In,
                "contains" => Contains,
                "and" => And,
                "or" => Or,
                "xor" => Xor,
                "implies" => Implies,
                _ => return None,
            },
            _ => return None,
        })
    }

    fn type_keyword(&self) -> Option<&'static str> {
        match &self.peek()?.tok {
            Tok::Ident(s) if s == "is" => Some("is"),
            Tok::Ident(s) if s == "as" => Some("as"),
            _ => None,
        }
    }

    /// Precedence climbing: operators binding tighter than `min`.
    fn expr(&mut self, min: u8) -> Result<Expr, ParseError> {
        let mut left = self.unary()?;
        loop {
            // `is` / `as` bind between `+` and `|` (precedence 8).
            if let Some(kw) = self.type_keyword() {
                if 8 <= min {
                    break;
                }
                let at = left.at;
                self.i += 1;
                let ty = self.type_name()?;
                let kind = if kw == "is" {
                    ExprKind::Is(Box::new(left), ty)
                } else {
                    ExprKind::As(Box::new(left), ty)
                };
                left = Expr { at, kind };
                continue;
            }
            let Some(op) = self.binop() else { break };
            let p = op.precedence();
            if p <= min {
                break;
            }
            self.i += 1;
            let right = self.expr(p)?;
            let at = left.at;
            left = Expr {
                at,
                kind: ExprKind::Binary(op, Box::new(left), Box::new(right)),
            };
        }
        Ok(left)
    }

    /// A qualified type name: `Quantity`, `FHIR.Quantity`, `System.String`.
    fn type_name(&mut self) -> Result<String, ParseError> {
        let mut name = self.identifier()?;
        while self.is_sym(".") {
            self.i += 1;
            name.push('.');
            name.push_str(&self.identifier()?);
        }
        Ok(name)
    }

    fn identifier(&mut self) -> Result<String, ParseError> {
        match self.peek().map(|t| t.tok.clone()) {
            Some(Tok::Ident(s)) | Some(Tok::Quoted(s)) => {
                self.i += 1;
                Ok(s)
            }
            other => {
                let found = other.map_or("the end".to_string(), |t| t.describe());
                Err(self.error_at(self.at(), format!("expected a name, found {found}")))
            }
        }
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        let at = self.at();
        if self.is_sym("-") {
            self.i += 1;
            let e = self.unary()?;
            return Ok(Expr {
                at,
                kind: ExprKind::Neg(Box::new(e)),
            });
        }
        if self.is_sym("+") {
            self.i += 1;
            return self.unary();
        }
        self.postfix()
    }

    /// A term followed by `.member`, `.call(...)` and `[index]`.
    fn postfix(&mut self) -> Result<Expr, ParseError> {
        let mut e = self.term()?;
        loop {
            if self.is_sym(".") {
                self.i += 1;
                let at = self.at();
                let name = self.identifier()?;
                if self.is_sym("(") {
                    let args = self.args()?;
                    e = Expr {
                        at,
                        kind: ExprKind::Call {
                            base: Some(Box::new(e)),
                            name,
                            args,
                        },
                    };
                } else {
                    e = Expr {
                        at,
                        kind: ExprKind::Member(Box::new(e), name),
                    };
                }
            } else if self.is_sym("[") {
                let at = self.at();
                self.i += 1;
                let index = self.expr(0)?;
                self.expect("]")?;
                e = Expr {
                    at,
                    kind: ExprKind::Indexer(Box::new(e), Box::new(index)),
                };
            } else {
                return Ok(e);
            }
        }
    }

    fn args(&mut self) -> Result<Vec<Expr>, ParseError> {
        self.expect("(")?;
        let mut args = Vec::new();
        if self.is_sym(")") {
            self.i += 1;
            return Ok(args);
        }
        loop {
            args.push(self.expr(0)?);
            if self.is_sym(",") {
                self.i += 1;
                continue;
            }
            self.expect(")")?;
            return Ok(args);
        }
    }

    fn term(&mut self) -> Result<Expr, ParseError> {
        let Some(t) = self.peek().cloned() else {
            return Err(self.error_at(self.end, "the expression ends early".into()));
        };
        let at = t.at;
        let lit = |l| Expr {
            at,
            kind: ExprKind::Lit(l),
        };
        self.i += 1;
        Ok(match t.tok {
            Tok::Sym("(") => {
                let e = self.expr(0)?;
                self.expect(")")?;
                e
            }
            Tok::Sym("{") => {
                self.expect("}")?;
                Expr {
                    at,
                    kind: ExprKind::Empty,
                }
            }
            Tok::Str(s) => lit(Lit::Str(s)),
            Tok::Num(n) => self.number(at, &n)?,
            Tok::DateTime(s) => {
                if s.contains('T') {
                    lit(Lit::DateTime(s.trim_end_matches('T').to_string()))
                } else {
                    lit(Lit::Date(s))
                }
            }
            Tok::Time(s) => lit(Lit::Time(s)),
            Tok::Var(s) => Expr {
                at,
                kind: ExprKind::Var(s),
            },
            Tok::Special(s) => Expr {
                at,
                kind: match s {
                    "this" => ExprKind::This,
                    "index" => ExprKind::Index,
                    _ => ExprKind::Total,
                },
            },
            Tok::Ident(s) if s == "true" || s == "false" => lit(Lit::Bool(s == "true")),
            Tok::Ident(name) | Tok::Quoted(name) => {
                if self.is_sym("(") {
                    let args = self.args()?;
                    Expr {
                        at,
                        kind: ExprKind::Call {
                            base: None,
                            name,
                            args,
                        },
                    }
                } else {
                    Expr {
                        at,
                        kind: ExprKind::Ident(name),
                    }
                }
            }
            other => {
                return Err(self.error_at(at, format!("unexpected {}", other.describe())));
            }
        })
    }

    /// A number, or a quantity when a unit follows it.
    fn number(&mut self, at: usize, text: &str) -> Result<Expr, ParseError> {
        let scale = text.split_once('.').map_or(0, |(_, f)| f.len()) as u8;
        let bad = || ParseError {
            offset: at,
            message: format!("number {text} is out of range"),
        };
        let unit = match self.peek().map(|t| &t.tok) {
            Some(Tok::Str(u)) => Some(u.clone()),
            Some(Tok::Ident(u)) if is_calendar_unit(u) => Some(u.clone()),
            _ => None,
        };
        let kind = if let Some(unit) = unit {
            self.i += 1;
            ExprKind::Lit(Lit::Quantity(text.parse().map_err(|_| bad())?, scale, unit))
        } else if text.contains('.') {
            ExprKind::Lit(Lit::Dec(text.parse().map_err(|_| bad())?, scale))
        } else {
            ExprKind::Lit(Lit::Int(text.parse().map_err(|_| bad())?))
        };
        Ok(Expr { at, kind })
    }
}

fn is_calendar_unit(u: &str) -> bool {
    matches!(
        u.trim_end_matches('s'),
        "year" | "month" | "week" | "day" | "hour" | "minute" | "second" | "millisecond"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(e: &Expr) -> String {
        match &e.kind {
            ExprKind::Empty => "{}".into(),
            ExprKind::Lit(l) => format!("{l:?}"),
            ExprKind::This => "$this".into(),
            ExprKind::Index => "$index".into(),
            ExprKind::Total => "$total".into(),
            ExprKind::Var(v) => format!("%{v}"),
            ExprKind::Ident(n) => n.clone(),
            ExprKind::Member(b, n) => format!("{}.{n}", show(b)),
            ExprKind::Call { base, name, args } => {
                let args: Vec<String> = args.iter().map(show).collect();
                match base {
                    Some(b) => format!("{}.{name}({})", show(b), args.join(",")),
                    None => format!("{name}({})", args.join(",")),
                }
            }
            ExprKind::Indexer(b, i) => format!("{}[{}]", show(b), show(i)),
            ExprKind::Neg(e) => format!("-({})", show(e)),
            ExprKind::Binary(op, l, r) => format!("({} {} {})", show(l), op.symbol(), show(r)),
            ExprKind::Is(e, t) => format!("({} is {t})", show(e)),
            ExprKind::As(e, t) => format!("({} as {t})", show(e)),
        }
    }

    #[test]
    fn operators_bind_as_the_specification_says() {
        let cases = [
            ("a.b.c", "a.b.c"),
            (
                "name.where(use = 'official').family.first()",
                "name.where((use = Str(\"official\"))).family.first()",
            ),
            ("a and b or c", "((a and b) or c)"),
            ("a = 1 + 2 * 3", "(a = (Int(1) + (Int(2) * Int(3))))"),
            ("a | b = c", "((a | b) = c)"),
            ("x is Quantity and y", "((x is Quantity) and y)"),
            ("-a.b", "-(a.b)"),
            ("name[0].given", "name[Int(0)].given"),
            ("a implies b xor c", "(a implies (b xor c))"),
            ("5 'mg'", "Quantity(5.0, 0, \"mg\")"),
            (
                "@2020-01 = @2020-01-02T10:00Z",
                "(Date(\"2020-01\") = DateTime(\"2020-01-02T10:00Z\"))",
            ),
            ("`div`.x", "div.x"),
            ("value.ofType(FHIR.Quantity)", "value.ofType(FHIR.Quantity)"),
            ("1.50", "Dec(1.5, 2)"),
        ];
        for (text, want) in cases {
            assert_eq!(show(&parse(text).unwrap()), want, "{text}");
        }
    }

    #[test]
    fn errors_point_at_the_offending_offset() {
        for (text, offset) in [
            ("@@", 0),
            ("name.", 5),
            ("a.where(b", 9),
            ("a b", 2),
            ("'x", 0),
            ("a $x", 2),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.offset, offset, "{text}: {e}");
        }
    }
}
