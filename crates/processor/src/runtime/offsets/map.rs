//! The offset-map codec: finished offsets above the commit position, as commit metadata.
//!
//! Format: `dtom1:<base>:<len>:<kind><base64>`, where `base` is the committed position and
//! `len` the number of offsets from `base` to one past the last finished one. Kind `r` is
//! run lengths (alternating not-done / done, starting with not-done, LEB128 varints); kind
//! `b` a little-endian bitset. The encoder picks the shorter. Decoding gives
//! [`DoneRanges`], whose size is bounded by the metadata's, whatever `len` says.

use base64::Engine as _;

use super::DoneRanges;

const MAP_PREFIX: &str = "dtom1";
/// Largest `len` a decoder accepts (a corrupt or hostile map must not allocate much).
const MAX_LEN: u64 = 1 << 40;

/// Encodes the finished offsets `done` (sorted, disjoint half-open ranges, all at or
/// above `base`) as commit metadata. Empty when nothing is done or the encoding would
/// exceed `max_len` bytes.
pub(crate) fn encode_offset_map(
    base: i64,
    done: impl Iterator<Item = (i64, i64)>,
    max_len: usize,
) -> String {
    let mut runs = Vec::new();
    let mut intervals: Vec<(u64, u64)> = Vec::new();
    let mut at: u64 = 0;
    for (start, end) in done {
        let (start, end) = ((start - base).max(0) as u64, (end - base).max(0) as u64);
        if end <= start || start < at {
            continue;
        }
        push_varint(&mut runs, start - at);
        push_varint(&mut runs, end - start);
        intervals.push((start, end));
        at = end;
        // Both encodings only grow from here: stop early on a hopeless map.
        if runs.len() > max_len && at.div_ceil(8) > max_len as u64 {
            return String::new();
        }
    }
    if intervals.is_empty() {
        return String::new();
    }
    let len = at;
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    let bitset_bytes = len.div_ceil(8);
    let (kind, payload) = if bitset_bytes < runs.len() as u64 {
        let mut bits = vec![0u8; bitset_bytes as usize];
        for (s, e) in intervals {
            for i in s..e {
                if let Some(byte) = bits.get_mut((i / 8) as usize) {
                    *byte |= 1 << (i % 8);
                }
            }
        }
        ('b', bits)
    } else {
        ('r', runs)
    };
    let encoded = format!("{MAP_PREFIX}:{base}:{len}:{kind}{}", b64.encode(payload));
    if encoded.len() > max_len {
        String::new()
    } else {
        encoded
    }
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn read_varint(input: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *input.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The finished offsets a committed offset map lists, if `metadata` is a valid map for the
/// committed `position`. Anything else (empty, foreign, corrupt, for another position)
/// gives None: the position alone is used.
pub fn decode_offset_map(position: i64, metadata: &str) -> Option<DoneRanges> {
    let mut parts = metadata.splitn(4, ':');
    if parts.next()? != MAP_PREFIX {
        return None;
    }
    let base: i64 = parts.next()?.parse().ok()?;
    let len: u64 = parts.next()?.parse().ok()?;
    let body = parts.next()?;
    if base != position || len > MAX_LEN || base.checked_add(len as i64).is_none() {
        return None;
    }
    // The kind is one ASCII byte; `get` refuses to split a multi-byte character.
    let kind = char::from(*body.as_bytes().first()?);
    let payload = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(body.get(1..)?)
        .ok()?;
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    match kind {
        'b' => {
            if payload.len() as u64 != len.div_ceil(8) {
                return None;
            }
            let mut open: Option<u64> = None;
            for i in 0..len {
                let set = payload
                    .get((i / 8) as usize)
                    .is_some_and(|byte| byte & (1 << (i % 8)) != 0);
                match (set, open) {
                    (true, None) => open = Some(i),
                    (false, Some(s)) => {
                        ranges.push((base + s as i64, base + i as i64));
                        open = None;
                    }
                    _ => {}
                }
            }
            if let Some(s) = open {
                ranges.push((base + s as i64, base + len as i64));
            }
        }
        'r' => {
            let mut pos = 0;
            let mut at: u64 = 0;
            let mut done = false;
            while pos < payload.len() {
                let run = read_varint(&payload, &mut pos)?;
                let end = at.checked_add(run)?;
                if end > len {
                    return None;
                }
                if done && run > 0 {
                    ranges.push((base + at as i64, base + end as i64));
                }
                at = end;
                done = !done;
            }
            if at != len {
                return None;
            }
        }
        _ => return None,
    }
    Some(DoneRanges::from_sorted(ranges))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn foreign_or_corrupt_metadata_is_ignored() {
        assert_eq!(decode_offset_map(5, ""), None);
        assert_eq!(decode_offset_map(5, "hello"), None);
        assert_eq!(decode_offset_map(5, "dtom1:6:3:rAQE"), None);
        assert_eq!(decode_offset_map(5, "dtom1:5:3:r!!!"), None);
        assert_eq!(decode_offset_map(5, "dtom1:5:99999999999999:b"), None);
        // A multi-byte first character of the body.
        assert_eq!(decode_offset_map(5, "dtom1:5:3:\u{202e}e"), None);
    }

    #[test]
    fn maps_written_by_earlier_versions_still_decode() {
        // 100 not done, 1 done, 2 not done, 3 done: runs [100, 1, 2, 3].
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode([100u8, 1, 2, 3]);
        let ranges = decode_offset_map(7, &format!("dtom1:7:106:r{b64}")).unwrap();
        assert_eq!(
            ranges.iter().collect::<Vec<_>>(),
            vec![(107, 108), (110, 113)]
        );
    }

    #[test]
    fn a_huge_gap_encodes_in_a_few_bytes() {
        let map = encode_offset_map(0, [(1 << 35, (1 << 35) + 1)].into_iter(), 4000);
        assert!(map.len() < 40, "{map}");
        let ranges = decode_offset_map(0, &map).unwrap();
        assert_eq!(ranges.count(), 1);
        assert!(ranges.contains(1 << 35));
    }

    proptest! {
        #[test]
        fn round_trips(base in 0i64..1_000_000, flags in proptest::collection::vec(any::<bool>(), 0..2000)) {
            let mut ranges = Vec::new();
            for (i, d) in flags.iter().enumerate() {
                if *d { ranges.push((base + i as i64, base + i as i64 + 1)); }
            }
            let expected = DoneRanges::from_sorted(ranges.clone());
            let enc = encode_offset_map(base, expected.iter(), 1 << 20);
            if expected.is_empty() {
                prop_assert_eq!(enc, "");
            } else {
                prop_assert_eq!(decode_offset_map(base, &enc).unwrap(), expected);
            }
        }

        #[test]
        fn decoding_garbage_never_panics(s in ".{0,64}", pos in any::<i64>()) {
            let _ = decode_offset_map(pos, &s);
            let _ = decode_offset_map(pos, &format!("dtom1:{pos}:{}", s));
        }
    }
}
