//! Registry authentication inputs: `WWW-Authenticate` challenges and docker's config.json.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;

/// Why docker's config.json could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read docker config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("docker config {path} is not valid JSON; fix or remove it")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the credentials for {registry} in {path} are malformed (expected base64 of user:password); log in again")]
    BadAuth { registry: String, path: PathBuf },
}

/// A parsed `WWW-Authenticate` challenge (`Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased scheme: `bearer` or `basic`.
    pub scheme: String,
    /// Parameters, keys lowercased.
    pub params: HashMap<String, String>,
}

/// Parses one challenge; `None` when it is not of the `scheme k=v, k="v"` form.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut params = HashMap::new();
    let mut s = rest.trim_start();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            // Quoted string with backslash escapes.
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next().map(|(_, c)| c)),
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end?..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.insert(key.trim().to_ascii_lowercase(), value);
        s = next.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
    }
    Some(Challenge { scheme: scheme.to_ascii_lowercase(), params })
}

/// Where docker keeps credentials: `explicit`, else `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`.
pub fn docker_config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_owned());
    }
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The config.json keys docker may have used for `registry`.
fn keys_for(registry: &str) -> Vec<String> {
    if matches!(registry, "docker.io" | "index.docker.io" | "registry-1.docker.io") {
        [
            "https://index.docker.io/v1/",
            "index.docker.io",
            "docker.io",
            "registry-1.docker.io",
            "https://registry-1.docker.io",
        ]
        .map(str::to_owned)
        .to_vec()
    } else {
        vec![
            registry.to_owned(),
            format!("https://{registry}"),
            format!("http://{registry}"),
            format!("https://{registry}/v1/"),
        ]
    }
}

/// `(user, password)` for `registry` from the text of a docker config.json; `Ok(None)` when it
/// holds none (a credential helper, for instance, is not consulted).
pub fn credentials(
    config_json: &str,
    registry: &str,
    path: &Path,
) -> Result<Option<(String, String)>, AuthError> {
    let v: serde_json::Value = serde_json::from_str(config_json)
        .map_err(|source| AuthError::Json { path: path.to_owned(), source })?;
    let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else { return Ok(None) };
    let Some(entry) = keys_for(registry).iter().find_map(|k| auths.get(k)) else { return Ok(None) };
    let bad = || AuthError::BadAuth { registry: registry.to_owned(), path: path.to_owned() };
    if let Some(a) = entry.get("auth").and_then(|a| a.as_str()).filter(|a| !a.is_empty()) {
        let raw = base64::engine::general_purpose::STANDARD.decode(a.trim()).map_err(|_| bad())?;
        let text = String::from_utf8(raw).map_err(|_| bad())?;
        let (user, pass) = text.split_once(':').ok_or_else(bad)?;
        return Ok(Some((user.to_owned(), pass.to_owned())));
    }
    let field = |k: &str| entry.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    Ok(field("username").zip(field("password")))
}

/// Loads credentials for `registry` from the docker config file (a missing file is no error).
pub fn load_credentials(
    explicit: Option<&Path>,
    registry: &str,
) -> Result<Option<(String, String)>, AuthError> {
    let Some(path) = docker_config_path(explicit) else { return Ok(None) };
    match std::fs::read_to_string(&path) {
        Ok(text) => credentials(&text, registry, &path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => Ok(None),
        Err(source) => Err(AuthError::Read { path, source }),
    }
}

/// The `Authorization` value for basic credentials.
pub fn basic_header(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        )
        .expect("parse");
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/alpine:pull");
    }

    #[test]
    fn basic_unquoted_spaced_and_escaped_challenges() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#).expect("basic").params["realm"],
            "Registry Realm"
        );
        let c = parse_challenge(
            r#"Bearer realm = "https://x/token" , scope=repository:a/b:pull , error="in\"valid""#,
        )
        .expect("loose");
        assert_eq!(c.params["realm"], "https://x/token");
        assert_eq!(c.params["scope"], "repository:a/b:pull");
        assert_eq!(c.params["error"], "in\"valid");
        assert!(parse_challenge("").is_none());
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
    }

    #[test]
    fn docker_config_credentials() {
        let p = Path::new("/c.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("u:p:w");
        let cfg = format!(
            r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{auth}"}},"https://index.docker.io/v1/":{{"username":"a","password":"b"}},"https://ghcr.io":{{"auth":"{auth}"}}}},"credsStore":"desktop"}}"#
        );
        assert_eq!(
            credentials(&cfg, "127.0.0.1:5000", p).expect("ok"),
            Some(("u".into(), "p:w".into()))
        );
        assert_eq!(credentials(&cfg, "docker.io", p).expect("ok"), Some(("a".into(), "b".into())));
        assert_eq!(credentials(&cfg, "ghcr.io", p).expect("ok"), Some(("u".into(), "p:w".into())));
        assert_eq!(credentials(&cfg, "quay.io", p).expect("ok"), None);
        assert_eq!(credentials("{}", "quay.io", p).expect("ok"), None);
        assert!(matches!(
            credentials(r#"{"auths":{"x.io":{"auth":"!!"}}}"#, "x.io", p),
            Err(AuthError::BadAuth { .. })
        ));
        assert!(matches!(credentials("nope", "x.io", p), Err(AuthError::Json { .. })));
    }

    #[test]
    fn config_file_location() {
        let t = tempfile::tempdir().expect("tmp");
        let f = t.path().join("config.json");
        assert_eq!(docker_config_path(Some(&f)), Some(f.clone()));
        assert!(
            matches!(load_credentials(Some(&f), "x.io"), Err(AuthError::Read { .. })),
            "an explicit file must exist"
        );
        std::fs::write(&f, r#"{"auths":{"x.io":{"username":"me","password":"pw"}}}"#)
            .expect("write");
        assert_eq!(
            load_credentials(Some(&f), "x.io").expect("ok"),
            Some(("me".into(), "pw".into()))
        );
        assert_eq!(basic_header("me", "pw"), "Basic bWU6cHc=");
    }
}
