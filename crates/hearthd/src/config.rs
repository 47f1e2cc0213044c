//! hearthd's configuration file (`--config FILE`, TOML), as `hearth host provision --all` writes
//! it: each key is one of hearthd's long flags (`flintlock-listen = "0.0.0.0:9090"`,
//! `thin-pool = "hearth-thinpool"`, `insecure = true`; `_` may stand for `-`), so the file says
//! exactly what the flags can. A key that is not a flag is refused with its name, as is a
//! value of the wrong kind; flags on the command line win over the file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The config file's path in `argv` (`--config FILE` or `--config=FILE`), if any.
fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(p.into());
        }
    }
    None
}

/// `argv` with the config file's settings put before the command line's own arguments (so a
/// flag given on both is the command line's). `flags` are the long flags hearthd has and
/// whether each takes a value.
pub fn with_config(argv: Vec<OsString>, flags: &[(String, bool)]) -> anyhow::Result<Vec<OsString>> {
    let Some(path) = config_path(&argv) else { return Ok(argv) };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    let from_file = settings(&text, &path, flags)?;
    let mut out = Vec::with_capacity(argv.len() + from_file.len());
    out.extend(argv.first().cloned());
    out.extend(from_file.into_iter().map(OsString::from));
    out.extend(argv.into_iter().skip(1));
    Ok(out)
}

/// The file's settings as command-line arguments.
fn settings(text: &str, path: &Path, flags: &[(String, bool)]) -> anyhow::Result<Vec<String>> {
    let table: toml::Table =
        text.parse().with_context(|| format!("{} is not valid TOML", path.display()))?;
    let mut args = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let Some((_, takes_value)) = flags
            .iter()
            .find(|(f, _)| *f == flag && !["config", "help", "version"].contains(&f.as_str()))
        else {
            bail!(
                "{}: unknown key {key:?}: the keys are hearthd's long flags (see `hearthd --help`)",
                path.display()
            );
        };
        let kind = |what: &str| anyhow::anyhow!("{}: {key} must be {what}", path.display());
        match (value, takes_value) {
            (toml::Value::Boolean(on), false) => {
                if on {
                    args.push(format!("--{flag}"));
                }
            }
            (_, false) => return Err(kind("true or false")),
            (toml::Value::String(s), true) => args.extend([format!("--{flag}"), s]),
            (toml::Value::Integer(n), true) => args.extend([format!("--{flag}"), n.to_string()]),
            (_, true) => return Err(kind("a string or a number")),
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Vec<(String, bool)> {
        [
            ("root", true),
            ("insecure", false),
            ("thin-pool", true),
            ("log-max-files", true),
            ("config", true),
        ]
        .into_iter()
        .map(|(f, v)| (f.to_owned(), v))
        .collect()
    }

    #[test]
    fn keys_are_flags_and_the_command_line_comes_after_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("hearthd.toml");
        std::fs::write(
            &file,
            "root = \"/srv/hearth\"\ninsecure = true\nthin_pool = \"p\"\nlog-max-files = 3\n",
        )
        .expect("write");
        let argv: Vec<OsString> =
            ["hearthd", "--config", file.to_str().expect("utf8"), "--root", "/other"]
                .map(OsString::from)
                .to_vec();
        let out = with_config(argv, &flags()).expect("config");
        let out: Vec<String> = out.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        let file_part = &out[1..out.len() - 4];
        for pair in [["--root", "/srv/hearth"], ["--thin-pool", "p"], ["--log-max-files", "3"]] {
            assert!(file_part.windows(2).any(|w| w == pair), "{pair:?} in {out:?}");
        }
        assert!(file_part.contains(&"--insecure".to_owned()));
        assert_eq!(out[out.len() - 2..], ["--root", "/other"], "the command line is last");
        let none: Vec<OsString> = ["hearthd", "--root", "/r"].map(OsString::from).to_vec();
        assert_eq!(with_config(none.clone(), &flags()).expect("no file"), none);
    }

    #[test]
    fn an_unknown_key_or_a_wrong_kind_is_refused_by_name() {
        let p = Path::new("/etc/hearth/hearthd.toml");
        let e = settings("flintlock_lisen = \"x\"", p, &flags()).expect_err("unknown");
        assert!(e.to_string().contains("unknown key \"flintlock_lisen\""), "{e}");
        let e = settings("insecure = \"yes\"", p, &flags()).expect_err("kind");
        assert!(e.to_string().contains("insecure must be true or false"), "{e}");
        let e = settings("root = [1]", p, &flags()).expect_err("kind");
        assert!(e.to_string().contains("root must be a string"), "{e}");
        assert!(settings("config = \"x\"", p, &flags()).is_err(), "no config in a config");
        assert!(settings("root = ", p, &flags()).is_err(), "bad TOML");
    }
}
