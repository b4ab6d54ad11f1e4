//! Routes: where a source record goes, whether it goes, and in what shape.
//!
//! A [`Route`] names a destination topic, a filter (an expression, see the crate docs,
//! and/or a Rust closure) and an optional map: keep only listed fields, re-key by a
//! field, add headers, or a Rust closure. Routes are compiled once against the task type
//! when the replicator is built; a record is offered to every route and may match several.
//!
//! Without a map, the derived record is the source record unchanged: same key, value and
//! headers (so a Decaton task stays a Decaton task, `dt_meta` included).

use std::borrow::Cow;
use std::sync::Arc;

use decaton_protocol::headers::raw_headers;
use prost::Message as _;
use prost_reflect::{
    DynamicMessage, FieldDescriptor, MessageDescriptor, ReflectMessage as _, Value,
};
use rdkafka::message::BorrowedHeaders;

use crate::expr::{resolve_path, Filter, Subject};
use crate::metrics::RouteCounters;
use crate::SourceFormat;

/// A Rust predicate over a source record; an `Err` counts the record as failed on this
/// route (and sends it to the dead-letter topic, if any).
pub type FilterFn = dyn Fn(&RecordView<'_>) -> Result<bool, String> + Send + Sync;
/// A Rust map from a source record and the route's derived record (after the configured
/// map) to the record to write.
pub type MapFn =
    dyn Fn(&RecordView<'_>, DerivedRecord) -> Result<DerivedRecord, String> + Send + Sync;
/// A Rust router: every (topic, record) it returns is written, through the same
/// acknowledgement tracking, metrics (route `router`) and dead-letter handling as routes.
pub type RouterFn =
    dyn Fn(&RecordView<'_>) -> Result<Vec<(String, DerivedRecord)>, String> + Send + Sync;

/// A source record as filters, maps and routers see it.
pub struct RecordView<'a> {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) headers: Option<&'a BorrowedHeaders>,
    /// The whole record value.
    pub(crate) value: &'a [u8],
    /// The serialized task (the value, or the task inside a legacy envelope).
    pub(crate) task: &'a [u8],
    pub(crate) message: Option<&'a DynamicMessage>,
    /// Decaton metadata of a legacy envelope (None when it came in the `dt_meta` header).
    pub(crate) legacy_metadata: Option<&'a decaton_protocol::TaskMetadata>,
}

impl<'a> RecordView<'a> {
    /// Source partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }
    /// Source offset.
    pub fn offset(&self) -> i64 {
        self.offset
    }
    /// The record key.
    pub fn key(&self) -> Option<&'a [u8]> {
        self.key
    }
    /// The value of the first header named `name` (an empty slice for a null header).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers.and_then(|h| {
            raw_headers(h)
                .find(|h| h.is(name))
                .map(|h| h.value.unwrap_or(&[]))
        })
    }
    /// The serialized task (for `decaton` sources the task inside the record, for `plain`
    /// sources the value).
    pub fn task_bytes(&self) -> &'a [u8] {
        self.task
    }
    /// The decoded task, when a task type is configured.
    pub fn message(&self) -> Option<&'a DynamicMessage> {
        self.message
    }

    pub(crate) fn subject(&self) -> Subject<'a> {
        Subject {
            key: self.key,
            headers: self.headers,
            message: self.message,
        }
    }

    /// The source record as a derived record: key, value and headers unchanged.
    pub fn to_derived(&self) -> DerivedRecord {
        DerivedRecord {
            key: self.key.map(<[u8]>::to_vec),
            value: self.value.to_vec(),
            headers: source_headers(self.headers),
        }
    }
}

fn source_headers(h: Option<&BorrowedHeaders>) -> Vec<(String, Vec<u8>)> {
    h.map(|h| {
        raw_headers(h)
            .map(|h| (h.name_lossy().into_owned(), h.value.unwrap_or(&[]).to_vec()))
            .collect()
    })
    .unwrap_or_default()
}

/// A record to write to a derived topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DerivedRecord {
    /// Its key (the partition follows from it, as Java producers pick it).
    pub key: Option<Vec<u8>>,
    /// Its value.
    pub value: Vec<u8>,
    /// Its headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// One route: a destination topic with its filter and map. Build with [`Route::to`].
