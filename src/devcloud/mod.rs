//! What `lockhub-cloud` runs for integration runs and the demo: the development PKI, the
//! fleet's topic ACL, the broker that enforces it, and the event sink (the relay and the
//! phone-app stand-in are to come).

pub mod acl;
pub mod app;
pub mod broker;
pub mod mosquitto_config;
pub mod nats_config;
pub mod pki;
pub mod sink;
