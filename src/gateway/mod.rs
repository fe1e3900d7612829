//! The gateway: what turns statements from the cloud into lock operations — the intake (strict
//! opening, refusals audited and answered), the decision and the policy engine with the facts
//! it reads, pairing, grants, replies, one task per paired lock, local control, the clock's
//! trust, the radio watch for advertised events, and the store's housekeeping.

pub mod claim;
pub mod clock;
mod core;
pub mod decision;
pub mod facts_cache;
mod grants;
pub mod intake;
mod local_control;
pub mod lock_worker;
pub mod maintenance;
mod pairing;
pub mod policy;
pub mod radio_watch;
mod replies;
pub mod statements;
pub mod timing;
mod unbind;
pub mod user_refs;

pub use self::core::{Clock, Gateway};
