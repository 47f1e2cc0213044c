//! Pulling from OCI/Docker registries (distribution API v2) with blocking `reqwest`.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use hearth_types::{Digest, ImageRecord, ImageRef};
use reqwest::blocking::{Client, Response};
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::StatusCode;

use crate::auth::{self, AuthError, Challenge};
use crate::oci::{self, Manifest, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use crate::store::{digest_of, now, ImageStore, StoreError};
use crate::Progress;

/// Manifests larger than this are refused (real ones are a few KiB).
const MAX_MANIFEST: u64 = 4 << 20;
/// Image configs larger than this are refused (real ones are a few KiB; history makes some
/// tens of KiB).
const MAX_CONFIG: u64 = 16 << 20;
/// Token service answers larger than this are refused.
const MAX_TOKEN_ANSWER: u64 = 1 << 20;
/// Redirects followed for one request (registries redirect blobs to a storage service once).
const MAX_REDIRECTS: usize = 5;
/// How long the registry may take to connect, to answer, or to send the next bytes of a blob.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How to reach the registry.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Plain http even for registries not on loopback (loopback ones always get http).
    pub insecure: bool,
    /// docker's config.json with credentials; default `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// The longest the registry may stay silent: to connect, to answer a request, between two
    /// reads of a blob. A stalled registry fails the pull after this long.
    pub timeout: Duration,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self { insecure: false, docker_config: None, timeout: DEFAULT_TIMEOUT }
    }
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("cannot reach registry {registry}")]
    Http {
        registry: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("registry {registry} stalled: nothing arrived for {} while {what}; try again, or raise the daemon's --registry-timeout", humantime_secs(*.timeout))]
    Stalled { registry: String, what: String, timeout: Duration },
    #[error("registry {registry} sent more than the {limit} bytes {what} may have; the registry is broken or hostile")]
    TooLarge { registry: String, what: String, limit: u64 },
    #[error("{what} was not found in {registry}: check the name and tag")]
    NotFound { registry: String, what: String },
    #[error("registry {registry} refused access to {what} ({status}): log in with docker (credentials are read from its config.json)")]
    Denied { registry: String, what: String, status: StatusCode },
    #[error("registry {registry} answered {status} for {what}")]
    Status { registry: String, what: String, status: StatusCode },
    #[error("registry {registry} sent a bad response: {why}")]
    Bad { registry: String, why: String },
    #[error("image {reference} has no linux/amd64 variant (it has: {available}); hearth runs amd64 guests only")]
    Platform { reference: String, available: String },
    #[error("layer {digest} of {reference} has media type {media_type:?}; hearth unpacks only tar, tar+gzip and tar+zstd layers")]
    MediaType { reference: String, digest: String, media_type: String },
    #[error("image {reference} is refused")]
    Refused {
        reference: String,
        #[source]
        source: crate::RootfsError,
    },
    #[error("docker credentials")]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn humantime_secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// Whether an I/O error is a read that timed out (reqwest reports it as `TimedOut`, or wraps a
/// timeout in its own error).
fn is_timeout(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::TimedOut
        || e.get_ref()
            .and_then(|inner| inner.downcast_ref::<reqwest::Error>())
            .is_some_and(reqwest::Error::is_timeout)
}

/// The error a [`Bounded`] read fails with.
#[derive(Debug, thiserror::Error)]
#[error("{0} is larger than its descriptor says")]
struct Overrun(String);

