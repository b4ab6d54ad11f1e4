//! Filter expressions: parsed and type-checked once at start-up, evaluated per record.
//!
//! ```text
//! expr      := or
//! or        := and ( ("or" | "||") and )*
//! and       := unary ( ("and" | "&&") unary )*
//! unary     := ("not" | "!") unary | "(" expr ")" | "true" | "false" | predicate
//! predicate := "has" "(" operand ")"
//!            | operand ("==" | "!=" | "<" | "<=" | ">" | ">=") literal
//!            | operand ["not"] "in" "[" literal ("," literal)* "]"
//! operand   := "key" "(" ")" | "header" "(" STRING ")" | field ("." field)*
//! literal   := INTEGER | FLOAT | STRING | "true" | "false" | ENUM_VALUE_NAME
//! ```
//!
//! A field path names a field of the task's message type (nested through singular message
//! fields). Every literal is checked against the type of what it is compared with: an enum
//! value must exist in the field's enum (its full name `OP_TYPE_SEND_MESSAGE` or the name
//! without the enum's prefix, `SEND_MESSAGE`), a string field takes a string, an integer
//! field an integer. `key()` and `header("name")` compare as bytes with string literals;
//! an absent key or header makes every comparison false (and `!=` true). Ranges on
//! strings and bytes compare lexicographically. Presence (`has`) is protobuf presence:
//! set to a non-default value, or explicitly set for `optional` fields.
//!
//! Repeated, map and message-typed fields cannot be compared (compare a nested scalar).

use std::borrow::Cow;
use std::fmt;

use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value};
use rdkafka::message::{BorrowedHeaders, Headers};

/// Why an expression was refused, with the character position in the expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExprError {
    /// Character offset of the problem in the expression text.
    pub(crate) at: usize,
    /// What is wrong.
    pub(crate) reason: String,
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at character {})", self.reason, self.at + 1)
    }
}

fn err<T>(at: usize, reason: impl Into<String>) -> Result<T, ExprError> {
    Err(ExprError {
        at,
        reason: reason.into(),
    })
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Int(i128),
    Float(f64),
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Dot,
    Op(CmpOp),
    And,
    Or,
    Not,
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

fn tokenize(text: &str) -> Result<Vec<(usize, Tok)>, ExprError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        let two = |n: char| chars.get(i + 1) == Some(&n);
        let tok = match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            '[' => Tok::LBracket,
            ']' => Tok::RBracket,
            ',' => Tok::Comma,
            '.' => Tok::Dot,
            '=' if two('=') => {
                i += 1;
                Tok::Op(CmpOp::Eq)
            }
            '!' if two('=') => {
                i += 1;
                Tok::Op(CmpOp::Ne)
            }
            '!' => Tok::Not,
            '<' if two('=') => {
                i += 1;
                Tok::Op(CmpOp::Le)
            }
            '<' => Tok::Op(CmpOp::Lt),
            '>' if two('=') => {
                i += 1;
                Tok::Op(CmpOp::Ge)
            }
            '>' => Tok::Op(CmpOp::Gt),
            '&' if two('&') => {
                i += 1;
                Tok::And
            }
            '|' if two('|') => {
                i += 1;
                Tok::Or
            }
            '"' | '\'' => {
                let quote = c;
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return err(start, "unterminated string"),
                        Some(&q) if q == quote => break,
                        Some('\\') => {
                            i += 1;
                            match chars.get(i) {
                                Some('n') => s.push('\n'),
                                Some('t') => s.push('\t'),
                                Some(&e @ ('\\' | '"' | '\'')) => s.push(e),
                                _ => return err(i, "unknown escape in string"),
                            }
                        }
                        Some(&ch) => s.push(ch),
                    }
                    i += 1;
                }
                Tok::Str(s)
            }
            c if c.is_ascii_digit()
                || (c == '-' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) =>
            {
                let mut j = i + 1;
                while j < chars.len()
                    && (chars[j].is_ascii_alphanumeric() || chars[j] == '.' || chars[j] == '_')
                {
                    j += 1;
                }
                let lit: String = chars[i..j].iter().filter(|c| **c != '_').collect();
                i = j - 1;
                if let Ok(n) = lit.parse::<i128>() {
                    Tok::Int(n)
                } else if let Ok(f) = lit.parse::<f64>() {
                    Tok::Float(f)
                } else {
                    return err(start, format!("not a number: {lit}"));
                }
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut j = i + 1;
                while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                let word: String = chars[i..j].iter().collect();
                i = j - 1;
                match word.as_str() {
                    "and" => Tok::And,
                    "or" => Tok::Or,
                    "not" => Tok::Not,
                    _ => Tok::Ident(word),
                }
            }
            other => return err(start, format!("unexpected character {other:?}")),
        };
        out.push((start, tok));
        i += 1;
    }
    Ok(out)
}

