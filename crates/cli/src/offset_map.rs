//! Reads the offset map a decaton-rs processor writes into its commit metadata: how many
//! tasks above the committed offset are already finished (a restart skips them).
//!
//! Format: `dtom1:<base>:<len>:<kind><base64>`, base64 without padding. `base` is the
//! committed offset and `len` the number of offsets from it to one past the last finished
//! one. Kind `r`: LEB128 varint run lengths alternating not-done / done, starting with
//! not-done, adding up to `len`. Kind `b`: a little-endian bitset of `len` bits, one per
//! offset, set when done. A map the processor would not accept (another position, bad
//! base64, runs not adding up, ...) is reported as invalid: the processor then starts
//! from the committed offset alone.

use base64::Engine as _;

/// Prefix of every map.
const MAP_PREFIX: &str = "dtom1";
/// Largest `len` a processor accepts.
const MAX_LEN: u64 = 1 << 40;

/// What a partition's commit metadata says about finished tasks above the commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OffsetMap {
    /// No metadata: nothing above the committed offset is known to be finished.
    Empty,
    /// A valid map: this many offsets above the committed one are finished.
    Finished(u64),
    /// Metadata a processor would ignore, with the reason.
    Invalid(String),
}

/// Decodes the commit `metadata` of a partition committed at `position`.
pub fn decode(position: i64, metadata: &str) -> OffsetMap {
    if metadata.is_empty() {
        return OffsetMap::Empty;
    }
    match count_finished(position, metadata) {
        Ok(n) => OffsetMap::Finished(n),
        Err(reason) => OffsetMap::Invalid(reason.to_string()),
    }
}

fn count_finished(position: i64, metadata: &str) -> Result<u64, &'static str> {
    let mut parts = metadata.splitn(4, ':');
    if parts.next() != Some(MAP_PREFIX) {
        return Err("not a decaton-rs offset map");
    }
    let base: i64 = parts
        .next()
        .and_then(|b| b.parse().ok())
        .ok_or("bad base offset")?;
    let len: u64 = parts
        .next()
        .and_then(|l| l.parse().ok())
        .ok_or("bad length")?;
    let body = parts.next().ok_or("no body")?;
    if base != position {
        return Err("written for another committed offset");
    }
    if len > MAX_LEN
        || i64::try_from(len)
            .ok()
            .and_then(|l| base.checked_add(l))
            .is_none()
    {
        return Err("length out of range");
    }
    let kind = *body.as_bytes().first().ok_or("no kind")?;
    let payload = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(body.get(1..).ok_or("bad kind")?)
        .map_err(|_| "bad base64")?;
    match kind {
        b'b' => {
            if payload.len() as u64 != len.div_ceil(8) {
                return Err("bitset length does not match");
            }
            let mut done = 0u64;
            for i in 0..len {
                if payload
                    .get((i / 8) as usize)
                    .is_some_and(|byte| byte & (1 << (i % 8)) != 0)
                {
                    done += 1;
                }
            }
            Ok(done)
        }
        b'r' => {
            let (mut pos, mut at, mut done, mut is_done) = (0usize, 0u64, 0u64, false);
            while pos < payload.len() {
                let run = read_varint(&payload, &mut pos).ok_or("bad varint")?;
                at = at
                    .checked_add(run)
                    .filter(|end| *end <= len)
                    .ok_or("runs longer than the map")?;
                if is_done {
                    done += run;
                }
                is_done = !is_done;
            }
            if at != len {
                return Err("runs shorter than the map");
            }
            Ok(done)
        }
        _ => Err("unknown kind"),
    }
}

/// One LEB128 varint (at most ten bytes), as the processor reads it.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The processor's encoder (`runtime/offsets/map.rs`), restated: finished ranges
    /// `done` (sorted, disjoint, at or above `base`) as a map of the kind asked for.
    fn encode(base: i64, done: &[(i64, i64)], bitset: bool) -> String {
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
        let (mut runs, mut at) = (Vec::new(), 0u64);
        for &(start, end) in done {
            let (start, end) = ((start - base) as u64, (end - base) as u64);
            push_varint(&mut runs, start - at);
            push_varint(&mut runs, end - start);
            at = end;
        }
        let len = at;
        let (kind, payload) = if bitset {
            let mut bits = vec![0u8; len.div_ceil(8) as usize];
            for &(s, e) in done {
                for i in (s - base) as u64..(e - base) as u64 {
                    bits[(i / 8) as usize] |= 1 << (i % 8);
                }
            }
            ('b', bits)
        } else {
            ('r', runs)
        };
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(payload);
        format!("{MAP_PREFIX}:{base}:{len}:{kind}{b64}")
    }

    #[test]
    fn counts_finished_offsets_of_both_kinds() {
        let done = [(101, 103), (110, 111), (300, 400), (1000, 1001)];
        for bitset in [false, true] {
            let map = encode(100, &done, bitset);
            assert_eq!(
                decode(100, &map),
                OffsetMap::Finished(2 + 1 + 100 + 1),
                "{map}"
            );
        }
        // A huge gap stays small as runs and is still counted right.
        let map = encode(0, &[(1 << 35, (1 << 35) + 3)], false);
        assert!(map.len() < 40, "{map}");
        assert_eq!(decode(0, &map), OffsetMap::Finished(3));
        // The processor's own compatibility sample: runs [100, 1, 2, 3].
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode([100u8, 1, 2, 3]);
        assert_eq!(
            decode(7, &format!("dtom1:7:106:r{b64}")),
            OffsetMap::Finished(4)
        );
    }

    #[test]
    fn rejects_what_the_processor_rejects() {
        assert_eq!(decode(5, ""), OffsetMap::Empty);
        let map = encode(5, &[(6, 8)], false);
        assert_eq!(decode(5, &map), OffsetMap::Finished(2));
        for bad in [
            "hello".to_string(),
            map.replacen(":5:", ":6:", 1), // another position
            "dtom1:5:3:r!!!".into(),
            "dtom1:5:99999999999999:b".into(),
            "dtom1:5:3:\u{202e}e".into(),
            "dtom1:5:4:rAQE".into(), // runs [1, 1] add up to 2, not 4
            "dtom1:5:1:rAQE".into(), // runs longer than the map
            "dtom1:5:16:bAQ".into(), // one bitset byte for 16 offsets
            "dtom1:5:3:xAQE".into(), // unknown kind
            "dtom1:5:3:r/////////////w".into(), // a varint that never ends
        ] {
            assert!(
                matches!(decode(5, &bad), OffsetMap::Invalid(_)),
                "{bad} decoded as {:?}",
                decode(5, &bad)
            );
        }
    }
}
