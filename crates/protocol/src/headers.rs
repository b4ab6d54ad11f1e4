//! Record headers as bytes, whatever a producer wrote.
//!
//! Kafka header names are bytes on the wire. Java producers only write UTF-8 names, but
//! any other client can write any bytes, and rdkafka's safe [`Headers`] accessors assume
//! UTF-8 and panic on anything else. A record is never trusted, so every part of
//! decaton-rs that reads a header goes through [`raw_headers`]: names and values are
//! borrowed as bytes, and text is made from them (lossily) only where text is needed.
//! [`add_raw_header`] writes a name back byte for byte, so a record copied to a retry or
//! dead-letter topic keeps the headers it had.
//!
//! librdkafka keeps a header name as a NUL-terminated string: a name that holds a NUL byte
//! is read up to that byte.
//!
//! ```
//! use decaton_protocol::headers::{add_raw_header, raw_headers};
//! use rdkafka::message::OwnedHeaders;
//!
//! let headers = add_raw_header(OwnedHeaders::new(), b"\xff\xfe", Some(b"x"));
//! let read: Vec<_> = raw_headers(headers.as_borrowed()).collect();
//! assert_eq!(read[0].name, b"\xff\xfe");
//! assert_eq!(read[0].value, Some(&b"x"[..]));
//! assert_eq!(read[0].name_lossy(), "\u{fffd}\u{fffd}");
//! ```
//!
//! [`Headers`]: rdkafka::message::Headers

// The two librdkafka calls below are the only way to read or write a header name that is
// not UTF-8; each is wrapped so that nothing else in the workspace needs `unsafe`.
#![allow(unsafe_code)]

use std::borrow::Cow;
use std::ffi::{c_char, c_void, CStr};
use std::ptr;

use rdkafka::bindings as rdsys;
use rdkafka::message::{BorrowedHeaders, Message, OwnedHeaders};

/// One header of a record, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeader<'a> {
    /// The name, as the producer wrote it (up to a NUL byte, see the module docs).
    pub name: &'a [u8],
    /// The value; `None` for a null value.
    pub value: Option<&'a [u8]>,
}

impl RawHeader<'_> {
    /// The name as text, with invalid UTF-8 replaced by U+FFFD.
    pub fn name_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(self.name)
    }

    /// Whether the name is exactly `name`.
    pub fn is(&self, name: &str) -> bool {
        self.name == name.as_bytes()
    }
}

/// The headers of `headers`, in order, without assuming anything of their bytes.
pub fn raw_headers(headers: &BorrowedHeaders) -> RawHeaders<'_> {
    RawHeaders { headers, next: 0 }
}

/// The headers of a message (none when it has none).
pub fn message_headers<M: Message>(msg: &M) -> Vec<RawHeader<'_>>
where
    M::Headers: AsBorrowedHeaders,
{
    msg.headers()
        .map(|h| raw_headers(h.as_borrowed_headers()).collect())
        .unwrap_or_default()
}

/// Header collections that can be read as [`BorrowedHeaders`].
pub trait AsBorrowedHeaders {
    /// The headers, borrowed.
    fn as_borrowed_headers(&self) -> &BorrowedHeaders;
}

impl AsBorrowedHeaders for BorrowedHeaders {
    fn as_borrowed_headers(&self) -> &BorrowedHeaders {
        self
    }
}

impl AsBorrowedHeaders for OwnedHeaders {
    fn as_borrowed_headers(&self) -> &BorrowedHeaders {
        self.as_borrowed()
    }
}

/// Iterator over a record's headers as bytes; see [`raw_headers`].
pub struct RawHeaders<'a> {
    headers: &'a BorrowedHeaders,
    next: usize,
}

impl<'a> Iterator for RawHeaders<'a> {
    type Item = RawHeader<'a>;

    fn next(&mut self) -> Option<RawHeader<'a>> {
        let native = native(self.headers);
        let (mut name, mut value, mut size) = (ptr::null::<c_char>(), ptr::null::<c_void>(), 0);
        // SAFETY: `native` is the librdkafka header list behind `self.headers` (rdkafka's
        // own `BorrowedHeaders` is that pointer); an index past the end returns an error and
        // leaves the out-pointers untouched.
        let err = unsafe {
            rdsys::rd_kafka_header_get_all(native, self.next, &mut name, &mut value, &mut size)
        };
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            return None;
        }
        self.next += 1;
        // SAFETY: librdkafka returns a NUL-terminated name and a value of `size` bytes, both
        // owned by the header list, which lives as long as the borrow `'a`.
        let name = unsafe { CStr::from_ptr(name) }.to_bytes();
        let value = (!value.is_null())
            // SAFETY: as above; `value` points at `size` readable bytes.
            .then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) });
        Some(RawHeader { name, value })
    }
}

fn native(headers: &BorrowedHeaders) -> *const rdsys::rd_kafka_headers_t {
    (headers as *const BorrowedHeaders).cast()
}

/// Adds a header whose name is any bytes (rdkafka's `insert` takes only UTF-8 names).
pub fn add_raw_header(headers: OwnedHeaders, name: &[u8], value: Option<&[u8]>) -> OwnedHeaders {
    let native = native(headers.as_borrowed()).cast_mut();
    let (value_ptr, value_len) = match value {
        Some(v) => (v.as_ptr().cast::<c_void>(), v.len()),
        None => (ptr::null(), 0),
    };
    // SAFETY: `headers` is owned here, so nothing else reads the list while librdkafka
    // appends to it; the name and value are copied, with their lengths given (a slice is
    // never longer than `isize::MAX`).
    let _ = unsafe {
        rdsys::rd_kafka_header_add(
            native,
            name.as_ptr().cast::<c_char>(),
            name.len() as isize,
            value_ptr,
            value_len as isize,
        )
    };
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_names_and_values_read_back_as_written(
            hs in prop::collection::vec(
                (prop::collection::vec(1u8..=255, 0..40), prop::option::of(prop::collection::vec(any::<u8>(), 0..300))),
                0..12,
            )
        ) {
            let mut owned = OwnedHeaders::new();
            for (n, v) in &hs {
                owned = add_raw_header(owned, n, v.as_deref());
            }
            let read: Vec<(Vec<u8>, Option<Vec<u8>>)> = raw_headers(owned.as_borrowed())
                .map(|h| (h.name.to_vec(), h.value.map(<[u8]>::to_vec)))
                .collect();
            prop_assert_eq!(read, hs);
        }
    }

    #[test]
    fn an_empty_value_is_not_a_null_value() {
        let owned = add_raw_header(OwnedHeaders::new(), b"a", Some(b""));
        let owned = add_raw_header(owned, b"b", None);
        let read: Vec<_> = raw_headers(owned.as_borrowed()).collect();
        assert_eq!(read[0].value, Some(&b""[..]));
        assert_eq!(read[1].value, None);
        assert!(read[0].is("a") && !read[0].is("b"));
    }
}
