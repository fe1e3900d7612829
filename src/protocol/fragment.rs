//! Fragmentation and reassembly of LHP/1 frames over ATT writes and notifications.
//!
//! A frame is at most [`MAX_FRAME_LEN`] bytes; one ATT write or notification carries at most
//! `MTU - 3` bytes ([`max_fragment_len`]), or less where the stack says so (bluer's
//! `AcquireWrite` writer allows `MTU - 5`). Every fragment starts with two header bytes:
//!
//! ```text
//! byte 0         frame number: 0 for a side's first frame on a link, +1 (mod 256) per frame
//! byte 1 bit 7   LAST: set on the fragment with the highest index of its frame
//! byte 1 bits 0-6  fragment index, 0 for the first fragment, +1 for each following one
//! index 0 only   the frame's length, a big-endian u16, after the header
//! ```
//!
//! One ATT bearer delivers in order, but a link with Enhanced ATT has several, and a stack
//! may send consecutive notifications or writes on different bearers (BlueZ 5.66 does): they
//! can arrive in another order. So the reassembler puts fragments back by index, holds up to
//! [`WINDOW`] frames at once, and hands frames out by frame number, in the order they were
//! sent: the sealed channel above counts every frame. Everything else stays strict: a
//! fragment repeated, beyond the declared length or its frame's LAST, a frame number outside
//! the window, or a frame still incomplete after [`REASSEMBLY_TIMEOUT_MS`] is an error that
//! ends the link, never a condition to paper over.

use std::collections::{BTreeMap, VecDeque};

use thiserror::Error;

/// Largest frame LHP/1 carries, in bytes (header, ciphertext and tag included).
pub const MAX_FRAME_LEN: usize = 1024;
/// Smallest ATT MTU (BLE 4.0 default): 20-byte writes.
pub const MIN_MTU: u16 = 23;
/// Largest ATT MTU BlueZ negotiates.
pub const MAX_MTU: u16 = 517;
/// Smallest fragment size accepted for sending: `MIN_MTU - 5`, what bluer's write socket
/// allows at the smallest MTU.
pub const MIN_FRAGMENT_LEN: usize = MIN_MTU as usize - 5;
/// Largest fragment: one notification at the largest MTU.
pub const MAX_FRAGMENT_LEN: usize = MAX_MTU as usize - 3;
/// A frame still incomplete this long after its first fragment (or after a later frame
/// showed it missing) fails with [`FragmentError::Timeout`].
pub const REASSEMBLY_TIMEOUT_MS: u64 = 3_000;
/// How many frames a receiver holds at once: the next one due and those sent after it. Three
/// EATT bearers reorder by at most a frame or two; this bounds what a peer can make a
/// receiver keep to `WINDOW * MAX_FRAME_LEN` bytes.
pub const WINDOW: usize = 4;
/// Header bytes on every fragment.
pub const HEADER_LEN: usize = 2;
/// Header and length bytes on a frame's first fragment.
pub const FIRST_HEADER_LEN: usize = HEADER_LEN + 2;
/// Most fragments a frame can take: a maximal frame at the smallest fragment size.
pub const MAX_FRAGMENTS: usize =
    1 + (MAX_FRAME_LEN - (MIN_FRAGMENT_LEN - FIRST_HEADER_LEN)).div_ceil(MIN_FRAGMENT_LEN - HEADER_LEN);