/// A body read that may not yield more than `limit` bytes: one more fails it.
struct Bounded<R> {
    inner: R,
    left: u64,
    what: String,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want =
            buf.len().min(usize::try_from(self.left.saturating_add(1)).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > self.left {
            return Err(std::io::Error::other(Overrun(self.what.clone())));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// One pull's connection to a registry repository, with the auth it negotiated.
struct Session {
    client: Client,
    base: String,
    registry: String,
    repo: String,
    auth: Option<String>,
    creds: Option<(String, String)>,
    timeout: Duration,
}

impl Session {
    fn http(&self, source: reqwest::Error) -> PullError {
        if source.is_redirect() {
            return self.bad(format!("it redirected more than {MAX_REDIRECTS} times"));
        }
        if source.is_timeout() {
            return PullError::Stalled {
                registry: self.registry.clone(),
                what: "waiting for an answer".into(),
                timeout: self.timeout,
            };
        }
        PullError::Http { registry: self.registry.clone(), source }
    }

    /// An error reading a body: a stall, an overrun, or a broken connection.
    fn read_error(&self, e: std::io::Error, what: &str, limit: u64) -> PullError {
        if is_timeout(&e) {
            return PullError::Stalled {
                registry: self.registry.clone(),
                what: format!("reading {what}"),
                timeout: self.timeout,
            };
        }
        if e.get_ref().is_some_and(|inner| inner.is::<Overrun>()) {
            return PullError::TooLarge {
                registry: self.registry.clone(),
                what: what.to_owned(),
                limit,
            };
        }
        self.bad(format!("reading {what}: {e}"))
    }

    fn bad(&self, why: impl Into<String>) -> PullError {
        PullError::Bad { registry: self.registry.clone(), why: why.into() }
    }

    /// GET with auth negotiation on a 401.
    fn get(&mut self, url: &str, accept: Option<&str>, what: &str) -> Result<Response, PullError> {
        let mut negotiated = false;
        loop {
            let mut req = self.client.get(url);
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            if let Some(a) = &self.auth {
                req = req.header(AUTHORIZATION, a);
            }
            let resp = req.send().map_err(|e| self.http(e))?;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            let (registry, what) = (self.registry.clone(), what.to_owned());
            match status {
                StatusCode::UNAUTHORIZED if !negotiated => {
                    negotiated = true;
                    let challenge = resp
                        .headers()
                        .get(WWW_AUTHENTICATE)
                        .and_then(|h| h.to_str().ok())
                        .and_then(auth::parse_challenge);
                    self.authenticate(
                        challenge.ok_or_else(|| {
                            self.bad("401 without a usable WWW-Authenticate challenge")
                        })?,
                        &what,
                    )?;
                }
                StatusCode::NOT_FOUND => return Err(PullError::NotFound { registry, what }),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    return Err(PullError::Denied { registry, what, status })
                }
                _ => return Err(PullError::Status { registry, what, status }),
            }
        }
    }

    fn authenticate(&mut self, c: Challenge, what: &str) -> Result<(), PullError> {
        let basic = self.creds.as_ref().map(|(u, p)| auth::basic_header(u, p));
        let denied = |status| PullError::Denied {
            registry: self.registry.clone(),
            what: what.to_owned(),
            status,
        };
        match c.scheme.as_str() {
            "basic" => {
                self.auth = Some(basic.ok_or_else(|| denied(StatusCode::UNAUTHORIZED))?);
                Ok(())
            }
            "bearer" => {
                let realm = c
                    .params
                    .get("realm")
                    .ok_or_else(|| self.bad("bearer challenge without a realm"))?;
                let scope = c
                    .params
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| format!("repository:{}:pull", self.repo));
                let mut query = vec![("scope", scope)];
                if let Some(s) = c.params.get("service") {
                    query.push(("service", s.clone()));
                }
                let mut req = self.client.get(realm).query(&query);
                if let Some(b) = basic {
                    req = req.header(AUTHORIZATION, b);
                }
                let resp = req.send().map_err(|e| self.http(e))?;
                if !resp.status().is_success() {
                    return Err(denied(resp.status()));
                }
                let mut answer = Vec::new();
                Bounded { inner: resp, left: MAX_TOKEN_ANSWER, what: "the token answer".into() }
                    .read_to_end(&mut answer)
                    .map_err(|e| self.read_error(e, "the token answer", MAX_TOKEN_ANSWER))?;
                let v: serde_json::Value = serde_json::from_slice(&answer)
                    .map_err(|e| self.bad(format!("the token answer is not JSON: {e}")))?;
                let token = v
                    .get("token")
                    .or_else(|| v.get("access_token"))
                    .and_then(|t| t.as_str())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| self.bad("the token service answered without a token"))?;
                self.auth = Some(format!("Bearer {token}"));
                Ok(())
            }
            other => Err(self.bad(format!("unsupported authentication scheme {other:?}"))),
        }
    }

    /// Fetches a manifest or index, verifying its digest when the reference pins one.
    fn manifest(&mut self, reference: &str) -> Result<(Vec<u8>, Digest), PullError> {
        let url = format!("{}/{}/manifests/{}", self.base, self.repo, reference);
        let accept = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST].join(", ");
        let what = format!("{}:{}", self.repo, reference);
        let resp = self.get(&url, Some(&accept), &what)?;
        let mut bytes = Vec::new();
        let label = format!("manifest {what}");
        Bounded { inner: resp, left: MAX_MANIFEST, what: label.clone() }
            .read_to_end(&mut bytes)
            .map_err(|e| self.read_error(e, &label, MAX_MANIFEST))?;
        let digest = digest_of(&bytes);
        if let Ok(expected) = reference.parse::<Digest>() {
            if expected != digest {
                return Err(StoreError::DigestMismatch {
                    what: format!("manifest {what}"),
                    expected,
                    actual: digest,
                }
                .into());
            }
        }
        Ok((bytes, digest))
    }
}

fn parse_digest(s: &str, reference: &ImageRef) -> Result<Digest, PullError> {
    s.parse().map_err(|_| PullError::Bad {
        registry: reference.registry.clone(),
        why: format!("{s:?} is not a sha256 digest"),
    })
}

