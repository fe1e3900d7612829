//! LHP/1 end to end over the in-memory link: the gateway's protocol state machine against the
//! emulated lock firmware, with an attacker's tap on the radio where a test needs one.

use std::sync::{Arc, Mutex};

use lockhub::firmware::{Firmware, Mechanics, PersistentState};
use lockhub::memlink::{Direction, LinkError, MemoryLink};
use lockhub::protocol::frame::{Frame, HelloRejectReason, PairRejectReason};
use lockhub::protocol::gatt::Capabilities;
use lockhub::protocol::hub::ProtocolError;
use lockhub::protocol::ids::{GatewayId, LockId};
use lockhub::protocol::message::{Actor, Cause, DoorState, Event, LockError, LockState, Op, Passcode, Reply, UserRef};
use lockhub::protocol::pairing::{MAX_PAIRING_ATTEMPTS, PairingKey, SetupCode};
use lockhub::protocol::session::SessionError;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

const ALICE: Actor = Actor::Cloud(UserRef([0xa1; 8]));

fn rng(seed: u64) -> Box<ChaCha20Rng> {
    Box::new(ChaCha20Rng::seed_from_u64(seed))
}

fn caps() -> Capabilities {
    Capabilities { unlatch: true, keypad: true, door_sensor: true }
}

fn new_lock(motor_ms: u64) -> Firmware {
    let mechanics = Mechanics { motor_ms, ..Mechanics::default() };
    let state = PersistentState::factory_new(LockId([0x10, 0, 0, 0, 0, 0, 0, 1]), caps(), mechanics, &mut *rng(1));
    Firmware::boot(state, rng(2))
}

fn link(mtu: u16, motor_ms: u64) -> (MemoryLink, SetupCode) {
    let fw = new_lock(motor_ms);
    let code = fw.persistent().identity.setup_code.clone();
    (MemoryLink::new(fw, GatewayId::new("hub-test").unwrap(), mtu, rng(3)), code)
}

fn paired(mtu: u16, motor_ms: u64) -> (MemoryLink, PairingKey) {
    let (mut link, code) = link(mtu, motor_ms);
    link.connect().unwrap();
    let key = link.pair(&code).unwrap();
    link.open_session(&key).unwrap();
    (link, key)
}

fn wrong_code(code: &SetupCode) -> SetupCode {
    let mut digits: Vec<u8> = code.expose().bytes().collect();
    digits[0] = if digits[0] == b'9' { b'0' } else { digits[0] + 1 };
    SetupCode::parse(std::str::from_utf8(&digits).unwrap()).unwrap()
}

/// Every fragment seen on the radio, in order.
type Recording = Arc<Mutex<Vec<(Direction, Vec<u8>)>>>;

/// Records every fragment in flight.
fn recorder(link: &mut MemoryLink) -> Recording {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    link.set_tap(Box::new(move |dir, f| {
        s.lock().unwrap().push((dir, f.clone()));
        vec![f]
    }));
    seen
}

#[test]
fn pair_then_unlock_at_mtu_23_and_247() {
    for mtu in [23, 247] {
        let (mut link, _key) = paired(mtu, 400);
        let seen = recorder(&mut link);
        let r = link.call(ALICE, Op::Unlock).unwrap();
        let Ok(Reply::Done(status)) = r.result else { panic!("unlock failed: {r:?}") };
        assert_eq!(status.state, LockState::Unlocked);
        assert!(link.now_ms() >= 400, "the motor takes its time");
        let events = link.take_events().unwrap();
        let states: Vec<_> = events
            .iter()
            .filter_map(|e| match e.event {
                Event::StateChanged { state, cause: Cause::Remote } => Some((state, e.actor)),
                _ => None,
            })
            .collect();
        assert_eq!(states, vec![(LockState::Unlocking, Some(ALICE)), (LockState::Unlocked, Some(ALICE))]);
        let max = seen.lock().unwrap().iter().map(|(_, f)| f.len()).max().unwrap();
        assert!(max <= usize::from(mtu) - 3, "fragment of {max} bytes at MTU {mtu}");
    }
}

