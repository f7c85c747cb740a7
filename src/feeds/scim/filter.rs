//! SCIM filters (RFC 7644 §3.4.2.2) and attribute paths: the parser and an
//! evaluator over JSON resources.
//!
//! Supported: `eq ne co sw ew gt ge lt le pr`, `and`, `or`, `not (…)`,
//! parentheses, value paths (`emails[type eq "work"]`) and Entra's
//! `emails[type eq "work"].value eq "…"` form. Attribute names compare
//! case-insensitively; string values too, except for `id` and `externalId`
//! (`caseExact: true` in RFC 7643).
//!
//! This parser reads network input: it never panics, bounds its nesting and
//! input length, and answers every malformed filter with an error.

use serde_json::{Map, Value};

use super::resource::get_ci;

/// Longest filter accepted.
pub const MAX_FILTER_LEN: usize = 4096;
/// Deepest nesting of parentheses, `not` and value paths.
const MAX_DEPTH: usize = 32;

/// An attribute path: `[urn:…:]attr[.sub]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttrPath {
    /// Extension schema URN the attribute lives in (`None` for the core schema).
    pub urn: Option<String>,
    /// The attribute.
    pub attr: String,
    /// The sub-attribute, if any.
    pub sub: Option<String>,
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// Equal.
    Eq,
    /// Not equal.
    Ne,
    /// Contains.
    Co,
    /// Starts with.
    Sw,
    /// Ends with.
    Ew,
    /// Greater than.
    Gt,
    /// Greater or equal.
    Ge,
    /// Less than.
    Lt,
    /// Less or equal.
    Le,
}

/// A parsed filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// Both hold.
    And(Box<Filter>, Box<Filter>),
    /// Either holds.
    Or(Box<Filter>, Box<Filter>),
    /// The inner filter does not hold.
    Not(Box<Filter>),
    /// The attribute has a non-empty value.
    Present(AttrPath),
    /// The attribute compares to a literal.
    Compare(AttrPath, CmpOp, Value),
    /// Some element of a multi-valued attribute matches the inner filter.
    ValuePath(AttrPath, Box<Filter>),
}

/// Why a filter or path did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError(pub String);

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(m: impl Into<String>) -> Result<T, FilterError> {
    Err(FilterError(m.into()))
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Lit(Value),
    LParen,
    RParen,
    LBracket,
    RBracket,
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '$')
}

fn tokenize(s: &str) -> Result<Vec<Tok>, FilterError> {
    let mut out = Vec::new();
    let mut it = s.char_indices().peekable();
    while let Some(&(i, c)) = it.peek() {
        match c {
            c if c.is_whitespace() => {
                it.next();
            }
            '(' => {
                it.next();
                out.push(Tok::LParen);
            }
            ')' => {
                it.next();
                out.push(Tok::RParen);
            }
            '[' => {
                it.next();
                out.push(Tok::LBracket);
            }
            ']' => {
                it.next();
                // `].sub` continues the value path: the word after it starts with '.'.
                if let Some(&(_, '.')) = it.peek() {
                    let mut w = String::new();
                    while let Some(&(_, c)) = it.peek() {
                        if !is_word_char(c) {
                            break;
                        }
                        w.push(c);
                        it.next();
                    }
                    out.push(Tok::RBracket);
                    out.push(Tok::Word(w));
                    continue;
                }
                out.push(Tok::RBracket);
            }
            '"' => {
                // A JSON string literal: find its end honouring escapes, then
                // let serde_json decode it.
                let start = i;
                it.next();
                let mut end = None;
                let mut escaped = false;
                for (j, c) in it.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        end = Some(j);
                        break;
                    }
                }
                let Some(end) = end else {
                    return err("unterminated string");
                };
                match serde_json::from_str::<String>(&s[start..=end]) {
                    Ok(v) => out.push(Tok::Str(v)),
                    Err(_) => return err("bad string escape"),
                }
            }
            c if is_word_char(c) => {
                let mut w = String::new();
                while let Some(&(_, c)) = it.peek() {
                    if !is_word_char(c) {
                        break;
                    }
                    w.push(c);
                    it.next();
                }
                let lower = w.to_ascii_lowercase();
                let lit = match lower.as_str() {
                    "true" => Some(Value::Bool(true)),
                    "false" => Some(Value::Bool(false)),
                    "null" => Some(Value::Null),
                    _ if w.starts_with(|c: char| c.is_ascii_digit() || c == '-') => {
                        match serde_json::from_str::<serde_json::Number>(&w) {
                            Ok(n) => Some(Value::Number(n)),
                            Err(_) => return err(format!("bad number `{w}`")),
                        }
                    }
                    _ => None,
                };
                out.push(lit.map_or(Tok::Word(w), Tok::Lit));
            }
            c => return err(format!("unexpected character `{c}`")),
        }
    }
    Ok(out)
}