/// What a predicate looks at.
#[derive(Debug, Clone)]
enum Operand {
    Key,
    Header(String),
    Field(Vec<String>),
}

#[derive(Debug, Clone)]
enum Literal {
    Int(i128),
    Float(f64),
    Str(String),
    Bool(bool),
    Ident(String),
}

#[derive(Debug, Clone)]
enum Ast {
    Const(bool),
    And(Vec<Ast>),
    Or(Vec<Ast>),
    Not(Box<Ast>),
    Has(usize, Operand),
    Cmp(usize, Operand, CmpOp, (usize, Literal)),
    In(usize, Operand, Vec<(usize, Literal)>),
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.1)
    }
    fn at(&self) -> usize {
        self.toks.get(self.pos).map_or(self.end, |t| t.0)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).map(|t| t.1.clone());
        self.pos += 1;
        t
    }
    fn expect(&mut self, want: Tok, what: &str) -> Result<(), ExprError> {
        let at = self.at();
        match self.next() {
            Some(t) if t == want => Ok(()),
            Some(t) => err(at, format!("expected {what}, found {}", describe(&t))),
            None => err(at, format!("expected {what}, found the end")),
        }
    }

    fn or(&mut self) -> Result<Ast, ExprError> {
        let mut terms = vec![self.and()?];
        while self.peek() == Some(&Tok::Or) {
            self.pos += 1;
            terms.push(self.and()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Ast::Or(terms)
        })
    }

    fn and(&mut self) -> Result<Ast, ExprError> {
        let mut terms = vec![self.unary()?];
        while self.peek() == Some(&Tok::And) {
            self.pos += 1;
            terms.push(self.unary()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Ast::And(terms)
        })
    }

    fn unary(&mut self) -> Result<Ast, ExprError> {
        let at = self.at();
        match self.peek() {
            Some(Tok::Not) => {
                self.pos += 1;
                Ok(Ast::Not(Box::new(self.unary()?)))
            }
            Some(Tok::LParen) => {
                self.pos += 1;
                let e = self.or()?;
                self.expect(Tok::RParen, "')'")?;
                Ok(e)
            }
            Some(Tok::Ident(w))
                if (w == "true" || w == "false") && !self.followed_by_operator() =>
            {
                let v = w == "true";
                self.pos += 1;
                Ok(Ast::Const(v))
            }
            Some(Tok::Ident(w))
                if w == "has"
                    && self.toks.get(self.pos + 1).map(|t| &t.1) == Some(&Tok::LParen) =>
            {
                self.pos += 2;
                let operand = self.operand()?;
                self.expect(Tok::RParen, "')'")?;
                Ok(Ast::Has(at, operand))
            }
            Some(Tok::Ident(_)) => self.predicate(),
            Some(t) => err(at, format!("expected a condition, found {}", describe(t))),
            None => err(at, "expected a condition, found the end"),
        }
    }

    fn followed_by_operator(&self) -> bool {
        matches!(
            self.toks.get(self.pos + 1).map(|t| &t.1),
            Some(Tok::Op(_)) | Some(Tok::Dot)
        )
    }

    fn operand(&mut self) -> Result<Operand, ExprError> {
        let at = self.at();
        let Some(Tok::Ident(first)) = self.next() else {
            return err(at, "expected a field name, key() or header(\"name\")");
        };
        let call = self.peek() == Some(&Tok::LParen);
        match first.as_str() {
            "key" if call => {
                self.pos += 1;
                self.expect(Tok::RParen, "')' (key() takes no argument)")?;
                Ok(Operand::Key)
            }
            "header" if call => {
                self.pos += 1;
                let at = self.at();
                let Some(Tok::Str(name)) = self.next() else {
                    return err(at, "header(...) takes the header name as a string");
                };
                self.expect(Tok::RParen, "')'")?;
                Ok(Operand::Header(name))
            }
            _ if call => err(
                at,
                format!(
                    "unknown function {first}(...); there are key(), header(\"name\") and has(...)"
                ),
            ),
            _ => {
                let mut path = vec![first];
                while self.peek() == Some(&Tok::Dot) {
                    self.pos += 1;
                    let at = self.at();
                    match self.next() {
                        Some(Tok::Ident(f)) => path.push(f),
                        _ => return err(at, "expected a field name after '.'"),
                    }
                }
                Ok(Operand::Field(path))
            }
        }
    }

    fn literal(&mut self) -> Result<(usize, Literal), ExprError> {
        let at = self.at();
        let lit = match self.next() {
            Some(Tok::Int(n)) => Literal::Int(n),
            Some(Tok::Float(f)) => Literal::Float(f),
            Some(Tok::Str(s)) => Literal::Str(s),
            Some(Tok::Ident(w)) if w == "true" => Literal::Bool(true),
            Some(Tok::Ident(w)) if w == "false" => Literal::Bool(false),
            Some(Tok::Ident(w)) => Literal::Ident(w),
            Some(t) => return err(at, format!("expected a value, found {}", describe(&t))),
            None => return err(at, "expected a value, found the end"),
        };
        Ok((at, lit))
    }

    fn predicate(&mut self) -> Result<Ast, ExprError> {
        let at = self.at();
        let operand = self.operand()?;
        let op_at = self.at();
        match self.next() {
            Some(Tok::Op(op)) => Ok(Ast::Cmp(at, operand, op, self.literal()?)),
            Some(Tok::Ident(w)) if w == "in" => Ok(Ast::In(at, operand, self.list()?)),
            Some(Tok::Not) if matches!(self.peek(), Some(Tok::Ident(w)) if w == "in") => {
                self.pos += 1;
                Ok(Ast::Not(Box::new(Ast::In(at, operand, self.list()?))))
            }
            Some(t) => err(
                op_at,
                format!(
                    "expected a comparison (==, !=, <, <=, >, >=, in), found {}",
                    describe(&t)
                ),
            ),
            None => err(
                op_at,
                "expected a comparison (==, !=, <, <=, >, >=, in), found the end",
            ),
        }
    }

    fn list(&mut self) -> Result<Vec<(usize, Literal)>, ExprError> {
        self.expect(Tok::LBracket, "'['")?;
        let mut items = Vec::new();
        if self.peek() == Some(&Tok::RBracket) {
            self.pos += 1;
            return Ok(items);
        }
        loop {
            items.push(self.literal()?);
            let at = self.at();
            match self.next() {
                Some(Tok::Comma) if self.peek() == Some(&Tok::RBracket) => {
                    self.pos += 1;
                    return Ok(items);
                }
                Some(Tok::Comma) => {}
                Some(Tok::RBracket) => return Ok(items),
                _ => return err(at, "expected ',' or ']'"),
            }
        }
    }
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Ident(w) => format!("'{w}'"),
        Tok::Str(s) => format!("string {s:?}"),
        Tok::Int(n) => format!("number {n}"),
        Tok::Float(f) => format!("number {f}"),
        Tok::LParen => "'('".into(),
        Tok::RParen => "')'".into(),
        Tok::LBracket => "'['".into(),
        Tok::RBracket => "']'".into(),
        Tok::Comma => "','".into(),
        Tok::Dot => "'.'".into(),
        Tok::Op(_) => "a comparison".into(),
        Tok::And => "'and'".into(),
        Tok::Or => "'or'".into(),
        Tok::Not => "'not'".into(),
    }
}