#[derive(Clone)]
pub struct Route {
    pub(crate) name: Option<String>,
    pub(crate) topic: String,
    pub(crate) filter: Option<String>,
    pub(crate) filter_fn: Option<Arc<FilterFn>>,
    pub(crate) keep: Option<Vec<String>>,
    pub(crate) key_field: Option<String>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) map_fn: Option<Arc<MapFn>>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("topic", &self.topic)
            .field("filter", &self.filter)
            .field("filter_fn", &self.filter_fn.is_some())
            .field("keep", &self.keep)
            .field("key_field", &self.key_field)
            .field("headers", &self.headers)
            .field("map_fn", &self.map_fn.is_some())
            .finish()
    }
}

impl Route {
    /// A route to `topic` that takes every record unchanged.
    pub fn to(topic: impl Into<String>) -> Route {
        Route {
            name: None,
            topic: topic.into(),
            filter: None,
            filter_fn: None,
            keep: None,
            key_field: None,
            headers: Vec::new(),
            map_fn: None,
        }
    }
    /// The route's name in metrics and reports (default: the topic).
    pub fn name(mut self, name: impl Into<String>) -> Route {
        self.name = Some(name.into());
        self
    }
    /// A filter expression (compiled when the replicator is built).
    pub fn filter(mut self, expr: impl Into<String>) -> Route {
        self.filter = Some(expr.into());
        self
    }
    /// A Rust filter, applied after the expression (both must accept the record).
    pub fn filter_fn(
        mut self,
        f: impl Fn(&RecordView<'_>) -> Result<bool, String> + Send + Sync + 'static,
    ) -> Route {
        self.filter_fn = Some(Arc::new(f));
        self
    }
    /// Keep only these fields of the task (the others are cleared).
    pub fn keep_fields<S: Into<String>>(mut self, fields: impl IntoIterator<Item = S>) -> Route {
        self.keep = Some(fields.into_iter().map(Into::into).collect());
        self
    }
    /// Re-key derived records by this field (a path like `a.b`): strings and bytes as
    /// they are, numbers and enums in decimal, booleans as `true`/`false`.
    pub fn key_field(mut self, path: impl Into<String>) -> Route {
        self.key_field = Some(path.into());
        self
    }
    /// Adds a header to every derived record.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Route {
        self.headers.push((name.into(), value.into()));
        self
    }
    /// A Rust map, applied after the configured map.
    pub fn map_fn(
        mut self,
        f: impl Fn(&RecordView<'_>, DerivedRecord) -> Result<DerivedRecord, String>
            + Send
            + Sync
            + 'static,
    ) -> Route {
        self.map_fn = Some(Arc::new(f));
        self
    }

    /// The route's name: the one given, else the topic.
    pub(crate) fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.topic.clone())
    }
}

/// Where in a route's definition a compile error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RoutePart {
    Filter(usize),
    Keep(usize),
    KeyField,
}

/// A route compiled against the task type.
pub(crate) struct CompiledRoute {
    pub(crate) name: String,
    pub(crate) topic: String,
    filter: Option<Filter>,
    filter_fn: Option<Arc<FilterFn>>,
    keep: Option<Vec<FieldDescriptor>>,
    key_field: Option<Vec<FieldDescriptor>>,
    headers: Vec<(String, Vec<u8>)>,
    map_fn: Option<Arc<MapFn>>,
    pub(crate) counters: RouteCounters,
}

/// A derived record on its way to the producer, borrowing from the source where it can.
pub(crate) struct Out<'a> {
    /// The destination, when not the route's own topic (router, dead letters).
    pub(crate) topic: Option<String>,
    pub(crate) key: Option<Cow<'a, [u8]>>,
    pub(crate) value: Cow<'a, [u8]>,
    /// Source headers first (when `copy_source_headers`), then these.
    pub(crate) headers: Vec<(String, Vec<u8>)>,
    pub(crate) copy_source_headers: bool,
}