fn valid_name(n: &str) -> bool {
    let mut cs = n.chars();
    match cs.next() {
        Some('$') => n == "$ref",
        Some(c) if c.is_ascii_alphabetic() => {
            cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        }
        _ => false,
    }
}

/// Splits `urn:…:attr.sub` into its parts. `extensions` are the schema URNs
/// that name an object of their own (so `urn:…:enterprise:2.0:User` alone
/// is the extension object, not attribute `User` of `urn:…:2.0`).
pub fn parse_attr_path(s: &str, extensions: &[&str]) -> Result<AttrPath, FilterError> {
    let (urn, rest) = match split_urn(s, extensions) {
        Split::Core(rest) => (None, rest),
        Split::Ext(urn, rest) => (Some(urn), rest),
        Split::ExtObject(urn) => {
            return Ok(AttrPath {
                urn: None,
                attr: urn,
                sub: None,
            });
        }
    };
    let mut parts = rest.split('.');
    let attr = parts.next().unwrap_or_default();
    let sub = parts.next();
    if parts.next().is_some() {
        return err(format!("`{s}` is nested too deeply"));
    }
    if !valid_name(attr) || sub.is_some_and(|s| !valid_name(s)) {
        return err(format!("`{s}` is not an attribute path"));
    }
    Ok(AttrPath {
        urn,
        attr: attr.to_owned(),
        sub: sub.map(str::to_owned),
    })
}

/// The core schemas: a URN prefix naming them is dropped.
pub const CORE_SCHEMAS: [&str; 2] = [
    "urn:ietf:params:scim:schemas:core:2.0:User",
    "urn:ietf:params:scim:schemas:core:2.0:Group",
];

enum Split<'a> {
    /// A core attribute path (any core-schema URN prefix dropped).
    Core(&'a str),
    /// An attribute path inside an extension schema.
    Ext(String, &'a str),
    /// The extension object itself.
    ExtObject(String),
}

fn split_urn<'a>(s: &'a str, extensions: &[&str]) -> Split<'a> {
    if !s.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("urn:")) {
        return Split::Core(s);
    }
    // A known schema, alone or followed by `:attr`.
    for schema in CORE_SCHEMAS.iter().chain(extensions) {
        let Some(rest) = s
            .get(..schema.len())
            .filter(|p| p.eq_ignore_ascii_case(schema))
            .and_then(|_| s.get(schema.len()..))
        else {
            continue;
        };
        if let Some(attr) = rest.strip_prefix(':') {
            return if CORE_SCHEMAS.contains(schema) {
                Split::Core(attr)
            } else {
                Split::Ext((*schema).to_owned(), attr)
            };
        }
        if rest.is_empty() && !CORE_SCHEMAS.contains(schema) {
            return Split::ExtObject((*schema).to_owned());
        }
    }
    // Unknown schema: attribute names hold no ':', so the last one splits
    // (URNs themselves hold dots, as in `2.0`).
    match s.rfind(':') {
        Some(i) => Split::Ext(s[..i].to_owned(), &s[i + 1..]),
        None => Split::Core(s),
    }
}