/// A value as predicates see it.
#[derive(Debug, Clone, PartialEq, PartialOrd)]
pub(crate) enum Scalar {
    Int(i128),
    Float(f64),
    Bool(bool),
    Bytes(Vec<u8>),
}

/// What a compiled predicate reads from a record.
#[derive(Debug, Clone)]
pub(crate) enum Access {
    Key,
    Header(String),
    /// The path of field descriptors from the message root.
    Field(Vec<FieldDescriptor>),
}

#[derive(Debug, Clone)]
pub(crate) enum Test {
    Present,
    Cmp(CmpOp, Scalar),
    /// Sorted for binary search.
    In(Vec<Scalar>),
}

/// A compiled filter, ready to evaluate.
#[derive(Debug, Clone)]
pub(crate) enum Filter {
    Const(bool),
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
    Test(Access, Test),
}

/// What a filter reads: the record's key, headers and decoded message.
pub(crate) struct Subject<'a> {
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) headers: Option<&'a BorrowedHeaders>,
    pub(crate) message: Option<&'a DynamicMessage>,
}

impl Filter {
    /// Parses and type-checks `text` against `message` (None: the records are opaque
    /// bytes, so only `key()` and `header(...)` can be used).
    pub(crate) fn compile(
        text: &str,
        message: Option<&MessageDescriptor>,
    ) -> Result<Filter, ExprError> {
        let toks = tokenize(text)?;
        let end = text.chars().count();
        let mut p = Parser { toks, pos: 0, end };
        let ast = p.or()?;
        if p.pos < p.toks.len() {
            let at = p.at();
            let t = p.next().map(|t| describe(&t)).unwrap_or_default();
            return err(
                at,
                format!("unexpected {t} after a complete condition (missing 'and'/'or'?)"),
            );
        }
        lower(ast, message)
    }