#[test]
fn wrong_setup_code_fails_without_leaking_and_five_failures_close_pairing_mode() {
    let (mut link, code) = link(23, 0);
    let bad = wrong_code(&code);
    let seen = recorder(&mut link);
    for attempt in 1..=MAX_PAIRING_ATTEMPTS {
        assert!(link.firmware().info().pairing_mode, "still in pairing mode before attempt {attempt}");
        link.connect().unwrap();
        let err = link.pair(&bad).unwrap_err();
        assert_eq!(
            err,
            LinkError::Protocol(ProtocolError::Pairing(lockhub::protocol::pairing::PairingError::ConfirmationFailed))
        );
        assert!(!err.to_string().contains(code.expose()) && !err.to_string().contains(bad.expose()));
        link.disconnect();
        assert!(link.firmware().persistent().pairing.is_none());
    }
    assert!(!link.firmware().info().pairing_mode, "five failures end pairing mode");
    assert!(!link.firmware().advertisement().pairing_mode);
    // Now even the right code is refused until someone presses the button.
    link.connect().unwrap();
    assert_eq!(
        link.pair(&code).unwrap_err(),
        LinkError::Protocol(ProtocolError::PairingRefused {
            reason: PairRejectReason::NotInPairingMode,
            attempts_left: 0
        })
    );
    link.disconnect();
    // Nothing on the air contains either code, in any encoding we could think of.
    for (_, f) in seen.lock().unwrap().iter() {
        for c in [code.expose(), bad.expose()] {
            assert!(!f.windows(8).any(|w| w == c.as_bytes()));
        }
    }
    link.firmware_mut().press_pairing_button();
    link.connect().unwrap();
    link.pair(&code).unwrap();
}

#[test]
fn session_keys_differ_for_every_connection() {
    let (mut link, key) = paired(247, 0);
    link.disconnect();
    let mut first_requests = Vec::new();
    for _ in 0..3 {
        let seen = recorder(&mut link);
        link.connect_session(&key).unwrap();
        link.call(ALICE, Op::Status).unwrap();
        link.disconnect();
        let seen = seen.lock().unwrap();
        // The request: first fragment to the lock after the hello.
        let req = seen.iter().filter(|(d, _)| *d == Direction::ToLock).nth(1).unwrap().1.clone();
        first_requests.push(req);
    }
    // Same counter (0), same request id (1), same plaintext: only the keys differ.
    assert_ne!(first_requests[0], first_requests[1]);
    assert_ne!(first_requests[1], first_requests[2]);
    assert_ne!(first_requests[0], first_requests[2]);
}

/// Runs `attack` on the fragments of the second request of a session; the lock must drop the
/// link, and a new connection must work again.
fn lock_refuses(attack: impl FnMut(Direction, Vec<u8>) -> Vec<Vec<u8>> + Send + 'static) {
    let (mut link, key) = paired(23, 0);
    link.call(ALICE, Op::Status).unwrap();
    link.set_tap(Box::new(attack));
    let err = link.call(ALICE, Op::Status).unwrap_err();
    assert_eq!(err, LinkError::LinkLost, "the lock must end the session");
    assert!(!link.firmware().is_connected());
    link.clear_tap();
    link.connect_session(&key).unwrap();
    link.call(ALICE, Op::Status).unwrap();
}

#[test]
fn replayed_frame_ends_the_session() {
    let (mut link, _key) = paired(23, 0);
    let seen = recorder(&mut link);
    link.call(ALICE, Op::Unlock).unwrap();
    let request: Vec<Vec<u8>> =
        seen.lock().unwrap().iter().filter(|(d, _)| *d == Direction::ToLock).map(|(_, f)| f.clone()).collect();
    link.clear_tap();
    // Replay the recorded unlock request in place of the next one.
    let mut replay = Some(request);
    lock_refuses_on(link, move |dir, f| match dir {
        Direction::ToLock => replay.take().unwrap_or_default(),
        Direction::ToGateway => vec![f],
    });
}

