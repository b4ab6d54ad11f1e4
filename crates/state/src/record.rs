//! The changelog record format, in one place: what a record's key, value and headers mean,
//! how a task batch's headers are written, and how a restore reads them back.
//!
//! One record per [`Mutation`]: key = the state key, value = the new value, or no value
//! (a tombstone) for a delete. Every record of a task batch carries fixed-width big-endian
//! headers ([`headers`]) that let a restore put the batch back together:
//!
//! | header           | type | meaning                                                   |
//! |------------------|------|-----------------------------------------------------------|
//! | `dt_src_offset`  | i64  | source offset of the task that wrote the batch            |
//! | `dt_batch`       | u64  | random id of this attempt's batch                         |
//! | `dt_batch_index` | u32  | position of the record in the batch                       |
//! | `dt_batch_size`  | u32  | number of records in the batch                            |
//! | `dt_writer`      | u64  | random id of the writer (a writer "epoch")                |
//! | `dt_seq`         | u64  | per-writer, per-partition record sequence number          |
//!
//! `dt_writer` and `dt_seq` let a restore tell a batch torn by a crash (its missing
//! records were never written: they lie past the writer's last record) from a batch that
//! compaction thinned out (its missing records were superseded by later writes).
//!
//! A record with a `dt_abort` header (u64 batch id) is an **abort marker**: the batch it
//! names is ignored by every restore. Its key is unique to the batch
//! ([`abort_marker_key`]), so compaction keeps it, and it never touches state.
//!
//! Records without the batch headers (written by something else) are [`Kind::Unframed`]
//! and applied one by one.

use rdkafka::message::{Header, OwnedHeaders};

/// Names of the changelog record headers.
///
/// Every record of a task batch carries all six batch headers, fixed-width big endian:
/// `dt_src_offset` (i64), `dt_batch` (u64), `dt_batch_index` (u32), `dt_batch_size`
/// (u32), `dt_writer` (u64), `dt_seq` (u64). An abort marker carries only `dt_abort`.
pub mod headers {
    /// Source offset of the task that wrote the record (i64, big endian).
    pub const SRC_OFFSET: &str = "dt_src_offset";
    /// Random id of the task attempt's batch (u64, big endian).
    pub const BATCH: &str = "dt_batch";
    /// Position of the record in its batch (u32, big endian).
    pub const BATCH_INDEX: &str = "dt_batch_index";
    /// Number of records in the batch (u32, big endian).
    pub const BATCH_SIZE: &str = "dt_batch_size";
    /// Random id of the writer that produced the record (u64, big endian).
    pub const WRITER: &str = "dt_writer";
    /// The writer's sequence number of the record in this partition (u64, big endian).
    pub const SEQ: &str = "dt_seq";
    /// Marks an abort marker; the value is the aborted batch id (u64, big endian).
    pub const ABORT: &str = "dt_abort";
}

/// `dt_src_offset` of records that no task wrote (a restore's compensation batch).
pub(crate) const NO_TASK: i64 = -1;

/// One write of a task's batch: a changelog record, and a write to the local store once
/// the changelog has acknowledged it.
///
/// Values are absolute (the new value, never a delta), so applying the same mutations
/// twice in a row leaves the same state as applying them once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mutation {
    /// The state key (also the changelog record key).
    pub key: Vec<u8>,
    /// The new value; `None` deletes the key (a tombstone in the changelog).
    pub value: Option<Vec<u8>>,
}

/// The batch framing of one changelog record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    /// Source offset of the task (`dt_src_offset`); [`NO_TASK`] for a restore's records.
    pub(crate) src_offset: i64,
    /// Batch id (`dt_batch`).
    pub(crate) batch: u64,
    /// Position in the batch (`dt_batch_index`).
    pub(crate) index: u32,
    /// Records in the batch (`dt_batch_size`).
    pub(crate) size: u32,
    /// `(dt_writer, dt_seq)` when present.
    pub(crate) seq: Option<(u64, u64)>,
}

/// What a changelog record is, by its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A record of a task batch.
    Framed(Frame),
    /// A record without (valid) batch headers.
    Unframed,
    /// An abort marker for the given batch.
    Abort(u64),
}

/// The headers of one record of a task batch.
pub(crate) fn encode_frame(frame: &Frame) -> OwnedHeaders {
    let mut hs = OwnedHeaders::new_with_capacity(6)
        .insert(Header {
            key: headers::SRC_OFFSET,
            value: Some(&frame.src_offset.to_be_bytes()),
        })
        .insert(Header {
            key: headers::BATCH,
            value: Some(&frame.batch.to_be_bytes()),
        })
        .insert(Header {
            key: headers::BATCH_INDEX,
            value: Some(&frame.index.to_be_bytes()),
        })
        .insert(Header {
            key: headers::BATCH_SIZE,
            value: Some(&frame.size.to_be_bytes()),
        });
    if let Some((writer, seq)) = frame.seq {
        hs = hs
            .insert(Header {
                key: headers::WRITER,
                value: Some(&writer.to_be_bytes()),
            })
            .insert(Header {
                key: headers::SEQ,
                value: Some(&seq.to_be_bytes()),
            });
    }
    hs
}

