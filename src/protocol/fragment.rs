//! Fragmentation and reassembly of LHP/1 frames over ATT writes and notifications.
//!
//! A frame is at most [`MAX_FRAME_LEN`] bytes; one ATT write or notification carries at most
//! `MTU - 3` bytes ([`max_fragment_len`]), or less where the stack says so (bluer's
//! `AcquireWrite` writer allows `MTU - 5`). Every fragment starts with one header byte:
//!
//! ```text
//! bit 7  FIRST   set on the first fragment of a frame, which then carries the frame length
//!                as a big-endian u16 right after the header byte
//! bit 6  LAST    set on the fragment that completes the frame
//! bits 0-5       fragment index, 0 for the first fragment, +1 for each following one
//! ```
//!
//! The reassembler is strict: a fragment out of order, repeated, beyond the declared length or
//! arriving after [`REASSEMBLY_TIMEOUT_MS`] is an error, and the partial frame is dropped. BLE
//! delivers writes and notifications in order on one link, so any of these means a broken link
//! or an attacker, never a condition to paper over.

use thiserror::Error;

/// Largest frame LHP/1 carries, in bytes (header, ciphertext and tag included).
pub const MAX_FRAME_LEN: usize = 1024;
/// Smallest ATT MTU (BLE 4.0 default): 20-byte writes.
pub const MIN_MTU: u16 = 23;
/// Largest ATT MTU BlueZ negotiates.
pub const MAX_MTU: u16 = 517;
/// Smallest fragment size accepted for sending: `MIN_MTU - 5`, what bluer's write socket
/// allows at the smallest MTU. A maximal frame still fits in 64 fragments at this size.
pub const MIN_FRAGMENT_LEN: usize = MIN_MTU as usize - 5;
/// Largest fragment: one notification at the largest MTU.
pub const MAX_FRAGMENT_LEN: usize = MAX_MTU as usize - 3;
/// A partial frame older than this is dropped with [`FragmentError::Timeout`].
pub const REASSEMBLY_TIMEOUT_MS: u64 = 3_000;

const FIRST: u8 = 0x80;
const LAST: u8 = 0x40;
const INDEX_MASK: u8 = 0x3f;
const MAX_FRAGMENTS: usize = 64;

/// Why a frame could not be cut or put back together.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FragmentError {
    /// The frame is larger than [`MAX_FRAME_LEN`], or fragments carried more than declared.
    #[error("frame of {len} bytes exceeds the bound of {max}")]
    Oversize {
        /// Declared or accumulated length.
        len: usize,
        /// The bound it broke.
        max: usize,
    },
    /// A fragment arrived with an unexpected index.
    #[error("fragment {got} out of order (expected {expected})")]
    OutOfOrder {
        /// The index that was due.
        expected: u8,
        /// The index received.
        got: u8,
    },
    /// The fragment just received repeats the previous one.
    #[error("fragment {index} received twice")]
    Duplicate {
        /// The repeated index.
        index: u8,
    },
    /// A frame ended early: a LAST fragment short of the declared length, a new FIRST fragment
    /// while one was pending, or a first fragment too short to hold its length.
    #[error("frame truncated: {received} of {declared} bytes")]
    Truncated {
        /// Bytes received.
        received: usize,
        /// Bytes declared by the first fragment.
        declared: usize,
    },
    /// All declared bytes arrived but the fragment carrying them was not marked LAST.
    #[error("frame complete but its last fragment is not marked LAST")]
    MissingLast,
    /// An empty fragment or a frame declared empty.
    #[error("empty fragment")]
    Empty,
    /// The partial frame was older than the reassembly timeout.
    #[error("reassembly timed out after {elapsed_ms} ms")]
    Timeout {
        /// Age of the partial frame.
        elapsed_ms: u64,
    },
    /// The ATT MTU is outside 23..=517.
    #[error("ATT MTU {0} outside {MIN_MTU}..={MAX_MTU}")]
    BadMtu(u16),
    /// The fragment size is outside the range LHP/1 supports.
    #[error("fragment size {0} outside {MIN_FRAGMENT_LEN}..={MAX_FRAGMENT_LEN}")]
    BadFragmentLen(usize),
}