impl Out<'_> {
    pub(crate) fn from_derived(d: DerivedRecord) -> Out<'static> {
        Out {
            topic: None,
            key: d.key.map(Cow::Owned),
            value: Cow::Owned(d.value),
            headers: d.headers,
            copy_source_headers: false,
        }
    }
}

impl CompiledRoute {
    /// Compiles `route`; errors name the part of the route that is wrong.
    pub(crate) fn compile(
        route: &Route,
        message: Option<&MessageDescriptor>,
    ) -> Result<CompiledRoute, (RoutePart, String, Option<usize>)> {
        let filter = match &route.filter {
            Some(text) => Some(
                Filter::compile(text, message)
                    .map_err(|e| (RoutePart::Filter(e.at), e.reason, None))?,
            ),
            None => None,
        };
        let keep = match &route.keep {
            Some(fields) => {
                let mut out = Vec::new();
                for (i, f) in fields.iter().enumerate() {
                    let Some(desc) = message else {
                        return Err((
                            RoutePart::Keep(i),
                            "keep needs a task type (records are raw bytes)".into(),
                            None,
                        ));
                    };
                    match desc.get_field_by_name(f) {
                        Some(fd) => out.push(fd),
                        None => {
                            return Err((
                                RoutePart::Keep(i),
                                format!("unknown field {f} in message {}", desc.full_name()),
                                None,
                            ))
                        }
                    }
                }
                Some(out)
            }
            None => None,
        };
        let key_field = match &route.key_field {
            Some(path) => {
                let parts: Vec<String> = path.split('.').map(str::to_string).collect();
                Some(resolve_path(&parts, message).map_err(|e| (RoutePart::KeyField, e, None))?)
            }
            None => None,
        };
        let name = route.display_name();
        Ok(CompiledRoute {
            counters: RouteCounters::new(&name),
            name,
            topic: route.topic.clone(),
            filter,
            filter_fn: route.filter_fn.clone(),
            keep,
            key_field,
            headers: route
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                .collect(),
            map_fn: route.map_fn.clone(),
        })
    }

    /// Whether this route needs the task decoded.
    pub(crate) fn reads_fields(&self) -> bool {
        self.filter.as_ref().is_some_and(Filter::reads_fields)
            || self.keep.is_some()
            || self.key_field.is_some()
            || self.filter_fn.is_some()
            || self.map_fn.is_some()
    }

    /// The derived record of `view` on this route: Ok(None) when the filter refuses it.
    pub(crate) fn derive<'a>(
        &self,
        view: &RecordView<'a>,
        format: SourceFormat,
    ) -> Result<Option<Out<'a>>, String> {
        if let Some(f) = &self.filter {
            if !f.matches(&view.subject()) {
                return Ok(None);
            }
        }
        if let Some(f) = &self.filter_fn {
            if !f(view)? {
                return Ok(None);
            }
        }
        let key = match &self.key_field {
            Some(path) => {
                let msg = view.message.ok_or("the task could not be decoded")?;
                Some(Cow::Owned(field_as_key(msg, path)))
            }
            None => view.key.map(Cow::Borrowed),
        };
        let mut out = Out {
            topic: None,
            key,
            value: Cow::Borrowed(view.value),
            headers: Vec::new(),
            copy_source_headers: true,
        };
        if let Some(keep) = &self.keep {
            let msg = view.message.ok_or("the task could not be decoded")?;
            let mut kept = DynamicMessage::new(msg.descriptor());
            for f in keep {
                if msg.has_field(f) {
                    kept.set_field(f, msg.get_field(f).into_owned());
                }
            }
            out.value = Cow::Owned(kept.encode_to_vec());
            if format == SourceFormat::Decaton {
                if let Some(meta) = view.legacy_metadata {
                    // The envelope is unwrapped: its metadata moves to the header.
                    out.headers.push((
                        decaton_protocol::METADATA_HEADER.to_string(),
                        decaton_protocol::encode_metadata(meta),
                    ));
                }
            }
        }
        out.headers.extend(self.headers.iter().cloned());
        if let Some(map) = &self.map_fn {
            let mut headers = if out.copy_source_headers {
                source_headers(view.headers)
            } else {
                Vec::new()
            };
            headers.append(&mut out.headers);
            let derived = DerivedRecord {
                key: out.key.map(Cow::into_owned),
                value: out.value.into_owned(),
                headers,
            };
            return Ok(Some(Out::from_derived(map(view, derived)?)));
        }
        Ok(Some(out))
    }
}