/// The headers of the abort marker of `batch`.
pub(crate) fn encode_abort(batch: u64) -> OwnedHeaders {
    OwnedHeaders::new().insert(Header {
        key: headers::ABORT,
        value: Some(&batch.to_be_bytes()),
    })
}

/// Key of the abort marker of `batch`: `"\0dt-abort\0"` followed by the id, big endian.
pub(crate) fn abort_marker_key(batch: u64) -> Vec<u8> {
    let mut key = b"\0dt-abort\0".to_vec();
    key.extend_from_slice(&batch.to_be_bytes());
    key
}

fn be<const N: usize>(v: Option<&[u8]>) -> Option<[u8; N]> {
    v.and_then(|v| <[u8; N]>::try_from(v).ok())
}

/// Classifies a record by its headers (name, value pairs).
pub(crate) fn classify<'a>(hdrs: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>) -> Kind {
    let (mut src, mut batch, mut index, mut size, mut writer, mut seq) =
        (None, None, None, None, None, None);
    for (key, value) in hdrs {
        match key {
            headers::SRC_OFFSET => src = be::<8>(value).map(i64::from_be_bytes),
            headers::BATCH => batch = be::<8>(value).map(u64::from_be_bytes),
            headers::BATCH_INDEX => index = be::<4>(value).map(u32::from_be_bytes),
            headers::BATCH_SIZE => size = be::<4>(value).map(u32::from_be_bytes),
            headers::WRITER => writer = be::<8>(value).map(u64::from_be_bytes),
            headers::SEQ => seq = be::<8>(value).map(u64::from_be_bytes),
            headers::ABORT => {
                if let Some(b) = be::<8>(value).map(u64::from_be_bytes) {
                    return Kind::Abort(b);
                }
            }
            _ => {}
        }
    }
    match (src, batch, index, size) {
        (Some(src_offset), Some(batch), Some(index), Some(size)) if index < size => {
            Kind::Framed(Frame {
                src_offset,
                batch,
                index,
                size,
                seq: writer.zip(seq),
            })
        }
        _ => Kind::Unframed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    fn decode(hs: &OwnedHeaders) -> Kind {
        classify(hs.iter().map(|h| (h.key, h.value)))
    }

    #[test]
    fn encoded_headers_classify_back() {
        for frame in [
            Frame {
                src_offset: 7,
                batch: u64::MAX,
                index: 2,
                size: 3,
                seq: Some((42, 1 << 40)),
            },
            Frame {
                src_offset: NO_TASK,
                batch: 9,
                index: 0,
                size: 1,
                seq: None,
            },
        ] {
            assert_eq!(decode(&encode_frame(&frame)), Kind::Framed(frame));
        }
        assert_eq!(decode(&encode_abort(77)), Kind::Abort(77));
        assert_ne!(abort_marker_key(1), abort_marker_key(2));
    }

    #[test]
    fn classify_rejects_incomplete_or_malformed_headers() {
        let src = 7i64.to_be_bytes();
        let batch = 9u64.to_be_bytes();
        let idx = 1u32.to_be_bytes();
        let size = 2u32.to_be_bytes();
        let hs: Vec<(&str, Option<&[u8]>)> = vec![
            (headers::SRC_OFFSET, Some(&src)),
            (headers::BATCH, Some(&batch)),
            (headers::BATCH_INDEX, Some(&idx)),
            (headers::BATCH_SIZE, Some(&size)),
        ];
        assert_eq!(
            classify(hs.iter().copied()),
            Kind::Framed(Frame {
                src_offset: 7,
                batch: 9,
                index: 1,
                size: 2,
                seq: None
            })
        );
        assert_eq!(classify(hs[..3].iter().copied()), Kind::Unframed);
        let bad = [(headers::BATCH_INDEX, Some(&b"\x01"[..]))];
        assert_eq!(
            classify(hs[..2].iter().copied().chain(bad).chain([hs[3]])),
            Kind::Unframed
        );
        // An index past the size is not a frame.
        let past = 2u32.to_be_bytes();
        let over = [(headers::BATCH_INDEX, Some(&past[..]))];
        assert_eq!(
            classify(hs[..2].iter().copied().chain(over).chain([hs[3]])),
            Kind::Unframed
        );
    }
}
