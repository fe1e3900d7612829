//! Three of Debian's `nats-server`, clustered on loopback with MQTT over mutual TLS, each
//! configured by `lockhub::devcloud::nats_config` (what `lockhub-cloud nats-config` prints).
//! Ephemeral ports, JetStream in a temporary directory, each node under
//! `setpriv --pdeathsig KILL` and killed on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use lockhub::devcloud::nats_config::NatsNode;
use lockhub::devcloud::pki::Pki;
use lockhub::protocol::ids::GatewayId;

use super::mosquitto::free_ports;

/// One node: its process and MQTT port.
pub struct Node {
    child: Option<Child>,
    /// Its MQTT (TLS) port on 127.0.0.1.
    pub mqtt_port: u16,
}

/// The cluster; its nodes die with it.
pub struct NatsCluster {
    /// The nodes, in order.
    pub nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

impl NatsCluster {
    /// Starts three nodes serving `gateways` and the relay; returns once the cluster has
    /// elected its JetStream leader (MQTT clients are refused until then).
    pub fn start(pki: &Pki, gateways: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16, u16)> = free_ports::<9>().chunks(3).map(|p| (p[0], p[1], p[2])).collect();
        let gateways: Vec<GatewayId> = gateways.iter().map(|g| GatewayId::new(*g).unwrap()).collect();
        let (lines_tx, lines) = mpsc::channel::<String>();
        let mut nodes = Vec::new();
        for (i, &(client, cluster, mqtt)) in ports.iter().enumerate() {
            let routes = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("nats-route://127.0.0.1:{}", p.1))
                .collect();
            let name = format!("n{}", i + 1);
            let node = NatsNode::for_pki(
                pki,
                &name,
                "127.0.0.1",
                (client, cluster, mqtt),
                routes,
                dir.path().join(&name),
                gateways.clone(),
            );
            let conf = dir.path().join(format!("{name}.conf"));
            std::fs::write(&conf, node.render()).unwrap();
            let mut child = Command::new("setpriv")
                .args(["--pdeathsig", "KILL", "--"])
                .arg(super::tier::program("nats-server").expect("nats-server is installed (tier::ready)"))
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("starting nats-server (.ci/run installs it)");
            let stderr = child.stderr.take().unwrap();
            let tx = lines_tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let _ = tx.send(format!("{name}: {line}"));
                }
            });
            nodes.push(Node { child: Some(child), mqtt_port: mqtt });
        }
        drop(lines_tx);
        // The nodes log their routes to each other and the cluster's JetStream election: MQTT
        // streams are created with a replica on every node, so all three must be there.
        let mut log = Vec::new();
        let (mut elected, mut routes) = (false, [0usize; 3]);
        while !(elected && routes.iter().all(|r| *r >= 2)) {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("the NATS cluster never formed ({e}):\n{}", log.join("\n")));
            assert!(!line.contains("[FTL]"), "nats-server failed: {line}\n{}", log.join("\n"));
            elected |= line.contains("metadata leader");
            if line.contains("Route connection created") {
                let node: usize = line[1..2].parse().unwrap();
                routes[node - 1] += 1;
            }
            log.push(line);
        }
        // The rest of the log goes to the test's stderr with LOCKHUB_TEST_NATS_LOG set, else
        // nowhere (the reader threads drain the pipes).
        let show = std::env::var_os("LOCKHUB_TEST_NATS_LOG").is_some();
        std::thread::spawn(move || {
            for line in lines {
                if show {
                    eprintln!("{line}");
                }
            }
        });
        NatsCluster { nodes, _dir: dir }
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The broker URLs of the nodes, in order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("mqtts://localhost:{}", n.mqtt_port)).collect()
    }
}
