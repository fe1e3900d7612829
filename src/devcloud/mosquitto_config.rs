//! The Mosquitto configuration equivalent to the bundled broker, for operators who run their
//! own: mutual TLS with the fleet's CA, the certificate's common name as the username, and the
//! ACL of [`crate::devcloud::acl`]. The integration tests start Debian's Mosquitto with exactly
//! this output, so what `lockhub-cloud mosquitto-config` prints is what the tests prove.

use std::path::PathBuf;

use crate::devcloud::acl::mosquitto_acl;
use crate::devcloud::pki::Pki;

/// What the configuration refers to.
#[derive(Clone, Debug)]
pub struct MosquittoConfig {
    /// Address the listener binds (e.g. `0.0.0.0` or `127.0.0.1`).
    pub bind: String,
    /// The TLS port.
    pub port: u16,
    /// The CA of client certificates (and of the broker's).
    pub ca_file: PathBuf,
    /// The broker's certificate.
    pub cert_file: PathBuf,
    /// Its key.
    pub key_file: PathBuf,
    /// Where the ACL file (from [`mosquitto_acl`]) is installed.
    pub acl_file: PathBuf,
    /// Directory to keep sessions and queued messages across restarts; none: in memory.
    pub persistence_dir: Option<PathBuf>,
    /// The largest MQTT packet the broker takes or sends, in bytes
    /// ([`crate::cloud::link::MAX_BROKER_PACKET`] by default): a client that sends a bigger one
    /// is disconnected, and it never reaches a hub. None: no limit (Mosquitto's own default),
    /// as on a broker configured by someone else.
    pub max_packet_size: Option<usize>,
    /// Run as root without dropping privileges (Mosquitto refuses otherwise when started as
    /// root with no `mosquitto` user; for test harnesses, not for production).
    pub run_as_root: bool,
}

impl MosquittoConfig {
    /// The configuration for a development PKI.
    pub fn for_pki(pki: &Pki, bind: &str, port: u16, acl_file: PathBuf) -> Self {
        MosquittoConfig {
            bind: bind.to_owned(),
            port,
            ca_file: pki.ca_cert(),
            cert_file: pki.broker_cert(),
            key_file: pki.broker_key(),
            acl_file,
            persistence_dir: None,
            max_packet_size: Some(crate::cloud::link::MAX_BROKER_PACKET),
            run_as_root: false,
        }
    }

    /// The `mosquitto.conf` text.
    pub fn render(&self) -> String {
        let mut out = String::from("# lockhub cloud broker: mutual TLS, one identity per gateway, per-gateway ACLs.\n");
        if self.run_as_root {
            out.push_str("user root\n");
        }
        out.push_str("per_listener_settings false\nallow_anonymous false\n");
        if let Some(max) = self.max_packet_size {
            // Without it, a QoS 1 message of any size is queued for a hub, which can only read
            // so much: refused at the door, it never is.
            out.push_str(&format!("max_packet_size {max}\n"));
        }
        match &self.persistence_dir {
            Some(dir) => out
                .push_str(&format!("persistence true\npersistence_location {}/\nautosave_interval 1\n", dir.display())),
            None => out.push_str("persistence false\n"),
        }
        out.push_str(&format!(
            "\nlistener {} {}\ncafile {}\ncertfile {}\nkeyfile {}\n\
             # Every client shows a certificate from the CA; its common name is its username.\n\
             require_certificate true\nuse_identity_as_username true\n\
             # With QoS 1 windows, Nagle on the broker holds PUBACKs back for the client's delayed ACK.\n\
             set_tcp_nodelay true\n\
             acl_file {}\n",
            self.port,
            self.bind,
            self.ca_file.display(),
            self.cert_file.display(),
            self.key_file.display(),
            self.acl_file.display()
        ));
        out
    }

    /// The ACL file's text.
    pub fn render_acl(&self) -> String {
        mosquitto_acl()
    }
}
