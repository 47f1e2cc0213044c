//! Pulling from OCI/Docker registries (distribution API v2).

use std::collections::HashMap;
use std::path::PathBuf;

use base64::Engine;
use hearth_types::{Digest, ImageRecord, ImageRef};
use reqwest::blocking::{Client, Response};
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use sha2::{Digest as _, Sha256};

use crate::oci::{self, Manifest, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use crate::{now, ImageError, ImageStore, Progress};

/// How to reach the registry.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Plain http (and no TLS verification) even for non-loopback registries.
    pub insecure: bool,
    /// docker's config.json with credentials; default `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
}

/// Why a registry request failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot reach registry {registry}: {source}")]
    Http {
        registry: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{what} was not found in {registry}: check the name and tag")]
    NotFound { registry: String, what: String },
    #[error("registry {registry} refused access to {what} ({status}): log in (credentials in ~/.docker/config.json)")]
    Denied { registry: String, what: String, status: StatusCode },
    #[error("registry {registry} answered {status} for {what}")]
    Status { registry: String, what: String, status: StatusCode },
    #[error("registry {registry} sent a bad response: {why}")]
    Bad { registry: String, why: String },
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: HashMap<String, String>,
}

/// Parses `Bearer realm="...",service="...",scope="..."`.
pub fn parse_challenge(h: &str) -> Option<Challenge> {
    let (scheme, rest) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    let mut params = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let after = after.trim_start();
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.insert(k.trim().to_ascii_lowercase(), v.to_owned());
        s = next.trim_start_matches([',', ' ']);
    }
    Some(Challenge { scheme: scheme.to_ascii_lowercase(), params })
}

/// `user:password` for `registry` from a docker config.json.
pub fn credentials(config_json: &str, registry: &str) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(config_json).ok()?;
    let auths = v.get("auths")?.as_object()?;
    let keys = if registry == "docker.io" {
        vec!["https://index.docker.io/v1/".to_owned(), "docker.io".to_owned(), "registry-1.docker.io".to_owned()]
    } else {
        vec![registry.to_owned(), format!("https://{registry}"), format!("http://{registry}")]
    };
    let entry = keys.iter().find_map(|k| auths.get(k))?;
    if let Some(a) = entry.get("auth").and_then(|a| a.as_str()) {
        let raw = base64::engine::general_purpose::STANDARD.decode(a).ok()?;
        let s = String::from_utf8(raw).ok()?;
        let (u, p) = s.split_once(':')?;
        return Some((u.to_owned(), p.to_owned()));
    }
    Some((entry.get("username")?.as_str()?.to_owned(), entry.get("password")?.as_str()?.to_owned()))
}

struct Session<'a> {
    client: Client,
    base: String,
    registry: String,
    repo: String,
    auth: Option<String>,
    creds: Option<(String, String)>,
    _opts: &'a PullOptions,
}