/// The bytes of a scalar field, as a key.
fn field_as_key(root: &DynamicMessage, path: &[FieldDescriptor]) -> Vec<u8> {
    let Some((last, parents)) = path.split_last() else {
        return Vec::new();
    };
    let mut msg: Cow<'_, DynamicMessage> = Cow::Borrowed(root);
    for f in parents {
        msg = match msg.get_field(f).as_ref() {
            Value::Message(m) => Cow::Owned(m.clone()),
            _ => return Vec::new(),
        };
    }
    match msg.get_field(last).as_ref() {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Bytes(b) => b.to_vec(),
        Value::Bool(b) => b.to_string().into_bytes(),
        Value::I32(v) => v.to_string().into_bytes(),
        Value::I64(v) => v.to_string().into_bytes(),
        Value::U32(v) => v.to_string().into_bytes(),
        Value::U64(v) => v.to_string().into_bytes(),
        Value::F32(v) => v.to_string().into_bytes(),
        Value::F64(v) => v.to_string().into_bytes(),
        Value::EnumNumber(v) => v.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::DescriptorPool;

    fn chat() -> MessageDescriptor {
        DescriptorPool::decode(decaton_protocol::FILE_DESCRIPTOR_SET)
            .unwrap()
            .get_message_by_name("decaton.example.ChatOp")
            .unwrap()
    }

    #[test]
    fn map_keeps_fields_rekeys_and_adds_headers() {
        let desc = chat();
        let op = decaton_protocol::ChatOp {
            user_id: "u1".into(),
            op: decaton_protocol::OpType::AddFriend as i32,
            target_id: "u2".into(),
            payload: b"p".to_vec(),
            sequence: 9,
            created_at_millis: 5,
        };
        let bytes = op.encode_to_vec();
        let msg = DynamicMessage::decode(desc.clone(), bytes.as_slice()).unwrap();
        let meta = decaton_protocol::TaskMetadata {
            source_application_id: "talk".into(),
            ..Default::default()
        };
        let view = RecordView {
            partition: 0,
            offset: 7,
            key: Some(b"u1"),
            headers: None,
            value: &bytes,
            task: &bytes,
            message: Some(&msg),
            legacy_metadata: Some(&meta),
        };
        let route = Route::to("social")
            .filter("op == ADD_FRIEND")
            .keep_fields(["user_id", "target_id", "sequence"])
            .key_field("target_id")
            .header("category", "social");
        let compiled = CompiledRoute::compile(&route, Some(&desc)).unwrap();
        let out = compiled
            .derive(&view, SourceFormat::Decaton)
            .unwrap()
            .unwrap();
        assert_eq!(out.key.as_deref(), Some(&b"u2"[..]));
        let kept = decaton_protocol::ChatOp::decode(out.value.as_ref()).unwrap();
        assert_eq!(
            kept,
            decaton_protocol::ChatOp {
                user_id: "u1".into(),
                target_id: "u2".into(),
                sequence: 9,
                ..Default::default()
            }
        );
        // The legacy envelope's metadata moved to the dt_meta header.
        let names: Vec<&str> = out.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["dt_meta", "category"]);
        assert_eq!(
            decaton_protocol::decode_metadata(&out.headers[0].1).unwrap(),
            meta
        );

        // Without a map: the source record as it is; a refusing filter: nothing.
        let plain = CompiledRoute::compile(&Route::to("all"), Some(&desc)).unwrap();
        let out = plain.derive(&view, SourceFormat::Decaton).unwrap().unwrap();
        assert_eq!(
            (out.key.as_deref(), out.value.as_ref()),
            (Some(&b"u1"[..]), &bytes[..])
        );
        assert!(out.copy_source_headers && out.headers.is_empty());
        let other =
            CompiledRoute::compile(&Route::to("m").filter("op == READ"), Some(&desc)).unwrap();
        assert!(other
            .derive(&view, SourceFormat::Decaton)
            .unwrap()
            .is_none());
    }
}
