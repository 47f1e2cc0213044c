//! Image references as docker spells them: `[registry[:port]/]path[:tag][@sha256:digest]`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// The registry that short names like `alpine` resolve to.
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// Why a reference was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("image reference is empty")]
    Empty,
    #[error("image reference {reference:?} is malformed: {why}")]
    Malformed { reference: String, why: &'static str },
}

/// A parsed, normalised image reference.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageRef {
    /// Registry host, with port if any (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path (`library/alpine`).
    pub repository: String,
    /// Tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// Pinned manifest digest.
    pub digest: Option<Digest>,
}

impl ImageRef {
    /// True when the registry is on the loopback interface, where hearth speaks plain http.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => self.registry.as_str(),
        };
        host == "localhost" || host.starts_with("127.") || host == "[::1]"
    }

    /// What to ask the registry for: the digest when pinned, else the tag.
    pub fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_owned(),
        }
    }

    /// The form docker shows for this reference: short names without `docker.io/library/`.
    pub fn familiar(&self) -> String {
        let name = if self.registry == DEFAULT_REGISTRY {
            self.repository.strip_prefix("library/").unwrap_or(&self.repository).to_owned()
        } else {
            format!("{}/{}", self.registry, self.repository)
        };
        let mut out = name;
        if let Some(t) = &self.tag {
            out.push(':');
            out.push_str(t);
        }
        if let Some(d) = &self.digest {
            out.push('@');
            out.push_str(&d.to_string());
        }
        out
    }
}

fn malformed(reference: &str, why: &'static str) -> ReferenceError {
    ReferenceError::Malformed { reference: reference.to_owned(), why }
}

fn valid_path_component(c: &str) -> bool {
    // [a-z0-9]+ separated by '.', '_', '__' or runs of '-'.
    if c.is_empty() {
        return false;
    }
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'_' || x == b'.' || x == b'-')
}

fn valid_registry(r: &str) -> bool {
    // A host name's labels are never empty (`..`, `.x`, `x.` are no hosts); an IPv6 literal
    // in brackets has no dots.
    let host = r.rsplit_once(':').map_or(r, |(h, _)| h);
    let labels_ok = host.starts_with('[') || host.split('.').all(|l| !l.is_empty());
    !r.is_empty()
        && labels_ok
        && r.bytes().all(|x| {
            x.is_ascii_alphanumeric()
                || x == b'.'
                || x == b'-'
                || x == b':'
                || x == b'['
                || x == b']'
        })
}

impl FromStr for ImageRef {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if s.len() > 255 + 128 + 72 {
            return Err(malformed(s, "it is too long"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let d = d
                    .parse::<Digest>()
                    .map_err(|_| malformed(s, "the part after '@' is not a sha256 digest"))?;
                (r, Some(d))
            }
            None => (s, None),
        };
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(malformed(
                    s,
                    "the tag may hold only letters, digits, '_', '.' and '-' (at most 128)",
                ));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, p))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                if !valid_registry(first) {
                    return Err(malformed(s, "the registry host is not a valid host[:port]"));
                }
                (first.to_owned(), p.to_owned())
            }
            _ => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
        };
        if path.is_empty() {
            return Err(malformed(s, "the repository name is empty"));
        }
        if !path.split('/').all(valid_path_component) {
            return Err(malformed(s, "repository names are lowercase letters and digits, separated by '/', '.', '_' or '-'"));
        }
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_owned()),
        };
        Ok(Self { registry, repository, tag, digest })
    }
}

impl TryFrom<String> for ImageRef {
    type Error = ReferenceError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ImageRef> for String {
    fn from(r: ImageRef) -> String {
        r.to_string()
    }
}

impl fmt::Display for ImageRef {
    /// The fully qualified form (`docker.io/library/alpine:latest`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ImageRef {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn short_names_go_to_docker_hub_library() {
        let r = p("alpine");
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        assert_eq!(r.familiar(), "alpine:latest");
        assert!(!r.is_loopback());
    }

    #[test]
    fn registry_with_port_and_nested_path() {
        let r = p("127.0.0.1:5000/team/demo:1");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/demo");
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert!(r.is_loopback());
        assert!(p("localhost/x").is_loopback());
    }

    #[test]
    fn digest_pins() {
        let d = format!("sha256:{}", "0".repeat(64));
        let r = p(&format!("ghcr.io/a/b@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.reference(), d);
    }

    #[test]
    fn rejects_malformed() {
        for bad in ["", "UPPER", "a//b", "a:", "a:b c", "-a", "a@sha256:12", "host:5000/"] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad:?} should be refused");
        }
    }
}