impl Session<'_> {
    fn err(&self, source: reqwest::Error) -> RegistryError {
        RegistryError::Http { registry: self.registry.clone(), source }
    }

    /// GET with auth negotiation on 401.
    fn get(&mut self, url: &str, accept: Option<&str>, what: &str) -> Result<Response, RegistryError> {
        for attempt in 0..2 {
            let mut req = self.client.get(url);
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            if let Some(a) = &self.auth {
                req = req.header(AUTHORIZATION, a);
            }
            let resp = req.send().map_err(|e| self.err(e))?;
            match resp.status() {
                s if s.is_success() => return Ok(resp),
                StatusCode::UNAUTHORIZED if attempt == 0 => {
                    let challenge = resp.headers().get(WWW_AUTHENTICATE).and_then(|h| h.to_str().ok()).and_then(parse_challenge);
                    self.authenticate(challenge)?;
                }
                StatusCode::NOT_FOUND => return Err(RegistryError::NotFound { registry: self.registry.clone(), what: what.to_owned() }),
                s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                    return Err(RegistryError::Denied { registry: self.registry.clone(), what: what.to_owned(), status: s })
                }
                s => return Err(RegistryError::Status { registry: self.registry.clone(), what: what.to_owned(), status: s }),
            }
        }
        Err(RegistryError::Denied { registry: self.registry.clone(), what: what.to_owned(), status: StatusCode::UNAUTHORIZED })
    }

    fn authenticate(&mut self, c: Option<Challenge>) -> Result<(), RegistryError> {
        let bad = |why: &str| RegistryError::Bad { registry: self.registry.clone(), why: why.to_owned() };
        let c = c.ok_or_else(|| bad("401 without a WWW-Authenticate challenge"))?;
        let basic =
            self.creds.as_ref().map(|(u, p)| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))));
        if c.scheme == "basic" {
            self.auth = Some(basic.ok_or_else(|| RegistryError::Denied {
                registry: self.registry.clone(),
                what: self.repo.clone(),
                status: StatusCode::UNAUTHORIZED,
            })?);
            return Ok(());
        }
        let realm = c.params.get("realm").ok_or_else(|| bad("bearer challenge without realm"))?;
        let mut req = self.client.get(realm);
        let scope = c.params.get("scope").cloned().unwrap_or_else(|| format!("repository:{}:pull", self.repo));
        let mut q = vec![("scope", scope)];
        if let Some(s) = c.params.get("service") {
            q.push(("service", s.clone()));
        }
        req = req.query(&q);
        if let Some(b) = basic {
            req = req.header(AUTHORIZATION, b);
        }
        let resp = req.send().map_err(|e| self.err(e))?;
        if !resp.status().is_success() {
            return Err(RegistryError::Denied { registry: self.registry.clone(), what: self.repo.clone(), status: resp.status() });
        }
        let v: serde_json::Value = resp.json().map_err(|e| self.err(e))?;
        let token = v
            .get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| bad("token response without a token"))?;
        self.auth = Some(format!("Bearer {token}"));
        Ok(())
    }

    fn manifest(&mut self, reference: &str) -> Result<(Vec<u8>, Digest), ImageError> {
        let url = format!("{}/{}/manifests/{}", self.base, self.repo, reference);
        let accept = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST].join(", ");
        let what = format!("{}:{}", self.repo, reference);
        let resp = self.get(&url, Some(&accept), &what)?;
        let bytes = resp.bytes().map_err(|e| self.err(e))?.to_vec();
        let digest = Digest::from_hex(&hex::encode(Sha256::digest(&bytes))).map_err(|e| ImageError::Format(e.to_string()))?;
        if let Ok(expected) = reference.parse::<Digest>() {
            if expected != digest {
                return Err(ImageError::DigestMismatch {
                    what: format!("manifest {what}"),
                    expected: expected.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        Ok((bytes, digest))
    }
}

fn docker_config(opts: &PullOptions) -> Option<String> {
    let path = opts.docker_config.clone().or_else(|| {
        std::env::var_os("DOCKER_CONFIG")
            .map(|d| PathBuf::from(d).join("config.json"))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")))
    })?;
    std::fs::read_to_string(path).ok()
}

impl ImageStore {
    /// Pulls `r` (linux/amd64 from multi-arch images), verifying every digest.
    pub fn pull(&self, r: &ImageRef, opts: &PullOptions, progress: &dyn Progress) -> Result<ImageRecord, ImageError> {
        let plain = opts.insecure || r.is_loopback();
        let host = if r.registry == "docker.io" { "registry-1.docker.io" } else { r.registry.as_str() };
        let client = Client::builder()
            .danger_accept_invalid_certs(opts.insecure)
            .timeout(None)
            .connect_timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|source| RegistryError::Http { registry: r.registry.clone(), source })?;
        let mut s = Session {
            client,
            base: format!("{}://{host}/v2", if plain { "http" } else { "https" }),
            registry: r.registry.clone(),
            repo: r.repository.clone(),
            auth: None,
            creds: docker_config(opts).and_then(|c| credentials(&c, &r.registry)),
            _opts: opts,
        };
        let (mut bytes, mut digest) = s.manifest(&r.reference())?;
        let mut m: Manifest = serde_json::from_slice(&bytes).map_err(|e| ImageError::Format(format!("manifest of {r}: {e}")))?;
        if m.is_index() {
            let pick = m.pick_amd64().map_err(ImageError::Format)?.digest.clone();
            (bytes, digest) = s.manifest(&pick)?;
            m = serde_json::from_slice(&bytes).map_err(|e| ImageError::Format(format!("manifest of {r}: {e}")))?;
        }
        self.put_blob(&bytes[..], Some(&digest), &|_| {})?;
        let config = m.config.clone().ok_or_else(|| ImageError::Format(format!("{r}: manifest has no config")))?;
        let config_digest: Digest =
            config.digest.parse().map_err(|_| ImageError::Format(format!("bad config digest {}", config.digest)))?;
        let mut layers = Vec::new();
        let mut size = 0;
        for desc in std::iter::once(&config).chain(m.layers.iter()) {
            let d: Digest = desc.digest.parse().map_err(|_| ImageError::Format(format!("bad digest {}", desc.digest)))?;
            if desc.digest != config.digest {
                layers.push(d.clone());
                size += desc.size;
            }
            if self.has_blob(&d) {
                continue;
            }
            let url = format!("{}/{}/blobs/{}", s.base, s.repo, d);
            let resp = s.get(&url, None, &format!("blob {d}"))?;
            progress.start(&desc.digest, desc.size);
            let name = desc.digest.clone();
            self.put_blob(resp, Some(&d), &|n| progress.advance(&name, n))?;
            progress.finish(&desc.digest);
        }
        let cfg =
            oci::parse_config(&self.read_blob(&config_digest)?).map_err(|e| ImageError::Format(format!("image config of {r}: {e}")))?;
        let rec = ImageRecord {
            names: vec![r.to_string()],
            id: config_digest,
            manifest_digest: Some(digest),
            layers,
            config: cfg,
            size,
            created_at: now(),
        };
        self.save(&rec)?;
        Ok(self.get(&rec.id.to_string())?.unwrap_or(rec))
    }
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
        assert_eq!(c.params["scope"], "repository:library/alpine:pull");
        assert_eq!(parse_challenge(r#"Basic realm="x""#).expect("basic").scheme, "basic");
    }

    #[test]
    fn docker_config_credentials() {
        let auth = base64::engine::general_purpose::STANDARD.encode("u:p:w");
        let cfg = format!(
            r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{auth}"}},"https://index.docker.io/v1/":{{"username":"a","password":"b"}}}}}}"#
        );
        assert_eq!(credentials(&cfg, "127.0.0.1:5000"), Some(("u".into(), "p:w".into())));
        assert_eq!(credentials(&cfg, "docker.io"), Some(("a".into(), "b".into())));
        assert_eq!(credentials(&cfg, "quay.io"), None);
    }
}

#[cfg(all(test, feature = "testutil"))]
mod registry_tests {
    use crate::testutil::{push_busybox, LocalRegistry};
    use crate::{ImageStore, NoProgress, PullOptions};

    fn tools() -> bool {
        ["docker-registry", "skopeo", "mkfs.ext4"]
            .iter()
            .all(|t| std::process::Command::new("sh").arg("-c").arg(format!("command -v {t}")).output().is_ok_and(|o| o.status.success()))
            && std::path::Path::new("/bin/busybox").exists()
    }

    #[test]
    fn pull_from_a_local_registry_and_build_the_rootfs() {
        if !tools() {
            eprintln!("skipping: needs docker-registry, skopeo, mkfs.ext4 and busybox-static");
            return;
        }
        let reg = LocalRegistry::start().expect("registry");
        push_busybox(&reg, "demo:1", "app").expect("push");
        let t = tempfile::tempdir().expect("tmp");
        let s = ImageStore::open(t.path()).expect("open");
        let r = format!("{}/demo:1", reg.host()).parse().expect("ref");
        let rec = s.pull(&r, &PullOptions::default(), &NoProgress).expect("pull");
        assert_eq!((rec.config.user.as_str(), rec.config.working_dir.as_str()), ("app", "/work"));
        let again = s.pull(&r, &PullOptions::default(), &NoProgress).expect("pull again");
        assert_eq!(again.id, rec.id);
        let img = s.rootfs(&rec).expect("rootfs");
        let ls = std::process::Command::new("debugfs").args(["-R", "ls -l /bin"]).arg(&img).output().expect("debugfs");
        assert!(String::from_utf8_lossy(&ls.stdout).contains("busybox"));

        // A corrupted blob in the registry is caught by digest verification.
        let t2 = tempfile::tempdir().expect("tmp");
        let s2 = ImageStore::open(t2.path()).expect("open");
        let layer = rec.layers[0].hex().to_owned();
        std::fs::write(reg.blob_file(&layer), b"corrupt").expect("corrupt");
        let e = s2.pull(&r, &PullOptions::default(), &NoProgress).expect_err("mismatch");
        assert!(e.to_string().contains("digest mismatch"), "{e}");
        assert!(s2.list().expect("list").is_empty());
        let missing = format!("{}/nope:1", reg.host()).parse().expect("ref");
        let e = s2.pull(&missing, &PullOptions::default(), &NoProgress).expect_err("missing");
        assert!(e.to_string().contains("not found"), "{e}");
    }
}
