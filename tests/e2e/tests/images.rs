//! Image handling through the daemon: malicious layers and corrupt registries are refused and
//! leave nothing behind. No guest is booted.

use std::path::Path;

use hearth_e2e::{require_e2e, text, Daemon};

/// Path, type, link target.
type Entry<'a> = (&'a str, tar::EntryType, &'a str);

/// A tar whose single entry path is written raw (tar builders refuse `..`).
fn evil_tar(path: &Path, entries: &[(&str, tar::EntryType, &str)]) {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, link) in entries {
        let mut h = tar::Header::new_gnu();
        let n = &mut h.as_old_mut().name;
        n.fill(0);
        n[..name.len()].copy_from_slice(name.as_bytes());
        if !link.is_empty() {
            let l = &mut h.as_old_mut().linkname;
            l.fill(0);
            l[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(*kind);
        h.set_size(if *kind == tar::EntryType::Regular { 4 } else { 0 });
        h.set_mode(0o644);
        h.set_cksum();
        let data: &[u8] = if *kind == tar::EntryType::Regular { b"evil" } else { b"" };
        b.append(&h, data).expect("append");
    }
    std::fs::write(path, b.into_inner().expect("tar")).expect("write");
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p.clone());
            }
            out.push(p.display().to_string());
        }
    }
    out
}

#[test]
fn malicious_layers_are_rejected_naming_the_entry_and_write_nothing_outside() {
    require_e2e!();
    let d = Daemon::start();
    d.import_kernel();
    let work = tempfile::tempdir().expect("tmp");
    let target = work.path().join("target");
    std::fs::create_dir(&target).expect("mkdir");
    let dots = format!("../../../../../../../..{}/pwned", target.display());
    let cases: Vec<(&str, Vec<Entry>, &str)> = vec![
        (
            "dotdot",
            vec![
                ("bin/", tar::EntryType::Directory, ""),
                (dots.as_str(), tar::EntryType::Regular, ""),
            ],
            "pwned",
        ),
        (
            "symlink",
            vec![
                ("esc", tar::EntryType::Symlink, target.to_str().expect("utf8")),
                ("esc/pwned", tar::EntryType::Regular, ""),
            ],
            "esc/pwned",
        ),
        ("hardlink", vec![("h", tar::EntryType::Link, "../../../../etc/passwd")], "\"h\""),
    ];
    for (name, entries, needle) in cases {
        let tar = work.path().join(format!("{name}.tar"));
        evil_tar(&tar, &entries);
        let reference = format!("evil-{name}:1");
        // The layer is checked as the image is stored, so it never sits in the store as good.
        let out = d.hearth(&["image", "import", tar.to_str().expect("utf8"), "--name", &reference]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{name}: the import should fail");
        assert!(err.contains("outside the image root") && err.contains(needle), "{name}: {err}");
        assert_eq!(
            d.ok(&["image", "ls", "-q"]).trim(),
            "",
            "{name}: the refused image is not in the store"
        );
        let out = d.hearth(&["run", "--rm", "--pull", "never", &reference, "true"]);
        assert!(
            !out.status.success() && text(&out.stderr).contains("not in the store"),
            "{name}: {}",
            text(&out.stderr)
        );
        assert!(files_under(&target).is_empty(), "{name}: wrote {:?}", files_under(&target));
        assert_eq!(
            d.ok(&["ps", "-a", "-q"]).lines().count(),
            0,
            "{name}: a failed run with --rm leaves no VM"
        );
        let staging = d.root.path().join("images/tmp");
        assert!(
            files_under(&staging).is_empty(),
            "{name}: staging left behind: {:?}",
            files_under(&staging)
        );
        assert!(
            std::fs::read_dir(d.root.path().join("images/rootfs"))
                .expect("rootfs dir")
                .next()
                .is_none(),
            "{name}: no base image"
        );
    }
}

#[test]
fn a_corrupt_blob_fails_the_pull_with_a_digest_mismatch_and_stores_nothing() {
    require_e2e!();
    let reg = hearth_e2e::testutil::LocalRegistry::start().expect("registry");
    hearth_e2e::testutil::push_busybox(&reg, "demo:1", "").expect("push");
    let d = Daemon::start();
    let image = format!("{}/demo:1", reg.host());
    d.ok(&["image", "pull", &image]);
    let v: serde_json::Value =
        serde_json::from_str(&d.ok(&["image", "ls", "-o", "json"])).expect("json");
    let layer = v[0]["layers"][0].as_str().expect("layer").trim_start_matches("sha256:").to_owned();
    d.ok(&["image", "rm", &image]);
    std::fs::write(reg.blob_file(&layer), b"tampered").expect("corrupt");
    let out = d.hearth(&["image", "pull", &image]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("digest mismatch"), "{}", text(&out.stderr));
    assert_eq!(d.ok(&["image", "ls", "-q"]).trim(), "");
    let tmp = d.root.path().join("images/tmp");
    assert!(files_under(&tmp).is_empty(), "partial downloads left: {:?}", files_under(&tmp));
}

#[test]
fn a_registry_that_stalls_mid_blob_fails_the_pull_within_the_timeout() {
    require_e2e!();
    let reg = hearth_e2e::StallingRegistry::start();
    let d = Daemon::start_with(&["--registry-timeout", "2s"]);
    let started = std::time::Instant::now();
    let out = d.hearth(&["image", "pull", &reg.image()]);
    assert!(!out.status.success(), "a stalled pull must fail");
    assert!(
        text(&out.stderr).contains("stalled") && text(&out.stderr).contains("2 s"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "gave up after {:?}",
        started.elapsed()
    );
    assert_eq!(d.ok(&["image", "ls", "-q"]).trim(), "");
    let tmp = d.root.path().join("images/tmp");
    assert!(files_under(&tmp).is_empty(), "partial downloads left: {:?}", files_under(&tmp));
}