fn lock_refuses_on(mut link: MemoryLink, attack: impl FnMut(Direction, Vec<u8>) -> Vec<Vec<u8>> + Send + 'static) {
    let before = link.firmware().status(link.now_ms()).state;
    link.set_tap(Box::new(attack));
    assert_eq!(link.call(ALICE, Op::Lock).unwrap_err(), LinkError::LinkLost);
    assert!(!link.firmware().is_connected());
    assert_eq!(link.firmware().status(link.now_ms()).state, before, "nothing ran");
}

/// Holds the fragments of two requests sent back to back and returns them, the second
/// request's first.
fn two_requests_swapped(link: &mut MemoryLink) -> Vec<Vec<u8>> {
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    link.set_tap(Box::new(move |dir, f| match dir {
        Direction::ToLock => {
            h.lock().unwrap().push(f);
            vec![]
        }
        Direction::ToGateway => vec![f],
    }));
    link.send(ALICE, Op::Status).unwrap();
    link.send(ALICE, Op::Status).unwrap();
    link.advance(1).unwrap();
    link.clear_tap();
    let frags = std::mem::take(&mut *held.lock().unwrap());
    assert!(frags.len() >= 2 && frags.len() % 2 == 0);
    let (first, second) = frags.split_at(frags.len() / 2);
    [second, first].concat()
}

/// Frames that arrive out of order, as over several EATT bearers, are put back in the order
/// sent: both requests are answered, in order, and the session goes on.
#[test]
fn frames_out_of_order_are_put_back_in_order() {
    let (mut link, _key) = paired(23, 0);
    link.call(ALICE, Op::Status).unwrap();
    let swapped = two_requests_swapped(&mut link);
    for f in swapped {
        link.firmware_mut().write(&f, 10);
    }
    assert!(link.firmware().is_connected());
    link.advance(1).unwrap();
    link.call(ALICE, Op::Status).unwrap();
}

/// Sealed frames delivered out of order under each other's numbers (what an attacker
/// reordering the radio's traffic can do): the counters refuse them and the session ends.
#[test]
fn sealed_frames_reordered_under_new_numbers_end_the_session() {
    let (mut link, _key) = paired(23, 0);
    link.call(ALICE, Op::Status).unwrap();
    let mut swapped = two_requests_swapped(&mut link);
    let half = swapped.len() / 2;
    let (second_number, first_number) = (swapped[0][0], swapped[half][0]);
    for (i, f) in swapped.iter_mut().enumerate() {
        f[0] = if i < half { first_number } else { second_number };
    }
    for f in swapped {
        link.firmware_mut().write(&f, 10);
    }
    assert!(!link.firmware().is_connected(), "a reordered frame must end the session");
}

#[test]
fn tampered_frame_ends_the_session() {
    lock_refuses(|dir, mut f| {
        if dir == Direction::ToLock {
            let last = f.len() - 1;
            f[last] ^= 0x40;
        }
        vec![f]
    });
}

#[test]
fn truncated_frame_ends_the_session() {
    // Cut the request's last fragment short.
    lock_refuses(|dir, mut f| {
        if dir == Direction::ToLock && f[1] & 0x80 != 0 {
            f.truncate(f.len() - 1);
        }
        vec![f]
    });
}

#[test]
fn plaintext_after_pairing_ends_the_session() {
    let (mut link, _key) = paired(23, 0);
    // A well-formed plaintext frame (a hello) where a sealed one belongs.
    let plain = Frame::Hello { nonce: [0; 16] }.encode();
    link.call(ALICE, Op::Status).unwrap();
    let mut sent = false;
    lock_refuses_on(link, move |dir, f| match dir {
        Direction::ToLock if !sent => {
            sent = true;
            // In the place of the gateway's next frame, under its number.
            lockhub::protocol::fragment::fragment(&plain, f[0], 20).unwrap()
        }
        Direction::ToLock => vec![],
        Direction::ToGateway => vec![f],
    });
}

#[test]
fn corrupted_frame_from_the_lock_is_refused_by_the_gateway() {
    let (mut link, key) = paired(23, 0);
    link.firmware_mut().faults_mut().corrupt_next_frame = true;
    let err = link.call(ALICE, Op::Status).unwrap_err();
    assert_eq!(err, LinkError::Protocol(ProtocolError::Session(SessionError::Tampered)));
    assert!(!link.is_connected());
    link.connect_session(&key).unwrap();
    link.call(ALICE, Op::Status).unwrap();
}