impl ImageStore {
    /// Pulls `r` (the linux/amd64 image of multi-platform ones), verifying every digest and
    /// reusing blobs already stored. The name moves to this image if another one had it.
    pub fn pull(
        &self,
        r: &ImageRef,
        opts: &PullOptions,
        progress: &dyn Progress,
    ) -> Result<ImageRecord, PullError> {
        let mut s = Session::open(r, opts)?;
        let (bytes, digest, m) = s.amd64_manifest(r)?;
        let config = s.check_manifest(&m, r)?;
        let config_digest = parse_digest(&config.digest, r)?;
        let mut layers = Vec::new();
        let mut size = 0;
        for (i, desc) in std::iter::once(&config).chain(&m.layers).enumerate() {
            let d = parse_digest(&desc.digest, r)?;
            if i > 0 {
                layers.push(d.clone());
                size += desc.size;
            }
            if !self.has_blob(&d) {
                self.fetch_blob(&mut s, &d, desc.size, progress)?;
            }
        }
        self.put_blob(&bytes[..], Some(&digest), &|_| {})?;
        let cfg = oci::parse_config(&self.read_blob(&config_digest)?)
            .map_err(|e| s.bad(format!("the image config of {r} is not valid JSON: {e}")))?;
        let rec = ImageRecord {
            names: vec![r.to_string()],
            id: config_digest,
            manifest_digest: Some(digest),
            layers,
            config: cfg,
            size,
            created_at: now(),
        };
        // Verified before it is stored: every layer unpacks safely and is what the config
        // promises (its diff_id), so an image that run would refuse is refused now.
        self.rootfs(&rec)
            .map_err(|source| PullError::Refused { reference: r.to_string(), source })?;
        Ok(self.save(&rec)?)
    }

    /// Downloads one blob into the store, never more than its descriptor's `size`: a registry
    /// cannot fill the disk.
    fn fetch_blob(
        &self,
        s: &mut Session,
        d: &Digest,
        size: u64,
        progress: &dyn Progress,
    ) -> Result<(), PullError> {
        let url = format!("{}/{}/blobs/{}", s.base, s.repo, d);
        let resp = s.get(&url, None, &format!("blob {d}"))?;
        let name = d.to_string();
        progress.start(&name, size);
        let body = Bounded { inner: resp, left: size, what: format!("blob {d}") };
        match self.put_blob(body, Some(d), &|n| progress.advance(&name, n)) {
            Err(StoreError::Source(e)) => return Err(s.read_error(e, &format!("blob {d}"), size)),
            other => other?,
        };
        progress.finish(&name);
        Ok(())
    }
}

impl Session {
    /// A session with the registry `r` names: http for `--insecure` and loopback registries.
    fn open(r: &ImageRef, opts: &PullOptions) -> Result<Self, PullError> {
        let plain = opts.insecure || r.is_loopback();
        let host = if r.registry == hearth_types::reference::DEFAULT_REGISTRY {
            "registry-1.docker.io"
        } else {
            r.registry.as_str()
        };
        // The blocking client applies `timeout` to connecting, to each answer and to every
        // read of a body: a stall anywhere fails, a slow but steady blob does not.
        let client = Client::builder()
            .timeout(opts.timeout)
            .connect_timeout(opts.timeout)
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            .user_agent(concat!("hearth/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| PullError::Http { registry: r.registry.clone(), source })?;
        Ok(Session {
            client,
            base: format!("{}://{host}/v2", if plain { "http" } else { "https" }),
            registry: r.registry.clone(),
            repo: r.repository.clone(),
            auth: None,
            creds: auth::load_credentials(opts.docker_config.as_deref(), &r.registry)?,
            timeout: opts.timeout,
        })
    }

    /// The image's manifest (its bytes, digest and parse), through the index's linux/amd64
    /// entry when `r` names an index.
    fn amd64_manifest(&mut self, r: &ImageRef) -> Result<(Vec<u8>, Digest, Manifest), PullError> {
        let parse = |bytes: &[u8], s: &Session| -> Result<Manifest, PullError> {
            serde_json::from_slice(bytes)
                .map_err(|e| s.bad(format!("manifest of {r} is not valid JSON: {e}")))
        };
        let (bytes, digest) = self.manifest(&r.reference())?;
        let m = parse(&bytes, self)?;
        if !m.is_index() {
            return Ok((bytes, digest, m));
        }
        let pick = m
            .pick_amd64()
            .map_err(|have| PullError::Platform {
                reference: r.to_string(),
                available: have.join(", "),
            })?
            .digest
            .clone();
        let (bytes, digest) = self.manifest(&pick)?;
        let m = parse(&bytes, self)?;
        if m.is_index() {
            return Err(self.bad(format!("the linux/amd64 entry of {r} is another index")));
        }
        Ok((bytes, digest, m))
    }

    /// The manifest's config descriptor, once the config is small enough and every layer is a
    /// layer type hearth unpacks.
    fn check_manifest(&self, m: &Manifest, r: &ImageRef) -> Result<oci::Descriptor, PullError> {
        let config = m
            .config
            .clone()
            .ok_or_else(|| self.bad(format!("the manifest of {r} has no config")))?;
        if config.size > MAX_CONFIG {
            return Err(PullError::TooLarge {
                registry: self.registry.clone(),
                what: format!("the config of {r}"),
                limit: MAX_CONFIG,
            });
        }
        if let Some(l) = m.layers.iter().find(|l| !oci::is_layer_type(&l.media_type)) {
            return Err(PullError::MediaType {
                reference: r.to_string(),
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
            });
        }
        Ok(config)
    }
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
