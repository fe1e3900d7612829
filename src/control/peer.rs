//! Who may use the control socket: root, the daemon's own user, and members of the admin group
//! (`lockhub-admin` by default), judged by the peer's credentials as the kernel reports them
//! (SO_PEERCRED), not by anything the peer says.
//!
//! The socket's mode (0660, group lockhub-admin) already keeps others from connecting; this
//! check is the second wall, for a socket whose mode someone loosened. Group membership comes
//! from /etc/group (primary group or member list), which is what a hub has.

use std::os::unix::fs::MetadataExt;

/// Largest /etc/group or /etc/passwd read.
const MAX_DB_BYTES: usize = 1024 * 1024;

/// The admin group, as /etc/group has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminGroup {
    /// Its name.
    pub name: String,
    /// Its gid, if the group exists.
    pub gid: Option<u32>,
    members: Vec<String>,
}

fn read_db(path: &str) -> String {
    crate::bounded_file::read(std::path::Path::new(path), MAX_DB_BYTES)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes.to_vec()).ok())
        .unwrap_or_default()
}

/// The user name of `uid`, from /etc/passwd.
pub fn user_name(uid: u32) -> Option<String> {
    read_db("/etc/passwd").lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 3 && fields[2].parse() == Ok(uid)).then(|| fields[0].to_owned())
    })
}

/// The uid this process runs as.
pub fn own_uid() -> u32 {
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX)
}

impl AdminGroup {
    /// Looks `name` up in /etc/group.
    pub fn load(name: &str) -> Self {
        let entry = read_db("/etc/group").lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() == 4 && fields[0] == name).then(|| {
                let members = fields[3].split(',').filter(|m| !m.is_empty()).map(str::to_owned).collect();
                (fields[2].parse().ok(), members)
            })
        });
        let (gid, members) = entry.unwrap_or((None, Vec::new()));
        AdminGroup { name: name.to_owned(), gid, members }
    }

    /// Whether the peer `uid` (primary group `gid`) may administer the hub; if not, the
    /// message to send it.
    pub fn admits(&self, uid: u32, gid: u32) -> Result<(), String> {
        if uid == 0 || uid == own_uid() {
            return Ok(());
        }
        if self.gid == Some(gid) {
            return Ok(());
        }
        let name = user_name(uid);
        if name.as_ref().is_some_and(|n| self.members.contains(n)) {
            return Ok(());
        }
        let who = name.unwrap_or_else(|| format!("uid {uid}"));
        Err(format!(
            "{who} may not administer this hub: use sudo, or join the {} group (sudo usermod -aG {} {who}, then log in again)",
            self.name, self.name
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_admitted_and_strangers_are_told_how_to_be() {
        let group = AdminGroup { name: "lockhub-admin".into(), gid: Some(4242), members: vec!["alice".into()] };
        assert_eq!(group.admits(0, 0), Ok(()));
        assert_eq!(group.admits(123_456, 4242), Ok(()), "primary group");
        let refused = group.admits(123_457, 123_457).unwrap_err();
        assert!(
            refused.contains("uid 123457 may not administer this hub") && refused.contains("usermod -aG lockhub-admin"),
            "{refused}"
        );
    }

    #[test]
    fn groups_are_read_from_etc_group() {
        assert_eq!(AdminGroup::load("root").gid, Some(0));
        assert_eq!(AdminGroup::load("no-such-group-here").gid, None);
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }
}
