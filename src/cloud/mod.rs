//! The cloud link: MQTT over mutual TLS to any standard broker — the TLS configuration, the
//! topic layout, and the session that drains the outbox and takes commands in.

pub mod broker_url;
pub mod express;
mod in_flight;
pub mod link;
pub mod lock_report;
pub mod reply;
pub mod tls;
pub mod topics;