struct Parser<'a> {
    toks: &'a [Tok],
    pos: usize,
    extensions: &'a [&'a str],
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn keyword(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw))
    }

    fn or(&mut self, depth: usize) -> Result<Filter, FilterError> {
        if depth > MAX_DEPTH {
            return err("filter is nested too deeply");
        }
        let mut f = self.and(depth)?;
        while self.keyword("or") {
            self.pos += 1;
            f = Filter::Or(Box::new(f), Box::new(self.and(depth)?));
        }
        Ok(f)
    }

    fn and(&mut self, depth: usize) -> Result<Filter, FilterError> {
        let mut f = self.unary(depth)?;
        while self.keyword("and") {
            self.pos += 1;
            f = Filter::And(Box::new(f), Box::new(self.unary(depth)?));
        }
        Ok(f)
    }

    fn unary(&mut self, depth: usize) -> Result<Filter, FilterError> {
        if self.keyword("not") {
            self.pos += 1;
            if self.next() != Some(Tok::LParen) {
                return err("`not` needs a parenthesised filter");
            }
            let f = self.or(depth + 1)?;
            if self.next() != Some(Tok::RParen) {
                return err("missing `)`");
            }
            return Ok(Filter::Not(Box::new(f)));
        }
        match self.next() {
            Some(Tok::LParen) => {
                let f = self.or(depth + 1)?;
                if self.next() != Some(Tok::RParen) {
                    return err("missing `)`");
                }
                Ok(f)
            }
            Some(Tok::Word(w)) => self.attr_expr(&w, depth),
            Some(_) => err("expected an attribute path"),
            None => err("unexpected end of filter"),
        }
    }

    fn attr_expr(&mut self, word: &str, depth: usize) -> Result<Filter, FilterError> {
        let path = parse_attr_path(word, self.extensions)?;
        if self.peek() == Some(&Tok::LBracket) {
            self.pos += 1;
            if path.sub.is_some() {
                return err(format!(
                    "`{word}[…]`: a filter follows an attribute, not a sub-attribute"
                ));
            }
            let inner = self.or(depth + 1)?;
            if self.next() != Some(Tok::RBracket) {
                return err("missing `]`");
            }
            // Entra: `emails[type eq "work"].value eq "x"`.
            if let Some(Tok::Word(w)) = self.peek().cloned()
                && let Some(sub) = w.strip_prefix('.')
            {
                self.pos += 1;
                if !valid_name(sub) {
                    return err(format!("`.{sub}` is not a sub-attribute"));
                }
                let sub_path = AttrPath {
                    urn: None,
                    attr: sub.to_owned(),
                    sub: None,
                };
                let cond = self.condition(sub_path)?;
                return Ok(Filter::ValuePath(
                    path,
                    Box::new(Filter::And(Box::new(inner), Box::new(cond))),
                ));
            }
            return Ok(Filter::ValuePath(path, Box::new(inner)));
        }
        self.condition(path)
    }

    fn condition(&mut self, path: AttrPath) -> Result<Filter, FilterError> {
        let Some(Tok::Word(op)) = self.next() else {
            return err("expected an operator");
        };
        let op = match op.to_ascii_lowercase().as_str() {
            "pr" => return Ok(Filter::Present(path)),
            "eq" => CmpOp::Eq,
            "ne" => CmpOp::Ne,
            "co" => CmpOp::Co,
            "sw" => CmpOp::Sw,
            "ew" => CmpOp::Ew,
            "gt" => CmpOp::Gt,
            "ge" => CmpOp::Ge,
            "lt" => CmpOp::Lt,
            "le" => CmpOp::Le,
            _ => return err(format!("unknown operator `{op}`")),
        };
        match self.next() {
            Some(Tok::Str(s)) => Ok(Filter::Compare(path, op, Value::String(s))),
            Some(Tok::Lit(v)) => Ok(Filter::Compare(path, op, v)),
            _ => err("expected a value after the operator"),
        }
    }
}

/// Parses a filter expression.
pub fn parse(s: &str, extensions: &[&str]) -> Result<Filter, FilterError> {
    if s.len() > MAX_FILTER_LEN {
        return err(format!("filter is longer than {MAX_FILTER_LEN} bytes"));
    }
    let toks = tokenize(s)?;
    let mut p = Parser {
        toks: &toks,
        pos: 0,
        extensions,
    };
    let f = p.or(0)?;
    if p.pos != toks.len() {
        return err("unexpected text after the filter");
    }
    Ok(f)
}

/// `id` and `externalId` compare exactly; everything else ignores case.
fn case_exact(path: &AttrPath) -> bool {
    path.urn.is_none()
        && path.sub.is_none()
        && (path.attr.eq_ignore_ascii_case("id") || path.attr.eq_ignore_ascii_case("externalId"))
}

