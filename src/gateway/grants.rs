//! What an owner's grants, revocations, local codes and lock policies change in the store.
//! That the owner may is `decision`'s; the policy engine reads the result through the facts
//! cache, which a change of principals empties.

use super::core::Gateway;
use super::policy::LockPolicy;
use super::replies::ok;
use crate::auth::keys::PublicKey;
use crate::auth::local_code::IssuedCode;
use crate::auth::statement::Statement;
use crate::ble::LockTransport;
use crate::cloud::reply::Reply;
use crate::protocol::ids::LockId;
use crate::store::StoreError;

impl<T: LockTransport> Gateway<T> {
    /// Commits what an allowed grant, revocation, local code or policy statement (`text`, its
    /// exact bytes) says; returns the reply and the audit action.
    pub(super) fn apply(
        &self,
        statement: &Statement,
        text: &str,
        now: i64,
    ) -> Result<(Reply, &'static str), StoreError> {
        let id = statement.id().as_str();
        match statement {
            Statement::Grant(g) => {
                self.store().transaction(|tx| {
                    tx.add_user(g.sub.as_bytes(), now)?;
                    tx.put_grant(g.jti.as_str(), g.lock, g.sub.as_bytes(), text.as_bytes(), Some(g.exp))
                })?;
                Ok((ok(id, "granted", now), "grant.add"))
            }
            Statement::Revoke(r) => {
                // The id names a grant or a local code; a local code is removed outright.
                let removed_code = self.store().transaction(|tx| {
                    tx.put_revocation(r.grant.as_str(), None, text.as_bytes(), now)?;
                    tx.remove_local_code(r.grant.as_str())
                })?;
                Ok((ok(id, "revoked", now), if removed_code { "local_code.revoke" } else { "grant.revoke" }))
            }
            Statement::LocalCode(c) => {
                self.store().transaction(|tx| {
                    tx.add_user(c.sub.as_bytes(), now)?;
                    tx.put_local_code(c.jti.as_str(), c.lock, c.sub.as_bytes(), &c.hash, c.nbf, c.exp)
                })?;
                Ok((ok(id, "local code set", now), "local_code.set"))
            }
            Statement::Policy(p) => {
                let policy = LockPolicy { remote_unlock: p.remote_unlock, quiet_hours: p.quiet_hours.clone() };
                let json = serde_json::to_string(&policy).expect("policies serialise");
                self.store().transaction(|tx| tx.set_policy(Some(p.lock), &json))?;
                let detail = if p.remote_unlock { "remote unlock on" } else { "remote unlock off" };
                Ok((ok(id, detail, now), "policy.set"))
            }
            Statement::Claim(_) | Statement::Pair(_) | Statement::Command(_) => {
                unreachable!("claims, pairings and commands are carried out elsewhere")
            }
        }
    }

    /// The local codes owner-signed statements gave for `lock`, valid now.
    pub fn local_codes(&self, lock: LockId) -> Result<Vec<IssuedCode>, StoreError> {
        let now = (self.clock)().0;
        let rows = self.store().local_codes(lock, now)?;
        Ok(rows
            .into_iter()
            .filter_map(|(key, hash)| {
                let user = PublicKey::from_bytes(key.try_into().ok()?);
                Some(IssuedCode { user, hash })
            })
            .collect())
    }
}
