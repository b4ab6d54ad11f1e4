//! The syntax of filter expressions: tokens, and the recursive-descent parser that turns
//! them into an [`Ast`] (the grammar is in the parent module's documentation).

use std::fmt;

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

pub(super) fn err<T>(at: usize, reason: impl Into<String>) -> Result<T, ExprError> {
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
    while let Some(&c) = chars.get(i) {
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
                while chars
                    .get(j)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_')
                {
                    j += 1;
                }
                let lit: String = chars
                    .iter()
                    .take(j)
                    .skip(i)
                    .filter(|c| **c != '_')
                    .collect();
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
                while chars
                    .get(j)
                    .is_some_and(|c| c.is_alphanumeric() || *c == '_')
                {
                    j += 1;
                }
                let word: String = chars.iter().take(j).skip(i).collect();
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
pub(super) enum Operand {
    Key,
    Header(String),
    Field(Vec<String>),
}

#[derive(Debug, Clone)]
pub(super) enum Literal {
    Int(i128),
    Float(f64),
    Str(String),
    Bool(bool),
    Ident(String),
}

#[derive(Debug, Clone)]
pub(super) enum Ast {
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

/// Parses a whole expression; trailing tokens are an error.
pub(super) fn parse(text: &str) -> Result<Ast, ExprError> {
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
    Ok(ast)
}