const LAST: u8 = 0x80;
const INDEX_MASK: u8 = 0x7f;
// The index has seven bits; every frame fits in them with room to spare.
const _: () = assert!(MAX_FRAGMENTS <= INDEX_MASK as usize + 1);
const MAX_INDEX: u8 = (MAX_FRAGMENTS - 1) as u8;

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
    /// A fragment of a frame the receiver is not waiting for: one already delivered, or one
    /// more than [`WINDOW`] frames ahead.
    #[error("fragment of frame {got} outside the window of {WINDOW} frames from frame {expected}")]
    OutOfWindow {
        /// The frame number due next.
        expected: u8,
        /// The frame number received.
        got: u8,
    },
    /// A fragment's index lies past its frame's LAST fragment, or past [`MAX_FRAGMENTS`].
    #[error("fragment {index} lies past its frame's last fragment {last}")]
    BeyondLast {
        /// The index received.
        index: u8,
        /// The LAST fragment's index, or the highest index a frame may have.
        last: u8,
    },
    /// This fragment of this frame was received before.
    #[error("fragment {index} of frame {frame} received twice")]
    Duplicate {
        /// The frame number.
        frame: u8,
        /// The repeated index.
        index: u8,
    },
    /// A frame ended short: its fragments up to LAST carried fewer bytes than declared, or a
    /// fragment was too short to hold its header.
    #[error("frame truncated: {received} of {declared} bytes")]
    Truncated {
        /// Bytes received.
        received: usize,
        /// Bytes declared by the first fragment (or the header's size).
        declared: usize,
    },
    /// All declared bytes arrived but the fragment carrying the end was not marked LAST.
    #[error("frame complete but its last fragment is not marked LAST")]
    MissingLast,
    /// An empty fragment or a frame declared empty.
    #[error("empty fragment")]
    Empty,
    /// A frame stayed incomplete past the reassembly timeout.
    #[error("reassembly timed out after {elapsed_ms} ms")]
    Timeout {
        /// How long the oldest incomplete frame waited.
        elapsed_ms: u64,
    },
    /// The reassembler failed before: the link it served must be made anew.
    #[error("the reassembler failed earlier; the link must be made anew")]
    Failed,
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

/// Cuts `frame`, numbered `number` on its link, into fragments of at most `max_len` bytes
/// (see [`max_fragment_len`]). A sender numbers its frames with a [`Fragmenter`].
pub fn fragment(frame: &[u8], number: u8, max_len: usize) -> Result<Vec<Vec<u8>>, FragmentError> {
    if !(MIN_FRAGMENT_LEN..=MAX_FRAGMENT_LEN).contains(&max_len) {
        return Err(FragmentError::BadFragmentLen(max_len));
    }
    if frame.is_empty() {
        return Err(FragmentError::Empty);
    }
    if frame.len() > MAX_FRAME_LEN {
        return Err(FragmentError::Oversize { len: frame.len(), max: MAX_FRAME_LEN });
    }
    let mut out = Vec::with_capacity(frame.len().div_ceil(max_len - HEADER_LEN) + 1);
    let first_take = frame.len().min(max_len - FIRST_HEADER_LEN);
    let mut first = Vec::with_capacity(first_take + FIRST_HEADER_LEN);
    first.extend_from_slice(&[number, 0]);
    first.extend_from_slice(&(frame.len() as u16).to_be_bytes());
    first.extend_from_slice(&frame[..first_take]);
    out.push(first);
    for (index, chunk) in (1u8..).zip(frame[first_take..].chunks(max_len - HEADER_LEN)) {
        let mut f = Vec::with_capacity(chunk.len() + HEADER_LEN);
        f.extend_from_slice(&[number, index]);
        f.extend_from_slice(chunk);
        out.push(f);
    }
    // MAX_FRAME_LEN fits in MAX_FRAGMENTS fragments even at the smallest fragment size.
    debug_assert!(out.len() <= MAX_FRAGMENTS);
    if let Some(last) = out.last_mut() {
        last[1] |= LAST;
    }
    Ok(out)
}

/// The sending side of a link: cuts frames into fragments and numbers them in order.
#[derive(Debug)]
pub struct Fragmenter {
    max_len: usize,
    next: u8,
}

impl Fragmenter {
    /// A sender whose fragments carry at most `max_len` bytes; its first frame is number 0.
    pub fn new(max_len: usize) -> Result<Self, FragmentError> {
        if !(MIN_FRAGMENT_LEN..=MAX_FRAGMENT_LEN).contains(&max_len) {
            return Err(FragmentError::BadFragmentLen(max_len));
        }
        Ok(Fragmenter { max_len, next: 0 })
    }

