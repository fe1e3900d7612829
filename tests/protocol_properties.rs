//! Property tests: fragmentation round-trips at every MTU, and no decoder of outside bytes
//! panics, whatever it is fed.

use lockhub::firmware::{Firmware, Mechanics, PersistentState};
use lockhub::protocol::fragment::{
    Fragmenter, MAX_FRAGMENTS, MAX_FRAME_LEN, MAX_MTU, MIN_MTU, Reassembler, WINDOW, fragment, max_fragment_len,
};
use lockhub::protocol::frame::Frame;
use lockhub::protocol::gatt::{Capabilities, LockInfo, ManufacturerData};
use lockhub::protocol::hub::HubConnection;
use lockhub::protocol::ids::{GatewayId, LockId};
use lockhub::protocol::message::{LockMessage, Request};
use lockhub::protocol::pairing::PairingKey;
use lockhub::protocol::session::{Role, SecureChannel, SessionKeys};
use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn fragmentation_round_trips_at_every_mtu(mtu in MIN_MTU..=MAX_MTU, frame in prop::collection::vec(any::<u8>(), 1..=MAX_FRAME_LEN)) {
        let frags = fragment(&frame, 0, max_fragment_len(mtu).unwrap()).unwrap();
        let mut r = Reassembler::default();
        let mut out = Vec::new();
        for (i, f) in frags.iter().enumerate() {
            prop_assert!(f.len() <= usize::from(mtu) - 3);
            prop_assert!(out.is_empty(), "completed before fragment {}", i);
            out = r.push(f, 0).unwrap();
        }
        prop_assert_eq!(out, vec![frame]);
    }

    #[test]
    fn fragmentation_round_trips_at_every_fragment_size(
        max in lockhub::protocol::fragment::MIN_FRAGMENT_LEN..=lockhub::protocol::fragment::MAX_FRAGMENT_LEN,
        frame in prop::collection::vec(any::<u8>(), 1..=MAX_FRAME_LEN),
    ) {
        let frags = fragment(&frame, 0, max).unwrap();
        prop_assert!(frags.len() <= MAX_FRAGMENTS);
        let mut r = Reassembler::default();
        let mut out = Vec::new();
        for f in &frags {
            prop_assert!(f.len() <= max);
            out = r.push(f, 0).unwrap();
        }
        prop_assert_eq!(out, vec![frame]);
    }

    /// Frames whose fragments arrive in any order within the window — shuffled across
    /// frames, as several EATT bearers deliver them — come out whole, in the order sent.
    #[test]
    fn fragments_in_any_order_within_the_window_come_out_in_order(
        max in lockhub::protocol::fragment::MIN_FRAGMENT_LEN..=64usize,
        lens in prop::collection::vec(1..=300usize, 1..=WINDOW),
        start in any::<u8>(),
        shuffle in any::<u64>(),
    ) {
        let mut sender = Fragmenter::new(max).unwrap();
        // A link that has carried `start` frames already: numbers wrap past 255.
        let mut r = Reassembler::default();
        for _ in 0..start {
            prop_assert_eq!(r.push(&sender.cut(&[1]).unwrap()[0], 0).unwrap().len(), 1);
        }
        let frames: Vec<Vec<u8>> = lens.iter().enumerate().map(|(i, &n)| vec![i as u8; n]).collect();
        let mut frags: Vec<Vec<u8>> = frames.iter().flat_map(|f| sender.cut(f).unwrap()).collect();
        let mut rng = ChaCha20Rng::seed_from_u64(shuffle);
        use rand_chacha::rand_core::RngCore;
        for i in (1..frags.len()).rev() {
            frags.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let mut out = Vec::new();
        for f in &frags {
            out.extend(r.push(f, 0).unwrap());
        }
        prop_assert_eq!(out, frames);
        prop_assert!(!r.is_pending());
    }

    #[test]
    fn reassembler_never_panics(frags in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..520), 0..80)) {
        let mut r = Reassembler::default();
        for (i, f) in frags.iter().enumerate() {
            if let Ok(frames) = r.push(f, i as u64 * 10) {
                prop_assert!(frames.iter().all(|frame| frame.len() <= MAX_FRAME_LEN));
            }
        }
    }

    #[test]
    fn frame_and_record_parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1100)) {
        let _ = Frame::parse(&bytes);
        let _ = LockInfo::parse(&bytes);
        let _ = ManufacturerData::parse(&bytes);
        let _ = Request::decode(&bytes);
        let _ = LockMessage::decode(&bytes);
        let keys = SessionKeys::derive(&PairingKey::from_bytes([1; 32]), LockId([2; 8]), &[3; 16], &[4; 16]);
        let _ = SecureChannel::new(&keys, Role::Lock).open(&bytes);
    }

    #[test]
    fn parsed_frames_re_encode_to_the_same_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(f) = Frame::parse(&bytes) {
            prop_assert_eq!(f.encode(), bytes);
        }
    }

    #[test]
    fn both_state_machines_survive_arbitrary_fragments(
        frags in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..40),
        seed in any::<u64>(),
    ) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let state = PersistentState::factory_new(LockId([7; 8]), Capabilities::default(), Mechanics::default(), &mut rng);
        let mut fw = Firmware::boot(state, Box::new(rng));
        fw.connect(23, 0);
        let mut hub = HubConnection::new(GatewayId::new("gw").unwrap(), LockId([7; 8]), 20).unwrap();
        for (i, f) in frags.iter().enumerate() {
            fw.write(f, i as u64);
            while fw.poll_output(u64::MAX).is_some() {}
            let _ = hub.on_notification(f, i as u64);
        }
    }
}