/// The values an attribute path names in `scope` (multi-valued attributes
/// fan out; a multi-valued complex attribute without a sub-attribute means
/// its `value`s).
fn values_at<'a>(scope: &'a Map<String, Value>, path: &AttrPath) -> Vec<&'a Value> {
    let container = match &path.urn {
        Some(urn) => match get_ci(scope, urn) {
            Some(Value::Object(o)) => o,
            _ => return Vec::new(),
        },
        None => scope,
    };
    let Some(v) = get_ci(container, &path.attr) else {
        return Vec::new();
    };
    let pick = |v: &'a Value| -> Option<&'a Value> {
        match (&path.sub, v) {
            (Some(sub), Value::Object(o)) => get_ci(o, sub),
            (Some(_), _) => None,
            (None, Value::Object(o)) => get_ci(o, "value"),
            (None, other) => Some(other),
        }
    };
    match v {
        Value::Array(items) => items.iter().filter_map(pick).collect(),
        Value::Object(_) if path.sub.is_none() => vec![v],
        other => pick(other).into_iter().collect(),
    }
}

fn compare(actual: &Value, op: CmpOp, want: &Value, exact: bool) -> bool {
    use std::cmp::Ordering;
    let ord = match (actual, want) {
        (Value::String(a), Value::String(b)) => {
            let (a, b) = if exact {
                (a.clone(), b.clone())
            } else {
                (a.to_lowercase(), b.to_lowercase())
            };
            match op {
                CmpOp::Co => return a.contains(&b),
                CmpOp::Sw => return a.starts_with(&b),
                CmpOp::Ew => return a.ends_with(&b),
                _ => a.cmp(&b),
            }
        }
        (Value::Number(a), Value::Number(b)) => match (a.as_f64(), b.as_f64()) {
            (Some(a), Some(b)) => match a.partial_cmp(&b) {
                Some(o) => o,
                None => return false,
            },
            _ => return false,
        },
        (Value::Bool(a), Value::Bool(b)) => {
            return match op {
                CmpOp::Eq => a == b,
                CmpOp::Ne => a != b,
                _ => false,
            };
        }
        _ => return op == CmpOp::Ne,
    };
    match op {
        CmpOp::Eq => ord == Ordering::Equal,
        CmpOp::Ne => ord != Ordering::Equal,
        CmpOp::Gt => ord == Ordering::Greater,
        CmpOp::Ge => ord != Ordering::Less,
        CmpOp::Lt => ord == Ordering::Less,
        CmpOp::Le => ord != Ordering::Greater,
        CmpOp::Co | CmpOp::Sw | CmpOp::Ew => false,
    }
}

fn present(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    }
}

/// True when `scope` (a resource, or one element inside a value path) matches.
pub fn matches(f: &Filter, scope: &Map<String, Value>) -> bool {
    match f {
        Filter::And(a, b) => matches(a, scope) && matches(b, scope),
        Filter::Or(a, b) => matches(a, scope) || matches(b, scope),
        Filter::Not(a) => !matches(a, scope),
        Filter::Present(p) => values_at(scope, p).into_iter().any(present),
        Filter::Compare(p, op, want) => {
            let exact = case_exact(p);
            let vals = values_at(scope, p);
            if want.is_null() {
                let absent = !vals.iter().any(|v| present(v));
                return match op {
                    CmpOp::Eq => absent,
                    CmpOp::Ne => !absent,
                    _ => false,
                };
            }
            if *op == CmpOp::Ne {
                return !vals.iter().any(|v| compare(v, CmpOp::Eq, want, exact));
            }
            vals.iter().any(|v| compare(v, *op, want, exact))
        }
        Filter::ValuePath(p, inner) => {
            let container = match &p.urn {
                Some(urn) => match get_ci(scope, urn) {
                    Some(Value::Object(o)) => o,
                    _ => return false,
                },
                None => scope,
            };
            match get_ci(container, &p.attr) {
                Some(Value::Array(items)) => items
                    .iter()
                    .any(|e| matches!(e, Value::Object(o) if matches(inner, o))),
                Some(Value::Object(o)) => matches(inner, o),
                _ => false,
            }
        }
    }
}