#[test]
fn factory_reset_forgets_the_gateway() {
    let (mut link, key) = paired(247, 0);
    link.firmware_mut().factory_reset();
    assert!(link.firmware().info().pairing_mode);
    link.connect().unwrap();
    assert_eq!(
        link.open_session(&key).unwrap_err(),
        LinkError::Protocol(ProtocolError::SessionRefused(HelloRejectReason::NotPaired))
    );
}

#[test]
fn a_lock_paired_elsewhere_cannot_fake_our_session() {
    let (mut link, _key) = paired(247, 0);
    link.disconnect();
    let impostor_key = PairingKey::from_bytes([0x55; 32]);
    link.connect().unwrap();
    assert_eq!(link.open_session(&impostor_key).unwrap_err(), LinkError::Protocol(ProtocolError::LockNotAuthenticated));
}

#[test]
fn unpair_clears_the_lock_and_returns_to_pairing_mode() {
    let (mut link, key) = paired(247, 0);
    let r =
        link.call(ALICE, Op::AddPasscode { code: Passcode::new("4711").unwrap(), valid_from: None, valid_until: None });
    assert!(matches!(r.unwrap().result, Ok(Reply::PasscodeAdded { .. })));
    let r = link.call(Actor::Admin, Op::Unpair).unwrap();
    assert_eq!(r.result, Ok(Reply::Unpaired));
    let fw = link.firmware().persistent();
    assert!(fw.pairing.is_none() && fw.pairing_mode && fw.log.is_empty());
    assert!(fw.passcodes.list().is_empty());
    link.advance(1).unwrap_err();
    link.connect().unwrap();
    assert!(link.open_session(&key).is_err());
}

#[test]
fn log_paging_returns_every_event_exactly_once() {
    let (mut link, _key) = paired(23, 0);
    link.disconnect();
    for i in 0..150u64 {
        link.firmware_mut().set_door(i % 2 == 0, i);
    }
    link.firmware_mut().trigger_tamper(200);
    assert!(link.firmware().advertisement().new_events);
    let key = link.firmware().persistent().pairing.clone().unwrap().key;
    link.connect_session(&key).unwrap();
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let r = link.call(Actor::Hub, Op::ReadEvents { after, max: 7 }).unwrap();
        let Ok(Reply::Events { entries, more }) = r.result else { panic!("{r:?}") };
        assert!(entries.len() <= 7);
        if let Some(last) = entries.last() {
            after = last.seq;
        }
        seen.extend(entries);
        if !more {
            break;
        }
    }
    let seqs: Vec<u64> = seen.iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "contiguous, each once");
    assert_eq!(seen.iter().filter(|e| matches!(e.event, Event::Door(_))).count(), 150);
    assert!(matches!(seen.last().unwrap().event, Event::Tamper));
    assert!(!link.firmware().advertisement().new_events, "the flag clears once read");
    let r = link.call(Actor::Hub, Op::ReadEvents { after: 0, max: 17 }).unwrap();
    assert_eq!(r.result, Err(LockError::InvalidArgument));
}

#[test]
fn sequence_numbers_survive_a_restart_from_flash() {
    let (mut link, key) = paired(247, 0);
    link.call(ALICE, Op::Unlock).unwrap();
    let last = link.firmware().persistent().log.last_seq();
    let saved = postcard::to_stdvec(link.firmware().persistent()).unwrap();
    let restored: PersistentState = postcard::from_bytes(&saved).unwrap();
    let fw = Firmware::boot(restored, rng(9));
    assert_eq!(fw.status(0).state, LockState::Unlocked);
    let mut link = MemoryLink::new(fw, GatewayId::new("hub-test").unwrap(), 247, rng(10));
    link.connect_session(&key).unwrap();
    link.firmware_mut().trigger_tamper(0);
    let events = link.take_events().unwrap();
    assert_eq!(events.last().unwrap().seq, last + 1);
}