    /// Whether this filter reads message fields (so the record must be decoded).
    pub(crate) fn reads_fields(&self) -> bool {
        match self {
            Filter::Const(_) => false,
            Filter::And(v) | Filter::Or(v) => v.iter().any(Filter::reads_fields),
            Filter::Not(f) => f.reads_fields(),
            Filter::Test(a, _) => matches!(a, Access::Field(_)),
        }
    }

    /// Evaluates the filter on one record.
    pub(crate) fn matches(&self, s: &Subject<'_>) -> bool {
        match self {
            Filter::Const(b) => *b,
            Filter::And(v) => v.iter().all(|f| f.matches(s)),
            Filter::Or(v) => v.iter().any(|f| f.matches(s)),
            Filter::Not(f) => !f.matches(s),
            Filter::Test(access, test) => test_access(access, test, s),
        }
    }
}

fn test_access(access: &Access, test: &Test, s: &Subject<'_>) -> bool {
    match access {
        Access::Key => test_bytes(s.key, test),
        Access::Header(name) => {
            let value = s.headers.and_then(|h| {
                h.iter()
                    .find(|h| h.key == name)
                    .map(|h| h.value.unwrap_or(&[]))
            });
            test_bytes(value, test)
        }
        Access::Field(path) => {
            let Some(msg) = s.message else {
                return false;
            };
            test_field(msg, path, test)
        }
    }
}

fn test_bytes(value: Option<&[u8]>, test: &Test) -> bool {
    let Some(v) = value else {
        // Absent: only "not equal" holds.
        return matches!(test, Test::Cmp(CmpOp::Ne, _));
    };
    match test {
        Test::Present => true,
        Test::Cmp(op, Scalar::Bytes(lit)) => compare(v.cmp(lit.as_slice()), *op),
        Test::In(set) => set
            .binary_search_by(|x| match x {
                Scalar::Bytes(b) => b.as_slice().cmp(v),
                _ => std::cmp::Ordering::Less,
            })
            .is_ok(),
        Test::Cmp(..) => false,
    }
}

fn compare(ord: std::cmp::Ordering, op: CmpOp) -> bool {
    use std::cmp::Ordering::*;
    match op {
        CmpOp::Eq => ord == Equal,
        CmpOp::Ne => ord != Equal,
        CmpOp::Lt => ord == Less,
        CmpOp::Le => ord != Greater,
        CmpOp::Gt => ord == Greater,
        CmpOp::Ge => ord != Less,
    }
}