/// The largest fragment one write or notification carries at ATT MTU `mtu`: `mtu - 3`.
pub fn max_fragment_len(mtu: u16) -> Result<usize, FragmentError> {
    if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
        return Err(FragmentError::BadMtu(mtu));
    }
    Ok(usize::from(mtu) - 3)
}

/// Cuts `frame` into fragments of at most `max_len` bytes (see [`max_fragment_len`]).
pub fn fragment(frame: &[u8], max_len: usize) -> Result<Vec<Vec<u8>>, FragmentError> {
    if !(MIN_FRAGMENT_LEN..=MAX_FRAGMENT_LEN).contains(&max_len) {
        return Err(FragmentError::BadFragmentLen(max_len));
    }
    if frame.is_empty() {
        return Err(FragmentError::Empty);
    }
    if frame.len() > MAX_FRAME_LEN {
        return Err(FragmentError::Oversize { len: frame.len(), max: MAX_FRAME_LEN });
    }
    let payload = max_len;
    let mut out = Vec::with_capacity(frame.len() / (payload - 1) + 1);
    let first_take = frame.len().min(payload - 3);
    let mut first = Vec::with_capacity(first_take + 3);
    first.push(FIRST);
    first.extend_from_slice(&(frame.len() as u16).to_be_bytes());
    first.extend_from_slice(&frame[..first_take]);
    out.push(first);
    let mut rest = &frame[first_take..];
    let mut index = 1u8;
    while !rest.is_empty() {
        let take = rest.len().min(payload - 1);
        let mut f = Vec::with_capacity(take + 1);
        f.push(index);
        f.extend_from_slice(&rest[..take]);
        out.push(f);
        rest = &rest[take..];
        index += 1;
    }
    // MAX_FRAME_LEN fits in MAX_FRAGMENTS fragments even at the smallest fragment size.
    debug_assert!(out.len() <= MAX_FRAGMENTS);
    if let Some(last) = out.last_mut() {
        last[0] |= LAST;
    }
    Ok(out)
}

/// Puts fragments back together into frames, one frame at a time.
#[derive(Debug)]
pub struct Reassembler {
    pending: Option<Pending>,
    timeout_ms: u64,
}

#[derive(Debug)]
struct Pending {
    buf: Vec<u8>,
    declared: usize,
    next_index: u8,
    started_ms: u64,
}

impl Default for Reassembler {
    fn default() -> Self {
        Self::new(REASSEMBLY_TIMEOUT_MS)
    }
}

impl Reassembler {
    /// A reassembler that drops partial frames older than `timeout_ms`.
    pub fn new(timeout_ms: u64) -> Self {
        Reassembler { pending: None, timeout_ms }
    }

    /// When the pending partial frame (if any) times out, in the caller's monotonic ms.
    pub fn deadline(&self) -> Option<u64> {
        self.pending.as_ref().map(|p| p.started_ms.saturating_add(self.timeout_ms))
    }

    /// Whether a partial frame is waiting for more fragments.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Drops a partial frame that has outlived the timeout.
    pub fn check_timeout(&mut self, now_ms: u64) -> Result<(), FragmentError> {
        if let Some(p) = &self.pending {
            let elapsed_ms = now_ms.saturating_sub(p.started_ms);
            if elapsed_ms >= self.timeout_ms {
                self.pending = None;
                return Err(FragmentError::Timeout { elapsed_ms });
            }
        }
        Ok(())
    }

