//! OCI `User` resolution against an image's /etc/passwd and /etc/group, as docker resolves it.
//! hearth-init runs it in the guest (no NSS: the binary is static and must not load glibc's
//! modules), and hearthd runs the same function at create, so a USER the image lacks is
//! refused before any VM exists.

/// Who to run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

fn passwd_line(passwd: &str, pred: impl Fn(&[&str]) -> bool) -> Option<Vec<&str>> {
    passwd.lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f.len() >= 7 && pred(f))
}

/// Resolves `user`, `uid`, `user:group`, `uid:gid` (empty = root).
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Ids, String> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let u = if u.is_empty() { "0" } else { u };
    let entry = match u.parse::<u32>() {
        Ok(uid) => passwd_line(passwd, |f| f[2] == uid.to_string()),
        Err(_) => passwd_line(passwd, |f| f[0] == u),
    };
    let (uid, mut gid, name, home) = match (&entry, u.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse().map_err(|_| format!("bad uid for {u} in /etc/passwd"))?,
            f[3].parse().map_err(|_| format!("bad gid for {u} in /etc/passwd"))?,
            f[0].to_owned(),
            f[5].to_owned(),
        ),
        (None, Ok(uid)) => (uid, uid, String::new(), "/".to_owned()),
        (None, Err(_)) => {
            return Err(format!("unable to find user {u}: no matching entries in /etc/passwd"))
        }
    };
    let groups_of = |f: &[&str]| -> Option<u32> { f.get(2)?.parse().ok() };
    let glines: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect())
        .filter(|f: &Vec<&str>| f.len() >= 3)
        .collect();
    if let Some(g) = g {
        gid =
            match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => glines.iter().find(|f| f[0] == g).and_then(|f| groups_of(f)).ok_or_else(
                    || format!("unable to find group {g}: no matching entries in /etc/group"),
                )?,
            };
    }
    let mut groups = vec![gid];
    if !name.is_empty() {
        for f in &glines {
            if f.get(3).is_some_and(|m| m.split(',').any(|x| x == name)) {
                if let Some(id) = groups_of(f) {
                    if !groups.contains(&id) {
                        groups.push(id);
                    }
                }
            }
        }
    }
    Ok(Ids { uid, gid, groups, home: if home.is_empty() { "/".into() } else { home } })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nwheel:x:10:app\n";

    #[test]
    fn names_numbers_and_groups() {
        assert_eq!(resolve("", PASSWD, GROUP).expect("root").uid, 0);
        let app = resolve("app", PASSWD, GROUP).expect("app");
        assert_eq!(
            (app.uid, app.gid, app.groups.clone(), app.home.as_str()),
            (1000, 1000, vec![1000, 10], "/home/app")
        );
        assert_eq!(resolve("1000:wheel", PASSWD, GROUP).expect("uid:group").gid, 10);
        assert_eq!(resolve("4242", PASSWD, GROUP).expect("unknown uid is fine").uid, 4242);
        assert!(resolve("ghost", PASSWD, GROUP).expect_err("unknown").contains("ghost"));
    }
}