    /// The largest fragment this sender cuts.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Cuts the next frame. A frame refused takes no number.
    pub fn cut(&mut self, frame: &[u8]) -> Result<Vec<Vec<u8>>, FragmentError> {
        let fragments = fragment(frame, self.next, self.max_len)?;
        self.next = self.next.wrapping_add(1);
        Ok(fragments)
    }
}

/// Puts fragments back together into frames and hands them out in the order they were sent.
#[derive(Debug)]
pub struct Reassembler {
    /// The number of the frame due next: the one `slots[0]` holds.
    next: u8,
    /// Frames `next`, `next + 1`, …, up to [`WINDOW`], as far as their fragments came.
    slots: VecDeque<Slot>,
    timeout_ms: u64,
    failed: bool,
    out_of_order: u64,
}

/// One frame being put back together.
#[derive(Debug)]
struct Slot {
    /// When its first fragment came, or a later frame's did while this one had none.
    since_ms: u64,
    declared: Option<usize>,
    /// The data of fragments `0..next_index`, in order.
    buf: Vec<u8>,
    next_index: u8,
    /// Fragments that came before one with a lower index.
    later: BTreeMap<u8, Vec<u8>>,
    later_len: usize,
    last: Option<u8>,
    complete: bool,
}

impl Slot {
    fn new(since_ms: u64) -> Self {
        Slot {
            since_ms,
            declared: None,
            buf: Vec::new(),
            next_index: 0,
            later: BTreeMap::new(),
            later_len: 0,
            last: None,
            complete: false,
        }
    }
}

impl Default for Reassembler {
    fn default() -> Self {
        Self::new(REASSEMBLY_TIMEOUT_MS)
    }
}

impl Reassembler {
    /// A reassembler for a new link (its first frame is number 0) that fails a frame still
    /// incomplete after `timeout_ms`.
    pub fn new(timeout_ms: u64) -> Self {
        Reassembler { next: 0, slots: VecDeque::new(), timeout_ms, failed: false, out_of_order: 0 }
    }

    /// How many fragments so far arrived before one sent ahead of them (of their own frame or
    /// of an earlier one) and were put back in order.
    pub fn out_of_order(&self) -> u64 {
        self.out_of_order
    }

    /// When the oldest incomplete frame (if any) times out, in the caller's monotonic ms.
    pub fn deadline(&self) -> Option<u64> {
        self.slots.front().map(|s| s.since_ms.saturating_add(self.timeout_ms))
    }

    /// Whether a frame is waiting for more fragments.
    pub fn is_pending(&self) -> bool {
        !self.slots.is_empty()
    }

    /// Fails if the oldest incomplete frame has outlived the timeout.
    pub fn check_timeout(&mut self, now_ms: u64) -> Result<(), FragmentError> {
        let r = self.check_timeout_inner(now_ms);
        self.fail_on_err(r)
    }

    /// Takes one fragment; returns the frames that are now complete and due, in the order
    /// they were sent (usually none or one; more when this one filled a gap). After an error
    /// every call fails with [`FragmentError::Failed`]: the link is broken or hostile.
    pub fn push(&mut self, fragment: &[u8], now_ms: u64) -> Result<Vec<Vec<u8>>, FragmentError> {
        let r = self.push_inner(fragment, now_ms);
        self.fail_on_err(r)?;
        let mut frames = Vec::new();
        while self.slots.front().is_some_and(|s| s.complete) {
            if let Some(slot) = self.slots.pop_front() {
                frames.push(slot.buf);
            }
            self.next = self.next.wrapping_add(1);
        }
        Ok(frames)
    }

    fn fail_on_err<T>(&mut self, r: Result<T, FragmentError>) -> Result<T, FragmentError> {
        if r.is_err() {
            self.failed = true;
            self.slots.clear();
        }
        r
    }

    fn check_timeout_inner(&self, now_ms: u64) -> Result<(), FragmentError> {
        if self.failed {
            return Err(FragmentError::Failed);
        }
        if let Some(front) = self.slots.front() {
            let elapsed_ms = now_ms.saturating_sub(front.since_ms);
            if elapsed_ms >= self.timeout_ms {
                return Err(FragmentError::Timeout { elapsed_ms });
            }
        }
        Ok(())
    }