#[test]
fn stored_passcode_hashes_never_contain_the_code() {
    let (mut link, _key) = paired(247, 0);
    link.call(Actor::Hub, Op::SetTime { unix_secs: 1_700_000_000 }).unwrap();
    let code = "80417263";
    let r =
        link.call(ALICE, Op::AddPasscode { code: Passcode::new(code).unwrap(), valid_from: None, valid_until: None });
    let Ok(Reply::PasscodeAdded { slot }) = r.unwrap().result else { panic!() };
    let flash = postcard::to_stdvec(link.firmware().persistent()).unwrap();
    assert!(!flash.windows(code.len()).any(|w| w == code.as_bytes()));
    let debug = format!("{:?}", link.firmware().persistent());
    assert!(!debug.contains(code));
    // The keypad still opens with it, and the log says which slot.
    link.take_events().unwrap();
    let now = link.now_ms();
    assert!(link.firmware_mut().enter_keypad_code(code, now));
    let events = link.take_events().unwrap();
    assert!(events.iter().any(|e| e.event == Event::StateChanged { state: LockState::Unlocked, cause: Cause::Keypad }
        && e.actor == Some(Actor::Keypad(slot))));
}

#[test]
fn passcode_windows_and_keypad_lockout() {
    let (mut link, _key) = paired(247, 0);
    link.call(Actor::Hub, Op::SetTime { unix_secs: 1_000 }).unwrap();
    let add =
        |from, until| Op::AddPasscode { code: Passcode::new("1357").unwrap(), valid_from: from, valid_until: until };
    link.call(ALICE, add(Some(2_000), Some(3_000))).unwrap();
    let now = link.now_ms();
    assert!(!link.firmware_mut().enter_keypad_code("1357", now), "not yet valid");
    for _ in 0..3 {
        assert!(!link.firmware_mut().enter_keypad_code("0000", now));
    }
    link.take_events().unwrap();
    link.call(ALICE, add(None, None)).unwrap();
    // The fifth wrong entry (counting the not-yet-valid one) locks the keypad.
    assert!(!link.firmware_mut().enter_keypad_code("9999", now));
    assert!(!link.firmware_mut().enter_keypad_code("1357", now), "locked out");
    assert!(link.take_events().unwrap().iter().any(|e| e.event == Event::KeypadLockout));
    link.advance(lockhub::firmware::KEYPAD_LOCKOUT_MS).unwrap();
    let now = link.now_ms();
    assert!(link.firmware_mut().enter_keypad_code("1357", now));
}

#[test]
fn jam_door_battery_and_manual_turns_are_reported() {
    let (mut link, _key) = paired(247, 300);
    link.firmware_mut().faults_mut().jam_next_operation = true;
    let r = link.call(ALICE, Op::Unlock).unwrap();
    assert_eq!(r.result, Err(LockError::Jammed));
    assert_eq!(link.firmware().status(link.now_ms()).state, LockState::Jammed);
    let r = link.call(ALICE, Op::Unlock).unwrap();
    assert!(matches!(r.result, Ok(Reply::Done(s)) if s.state == LockState::Unlocked));

    let now = link.now_ms();
    link.firmware_mut().set_door(true, now);
    assert_eq!(link.call(ALICE, Op::Lock).unwrap().result, Err(LockError::DoorOpen));
    let now = link.now_ms();
    link.firmware_mut().set_door(false, now);
    link.firmware_mut().set_battery(15, now);
    link.firmware_mut().turn_knob(now);
    let events = link.take_events().unwrap();
    assert!(events.iter().any(|e| e.event == Event::Jammed));
    assert!(events.iter().any(|e| e.event == Event::Door(DoorState::Open)));
    assert!(events.iter().any(|e| e.event == Event::StateChanged { state: LockState::Locked, cause: Cause::Manual }));
    link.call(ALICE, Op::Unlock).unwrap();
    assert!(link.take_events().unwrap().iter().any(|e| matches!(e.event, Event::BatteryLow { pct: 14 })));
    let now = link.now_ms();
    link.firmware_mut().set_battery(0, now);
    assert_eq!(link.call(ALICE, Op::Lock).unwrap().result, Err(LockError::BatteryEmpty));
}

