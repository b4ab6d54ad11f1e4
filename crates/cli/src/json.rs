//! The example task, [`ChatOp`], as JSON: what `decaton put --json` reads and
//! `decaton tail` prints.
//!
//! The mapping is made for typing at a shell, not protobuf's canonical JSON mapping:
//!
//! ```json
//! {"user_id":"u1","op":"SEND_MESSAGE","target_id":"room-1","payload":"hello","sequence":3}
//! ```
//!
//! * Field names are the `.proto` names (`snake_case`).
//! * `op` is an [`OpType`] name, case-insensitive, with or without the `OP_TYPE_` prefix
//!   (`"send_message"`, `"OP_TYPE_SEND_MESSAGE"`, `"send-message"`), or its number
//!   (`1` or `"1"`). Numbers outside the enum are kept, as protobuf keeps them.
//! * `payload` is a UTF-8 string; bytes that are not UTF-8 go in `payload_hex` instead.
//!   At most one of the two may be given.
//! * Missing fields take their protobuf default; unknown fields are an error, so a typo
//!   does not silently send a default.
//!
//! Printing is the inverse: `op` as the short name (`SEND_MESSAGE`), `payload` when it is
//! UTF-8 and `payload_hex` otherwise, every other field always present. Parsing what was
//! printed gives back the same [`ChatOp`].

use std::fmt;

use anyhow::Context as _;
use decaton_protocol::{ChatOp, OpType};
use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

/// Prefix of every [`OpType`] name in the `.proto`; optional on input, dropped on output.
const OP_PREFIX: &str = "OP_TYPE_";

/// The JSON shape of a [`ChatOp`]; converts to and from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatOpJson {
    /// The user the operation belongs to (also the usual record key).
    pub user_id: String,
    /// What the user did.
    pub op: Op,
    /// The user or room the operation targets.
    pub target_id: String,
    /// The payload as text, when it is UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// The payload as lowercase or uppercase hex, when it is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_hex: Option<String>,
    /// Per-user sequence number.
    pub sequence: u64,
    /// When the chat server accepted the operation, milliseconds since the Unix epoch.
    pub created_at_millis: i64,
}

/// An [`OpType`] value as it appears in JSON: a name or a number on input, the short name
/// (or the number, for values outside the enum) on output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Op(pub i32);

impl Op {
    /// Parses an op name (any case, `OP_TYPE_` prefix optional, `-` for `_`) or a number.
    pub fn parse(text: &str) -> anyhow::Result<Op> {
        let trimmed = text.trim();
        if let Ok(n) = trimmed.parse::<i32>() {
            return Ok(Op(n));
        }
        let upper = trimmed.to_ascii_uppercase().replace('-', "_");
        let full = if upper.starts_with(OP_PREFIX) {
            upper
        } else {
            format!("{OP_PREFIX}{upper}")
        };
        match OpType::from_str_name(&full) {
            Some(op) => Ok(Op(op as i32)),
            None => anyhow::bail!(
                "unknown op {text:?}; expected one of {}",
                op_names().join(", ")
            ),
        }
    }
}

/// The short names of every [`OpType`], for error messages.
fn op_names() -> Vec<&'static str> {
    (0..)
        .map_while(|n| OpType::try_from(n).ok())
        .map(|op| op.as_str_name().trim_start_matches(OP_PREFIX))
        .collect()
}

impl Serialize for Op {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match OpType::try_from(self.0) {
            Ok(op) => serializer.serialize_str(op.as_str_name().trim_start_matches(OP_PREFIX)),
            Err(_) => serializer.serialize_i32(self.0),
        }
    }
}

impl<'de> Deserialize<'de> for Op {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Op, D::Error> {
        struct OpVisitor;

        impl Visitor<'_> for OpVisitor {
            type Value = Op;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an op name such as \"SEND_MESSAGE\" or its number")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Op, E> {
                Op::parse(v).map_err(|e| E::custom(format!("{e:#}")))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Op, E> {
                i32::try_from(v)
                    .map(Op)
                    .map_err(|_| E::custom(format!("op number {v} out of range")))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Op, E> {
                i32::try_from(v)
                    .map(Op)
                    .map_err(|_| E::custom(format!("op number {v} out of range")))
            }
        }

        deserializer.deserialize_any(OpVisitor)
    }
}

impl From<&ChatOp> for ChatOpJson {
    fn from(op: &ChatOp) -> ChatOpJson {
        let (payload, payload_hex) = match std::str::from_utf8(&op.payload) {
            Ok(text) => (Some(text.to_string()), None),
            Err(_) => (None, Some(to_hex(&op.payload))),
        };
        ChatOpJson {
            user_id: op.user_id.clone(),
            op: Op(op.op),
            target_id: op.target_id.clone(),
            payload,
            payload_hex,
            sequence: op.sequence,
            created_at_millis: op.created_at_millis,
        }
    }
}

impl TryFrom<ChatOpJson> for ChatOp {
    type Error = anyhow::Error;

    fn try_from(json: ChatOpJson) -> anyhow::Result<ChatOp> {
        let payload = match (json.payload, json.payload_hex) {
            (Some(_), Some(_)) => anyhow::bail!("give either payload or payload_hex, not both"),
            (Some(text), None) => text.into_bytes(),
            (None, Some(hex)) => from_hex(&hex).context("payload_hex")?,
            (None, None) => Vec::new(),
        };
        Ok(ChatOp {
            user_id: json.user_id,
            op: json.op.0,
            target_id: json.target_id,
            payload,
            sequence: json.sequence,
            created_at_millis: json.created_at_millis,
        })
    }
}

