//! The gateway: what turns statements from the cloud into lock operations. So far the intake
//! (strict opening, refusals audited and answered); the policy engine and the per-lock tasks
//! come with remote unlock.

pub mod claim;
pub mod clock;
pub mod intake;
pub mod lock_worker;
pub mod policy;
pub mod radio_watch;
pub mod statements;
