//! The payloads the gateway sends match the JSON Schemas published in docs/schemas, and the
//! AsyncAPI document refers only to schemas that exist.

use std::path::Path;

fn schema(name: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schemas").join(name);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    jsonschema::validator_for(&json).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn status_payloads_match_their_schema() {
    let status = schema("status.json");
    for payload in [lockhub::cloud::link::online_payload(), lockhub::cloud::link::offline_payload()] {
        let value = json(&payload);
        assert!(status.is_valid(&value), "{value} does not match status.json");
    }
    for bad in [r#"{"status":"online"}"#, r#"{"status":"maybe"}"#, r#"{"status":"offline","ip":"10.0.0.1"}"#] {
        assert!(!status.is_valid(&json(bad.as_bytes())), "{bad} should not match");
    }
}

#[test]
fn the_asyncapi_document_refers_to_existing_schemas() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let asyncapi = std::fs::read_to_string(docs.join("asyncapi.yaml")).unwrap();
    let refs: Vec<&str> =
        asyncapi.lines().filter_map(|l| l.trim().strip_prefix("$ref: './")).map(|r| r.trim_end_matches('\'')).collect();
    assert!(!refs.is_empty());
    for r in refs {
        assert!(docs.join(r).exists(), "asyncapi.yaml refers to missing {r}");
        schema(r.trim_start_matches("schemas/"));
    }
}

fn statements() -> Vec<lockhub::auth::statement::Statement> {
    use lockhub::auth::keys::PublicKey;
    use lockhub::auth::statement::*;
    use lockhub::protocol::ids::{GatewayId, LockId};
    let (jti, gw, lock) = (StatementId::new("s-1").unwrap(), GatewayId::new("gw-a").unwrap(), LockId([0xab; 8]));
    let schedule = Schedule {
        tz: "Europe/Berlin".into(),
        days: vec!["mon".into(), "fri".into()],
        from: "08:00".into(),
        to: "18:30".into(),
    };
    vec![
        Statement::Command(Command {
            jti: jti.clone(),
            gw: gw.clone(),
            lock,
            op: Operation::Unlatch,
            iat: 1,
            exp: 31,
            nonce: "n0nce-n0nce-n0nce".into(),
        }),
        Statement::Claim(Claim { jti: jti.clone(), gw: gw.clone(), code: "123-456".into(), iat: 1, exp: 2 }),
        Statement::Pair(Pair { jti: jti.clone(), gw: gw.clone(), lock, setup: "000000".into(), iat: 1, exp: 2 }),
        Statement::Grant(Grant {
            jti: jti.clone(),
            gw: gw.clone(),
            sub: PublicKey::from_bytes([3; 32]),
            lock,
            perms: vec![Permission::Unlock, Permission::Remote],
            nbf: 0,
            iat: 1,
            exp: 2,
            schedule: Some(schedule.clone()),
        }),
        Statement::Revoke(Revoke { jti: jti.clone(), gw: gw.clone(), grant: jti.clone(), iat: 1, exp: 2 }),
        Statement::LocalCode(LocalCode {
            jti: jti.clone(),
            gw: gw.clone(),
            sub: PublicKey::from_bytes([4; 32]),
            lock,
            hash: lockhub::local::codes::hash_code("2468").unwrap(),
            nbf: 0,
            iat: 1,
            exp: 2,
        }),
        Statement::Policy(Policy { jti, gw, lock, remote_unlock: true, quiet_hours: Some(schedule), iat: 1, exp: 2 }),
    ]
}

#[test]
fn every_statement_type_matches_the_claims_and_envelope_schemas() {
    let claims = schema("claims.json");
    let envelope = schema("statement.json");
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    for statement in statements() {
        let value = json(&statement.to_json());
        assert!(claims.is_valid(&value), "{} claims {value} do not match claims.json", statement.typ());
        let text = statement.sign(&key);
        assert!(envelope.is_valid(&serde_json::Value::String(text.clone())), "{text} does not match statement.json");
        assert_eq!(lockhub::auth::statement::open(&text).unwrap().statement, statement);
    }
    let mut extra = json(&statements()[0].to_json());
    extra["ip"] = "10.0.0.1".into();
    assert!(!claims.is_valid(&extra), "an unknown field must not match");
}

#[test]
fn replies_match_their_schema() {
    use lockhub::auth::reason::Reason;
    use lockhub::cloud::reply::{Outcome, Reply};
    let reply = schema("reply.json");
    let ok = Reply { id: "c-1".into(), result: Outcome::Ok, reason: None, detail: None, at: 5, actor: None };
    let mut samples = vec![ok];
    for reason in [Reason::Malformed, Reason::BadSignature, Reason::WrongGateway, Reason::ClockUnsynchronised] {
        samples.push(Reply::refused("c-2", reason, &"x".repeat(500), 5));
    }
    for sample in samples {
        let value = json(&sample.to_json());
        assert!(reply.is_valid(&value), "{value} does not match reply.json");
    }
    assert!(!reply.is_valid(&json(br#"{"id":"c","result":"refused","at":1}"#)), "a refusal needs its reason");
}

#[test]
fn every_lock_event_and_the_lock_state_match_their_schemas() {
    use lockhub::cloud::lock_report::{event_payload, state_payload};
    use lockhub::protocol::ids::LockId;
    use lockhub::protocol::message::*;
    let events = schema("event.json");
    let lock = LockId([0x0a; 8]);
    let states = [LockState::Locked, LockState::Unlocking, LockState::Unlocked, LockState::Locking, LockState::Jammed];
    let causes = [Cause::Remote, Cause::Keypad, Cause::Manual, Cause::AutoLock];
    let mut all: Vec<Event> = states
        .iter()
        .flat_map(|&state| causes.iter().map(move |&cause| Event::StateChanged { state, cause }))
        .collect();
    all.extend([
        Event::Unlatched,
        Event::Door(DoorState::Open),
        Event::Door(DoorState::Closed),
        Event::Door(DoorState::Unknown),
        Event::Jammed,
        Event::Tamper,
        Event::BatteryLow { pct: 9 },
        Event::KeypadRejected,
        Event::KeypadLockout,
        Event::ClockSet,
        Event::PasscodeAdded { slot: 3 },
        Event::PasscodeRemoved { slot: 3 },
        Event::Paired,
        Event::Rebooted,
    ]);
    let actors = [
        None,
        Some(Actor::Hub),
        Some(Actor::Admin),
        Some(Actor::Cloud(UserRef([1; 8]))),
        Some(Actor::Local(UserRef([2; 8]))),
        Some(Actor::Keypad(7)),
    ];
    for (i, event) in all.into_iter().enumerate() {
        for (j, actor) in actors.iter().enumerate() {
            let entry = LogEntry {
                seq: (i * 10 + j + 1) as u64,
                time: (j % 2 == 0).then_some(1_764_480_000),
                event,
                actor: *actor,
            };
            let value = json(&event_payload(lock, 1_764_000_000, &entry));
            assert!(events.is_valid(&value), "{value} does not match event.json");
        }
    }
    let state = schema("lock-state.json");
    for s in states {
        let status = LockStatus { state: s, door: DoorState::Closed, battery_pct: 250, clock: None, last_seq: 4 };
        let value = json(&state_payload(lock, &status, true, 1_764_480_000));
        assert!(state.is_valid(&value), "{value} does not match lock-state.json");
    }
}
