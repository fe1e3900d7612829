//! The configuration of a NATS server node serving the fleet over MQTT, for operators who run
//! the cloud side on a clustered broker: mutual TLS with the fleet's CA, each certificate's
//! subject mapped to a user, and the ACL of [`crate::devcloud::acl`] as NATS permissions.
//! The integration tests cluster three of Debian's `nats-server` with exactly this output, so
//! what `lockhub-cloud nats-config` prints is what the tests prove.
//!
//! NATS keeps MQTT sessions, retained messages and unacknowledged QoS 1 messages in
//! JetStream, replicated across the cluster: a gateway that moves to another node finds its
//! session there. MQTT topics become subjects (`lockhub/v1/gw-a/cmd` is
//! `lockhub.v1.gw-a.cmd`; a `.` in a topic level becomes `//`), and permissions are written
//! on subjects. A configuration file has no per-user patterns, so every gateway is listed by
//! name: regenerate and reload (`nats-server --signal reload`) when the fleet grows, or use
//! NATS's JWT mode for large fleets (`docs/deployment.md`).

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::devcloud::pki::{Pki, RELAY_IDENTITY};
use crate::protocol::ids::GatewayId;

/// One node of the cluster.
#[derive(Clone, Debug)]
pub struct NatsNode {
    /// The node's name, unique in the cluster (NATS requires one for MQTT).
    pub name: String,
    /// The cluster's name.
    pub cluster: String,
    /// Address the listeners bind.
    pub bind: String,
    /// Port of the NATS protocol listener (no user can authenticate on it: MQTT only).
    pub client_port: u16,
    /// Port the other nodes' routes reach.
    pub cluster_port: u16,
    /// Port of the MQTT listener (TLS).
    pub mqtt_port: u16,
    /// The other nodes' route URLs, `nats-route://host:port`.
    pub routes: Vec<String>,
    /// JetStream's directory (sessions, retained messages, queued QoS 1 messages).
    pub store_dir: PathBuf,
    /// The CA of client certificates (and of the server's).
    pub ca_file: PathBuf,
    /// The server's certificate.
    pub cert_file: PathBuf,
    /// Its key.
    pub key_file: PathBuf,
    /// The gateways allowed to connect.
    pub gateways: Vec<GatewayId>,
}

/// A topic level as a subject token: NATS writes a `.` inside a level as `//`.
fn token(level: &str) -> String {
    level.replace('.', "//")
}

/// The user a certificate with common name `cn` (and no alternative names) maps to.
fn user(cn: &str) -> String {
    format!("CN={cn}")
}

impl NatsNode {
    /// Node `name` for a development PKI, its listeners on `bind`.
    #[allow(clippy::too_many_arguments)]
    pub fn for_pki(
        pki: &Pki,
        name: &str,
        bind: &str,
        ports: (u16, u16, u16),
        routes: Vec<String>,
        store_dir: PathBuf,
        gateways: Vec<GatewayId>,
    ) -> Self {
        let (client_port, cluster_port, mqtt_port) = ports;
        NatsNode {
            name: name.to_owned(),
            cluster: "lockhub".to_owned(),
            bind: bind.to_owned(),
            client_port,
            cluster_port,
            mqtt_port,
            routes,
            store_dir,
            ca_file: pki.ca_cert(),
            cert_file: pki.broker_cert(),
            key_file: pki.broker_key(),
            gateways,
        }
    }

    /// The `nats-server.conf` text.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# lockhub cloud broker node: MQTT over mutual TLS, one user per certificate, per-gateway permissions.\n",
        );
        let _ = writeln!(out, "server_name: \"{}\"", self.name);
        let _ = writeln!(out, "listen: \"{}:{}\"", self.bind, self.client_port);
        // The largest message a client may publish (the default is 1 MiB), as the other
        // brokers' limit. NATS 2.9 acknowledges a bigger MQTT QoS 1 publish but stores
        // nothing over it, so no hub is handed it (tests/nats_cluster.rs).
        let _ = writeln!(out, "max_payload: {}", crate::cloud::link::MAX_BROKER_PACKET);
        let _ = writeln!(out, "jetstream {{\n  store_dir: \"{}\"\n}}", self.store_dir.display());
        let routes: Vec<String> = self.routes.iter().map(|r| format!("\"{r}\"")).collect();
        let _ = writeln!(
            out,
            "cluster {{\n  name: \"{}\"\n  listen: \"{}:{}\"\n  routes: [{}]\n}}",
            self.cluster,
            self.bind,
            self.cluster_port,
            routes.join(", ")
        );
        // Sessions, retained messages and queued QoS 1 messages on every node (at most three):
        // a node can die and the others keep a quorum.
        let replicas = (self.routes.len() + 1).min(3);
        let _ = writeln!(
            out,
            "mqtt {{\n  listen: \"{}:{}\"\n  stream_replicas: {replicas}\n  consumer_replicas: {replicas}\n  tls {{\n    cert_file: \"{}\"\n    key_file: \"{}\"\n    ca_file: \"{}\"\n    \
             # Every client shows a certificate from the CA; its subject is its user.\n    verify_and_map: true\n    \
             timeout: 5\n  }}\n}}",
            self.bind,
            self.mqtt_port,
            self.cert_file.display(),
            self.key_file.display(),
            self.ca_file.display()
        );
        // QoS 1 subscriptions are JetStream consumers delivering on $MQTT.sub.<id>: every MQTT
        // user subscribes there too.
        out.push_str("authorization {\n  users: [\n");
        let _ = writeln!(
            out,
            "    {{ user: \"{}\", allowed_connection_types: [\"MQTT\"], permissions: {{ \
             publish: [\"lockhub.v1.>\"], subscribe: [\"lockhub.v1.>\", \"$MQTT.sub.>\"] }} }}",
            user(RELAY_IDENTITY)
        );
        for gateway in &self.gateways {
            let subtree = format!("lockhub.v1.{}.>", token(gateway.as_str()));
            let _ = writeln!(
                out,
                "    {{ user: \"{}\", allowed_connection_types: [\"MQTT\"], permissions: {{ \
                 publish: [\"{subtree}\"], subscribe: [\"{subtree}\", \"$MQTT.sub.>\"] }} }}",
                user(gateway.as_str())
            );
        }
        out.push_str("  ]\n}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_gateway_gets_its_own_subtree_and_dots_are_escaped() {
        let node = NatsNode {
            name: "n1".into(),
            cluster: "lockhub".into(),
            bind: "127.0.0.1".into(),
            client_port: 4222,
            cluster_port: 6222,
            mqtt_port: 8883,
            routes: vec!["nats-route://127.0.0.1:6223".into()],
            store_dir: "/var/lib/nats".into(),
            ca_file: "/etc/lockhub/ca.pem".into(),
            cert_file: "/etc/lockhub/broker.pem".into(),
            key_file: "/etc/lockhub/broker.key".into(),
            gateways: vec![GatewayId::new("gw-a").unwrap(), GatewayId::new("hub.b").unwrap()],
        };
        let text = node.render();
        assert!(
            text.contains(
                r#"user: "CN=gw-a", allowed_connection_types: ["MQTT"], permissions: { publish: ["lockhub.v1.gw-a.>"]"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"publish: ["lockhub.v1.hub//b.>"]"#), "{text}");
        assert!(text.contains(r#"user: "CN=lockhub-relay""#), "{text}");
        assert!(text.contains("verify_and_map: true"), "{text}");
        assert!(text.contains(r#"routes: ["nats-route://127.0.0.1:6223"]"#), "{text}");
    }
}