fn test_field(root: &DynamicMessage, path: &[FieldDescriptor], test: &Test) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut msg: Cow<'_, DynamicMessage> = Cow::Borrowed(root);
    for f in parents {
        if !msg.has_field(f) {
            // An unset message field: every nested field is absent / default.
            if matches!(test, Test::Present) {
                return false;
            }
            msg = Cow::Owned(DynamicMessage::new(match f.kind() {
                Kind::Message(m) => m,
                _ => return false,
            }));
            continue;
        }
        let next = match msg.get_field(f).as_ref() {
            Value::Message(m) => m.clone(),
            _ => return false,
        };
        msg = Cow::Owned(next);
    }
    if matches!(test, Test::Present) {
        return msg.has_field(last);
    }
    let value = msg.get_field(last);
    let scalar_cmp = |lit: &Scalar| -> Option<std::cmp::Ordering> {
        match (value.as_ref(), lit) {
            (Value::String(s), Scalar::Bytes(b)) => Some(s.as_bytes().cmp(b.as_slice())),
            (Value::Bytes(s), Scalar::Bytes(b)) => Some(s.as_ref().cmp(b.as_slice())),
            (Value::Bool(v), Scalar::Bool(b)) => Some(v.cmp(b)),
            (Value::F32(v), Scalar::Float(b)) => f64::from(*v).partial_cmp(b),
            (Value::F64(v), Scalar::Float(b)) => v.partial_cmp(b),
            (v, Scalar::Int(b)) => int_of(v).map(|i| i.cmp(b)),
            _ => None,
        }
    };
    match test {
        Test::Present => false,
        Test::Cmp(op, lit) => scalar_cmp(lit).is_some_and(|o| compare(o, *op)),
        Test::In(set) => set
            .iter()
            .any(|lit| scalar_cmp(lit) == Some(std::cmp::Ordering::Equal)),
    }
}

fn int_of(v: &Value) -> Option<i128> {
    Some(match v {
        Value::I32(i) => i128::from(*i),
        Value::I64(i) => i128::from(*i),
        Value::U32(i) => i128::from(*i),
        Value::U64(i) => i128::from(*i),
        Value::EnumNumber(i) => i128::from(*i),
        _ => return None,
    })
}

/// Resolves a field path against `message`, refusing what cannot be compared.
pub(crate) fn resolve_path(
    path: &[String],
    message: Option<&MessageDescriptor>,
) -> Result<Vec<FieldDescriptor>, String> {
    let Some(mut desc) = message.cloned() else {
        return Err(format!(
            "field {} used, but no task type is configured (records are raw bytes: only key() and header(...) can be used)",
            path.join(".")
        ));
    };
    let mut out = Vec::new();
    for (i, name) in path.iter().enumerate() {
        let Some(f) = desc.get_field_by_name(name) else {
            let fields: Vec<_> = desc.fields().map(|f| f.name().to_string()).collect();
            return Err(format!(
                "unknown field {name} in message {} (fields: {})",
                desc.full_name(),
                fields.join(", ")
            ));
        };
        if f.is_list() || f.is_map() {
            return Err(format!(
                "field {} is repeated or a map; it cannot be compared",
                path[..=i].join(".")
            ));
        }
        let last = i + 1 == path.len();
        match f.kind() {
            Kind::Message(m) if !last => desc = m,
            Kind::Message(_) => {
                return Err(format!(
                    "field {} is a message; compare one of its fields ({}.<field>)",
                    path.join("."),
                    path.join(".")
                ))
            }
            _ if !last => {
                return Err(format!(
                    "field {} is not a message; it has no field {}",
                    path[..=i].join("."),
                    path[i + 1]
                ))
            }
            _ => {}
        }
        out.push(f);
    }
    Ok(out)
}