#[test]
fn auto_lock_fires_after_its_delay() {
    let mut fw = new_lock(100);
    let mut state = fw.persistent().clone();
    state.mechanics.auto_lock_ms = Some(5_000);
    let code = state.identity.setup_code.clone();
    fw = Firmware::boot(state, rng(4));
    let mut link = MemoryLink::new(fw, GatewayId::new("hub-test").unwrap(), 247, rng(5));
    link.connect().unwrap();
    let key = link.pair(&code).unwrap();
    link.open_session(&key).unwrap();
    link.call(ALICE, Op::Unlock).unwrap();
    link.take_events().unwrap();
    link.advance(5_200).unwrap();
    let events = link.take_events().unwrap();
    assert!(events.iter().any(|e| e.event == Event::StateChanged { state: LockState::Locked, cause: Cause::AutoLock }));
}

#[test]
fn link_dropped_mid_command_and_reboot_mid_session() {
    let (mut link, key) = paired(23, 0);
    link.firmware_mut().faults_mut().drop_link_after_frames = Some(1);
    assert_eq!(link.call(ALICE, Op::Unlock).unwrap_err(), LinkError::LinkLost);
    assert_eq!(link.firmware().status(0).state, LockState::Locked, "the dropped command did not run");
    link.connect_session(&key).unwrap();
    assert!(link.call(ALICE, Op::Unlock).unwrap().result.is_ok());

    // A reboot while the motor runs: the link drops and the bolt stays where it was.
    let (mut link, key) = paired(23, 1_000);
    link.send(ALICE, Op::Unlock).unwrap();
    link.advance(10).unwrap();
    assert_eq!(link.firmware().status(link.now_ms()).state, LockState::Unlocking);
    let now = link.now_ms();
    link.firmware_mut().reboot(now);
    assert_eq!(link.advance(10).unwrap_err(), LinkError::LinkLost);
    assert_eq!(link.firmware().status(link.now_ms()).state, LockState::Locked);
    assert_eq!(link.firmware().status(link.now_ms()).clock, None, "the clock is lost");
    link.connect_session(&key).unwrap();
    assert!(link.call(ALICE, Op::Status).unwrap().result.is_ok());
}

#[test]
fn delayed_responses_still_arrive_in_order() {
    let (mut link, _key) = paired(23, 0);
    link.firmware_mut().faults_mut().response_delay_ms = 2_000;
    let t0 = link.now_ms();
    let r = link.call(ALICE, Op::Unlock).unwrap();
    assert!(r.result.is_ok());
    assert!(link.now_ms() - t0 >= 2_000);
}

#[test]
fn requests_naming_the_keypad_are_refused() {
    let (mut link, _key) = paired(247, 0);
    assert_eq!(link.call(Actor::Keypad(1), Op::Unlock).unwrap().result, Err(LockError::BadActor));
}

#[test]
fn the_same_seeds_and_inputs_give_the_same_bytes() {
    let run = || {
        let (mut link, _code) = link(23, 250);
        let seen = recorder(&mut link);
        link.connect().unwrap();
        let code = link.firmware().persistent().identity.setup_code.clone();
        let key = link.pair(&code).unwrap();
        link.open_session(&key).unwrap();
        link.call(ALICE, Op::Unlock).unwrap();
        link.call(Actor::Hub, Op::ReadEvents { after: 0, max: 16 }).unwrap();
        let bytes = seen.lock().unwrap().clone();
        (bytes, link.now_ms())
    };
    assert_eq!(run(), run());
}

#[test]
fn extreme_clock_values_do_not_break_the_lock() {
    let (mut link, _key) = paired(247, 10);
    let r = link.call(Actor::Hub, Op::SetTime { unix_secs: u64::MAX }).unwrap();
    assert_eq!(r.result, Ok(Reply::ClockSet));
    link.advance(5_000).unwrap();
    let r = link.call(ALICE, Op::Unlock).unwrap();
    assert!(r.result.is_ok());
    assert_eq!(link.firmware().status(link.now_ms()).clock, Some(u64::MAX));
}
