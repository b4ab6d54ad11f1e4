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

use decaton_protocol::headers::raw_headers;
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value};
use rdkafka::message::BorrowedHeaders;

mod syntax;

use syntax::{err, parse, Ast, Literal, Operand};
pub(crate) use syntax::{CmpOp, ExprError};

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
        lower(parse(text)?, message)
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
                raw_headers(h)
                    .find(|h| h.is(name))
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
                path.iter()
                    .take(i + 1)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(".")
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
                    path.iter()
                        .take(i + 1)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("."),
                    path.get(i + 1).map_or("", String::as_str)
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
