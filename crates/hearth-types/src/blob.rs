//! Bytes kept exactly through JSON records: a cloud-init file may be gzip (valid cloud-init user
//! data) or any other binary, and must reach the guest byte for byte.

use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes, written as a JSON string when they are UTF-8 (records written before this type read
/// as they are) and as `{"base64": "..."}` otherwise.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Blob(pub Vec<u8>);

impl Blob {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bytes as text, with what is not UTF-8 replaced (for a service that only carries
    /// text, such as Firecracker's MMDS).
    pub fn to_text_lossy(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) => write!(f, "{s:?}"),
            Err(_) => write!(f, "<{} bytes>", self.0.len()),
        }
    }
}

impl From<&str> for Blob {
    fn from(s: &str) -> Self {
        Self(s.as_bytes().to_vec())
    }
}

impl From<String> for Blob {
    fn from(s: String) -> Self {
        Self(s.into_bytes())
    }
}

impl From<Vec<u8>> for Blob {
    fn from(b: Vec<u8>) -> Self {
        Self(b)
    }
}

impl PartialEq<&str> for Blob {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Form {
    Text(String),
    Binary { base64: String },
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                Form::Binary { base64: base64::engine::general_purpose::STANDARD.encode(&self.0) }
                    .serialize(s)
            }
        }
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Form::deserialize(d)? {
            Form::Text(t) => Ok(Self(t.into_bytes())),
            Form::Binary { base64 } => base64::engine::general_purpose::STANDARD
                .decode(base64)
                .map(Self)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stays_a_string_and_binary_round_trips_exactly() {
        let text = Blob::from("#cloud-config\nhostname: a\n");
        assert_eq!(
            serde_json::to_string(&text).expect("json"),
            "\"#cloud-config\\nhostname: a\\n\""
        );
        let gzip = Blob(vec![0x1f, 0x8b, 0x08, 0x00, 0xff, 0xfe, 0x00]);
        let json = serde_json::to_string(&gzip).expect("json");
        assert!(json.starts_with("{\"base64\":"), "{json}");
        for b in [text, gzip] {
            let back: Blob =
                serde_json::from_str(&serde_json::to_string(&b).expect("json")).expect("back");
            assert_eq!(back, b);
        }
        assert!(serde_json::from_str::<Blob>("{\"base64\":\"!!\"}").is_err());
    }
}