    /// Takes one fragment; returns the frame it completes, if any. On error the partial frame
    /// is dropped and the reassembler is ready for a new first fragment.
    pub fn push(&mut self, fragment: &[u8], now_ms: u64) -> Result<Option<Vec<u8>>, FragmentError> {
        let result = self.push_inner(fragment, now_ms);
        if result.is_err() {
            self.pending = None;
        }
        result
    }

    fn push_inner(&mut self, fragment: &[u8], now_ms: u64) -> Result<Option<Vec<u8>>, FragmentError> {
        self.check_timeout(now_ms)?;
        let (&header, body) = fragment.split_first().ok_or(FragmentError::Empty)?;
        let index = header & INDEX_MASK;
        let is_last = header & LAST != 0;
        if header & FIRST != 0 {
            if let Some(p) = &self.pending {
                return Err(FragmentError::Truncated { received: p.buf.len(), declared: p.declared });
            }
            if index != 0 {
                return Err(FragmentError::OutOfOrder { expected: 0, got: index });
            }
            if body.len() < 2 {
                return Err(FragmentError::Truncated { received: body.len(), declared: 2 });
            }
            let declared = usize::from(u16::from_be_bytes([body[0], body[1]]));
            if declared == 0 {
                return Err(FragmentError::Empty);
            }
            if declared > MAX_FRAME_LEN {
                return Err(FragmentError::Oversize { len: declared, max: MAX_FRAME_LEN });
            }
            self.pending =
                Some(Pending { buf: Vec::with_capacity(declared), declared, next_index: 0, started_ms: now_ms });
            return self.append(&body[2..], index, is_last);
        }
        let Some(p) = &self.pending else {
            return Err(FragmentError::OutOfOrder { expected: 0, got: index });
        };
        if index != p.next_index {
            if p.next_index > 0 && index == p.next_index - 1 {
                return Err(FragmentError::Duplicate { index });
            }
            return Err(FragmentError::OutOfOrder { expected: p.next_index, got: index });
        }
        self.append(body, index, is_last)
    }