/// Parses a [`ChatOp`] from its JSON form (see the module docs).
pub fn chat_op_from_json(text: &str) -> anyhow::Result<ChatOp> {
    let value: serde_json::Value = serde_json::from_str(text).context("invalid ChatOp JSON")?;
    // serde would also fill a struct from an array, by position; only objects make sense.
    anyhow::ensure!(
        value.is_object(),
        "invalid ChatOp JSON: invalid type: expected an object, got {value}"
    );
    let json = ChatOpJson::deserialize(value).context("invalid ChatOp JSON")?;
    ChatOp::try_from(json).context("invalid ChatOp JSON")
}

/// Compact one-line JSON, fields in `.proto` order: how a [`ChatOp`] is printed
/// (`ChatOpJson::from(&op).to_string()`).
impl fmt::Display for ChatOpJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Serializing strings and numbers cannot fail; if it ever did, report, don't panic.
        let text = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// Parses hex (either case, even length, no separators).
pub fn from_hex(text: &str) -> anyhow::Result<Vec<u8>> {
    let digits = text.as_bytes();
    anyhow::ensure!(
        digits.len() % 2 == 0,
        "hex string has an odd number of digits"
    );
    digits
        .chunks_exact(2)
        .map(|pair| {
            let hi = hex_digit(pair[0]);
            let lo = hex_digit(pair[1]);
            match (hi, lo) {
                (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
                _ => anyhow::bail!("not a hex digit in {:?}", String::from_utf8_lossy(pair)),
            }
        })
        .collect()
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn to_json(op: &ChatOp) -> String {
        ChatOpJson::from(op).to_string()
    }

    fn sample() -> ChatOp {
        ChatOp {
            user_id: "u1".into(),
            op: OpType::SendMessage as i32,
            target_id: "room-1".into(),
            payload: b"hello".to_vec(),
            sequence: 3,
            created_at_millis: 1_700_000_000_000,
        }
    }

    #[test]
    fn parses_the_documented_example() {
        let op = chat_op_from_json(
            r#"{"user_id":"u1","op":"SEND_MESSAGE","target_id":"room-1","payload":"hello","sequence":3}"#,
        )
        .unwrap();
        assert_eq!(
            op,
            ChatOp {
                created_at_millis: 0,
                ..sample()
            }
        );
    }

    #[test]
    fn round_trips_through_json() {
        let binary = ChatOp {
            payload: vec![0xff, 0x00, 0x7f],
            op: OpType::UpdateProfile as i32,
            ..sample()
        };
        let unknown_op = ChatOp { op: 42, ..sample() };
        for op in [sample(), binary, unknown_op, ChatOp::default()] {
            let text = to_json(&op);
            assert_eq!(chat_op_from_json(&text).unwrap(), op, "via {text}");
        }
    }

    #[test]
    fn prints_short_names_and_picks_payload_or_hex() {
        let text = to_json(&sample());
        assert_eq!(
            text,
            r#"{"user_id":"u1","op":"SEND_MESSAGE","target_id":"room-1","payload":"hello","sequence":3,"created_at_millis":1700000000000}"#
        );
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["op"], "SEND_MESSAGE");
        assert_eq!(json["payload"], "hello");
        assert!(json.get("payload_hex").is_none());

        let text = to_json(&ChatOp {
            payload: vec![0xc3, 0x28],
            op: 99,
            ..sample()
        });
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["op"], 99);
        assert_eq!(json["payload_hex"], "c328");
        assert!(json.get("payload").is_none());
    }

    #[test]
    fn accepts_every_spelling_of_an_op() {
        for spelling in [
            r#""JOIN_ROOM""#,
            r#""join_room""#,
            r#""Join-Room""#,
            r#""OP_TYPE_JOIN_ROOM""#,
            r#""op_type_join_room""#,
            "5",
            r#""5""#,
        ] {
            let op = chat_op_from_json(&format!(r#"{{"op":{spelling}}}"#)).unwrap();
            assert_eq!(op.op(), OpType::JoinRoom, "spelling {spelling}");
        }
        assert_eq!(chat_op_from_json(r#"{"op":"UNSPECIFIED"}"#).unwrap().op, 0);
        assert_eq!(chat_op_from_json("{}").unwrap(), ChatOp::default());
    }

    #[test]
    fn payload_hex_is_decoded() {
        let op = chat_op_from_json(r#"{"payload_hex":"00FFab"}"#).unwrap();
        assert_eq!(op.payload, vec![0x00, 0xff, 0xab]);
    }

    #[test]
    fn bad_input_is_an_error() {
        let bad = [
            (r#"{"user":"u1"}"#, "unknown field"),
            (r#"{"op":"SEND"}"#, "unknown op"),
            (r#"{"op":3000000000}"#, "out of range"),
            (r#"{"op":1.5}"#, "op name"),
            (r#"{"sequence":-1}"#, "expected u64"),
            (r#"{"payload":"a","payload_hex":"61"}"#, "not both"),
            (r#"{"payload_hex":"abc"}"#, "odd number"),
            (r#"{"payload_hex":"zz"}"#, "not a hex digit"),
            (r#"{"user_id":7}"#, "invalid type"),
            (r#"["u1"]"#, "invalid type"),
            (r#"{"user_id":"u1"} trailing"#, "trailing"),
            ("", "EOF"),
        ];
        for (input, expected) in bad {
            let err = format!("{:#}", chat_op_from_json(input).unwrap_err());
            assert!(
                err.contains(expected),
                "{input:?} gave {err:?}, expected it to mention {expected:?}"
            );
        }
    }

    #[test]
    fn hex_round_trips() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&bytes)).unwrap(), bytes);
        assert_eq!(to_hex(&[]), "");
    }
}
