//! What `lockhub-cloud` runs for integration runs and the demo: the development PKI (so far;
//! the broker with per-gateway ACLs, the relay and the phone-app stand-in are to come).

pub mod pki;
