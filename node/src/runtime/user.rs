//! Resolving an image's `user` (`name`, `uid`, `name:group`, `uid:gid`, ...)
//! with the image's own `/etc/passwd` and `/etc/group`, as Docker does:
//!
//! - a name must be in `/etc/passwd`; a number need not be (its group is
//!   then 0, its home `/`);
//! - without a group, the user's primary group from `/etc/passwd`;
//! - supplementary groups: every `/etc/group` entry listing the user's name,
//!   unless a group was given explicitly.

/// Who the workload runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

/// (name, gid, members)
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || line.starts_with('#') {
            return None;
        }
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolves `spec` (`None`: root) with the image's `/etc/passwd` and
/// `/etc/group` contents (`None` when the file is missing).
pub fn resolve(
    spec: Option<&str>,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<User, String> {
    let passwd = passwd.unwrap_or("");
    let group_file = group.unwrap_or("");
    let spec = spec.map(str::trim).filter(|s| !s.is_empty()).unwrap_or("0");
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err(format!(
            "user {spec:?}: expected user, uid, user:group or uid:gid"
        ));
    }
    let entry = match user.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|e| e.uid == uid),
        Err(_) => Some(
            passwd_entries(passwd)
                .find(|e| e.name == user)
                .ok_or_else(|| format!("user {user:?} is not in the image's /etc/passwd"))?,
        ),
    };
    let uid = match &entry {
        Some(e) => e.uid,
        None => user.parse().unwrap_or(0),
    };
    let home = entry
        .as_ref()
        .map(|e| e.home)
        .filter(|h| !h.is_empty())
        .unwrap_or("/")
        .to_owned();
    let (gid, groups) = match group {
        Some(g) => {
            let gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => group_entries(group_file)
                    .find(|(name, _, _)| *name == g)
                    .map(|(_, gid, _)| gid)
                    .ok_or_else(|| format!("group {g:?} is not in the image's /etc/group"))?,
            };
            (gid, vec![gid])
        }
        None => {
            let gid = entry.as_ref().map(|e| e.gid).unwrap_or(0);
            let mut groups = vec![gid];
            if let Some(e) = &entry {
                for (_, g, members) in group_entries(group_file) {
                    if members.contains(&e.name) && !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
            (gid, groups)
        }
    };
    Ok(User {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          app:x:1000:1001:App:/home/app:/bin/sh\n\
                          # comment\n\
                          nobody:x:65534:65534::/nonexistent:/bin/false\n";
    const GROUP: &str = "root:x:0:\napp:x:1001:\nextra:x:2000:nobody,app\nother:x:3000:nobody\n";

    fn user(spec: Option<&str>) -> Result<User, String> {
        resolve(spec, Some(PASSWD), Some(GROUP))
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(
            user(None).unwrap(),
            User {
                uid: 0,
                gid: 0,
                groups: vec![0],
                home: "/root".into()
            }
        );
        assert_eq!(
            user(Some("app")).unwrap(),
            User {
                uid: 1000,
                gid: 1001,
                groups: vec![1001, 2000],
                home: "/home/app".into()
            }
        );
        assert_eq!(user(Some("1000")).unwrap(), user(Some("app")).unwrap());
        assert_eq!(
            user(Some("4242")).unwrap(),
            User {
                uid: 4242,
                gid: 0,
                groups: vec![0],
                home: "/".into()
            }
        );
        assert_eq!(
            user(Some("app:other")).unwrap(),
            User {
                uid: 1000,
                gid: 3000,
                groups: vec![3000],
                home: "/home/app".into()
            }
        );
        assert_eq!(user(Some("4242:77")).unwrap().groups, vec![77]);
    }

    #[test]
    fn unknown_names_are_clear_errors() {
        assert!(
            user(Some("ghost"))
                .unwrap_err()
                .contains("\"ghost\" is not in the image's /etc/passwd")
        );
        assert!(user(Some("app:ghosts")).unwrap_err().contains("/etc/group"));
        assert!(user(Some("app:")).is_err());
        assert!(resolve(Some("app"), None, None).is_err());
        assert_eq!(resolve(Some("7"), None, None).unwrap().uid, 7);
    }
}
