//! The broker's routing state machine, sans IO: sessions, subscriptions, retained messages,
//! QoS 1 delivery with a bounded window per session, last wills.
//!
//! Connections feed it what their clients did (already authenticated and ACL-checked) and get
//! back [`Action`]s: packets to send to connections, connections to close. Everything here is
//! in memory: sessions survive reconnects, not a restart of the broker (the event sink is what
//! the bundled cloud keeps on disk).

use std::collections::{BTreeMap, HashMap, VecDeque};

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, LastWill, Packet, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};

use super::topic::matches;

/// A connection, as the router knows it.
pub type ConnId = u64;

/// What the router wants done.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this packet on this connection.
    Send(ConnId, Packet),
    /// Close this connection (taken over by a newer one with the same client id).
    Close(ConnId),
}

/// Bounds on what one client can make the broker hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// QoS 1 messages sent to one session and not yet acknowledged.
    pub inflight: usize,
    /// Messages waiting for one session (offline, or beyond the window); the oldest is dropped
    /// when full.
    pub queue: usize,
    /// Subscriptions of one session.
    pub subscriptions: usize,
    /// Retained messages in all.
    pub retained: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { inflight: 64, queue: 100_000, subscriptions: 64, retained: 100_000 }
    }
}

struct Session {
    conn: Option<ConnId>,
    clean: bool,
    will: Option<LastWill>,
    subscriptions: BTreeMap<String, QoS>,
    inflight: BTreeMap<u16, Publish>,
    pending: VecDeque<Publish>,
    next_pkid: u16,
}

impl Session {
    fn new(clean: bool) -> Self {
        Session {
            conn: None,
            clean,
            will: None,
            subscriptions: BTreeMap::new(),
            inflight: BTreeMap::new(),
            pending: VecDeque::new(),
            next_pkid: 0,
        }
    }

    /// The highest QoS among this session's subscriptions matching `topic`, if any match.
    fn wants(&self, topic: &str) -> Option<QoS> {
        self.subscriptions.iter().filter(|(f, _)| matches(f, topic)).map(|(_, q)| *q).max_by_key(|q| *q as u8)
    }

    fn take_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }
}

/// The routing state.
pub struct Router {
    limits: Limits,
    sessions: HashMap<String, Session>,
    owners: HashMap<ConnId, String>,
    retained: BTreeMap<String, Publish>,
    dropped: u64,
}

fn lower(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) { a } else { b }
}

impl Router {
    /// An empty router.
    pub fn new(limits: Limits) -> Self {
        Router { limits, sessions: HashMap::new(), owners: HashMap::new(), retained: BTreeMap::new(), dropped: 0 }
    }

