//! The gateway: what turns statements from the cloud into lock operations — the intake (strict
//! opening, refusals audited and answered), the policy engine and the facts it reads, one task per paired lock, the
//! clock's trust, the radio watch for advertised events, and the store's housekeeping.

pub mod claim;
pub mod clock;
pub mod facts_cache;
pub mod intake;
pub mod lock_worker;
pub mod maintenance;
pub mod policy;
pub mod radio_watch;
pub mod statements;
pub mod timing;
