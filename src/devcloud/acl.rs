//! The topic ACL of a lockhub fleet, in one place: who may publish and subscribe where.
//!
//! A client is known by its certificate's common name. A gateway reaches its own subtree
//! `lockhub/v1/<gateway id>/…` and nothing else; the relay reaches every gateway's subtree;
//! nobody reaches topics outside `lockhub/v1/`. The bundled broker enforces these rules, and
//! [`mosquitto_acl`] writes the same rules for Mosquitto; the integration tests run the same
//! checks against both.

use crate::devcloud::broker::topic::{matches, validate_filter, validate_name};
use crate::devcloud::pki::RELAY_IDENTITY;
use crate::protocol::ids::GatewayId;

/// The prefix of every lockhub topic.
pub const ROOT: &str = "lockhub/v1/";

/// Who a connected client is, from its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// The cloud's relay (and its helpers: the event sink, the app stand-in).
    Relay,
    /// A gateway.
    Gateway(GatewayId),
}

impl Identity {
    /// The identity a certificate's common name gives, if any.
    pub fn from_common_name(cn: &str) -> Option<Self> {
        if cn == RELAY_IDENTITY { Some(Identity::Relay) } else { GatewayId::new(cn).ok().map(Identity::Gateway) }
    }

    /// Whether this identity may connect with `client_id`. A gateway's client id is its id (so
    /// no client can take over another's session); the relay's processes use `lockhub-relay`
    /// or `lockhub-relay-<suffix>`.
    pub fn may_use_client_id(&self, client_id: &str) -> bool {
        match self {
            Identity::Gateway(id) => client_id == id.as_str(),
            Identity::Relay => {
                client_id == RELAY_IDENTITY
                    || client_id.strip_prefix(RELAY_IDENTITY).and_then(|s| s.strip_prefix('-')).is_some_and(|suffix| {
                        !suffix.is_empty()
                            && suffix.len() <= 64
                            && suffix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    })
            }
        }
    }

    /// The filter covering everything this identity may reach.
    pub fn subtree(&self) -> String {
        match self {
            Identity::Relay => format!("{ROOT}#"),
            Identity::Gateway(id) => format!("{ROOT}{id}/#"),
        }
    }

    /// Whether this identity may publish to the topic `name`.
    pub fn may_publish(&self, name: &str) -> bool {
        validate_name(name).is_ok() && matches(&self.subtree(), name)
    }

    /// Whether this identity may subscribe to `filter`: every topic the filter can match must
    /// be inside the subtree, so the filter must start with the subtree's literal prefix.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        if validate_filter(filter).is_err() {
            return false;
        }
        let subtree = self.subtree();
        let prefix = subtree.trim_end_matches('#');
        // `lockhub/v1/gw-a` (the parent level itself) is matched by `lockhub/v1/gw-a/#` too.
        filter.starts_with(prefix) || filter == prefix.trim_end_matches('/')
    }
}

/// The same rules as a Mosquitto ACL file (with `use_identity_as_username true`).
pub fn mosquitto_acl() -> String {
    format!(
        "# lockhub: the relay reaches every gateway; a gateway only its own subtree.\n\
         user {RELAY_IDENTITY}\ntopic readwrite {ROOT}#\n\n\
         pattern readwrite {ROOT}%u/#\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(id: &str) -> Identity {
        Identity::from_common_name(id).unwrap()
    }

    #[test]
    fn a_gateway_reaches_its_own_subtree_only() {
        let a = gw("gw-a");
        assert!(a.may_publish("lockhub/v1/gw-a/events"));
        assert!(a.may_publish("lockhub/v1/gw-a/lock/1/state"));
        assert!(!a.may_publish("lockhub/v1/gw-b/cmd"));
        assert!(!a.may_publish("lockhub/v1/gw-ab/cmd"), "a prefix of another id is not enough");
        assert!(!a.may_publish("other/topic"));
        assert!(!a.may_publish("lockhub/v1/+/cmd"), "no wildcards in names");
        assert!(a.may_subscribe("lockhub/v1/gw-a/cmd"));
        assert!(a.may_subscribe("lockhub/v1/gw-a/#"));
        assert!(a.may_subscribe("lockhub/v1/gw-a/lock/+/state"));
        for denied in ["#", "lockhub/#", "lockhub/v1/#", "lockhub/v1/+/cmd", "lockhub/v1/gw-b/#", "+/v1/gw-a/cmd"] {
            assert!(!a.may_subscribe(denied), "{denied}");
        }
    }

    #[test]
    fn the_relay_reaches_every_gateway_but_nothing_else() {
        let relay = Identity::from_common_name(RELAY_IDENTITY).unwrap();
        assert_eq!(relay, Identity::Relay);
        assert!(relay.may_subscribe("lockhub/v1/+/events"));
        assert!(relay.may_subscribe("lockhub/v1/#"));
        assert!(relay.may_publish("lockhub/v1/gw-a/cmd"));
        assert!(!relay.may_subscribe("#"));
        assert!(!relay.may_publish("$SYS/x"));
    }

    #[test]
    fn client_ids_are_bound_to_identities() {
        assert!(gw("gw-a").may_use_client_id("gw-a"));
        assert!(!gw("gw-a").may_use_client_id("gw-b"));
        assert!(!gw("gw-a").may_use_client_id(RELAY_IDENTITY));
        assert!(Identity::Relay.may_use_client_id("lockhub-relay-sink"));
        assert!(!Identity::Relay.may_use_client_id("lockhub-relay-"));
        assert!(!Identity::Relay.may_use_client_id("lockhub-relayx"));
        assert!(!Identity::Relay.may_use_client_id("gw-a"));
        assert_eq!(Identity::from_common_name("not an id!"), None);
    }
}