    /// Messages dropped because a session's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Sessions held (connected or not).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// A client authenticated and asked to connect: CONNACK, and whatever its session holds.
    pub fn connect(&mut self, conn: ConnId, client_id: &str, clean: bool, will: Option<LastWill>) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(old) = self.sessions.get(client_id).and_then(|s| s.conn) {
            self.owners.remove(&old);
            actions.push(Action::Close(old));
        }
        let resume = !clean && self.sessions.get(client_id).is_some_and(|s| !s.clean);
        if !resume {
            self.sessions.insert(client_id.to_owned(), Session::new(clean));
        }
        let session = self.sessions.get_mut(client_id).expect("inserted above");
        session.conn = Some(conn);
        session.will = will;
        self.owners.insert(conn, client_id.to_owned());
        actions.push(Action::Send(conn, Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, resume))));
        // Unacknowledged messages first, as duplicates, then the queue.
        for publish in session.inflight.values() {
            let mut again = publish.clone();
            again.dup = true;
            actions.push(Action::Send(conn, Packet::Publish(again)));
        }
        Self::pump(self.limits, session, &mut actions);
        actions
    }

    /// Routes a message published by a client (already authorised) to every matching
    /// session; keeps it if retained. The publisher's PUBACK is the connection's business.
    pub fn publish(&mut self, publish: &Publish) -> Vec<Action> {
        let mut actions = Vec::new();
        if publish.retain {
            if publish.payload.is_empty() {
                self.retained.remove(&publish.topic);
            } else if self.retained.len() < self.limits.retained || self.retained.contains_key(&publish.topic) {
                let mut kept = publish.clone();
                kept.dup = false;
                kept.pkid = 0;
                self.retained.insert(publish.topic.clone(), kept);
            } else {
                tracing::warn!(topic = %publish.topic, "retained message not kept: the broker holds its maximum");
            }
        }
        let limits = self.limits;
        for session in self.sessions.values_mut() {
            let Some(qos) = session.wants(&publish.topic) else { continue };
            let out = Publish::from_bytes(publish.topic.clone(), lower(qos, publish.qos), publish.payload.clone());
            self.dropped += Self::deliver(limits, session, out, &mut actions);
        }
        actions
    }

    /// A client acknowledged a message: its window moves on.
    pub fn puback(&mut self, conn: ConnId, pkid: u16) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(session) = self.owners.get(&conn).and_then(|id| self.sessions.get_mut(id)) {
            session.inflight.remove(&pkid);
            Self::pump(self.limits, session, &mut actions);
        }
        actions
    }

    /// A client subscribes; `None` as a QoS marks a filter the ACL refused. Answers with the
    /// SUBACK, then the retained messages the new filters match.
    pub fn subscribe(&mut self, conn: ConnId, pkid: u16, filters: Vec<(String, Option<QoS>)>) -> Vec<Action> {
        let mut actions = Vec::new();
        let limits = self.limits;
        let Some(session) = self.owners.get(&conn).and_then(|id| self.sessions.get_mut(id)) else {
            return actions;
        };
        let mut codes = Vec::with_capacity(filters.len());
        let mut granted = Vec::new();
        for (filter, qos) in filters {
            let room =
                session.subscriptions.len() < limits.subscriptions || session.subscriptions.contains_key(&filter);
            match qos {
                Some(qos) if room => {
                    let qos = lower(qos, QoS::AtLeastOnce);
                    session.subscriptions.insert(filter.clone(), qos);
                    codes.push(SubscribeReasonCode::Success(qos));
                    granted.push((filter, qos));
                }
                _ => codes.push(SubscribeReasonCode::Failure),
            }
        }
        actions.push(Action::Send(conn, Packet::SubAck(SubAck::new(pkid, codes))));
        for (filter, qos) in granted {
            for kept in self.retained.values().filter(|m| matches(&filter, &m.topic)) {
                let mut out = Publish::from_bytes(kept.topic.clone(), lower(qos, kept.qos), kept.payload.clone());
                out.retain = true;
                self.dropped += Self::deliver(limits, session, out, &mut actions);
            }
        }
        actions
    }

    /// A client unsubscribes.
    pub fn unsubscribe(&mut self, conn: ConnId, pkid: u16, filters: &[String]) -> Vec<Action> {
        if let Some(session) = self.owners.get(&conn).and_then(|id| self.sessions.get_mut(id)) {
            for f in filters {
                session.subscriptions.remove(f);
            }
        }
        vec![Action::Send(conn, Packet::UnsubAck(UnsubAck::new(pkid)))]
    }

    /// A connection ended: with a DISCONNECT (`graceful`), or not, which publishes the will.
    /// A clean session ends with its connection; a persistent one waits for its client.
    pub fn disconnected(&mut self, conn: ConnId, graceful: bool) -> Vec<Action> {
        let Some(client_id) = self.owners.remove(&conn) else {
            // Already taken over by a newer connection.
            return Vec::new();
        };
        let Some(session) = self.sessions.get_mut(&client_id) else { return Vec::new() };
        session.conn = None;
        let will = session.will.take();
        if session.clean {
            self.sessions.remove(&client_id);
        }
        match will {
            Some(will) if !graceful => {
                let mut publish = Publish::from_bytes(will.topic, will.qos, will.message);
                publish.retain = will.retain;
                self.publish(&publish)
            }
            _ => Vec::new(),
        }
    }

    /// Queues a message for a session and sends what the window allows. Returns how many
    /// messages were dropped to make room.
    fn deliver(limits: Limits, session: &mut Session, publish: Publish, actions: &mut Vec<Action>) -> u64 {
        if publish.qos == QoS::AtMostOnce {
            if let Some(conn) = session.conn {
                actions.push(Action::Send(conn, Packet::Publish(publish)));
            }
            return 0;
        }
        let mut dropped = 0;
        if session.pending.len() >= limits.queue {
            session.pending.pop_front();
            dropped = 1;
        }
        session.pending.push_back(publish);
        Self::pump(limits, session, actions);
        dropped
    }

    fn pump(limits: Limits, session: &mut Session, actions: &mut Vec<Action>) {
        let Some(conn) = session.conn else { return };
        while session.inflight.len() < limits.inflight {
            let Some(mut publish) = session.pending.pop_front() else { break };
            publish.pkid = session.take_pkid();
            session.inflight.insert(publish.pkid, publish.clone());
            actions.push(Action::Send(conn, Packet::Publish(publish)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent_publishes(actions: &[Action], to: ConnId) -> Vec<Publish> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(c, Packet::Publish(p)) if *c == to => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    fn publish(topic: &str, payload: &str, retain: bool) -> Publish {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.as_bytes().to_vec());
        p.retain = retain;
        p
    }

    #[test]
    fn a_persistent_session_keeps_messages_while_offline_and_resends_unacknowledged_ones() {
        let mut r = Router::new(Limits { inflight: 2, ..Limits::default() });
        r.connect(1, "sub", false, None);
        r.subscribe(1, 1, vec![("t/#".into(), Some(QoS::AtLeastOnce))]);
        let sent = sent_publishes(&r.publish(&publish("t/a", "1", false)), 1);
        assert_eq!(sent.len(), 1);
        r.disconnected(1, false);
        r.publish(&publish("t/a", "2", false));
        r.publish(&publish("t/a", "3", false));
        // Back: the unacknowledged "1" again (dup), then "2" fills the window of 2.
        let actions = r.connect(2, "sub", false, None);
        assert_eq!(actions[0], Action::Send(2, Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, true))));
        let sent = sent_publishes(&actions, 2);
        assert_eq!(sent.iter().map(|p| &p.payload[..]).collect::<Vec<_>>(), [b"1", b"2"]);
        assert!(sent[0].dup);
        let after_ack = sent_publishes(&r.puback(2, sent[0].pkid), 2);
        assert_eq!(&after_ack[0].payload[..], b"3");
    }

    #[test]
    fn a_clean_session_forgets_and_wills_go_out_only_on_an_unclean_end() {
        let mut r = Router::new(Limits::default());
        r.connect(1, "watcher", true, None);
        r.subscribe(1, 1, vec![("s".into(), Some(QoS::AtLeastOnce))]);
        let will = LastWill::new("s", "offline", QoS::AtLeastOnce, true);
        r.connect(2, "gw", true, Some(will.clone()));
        assert!(r.disconnected(2, true).is_empty(), "DISCONNECT: no will");
        r.connect(3, "gw", true, Some(will));
        let actions = r.disconnected(3, false);
        assert_eq!(sent_publishes(&actions, 1)[0].payload, "offline");
        assert_eq!(r.sessions(), 1, "the clean sessions are gone");
        // The will was retained: a new subscriber gets it, flagged retained.
        r.connect(4, "late", true, None);
        let late = sent_publishes(&r.subscribe(4, 1, vec![("s".into(), Some(QoS::AtLeastOnce))]), 4);
        assert!(late[0].retain);
    }

    #[test]
    fn a_newer_connection_takes_the_session_over() {
        let mut r = Router::new(Limits::default());
        r.connect(1, "gw", false, None);
        let actions = r.connect(2, "gw", false, None);
        assert_eq!(actions[0], Action::Close(1));
        assert!(r.disconnected(1, false).is_empty(), "the old connection no longer owns the session");
    }

    #[test]
    fn refused_filters_get_a_failure_code_and_no_messages() {
        let mut r = Router::new(Limits::default());
        r.connect(1, "a", true, None);
        let actions = r.subscribe(1, 7, vec![("x".into(), None), ("y".into(), Some(QoS::ExactlyOnce))]);
        assert_eq!(
            actions[0],
            Action::Send(
                1,
                Packet::SubAck(SubAck::new(
                    7,
                    vec![SubscribeReasonCode::Failure, SubscribeReasonCode::Success(QoS::AtLeastOnce)]
                ))
            )
        );
        assert!(sent_publishes(&r.publish(&publish("x", "no", false)), 1).is_empty());
    }

    #[test]
    fn full_queues_drop_the_oldest() {
        let mut r = Router::new(Limits { inflight: 1, queue: 2, ..Limits::default() });
        r.connect(1, "s", false, None);
        r.subscribe(1, 1, vec![("t".into(), Some(QoS::AtLeastOnce))]);
        r.disconnected(1, false);
        for i in 0..5 {
            r.publish(&publish("t", &i.to_string(), false));
        }
        assert_eq!(r.dropped(), 3);
        let sent = sent_publishes(&r.connect(2, "s", false, None), 2);
        assert_eq!(sent[0].payload, "3");
    }
}
