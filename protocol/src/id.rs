//! Content ids: the blake3 hash of a blob or chunk, written `b3:<64 lowercase hex>`.

use std::fmt;
use std::str::FromStr;

/// Prefix of every content id in text form.
pub const PREFIX: &str = "b3:";

/// The blake3 hash of some bytes: a blob, a chunk, a chunk map or a manifest payload.
///
/// Chunks and blobs share this type: a chunk is named by the hash of its bytes exactly as a blob is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId([u8; 32]);

/// Why a string is not a content id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("content id {0:?} does not start with \"b3:\"")]
    Prefix(String),
    #[error("content id {0:?} must have exactly 64 hex digits after \"b3:\"")]
    Length(String),
    #[error("content id {0:?} must use lowercase hex digits only")]
    Digits(String),
    #[error("hex name {0:?} is not 64 lowercase hex digits")]
    Hex(String),
}

impl BlobId {
    /// Hashes `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn from_hash(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex digits, without the `b3:` prefix (used in file names and S3 keys).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 lowercase hex digits without a prefix (a file or key name).
    pub fn from_hex(s: &str) -> Result<Self, IdError> {
        parse_hex(s).ok_or_else(|| IdError::Hex(s.to_owned()))
    }

    /// A short form for logs: the first 12 hex digits.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

fn parse_hex(s: &str) -> Option<BlobId> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(BlobId(out))
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.to_hex())
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.short())
    }
}

impl FromStr for BlobId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        let Some(rest) = s.strip_prefix(PREFIX) else {
            return Err(IdError::Prefix(s.to_owned()));
        };
        if rest.len() != 64 {
            return Err(IdError::Length(s.to_owned()));
        }
        parse_hex(rest).ok_or_else(|| IdError::Digits(s.to_owned()))
    }
}

impl serde::Serialize for BlobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for BlobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_everything_else() {
        let id = BlobId::of(b"hello");
        let text = id.to_string();
        assert_eq!(text.len(), 67);
        assert_eq!(text.parse::<BlobId>().unwrap(), id);
        assert_eq!(BlobId::from_hex(&id.to_hex()).unwrap(), id);

        let upper = format!("b3:{}", id.to_hex().to_uppercase());
        assert!(matches!(upper.parse::<BlobId>(), Err(IdError::Digits(_))));
        assert!(matches!(
            id.to_hex().parse::<BlobId>(),
            Err(IdError::Prefix(_))
        ));
        assert!(matches!(
            format!("B3:{}", id.to_hex()).parse::<BlobId>(),
            Err(IdError::Prefix(_))
        ));
        assert!(matches!(
            format!("{text}0").parse::<BlobId>(),
            Err(IdError::Length(_))
        ));
        assert!(matches!(
            text[..66].parse::<BlobId>(),
            Err(IdError::Length(_))
        ));
        assert!(matches!(
            format!("b3:{}g", &id.to_hex()[..63]).parse::<BlobId>(),
            Err(IdError::Digits(_))
        ));
        assert!(matches!(
            format!(" {text}").parse::<BlobId>(),
            Err(IdError::Prefix(_))
        ));
        assert!(matches!("b3:".parse::<BlobId>(), Err(IdError::Length(_))));
        // A multi-byte character must not slip through a length check.
        let sneaky = format!("b3:{}é", &id.to_hex()[..62]);
        assert!(sneaky.parse::<BlobId>().is_err());
    }

    #[test]
    fn serde_uses_text_form() {
        let id = BlobId::of(b"x");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<BlobId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<BlobId>("\"b3:00\"").is_err());
    }
}