    fn push_inner(&mut self, fragment: &[u8], now_ms: u64) -> Result<(), FragmentError> {
        self.check_timeout_inner(now_ms)?;
        if fragment.is_empty() {
            return Err(FragmentError::Empty);
        }
        let Some((&[number, flags], mut body)) = fragment.split_first_chunk::<HEADER_LEN>() else {
            return Err(FragmentError::Truncated { received: fragment.len(), declared: HEADER_LEN });
        };
        let (index, is_last) = (flags & INDEX_MASK, flags & LAST != 0);
        let offset = usize::from(number.wrapping_sub(self.next));
        if offset >= WINDOW {
            return Err(FragmentError::OutOfWindow { expected: self.next, got: number });
        }
        if index > MAX_INDEX {
            return Err(FragmentError::BeyondLast { index, last: MAX_INDEX });
        }
        while self.slots.len() <= offset {
            self.slots.push_back(Slot::new(now_ms));
        }
        let overtakes = offset > 0;
        let slot = &mut self.slots[offset];
        if slot.complete || index < slot.next_index || slot.later.contains_key(&index) {
            return Err(FragmentError::Duplicate { frame: number, index });
        }
        if index == 0 {
            let Some((len, rest)) = body.split_first_chunk::<2>() else {
                return Err(FragmentError::Truncated { received: body.len(), declared: 2 });
            };
            let declared = usize::from(u16::from_be_bytes(*len));
            if declared == 0 {
                return Err(FragmentError::Empty);
            }
            if declared > MAX_FRAME_LEN {
                return Err(FragmentError::Oversize { len: declared, max: MAX_FRAME_LEN });
            }
            slot.declared = Some(declared);
            body = rest;
        }
        if body.is_empty() && !(index == 0 && is_last) {
            return Err(FragmentError::Empty);
        }
        let highest_seen = slot.later.last_key_value().map_or(slot.next_index.saturating_sub(1), |(&i, _)| i);
        match slot.last {
            Some(last) if is_last => {
                return Err(FragmentError::BeyondLast { index: index.max(last), last: index.min(last) });
            }
            Some(last) if index > last => return Err(FragmentError::BeyondLast { index, last }),
            None if is_last && highest_seen > index => {
                return Err(FragmentError::BeyondLast { index: highest_seen, last: index });
            }
            _ => {}
        }
        let received = slot.buf.len() + slot.later_len + body.len();
        let bound = slot.declared.unwrap_or(MAX_FRAME_LEN);
        if received > bound {
            return Err(FragmentError::Oversize { len: received, max: bound });
        }
        if is_last {
            slot.last = Some(index);
        }
        if overtakes || index != slot.next_index {
            self.out_of_order += 1;
        }
        if index == slot.next_index {
            slot.buf.extend_from_slice(body);
            slot.next_index += 1;
            while let Some(piece) = slot.later.remove(&slot.next_index) {
                slot.later_len -= piece.len();
                slot.buf.extend_from_slice(&piece);
                slot.next_index += 1;
            }
        } else {
            slot.later_len += body.len();
            slot.later.insert(index, body.to_vec());
        }
        let Some(declared) = slot.declared else { return Ok(()) };
        match slot.last {
            Some(last) if slot.next_index == last + 1 => {
                if slot.buf.len() < declared {
                    return Err(FragmentError::Truncated { received: slot.buf.len(), declared });
                }
                slot.complete = true;
            }
            Some(_) => {}
            // Every fragment carries data, so one more could only overflow the frame.
            None if received == declared => return Err(FragmentError::MissingLast),
            None if usize::from(slot.next_index) == MAX_FRAGMENTS => {
                return Err(FragmentError::Truncated { received, declared });
            }
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    /// Feeds `frags` in the order given; returns every frame handed out.
    fn feed(r: &mut Reassembler, frags: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, FragmentError> {
        let mut out = Vec::new();
        for f in frags {
            out.extend(r.push(f, 0)?);
        }
        Ok(out)
    }

    fn reassemble(frags: &[Vec<u8>]) -> Result<Vec<u8>, FragmentError> {
        let mut r = Reassembler::default();
        let mut done = None;
        for (i, f) in frags.iter().enumerate() {
            let mut frames = r.push(f, 0)?;
            if let Some(frame) = frames.pop() {
                assert!(frames.is_empty() && done.is_none() && i == frags.len() - 1, "frame completed early");
                done = Some(frame);
            }
        }
        Ok(done.expect("frame never completed"))
    }

    #[test]
    fn round_trip_at_smallest_and_largest_mtu() {
        for max in [MIN_FRAGMENT_LEN, 20, 244, MAX_FRAGMENT_LEN] {
            for len in [1, 15, 16, 17, 100, MAX_FRAME_LEN] {
                let f = frame(len);
                let frags = fragment(&f, 0, max).unwrap();
                assert!(frags.iter().all(|x| x.len() <= max));
                assert!(frags.len() <= MAX_FRAGMENTS);
                assert_eq!(reassemble(&frags).unwrap(), f);
            }
        }
        assert_eq!(fragment(&frame(MAX_FRAME_LEN), 0, MIN_FRAGMENT_LEN).unwrap().len(), MAX_FRAGMENTS);
    }

    #[test]
    fn refuses_oversize_frames() {
        assert_eq!(
            fragment(&frame(MAX_FRAME_LEN + 1), 0, 20),
            Err(FragmentError::Oversize { len: MAX_FRAME_LEN + 1, max: MAX_FRAME_LEN })
        );
        let mut r = Reassembler::default();
        assert!(matches!(r.push(&[0, 0, 0x04, 0x01, 0], 0), Err(FragmentError::Oversize { .. })));
    }

    /// Fragments of one frame, and whole frames, put back in the order they were sent
    /// whatever order they came in, as they do over several EATT bearers.
    #[test]
    fn fragments_and_frames_out_of_order_are_put_back_in_order() {
        let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(40 + i)).collect();
        let mut sender = Fragmenter::new(20).unwrap();
        let cut: Vec<Vec<Vec<u8>>> = frames.iter().map(|f| sender.cut(f).unwrap()).collect();
        assert!(cut.iter().all(|c| c.len() == 3));
        // Frame 2 whole, then frame 0 backwards, then frame 1 with its first fragment last.
        let mut r = Reassembler::default();
        assert_eq!(feed(&mut r, &cut[2]).unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(feed(&mut r, &[cut[0][2].clone(), cut[0][1].clone()]).unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(r.push(&cut[0][0], 0).unwrap(), [frames[0].clone()]);
        assert_eq!(feed(&mut r, &[cut[1][1].clone(), cut[1][2].clone()]).unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(r.push(&cut[1][0], 0).unwrap(), [frames[1].clone(), frames[2].clone()]);
        assert!(!r.is_pending());
        // All of frame 2, two of frame 0 and two of frame 1 came before one sent earlier.
        assert_eq!(r.out_of_order(), 7);
        // Numbers go on past 255.
        let mut r = Reassembler::default();
        let mut sender = Fragmenter::new(20).unwrap();
        for i in 0..300 {
            assert_eq!(feed(&mut r, &sender.cut(&frame(1 + i % 50)).unwrap()).unwrap(), [frame(1 + i % 50)]);
        }
        assert_eq!(r.out_of_order(), 0);
    }

    #[test]
    fn typed_errors_for_windows_duplicates_and_truncation() {
        let frags = fragment(&frame(60), 0, 20).unwrap();
        assert_eq!(frags.len(), 4);
        let fails = |steps: &[&[u8]], want: FragmentError| {
            let mut r = Reassembler::default();
            let (last, before) = steps.split_last().unwrap();
            for s in before {
                r.push(s, 0).unwrap();
            }
            assert_eq!(r.push(last, 0), Err(want), "{steps:?}");
            assert_eq!(r.push(&frags[0], 0), Err(FragmentError::Failed), "a failed reassembler stays failed");
        };
        fails(&[&frags[0], &frags[1], &frags[1]], FragmentError::Duplicate { frame: 0, index: 1 });
        fails(&[&frags[2], &frags[2]], FragmentError::Duplicate { frame: 0, index: 2 });
        fails(&[&frags[0], &frags[0]], FragmentError::Duplicate { frame: 0, index: 0 });
        let mut early_last = frags[1].clone();
        early_last[1] |= LAST;
        fails(&[&frags[0], &early_last], FragmentError::Truncated { received: 34, declared: 60 });
        fails(&[&frags[2], &early_last], FragmentError::BeyondLast { index: 2, last: 1 });
        fails(&[&early_last, &frags[3]], FragmentError::BeyondLast { index: 3, last: 1 });
        let mut far = frags[0].clone();
        far[0] = WINDOW as u8;
        fails(&[&far], FragmentError::OutOfWindow { expected: 0, got: WINDOW as u8 });
        // A frame already handed out is outside the window too.
        let one = fragment(&frame(5), 0, 20).unwrap();
        fails(&[&one[0], &one[0]], FragmentError::OutOfWindow { expected: 1, got: 0 });
        fails(&[&[0, MAX_INDEX + 1, 1]], FragmentError::BeyondLast { index: MAX_INDEX + 1, last: MAX_INDEX });
    }

    /// Every fragment but the last is filled to the size allowed: a frame takes as few ATT
    /// writes as it can, and each one is cut exactly where the header says.
    #[test]
    fn fragments_are_as_few_as_the_size_allows() {
        let lens = |frags: &[Vec<u8>]| frags.iter().map(Vec::len).collect::<Vec<_>>();
        let frags = fragment(&frame(100), 7, 20).unwrap();
        assert_eq!(lens(&frags), [20, 20, 20, 20, 20, 14]);
        assert_eq!(
            frags.iter().map(|f| (f[0], f[1])).collect::<Vec<_>>(),
            [(7, 0), (7, 1), (7, 2), (7, 3), (7, 4), (7, 5 | LAST)]
        );
        assert_eq!(frags[0][2..4], [0, 100], "the first fragment declares the frame's length");
        assert_eq!(
            frags.iter().flat_map(|f| &f[if f[1] & INDEX_MASK == 0 { 4 } else { 2 }..]).copied().collect::<Vec<_>>(),
            frame(100)
        );
        // One that fits the first fragment whole is one write; one byte more is two.
        let one = fragment(&frame(16), 0, 20).unwrap();
        assert_eq!((lens(&one), one[0][1]), (vec![20], LAST));
        assert_eq!(lens(&fragment(&frame(17), 0, 20).unwrap()), [20, 3]);
    }

    /// The write size is the MTU less three, within the MTUs BLE allows; sizes and frames
    /// outside the bounds are refused with what they are.
    #[test]
    fn sizes_outside_the_bounds_are_refused() {
        assert_eq!(max_fragment_len(MIN_MTU), Ok(20));
        assert_eq!(max_fragment_len(MAX_MTU), Ok(514));
        assert_eq!(max_fragment_len(MIN_MTU - 1), Err(FragmentError::BadMtu(22)));
        assert_eq!(max_fragment_len(MAX_MTU + 1), Err(FragmentError::BadMtu(518)));
        assert_eq!(fragment(&frame(1), 0, MIN_FRAGMENT_LEN - 1), Err(FragmentError::BadFragmentLen(17)));
        assert_eq!(fragment(&frame(1), 0, MAX_FRAGMENT_LEN + 1), Err(FragmentError::BadFragmentLen(515)));
        assert!(matches!(Fragmenter::new(MIN_FRAGMENT_LEN - 1), Err(FragmentError::BadFragmentLen(17))));
        assert_eq!(fragment(&[], 0, 20), Err(FragmentError::Empty));
        // A frame refused takes no number.
        let mut sender = Fragmenter::new(20).unwrap();
        assert!(sender.cut(&[]).is_err());
        assert_eq!(sender.cut(&[1]).unwrap()[0][0], 0);
    }

    /// Fragments too short for what their header claims get the error that names the fault.
    #[test]
    fn short_and_empty_fragments_name_their_fault() {
        let first_then = |next: &[u8]| {
            let mut r = Reassembler::default();
            assert_eq!(r.push(&[0, 0, 0, 5, 1], 0), Ok(vec![]));
            r.push(next, 0)
        };
        for (bytes, want) in [
            (&[][..], FragmentError::Empty),
            (&[0][..], FragmentError::Truncated { received: 1, declared: 2 }),
            (&[0, 0][..], FragmentError::Truncated { received: 0, declared: 2 }),
            (&[0, 0, 0][..], FragmentError::Truncated { received: 1, declared: 2 }),
            (&[0, 0, 0, 0, 9][..], FragmentError::Empty),
            // A first fragment that carries only the length.
            (&[0, 0, 0, 5][..], FragmentError::Empty),
            (&[0, LAST, 0, 1][..], FragmentError::Truncated { received: 0, declared: 1 }),
            (&[0, 1][..], FragmentError::Empty),
        ] {
            assert_eq!(Reassembler::default().push(bytes, 0), Err(want), "{bytes:?}");
        }
        assert_eq!(first_then(&[0, 1]), Err(FragmentError::Empty));
        assert_eq!(first_then(&[0, 1 | LAST]), Err(FragmentError::Empty));
        assert_eq!(first_then(&[0, 1 | LAST, 2, 3]), Err(FragmentError::Truncated { received: 3, declared: 5 }));
        assert_eq!(first_then(&[0, 1, 2, 3, 4, 5]), Err(FragmentError::MissingLast));
        assert_eq!(first_then(&[0, 1 | LAST, 2, 3, 4, 5, 6]), Err(FragmentError::Oversize { len: 6, max: 5 }));
        // Before the length is known, a frame is bounded by the largest there is.
        let mut r = Reassembler::default();
        let big = |index: u8| [&[0u8, index][..], &[0; MAX_FRAME_LEN / 2][..]].concat();
        assert_eq!(r.push(&big(1), 0), Ok(vec![]));
        assert_eq!(r.push(&big(2), 0), Ok(vec![]));
        assert_eq!(r.push(&big(3), 0), Err(FragmentError::Oversize { len: 1536, max: MAX_FRAME_LEN }));
    }

    /// The index has room for the longest frame; a frame still short of its length after
    /// that many fragments is refused at the last one rather than waited for.
    #[test]
    fn a_frame_unfinished_after_its_most_fragments_is_refused() {
        let mut r = Reassembler::default();
        assert_eq!(r.push(&[0, 0, 0x04, 0x00, 0], 0), Ok(vec![]));
        for index in 1..MAX_INDEX {
            assert_eq!(r.push(&[0, index, index], 0), Ok(vec![]), "fragment {index}");
        }
        let short = usize::from(MAX_INDEX) + 1;
        assert_eq!(
            r.push(&[0, MAX_INDEX, 1], 0),
            Err(FragmentError::Truncated { received: short, declared: MAX_FRAME_LEN })
        );
        assert!(!r.is_pending());
    }

    #[test]
    fn incomplete_frames_time_out_even_when_a_later_one_is_whole() {
        let frags = fragment(&frame(60), 0, 20).unwrap();
        let mut r = Reassembler::new(100);
        assert!(!r.is_pending() && r.deadline().is_none());
        r.push(&frags[0], 1_000).unwrap();
        assert_eq!(r.deadline(), Some(1_100));
        assert_eq!(r.check_timeout(1_099), Ok(()));
        assert!(r.is_pending());
        assert_eq!(r.push(&frags[1], 1_100), Err(FragmentError::Timeout { elapsed_ms: 100 }));
        assert!(!r.is_pending());
        // Frame 1 whole while frame 0 never came: frame 0 is waited for from then on.
        let mut r = Reassembler::new(100);
        let later = fragment(&frame(5), 1, 20).unwrap();
        assert_eq!(r.push(&later[0], 2_000), Ok(vec![]));
        assert_eq!(r.deadline(), Some(2_100));
        assert_eq!(r.check_timeout(2_100), Err(FragmentError::Timeout { elapsed_ms: 100 }));
        assert_eq!(r.check_timeout(2_100), Err(FragmentError::Failed));
    }
}
