//! Resolving a `user` string against the image's `/etc/passwd` and `/etc/group`, with
//! Docker's rules: `uid`, `uid:gid`, `name`, `name:group`; a numeric uid need not exist
//! (its group is then 0), a name must; supplementary groups come from `/etc/group`
//! membership unless a group is given explicitly.

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub supplementary_gids: Vec<u32>,
    pub home: String,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: fields[0],
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: fields[5],
        })
    })
}

fn group_entries(group: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    group.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 || line.starts_with('#') {
            return None;
        }
        Some(GroupEntry {
            name: fields[0],
            gid: fields[2].parse().ok()?,
            members: fields[3]
                .split(',')
                .filter(|member| !member.is_empty())
                .collect(),
        })
    })
}

/// A `user` the image's `/etc/passwd` or `/etc/group` does not know (the messages are runc's).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UserError {
    #[error("unable to find user {0}: no matching entries in passwd file")]
    UnknownUser(String),
    #[error("unable to find group {0}: no matching entries in group file")]
    UnknownGroup(String),
}

/// `passwd` and `group` are the files' contents (empty when missing).
pub(crate) fn resolve_user(
    user: &str,
    passwd: &str,
    group: &str,
) -> Result<ResolvedUser, UserError> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((user_part, group_part)) => (user_part, Some(group_part)),
        None => (user, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };

    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|entry| entry.uid == uid),
        Err(_) => passwd_entries(passwd).find(|entry| entry.name == user_part),
    };
    let (uid, mut gid, name, home) = match (entry, user_part.parse::<u32>()) {
        (Some(entry), _) => (
            entry.uid,
            entry.gid,
            Some(entry.name),
            entry.home.to_string(),
        ),
        (None, Ok(uid)) => (uid, 0, None, "/".to_string()),
        // Images without /etc/passwd still know root.
        (None, Err(_)) if user_part == "root" => (0, 0, Some("root"), "/root".to_string()),
        (None, Err(_)) => return Err(UserError::UnknownUser(user_part.to_string())),
    };

    let mut supplementary_gids = Vec::new();
    match group_part {
        Some(group_part) if !group_part.is_empty() => {
            gid = match group_part.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => group_entries(group)
                    .find(|entry| entry.name == group_part)
                    .map(|entry| entry.gid)
                    .ok_or_else(|| UserError::UnknownGroup(group_part.to_string()))?,
            };
        }
        _ => {
            if let Some(name) = name {
                for entry in group_entries(group) {
                    if entry.members.contains(&name) && !supplementary_gids.contains(&entry.gid) {
                        supplementary_gids.push(entry.gid);
                    }
                }
            }
        }
    }
    if !supplementary_gids.contains(&gid) {
        supplementary_gids.insert(0, gid);
    }
    Ok(ResolvedUser {
        uid,
        gid,
        supplementary_gids,
        home: if home.is_empty() {
            "/".to_string()
        } else {
            home
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:app,root\napp:x:1000:\ndocker:x:999:app\n";

    #[test]
    fn numeric_user_need_not_exist() {
        let user = resolve_user("65532", PASSWD, GROUP).expect("resolves");
        assert_eq!((user.uid, user.gid, user.home.as_str()), (65532, 0, "/"));
        assert_eq!(user.supplementary_gids, [0]);
    }

    #[test]
    fn names_resolve_with_home_and_groups() {
        let user = resolve_user("app", PASSWD, GROUP).expect("resolves");
        assert_eq!(
            (user.uid, user.gid, user.home.as_str()),
            (1000, 1000, "/home/app")
        );
        assert_eq!(user.supplementary_gids, [1000, 10, 999]);
        let by_uid = resolve_user("1000", PASSWD, GROUP).expect("resolves");
        assert_eq!(by_uid, user);
    }

    #[test]
    fn explicit_groups_by_number_or_name() {
        let user = resolve_user("app:docker", PASSWD, GROUP).expect("resolves");
        assert_eq!((user.uid, user.gid), (1000, 999));
        assert_eq!(user.supplementary_gids, [999]);
        let user = resolve_user("5:7", "", "").expect("resolves");
        assert_eq!((user.uid, user.gid), (5, 7));
    }

    #[test]
    fn unknown_names_are_errors() {
        let error = resolve_user("nobody", PASSWD, GROUP).expect_err("unknown user");
        assert_eq!(error, UserError::UnknownUser("nobody".into()));
        assert_eq!(
            error.to_string(),
            "unable to find user nobody: no matching entries in passwd file"
        );
        let error = resolve_user("app:staff", PASSWD, GROUP).expect_err("unknown group");
        assert_eq!(error, UserError::UnknownGroup("staff".into()));
        assert_eq!(
            error.to_string(),
            "unable to find group staff: no matching entries in group file"
        );
    }

    #[test]
    fn empty_user_and_root_without_passwd_are_root() {
        for user in ["", "root", "0"] {
            let resolved = resolve_user(user, "", "").expect("root");
            assert_eq!((resolved.uid, resolved.gid), (0, 0), "{user}");
        }
    }
}