/// Converts a literal for a comparison with `access`.
fn literal_for(access: &Access, at: usize, lit: &Literal) -> Result<Scalar, ExprError> {
    let field = match access {
        Access::Key | Access::Header(_) => {
            return match lit {
                Literal::Str(s) => Ok(Scalar::Bytes(s.clone().into_bytes())),
                _ => err(at, "key() and header(...) compare with strings (\"...\")"),
            }
        }
        Access::Field(path) => match path.last() {
            Some(f) => f,
            None => return err(at, "empty field path"),
        },
    };
    let name = field.name();
    match (field.kind(), lit) {
        (Kind::String | Kind::Bytes, Literal::Str(s)) => Ok(Scalar::Bytes(s.clone().into_bytes())),
        (Kind::Bool, Literal::Bool(b)) => Ok(Scalar::Bool(*b)),
        (Kind::Double | Kind::Float, Literal::Float(f)) => Ok(Scalar::Float(*f)),
        (Kind::Double | Kind::Float, Literal::Int(i)) => Ok(Scalar::Float(*i as f64)),
        (Kind::Enum(e), Literal::Ident(v) | Literal::Str(v)) => {
            let prefix = format!("{}_", screaming_snake(e.name()));
            let found = e.values().find(|x| x.name() == v).or_else(|| {
                e.values()
                    .find(|x| x.name().strip_prefix(&prefix) == Some(v.as_str()))
            });
            match found {
                Some(x) => Ok(Scalar::Int(i128::from(x.number()))),
                None => {
                    let names: Vec<_> = e.values().map(|x| x.name().to_string()).collect();
                    err(
                        at,
                        format!(
                            "unknown value {v} of enum {} (field {name}); values: {}",
                            e.full_name(),
                            names.join(", ")
                        ),
                    )
                }
            }
        }
        (Kind::Enum(_), Literal::Int(i)) => Ok(Scalar::Int(*i)),
        (
            Kind::Int32
            | Kind::Sint32
            | Kind::Sfixed32
            | Kind::Int64
            | Kind::Sint64
            | Kind::Sfixed64
            | Kind::Uint32
            | Kind::Fixed32
            | Kind::Uint64
            | Kind::Fixed64,
            Literal::Int(i),
        ) => Ok(Scalar::Int(*i)),
        (kind, Literal::Ident(v)) => err(
            at,
            format!(
                "unknown name {v}: field {name} is {kind:?}, not an enum (strings need quotes)"
            ),
        ),
        (kind, _) => err(
            at,
            format!("field {name} is {kind:?}; this value does not fit it"),
        ),
    }
}

/// `OpType` -> `OP_TYPE`, the prefix protobuf style puts on enum value names.
fn screaming_snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.extend(c.to_uppercase());
    }
    out
}

fn access_of(
    at: usize,
    operand: &Operand,
    message: Option<&MessageDescriptor>,
) -> Result<Access, ExprError> {
    Ok(match operand {
        Operand::Key => Access::Key,
        Operand::Header(h) => Access::Header(h.clone()),
        Operand::Field(path) => {
            Access::Field(resolve_path(path, message).map_err(|reason| ExprError { at, reason })?)
        }
    })
}