    fn append(&mut self, data: &[u8], index: u8, is_last: bool) -> Result<Option<Vec<u8>>, FragmentError> {
        let p = self.pending.as_mut().expect("append follows a pending frame");
        if data.is_empty() && !(index == 0 && is_last) {
            return Err(FragmentError::Empty);
        }
        let len = p.buf.len() + data.len();
        if len > p.declared {
            return Err(FragmentError::Oversize { len, max: p.declared });
        }
        p.buf.extend_from_slice(data);
        p.next_index = index.wrapping_add(1);
        match (len == p.declared, is_last) {
            (true, true) => Ok(self.pending.take().map(|p| p.buf)),
            (false, true) => Err(FragmentError::Truncated { received: len, declared: p.declared }),
            (true, false) => Err(FragmentError::MissingLast),
            (false, false) if usize::from(p.next_index) >= MAX_FRAGMENTS => {
                Err(FragmentError::Truncated { received: len, declared: p.declared })
            }
            (false, false) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    fn reassemble(frags: &[Vec<u8>]) -> Result<Vec<u8>, FragmentError> {
        let mut r = Reassembler::default();
        for (i, f) in frags.iter().enumerate() {
            if let Some(done) = r.push(f, 0)? {
                assert_eq!(i, frags.len() - 1, "frame completed early");
                return Ok(done);
            }
        }
        panic!("frame never completed")
    }

    #[test]
    fn round_trip_at_smallest_and_largest_mtu() {
        for max in [MIN_FRAGMENT_LEN, 20, 244, MAX_FRAGMENT_LEN] {
            for len in [1, 17, 18, 19, 100, MAX_FRAME_LEN] {
                let f = frame(len);
                let frags = fragment(&f, max).unwrap();
                assert!(frags.iter().all(|x| x.len() <= max));
                assert_eq!(reassemble(&frags).unwrap(), f);
            }
        }
    }

    #[test]
    fn refuses_oversize_frames() {
        assert_eq!(
            fragment(&frame(MAX_FRAME_LEN + 1), 20),
            Err(FragmentError::Oversize { len: MAX_FRAME_LEN + 1, max: MAX_FRAME_LEN })
        );
        let mut r = Reassembler::default();
        assert!(matches!(r.push(&[FIRST, 0x04, 0x01, 0], 0), Err(FragmentError::Oversize { .. })));
    }

    #[test]
    fn typed_errors_for_order_duplicates_and_truncation() {
        let frags = fragment(&frame(60), 20).unwrap();
        assert_eq!(frags.len(), 4);
        let mut r = Reassembler::default();
        r.push(&frags[0], 0).unwrap();
        assert_eq!(r.push(&frags[2], 0), Err(FragmentError::OutOfOrder { expected: 1, got: 2 }));

        let mut r = Reassembler::default();
        r.push(&frags[0], 0).unwrap();
        r.push(&frags[1], 0).unwrap();
        assert_eq!(r.push(&frags[1], 0), Err(FragmentError::Duplicate { index: 1 }));

        let mut r = Reassembler::default();
        r.push(&frags[0], 0).unwrap();
        assert!(matches!(r.push(&frags[0], 0), Err(FragmentError::Truncated { .. })));

        let mut r = Reassembler::default();
        r.push(&frags[0], 0).unwrap();
        let mut early_last = frags[1].clone();
        early_last[0] |= LAST;
        assert!(matches!(r.push(&early_last, 0), Err(FragmentError::Truncated { .. })));

        let mut r = Reassembler::default();
        assert_eq!(r.push(&frags[1], 0), Err(FragmentError::OutOfOrder { expected: 0, got: 1 }));
    }

    /// Every fragment but the last is filled to the size allowed: a frame takes as few ATT
    /// writes as it can, and each one is cut exactly where the header says.
    #[test]
    fn fragments_are_as_few_as_the_size_allows() {
        let lens = |frags: &[Vec<u8>]| frags.iter().map(Vec::len).collect::<Vec<_>>();
        let frags = fragment(&frame(100), 20).unwrap();
        assert_eq!(lens(&frags), [20, 20, 20, 20, 20, 8]);
        assert_eq!(frags.iter().map(|f| f[0]).collect::<Vec<_>>(), [FIRST, 1, 2, 3, 4, 5 | LAST]);
        assert_eq!(frags[0][1..3], [0, 100], "the first fragment declares the frame's length");
        assert_eq!(
            frags.iter().flat_map(|f| &f[if f[0] & FIRST != 0 { 3 } else { 1 }..]).copied().collect::<Vec<_>>(),
            frame(100)
        );
        // One that fits the first fragment whole is one write; one byte more is two.
        let one = fragment(&frame(17), 20).unwrap();
        assert_eq!((lens(&one), one[0][0]), (vec![20], FIRST | LAST));
        assert_eq!(lens(&fragment(&frame(18), 20).unwrap()), [20, 2]);
    }

    /// The write size is the MTU less three, within the MTUs BLE allows; sizes and frames
    /// outside the bounds are refused with what they are.
    #[test]
    fn sizes_outside_the_bounds_are_refused() {
        assert_eq!(max_fragment_len(MIN_MTU), Ok(20));
        assert_eq!(max_fragment_len(MAX_MTU), Ok(514));
        assert_eq!(max_fragment_len(MIN_MTU - 1), Err(FragmentError::BadMtu(22)));
        assert_eq!(max_fragment_len(MAX_MTU + 1), Err(FragmentError::BadMtu(518)));
        assert_eq!(fragment(&frame(1), MIN_FRAGMENT_LEN - 1), Err(FragmentError::BadFragmentLen(17)));
        assert_eq!(fragment(&frame(1), MAX_FRAGMENT_LEN + 1), Err(FragmentError::BadFragmentLen(515)));
        assert_eq!(fragment(&[], 20), Err(FragmentError::Empty));
    }

    /// Fragments too short for what their header claims get the error that names the fault.
    #[test]
    fn short_and_empty_fragments_name_their_fault() {
        let first_then = |next: &[u8]| {
            let mut r = Reassembler::default();
            assert_eq!(r.push(&[FIRST, 0, 5, 1], 0), Ok(None));
            r.push(next, 0)
        };
        for (bytes, want) in [
            (&[][..], FragmentError::Empty),
            (&[FIRST][..], FragmentError::Truncated { received: 0, declared: 2 }),
            (&[FIRST, 0][..], FragmentError::Truncated { received: 1, declared: 2 }),
            (&[FIRST, 0, 0, 9][..], FragmentError::Empty),
            // A first fragment that carries only the length.
            (&[FIRST, 0, 5][..], FragmentError::Empty),
            (&[FIRST | LAST, 0, 1][..], FragmentError::Truncated { received: 0, declared: 1 }),
        ] {
            assert_eq!(Reassembler::default().push(bytes, 0), Err(want), "{bytes:?}");
        }
        assert_eq!(first_then(&[1]), Err(FragmentError::Empty));
        assert_eq!(first_then(&[1 | LAST]), Err(FragmentError::Empty));
        assert_eq!(first_then(&[1 | LAST, 2, 3]), Err(FragmentError::Truncated { received: 3, declared: 5 }));
        assert_eq!(first_then(&[1, 2, 3, 4, 5]), Err(FragmentError::MissingLast));
        assert_eq!(first_then(&[1 | LAST, 2, 3, 4, 5, 6]), Err(FragmentError::Oversize { len: 6, max: 5 }));
    }

    /// The index has six bits: a frame still short of its length after 64 fragments is
    /// refused at the 64th rather than waiting for a 65th that would wrap to index 0.
    #[test]
    fn a_frame_unfinished_after_64_fragments_is_refused_at_the_64th() {
        let mut r = Reassembler::default();
        assert_eq!(r.push(&[FIRST, 0x04, 0x00, 0], 0), Ok(None));
        for index in 1..63u8 {
            assert_eq!(r.push(&[index, index], 0), Ok(None), "fragment {index}");
        }
        assert_eq!(r.push(&[63, 63], 0), Err(FragmentError::Truncated { received: 64, declared: MAX_FRAME_LEN }));
        assert!(!r.is_pending());
    }

    /// A partial frame is pending until it completes or fails; a failure leaves the same
    /// reassembler ready for the next frame.
    #[test]
    fn a_failed_frame_leaves_the_reassembler_ready_for_the_next() {
        let frags = fragment(&frame(60), 20).unwrap();
        let mut r = Reassembler::default();
        assert!(!r.is_pending() && r.deadline().is_none());
        r.push(&frags[0], 0).unwrap();
        assert!(r.is_pending());
        assert_eq!(r.push(&frags[2], 0), Err(FragmentError::OutOfOrder { expected: 1, got: 2 }));
        assert!(!r.is_pending() && r.deadline().is_none());
        for (i, f) in frags.iter().enumerate() {
            let done = r.push(f, 0).unwrap();
            assert_eq!(done.is_some(), i == frags.len() - 1);
            assert_eq!(r.is_pending(), i < frags.len() - 1);
        }
    }

    #[test]
    fn partial_frames_time_out_and_the_next_frame_still_works() {
        let frags = fragment(&frame(60), 20).unwrap();
        let mut r = Reassembler::new(100);
        r.push(&frags[0], 1_000).unwrap();
        assert_eq!(r.deadline(), Some(1_100));
        assert_eq!(r.check_timeout(1_099), Ok(()));
        assert!(r.is_pending());
        assert_eq!(r.push(&frags[1], 1_100), Err(FragmentError::Timeout { elapsed_ms: 100 }));
        assert!(!r.is_pending());
        assert_eq!(reassemble(&frags).unwrap(), frame(60));
    }
}