/// For `attr eq "x"` inside a value path: the `(attr, "x")` pairs a new
/// element must carry to match (used when a replace targets no element).
pub fn equalities(f: &Filter) -> Option<Vec<(String, Value)>> {
    match f {
        Filter::Compare(p, CmpOp::Eq, v) if p.urn.is_none() && p.sub.is_none() => {
            Some(vec![(p.attr.clone(), v.clone())])
        }
        Filter::And(a, b) => {
            let mut l = equalities(a)?;
            l.extend(equalities(b)?);
            Some(l)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    fn m(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => panic!("not an object"),
        }
    }

    const EXT: &[&str] = &["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"];

    #[test]
    fn user_name_eq_ignores_case_and_external_id_does_not() {
        let u = m(json!({"userName": "M.Ito@acme.example", "externalId": "00uAB"}));
        assert!(matches(
            &parse(r#"userName eq "m.ito@ACME.example""#, EXT).unwrap(),
            &u
        ));
        assert!(matches(
            &parse(r#"USERNAME Eq "m.ito@acme.example""#, EXT).unwrap(),
            &u
        ));
        assert!(!matches(
            &parse(r#"externalId eq "00uab""#, EXT).unwrap(),
            &u
        ));
        assert!(matches(
            &parse(r#"externalId eq "00uAB""#, EXT).unwrap(),
            &u
        ));
        assert!(matches(
            &parse(
                r#"userName eq "m.ito@acme.example" and externalId eq "00uAB""#,
                EXT
            )
            .unwrap(),
            &u
        ));
        assert!(!matches(
            &parse(r#"userName eq "x" and externalId eq "00uAB""#, EXT).unwrap(),
            &u
        ));
        assert!(matches(
            &parse(r#"userName eq "x" or externalId eq "00uAB""#, EXT).unwrap(),
            &u
        ));
        assert!(matches(
            &parse(r#"not (userName eq "x")"#, EXT).unwrap(),
            &u
        ));
        assert!(matches(&parse("userName pr", EXT).unwrap(), &u));
        assert!(matches(&parse(r#"userName sw "m.ito""#, EXT).unwrap(), &u));
    }

    #[test]
    fn value_paths_and_entra_form() {
        let u = m(json!({"emails": [
            {"type": "home", "value": "mei@home.example"},
            {"type": "work", "value": "m.ito@acme.example"}],
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"department": "Sales"}}));
        let f = parse(
            r#"emails[type eq "work"].value eq "M.ITO@acme.example""#,
            EXT,
        )
        .unwrap();
        assert!(matches(&f, &u));
        let f = parse(
            r#"emails[type eq "home"].value eq "m.ito@acme.example""#,
            EXT,
        )
        .unwrap();
        assert!(!matches(&f, &u));
        let f = parse(r#"emails co "home.example""#, EXT).unwrap();
        assert!(matches(&f, &u));
        let f = parse(
            r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department eq "sales""#,
            EXT,
        )
        .unwrap();
        assert!(matches(&f, &u));
        let f = parse(
            r#"urn:ietf:params:scim:schemas:core:2.0:User:emails.type eq "work""#,
            EXT,
        )
        .unwrap();
        assert!(matches(&f, &u));
    }

    #[test]
    fn malformed_filters_are_errors() {
        for bad in [
            "",
            "userName",
            "userName eq",
            r#"userName eq "x"#,
            r#"userName zz "x""#,
            r#"(userName eq "x""#,
            r#"emails[type eq "work""#,
            r#"userName eq "x" garbage"#,
            r#"a.b.c eq "x""#,
            r#"1abc eq "x""#,
            "not userName pr",
            "userName eq 12x",
        ] {
            assert!(parse(bad, EXT).is_err(), "{bad:?} parsed");
        }
        let deep = format!("{}userName pr{}", "(".repeat(100), ")".repeat(100));
        assert!(parse(&deep, EXT).is_err());
    }

    /// A cheap property test: no input panics the parser or the evaluator.
    #[test]
    fn arbitrary_input_never_panics() {
        let atoms = [
            "userName", " eq ", " and ", " or ", "not", "(", ")", "[", "]", "\"", "\\", "x", ".",
            ":", "urn:a:b", " pr", "emails", "type", "1", "-", "true", "null", "é", " ", "\"v\"",
            "].value",
        ];
        let u = m(json!({"userName": "a", "emails": [{"value": "b", "type": "work"}]}));
        let strategy = proptest::collection::vec(proptest::sample::select(atoms.to_vec()), 0..12);
        proptest::proptest!(
            proptest::test_runner::Config::with_cases(20_000),
            |(parts in strategy)| {
                if let Ok(f) = parse(&parts.concat(), EXT) {
                    let _ = matches(&f, &u);
                }
            }
        );
    }
}
