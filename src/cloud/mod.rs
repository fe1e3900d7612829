//! The cloud link: MQTT over mutual TLS to any standard broker. So far the TLS configuration;
//! the session, topics, outbox drain and inbound commands are to come.

pub mod tls;