fn lower(ast: Ast, message: Option<&MessageDescriptor>) -> Result<Filter, ExprError> {
    Ok(match ast {
        Ast::Const(b) => Filter::Const(b),
        Ast::And(v) => Filter::And(
            v.into_iter()
                .map(|a| lower(a, message))
                .collect::<Result<_, _>>()?,
        ),
        Ast::Or(v) => Filter::Or(
            v.into_iter()
                .map(|a| lower(a, message))
                .collect::<Result<_, _>>()?,
        ),
        Ast::Not(a) => Filter::Not(Box::new(lower(*a, message)?)),
        Ast::Has(at, operand) => Filter::Test(access_of(at, &operand, message)?, Test::Present),
        Ast::Cmp(at, operand, op, (lat, lit)) => {
            let access = access_of(at, &operand, message)?;
            let scalar = literal_for(&access, lat, &lit)?;
            if matches!(scalar, Scalar::Bool(_)) && !matches!(op, CmpOp::Eq | CmpOp::Ne) {
                return err(lat, "booleans only compare with == and !=");
            }
            Filter::Test(access, Test::Cmp(op, scalar))
        }
        Ast::In(at, operand, items) => {
            let access = access_of(at, &operand, message)?;
            let mut set = items
                .iter()
                .map(|(lat, lit)| literal_for(&access, *lat, lit))
                .collect::<Result<Vec<_>, _>>()?;
            set.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            set.dedup();
            Filter::Test(access, Test::In(set))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use prost_reflect::DescriptorPool;

    fn chat() -> MessageDescriptor {
        DescriptorPool::decode(decaton_protocol::FILE_DESCRIPTOR_SET)
            .unwrap()
            .get_message_by_name("decaton.example.ChatOp")
            .unwrap()
    }

    fn eval(expr: &str, op: &decaton_protocol::ChatOp, key: Option<&[u8]>) -> bool {
        let desc = chat();
        let f = Filter::compile(expr, Some(&desc)).unwrap_or_else(|e| panic!("{expr}: {e}"));
        let msg = DynamicMessage::decode(desc, op.encode_to_vec().as_slice()).unwrap();
        f.matches(&Subject {
            key,
            headers: None,
            message: Some(&msg),
        })
    }

    fn op(kind: decaton_protocol::OpType, seq: u64, target: &str) -> decaton_protocol::ChatOp {
        decaton_protocol::ChatOp {
            user_id: "u1".into(),
            op: kind as i32,
            target_id: target.into(),
            sequence: seq,
            ..Default::default()
        }
    }

    #[test]
    fn sets_ranges_presence_and_logic() {
        use decaton_protocol::OpType::*;
        let send = op(SendMessage, 5, "room-1");
        assert!(eval("op in [SEND_MESSAGE, READ]", &send, None));
        assert!(eval("op in [OP_TYPE_SEND_MESSAGE]", &send, None));
        assert!(!eval("op in [ADD_FRIEND, BLOCK]", &send, None));
        assert!(eval("op not in [ADD_FRIEND, BLOCK]", &send, None));
        assert!(eval(
            "op == SEND_MESSAGE && sequence >= 5 and sequence < 6",
            &send,
            None
        ));
        assert!(!eval("sequence > 5", &send, None));
        assert!(eval("not (sequence > 5) or false", &send, None));
        assert!(eval("has(target_id) and !has(payload)", &send, None));
        assert!(eval(
            "target_id >= \"room-\" and target_id < \"room-~\"",
            &send,
            None
        ));
        assert!(eval("key() == \"u1\"", &send, Some(b"u1")));
        assert!(!eval("key() == \"u1\"", &send, None));
        assert!(eval("key() != \"u1\"", &send, None));
        assert!(!eval("header(\"x\") == \"1\"", &send, None));
        assert!(eval("op == 1 or op == 2", &send, None));
        assert!(eval("true", &send, None));
    }

    #[test]
    fn errors_name_the_position_and_the_reason() {
        let desc = chat();
        let e = Filter::compile("op in [SEND_MESSAGE, WRITE]", Some(&desc)).unwrap_err();
        assert_eq!(e.at, 21, "{e}");
        assert!(
            e.reason
                .contains("unknown value WRITE of enum decaton.example.OpType"),
            "{e}"
        );
        let e = Filter::compile("opp == READ", Some(&desc)).unwrap_err();
        assert!(e.reason.contains("unknown field opp"), "{e}");
        let e = Filter::compile("sequence == \"x\"", Some(&desc)).unwrap_err();
        assert_eq!(e.at, 12, "{e}");
        let e = Filter::compile("op in [READ", Some(&desc)).unwrap_err();
        assert!(e.reason.contains("expected ',' or ']'"), "{e}");
        let e = Filter::compile("op == READ sequence > 1", Some(&desc)).unwrap_err();
        assert!(e.reason.contains("missing 'and'/'or'"), "{e}");
        let e = Filter::compile("user_id == \"a", Some(&desc)).unwrap_err();
        assert!(e.reason.contains("unterminated"), "{e}");
        let e = Filter::compile("user_id == \"a\"", None).unwrap_err();
        assert!(e.reason.contains("no task type"), "{e}");
        assert!(Filter::compile("key() in [\"a\", \"b\"]", None).is_ok());
    }
}
