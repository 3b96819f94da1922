//! ed25519 signing keys, their text file forms, and key ids.
//!
//! A public key file is one line, `deckhand-ed25519-pub <base64 of 32 bytes>`; a secret key file is
//! `deckhand-ed25519-secret <base64 of the 32-byte seed>`. A key id is `ed25519:` and the first 16 bytes of
//! the blake3 hash of the public key, in hex: short enough to read, long enough never to collide by chance.
//! This module never touches randomness: the caller supplies the seed.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use std::fmt;

const PUB_TAG: &str = "deckhand-ed25519-pub";
const SECRET_TAG: &str = "deckhand-ed25519-secret";

/// Names a public key: `ed25519:<32 hex digits>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct KeyId(String);

impl KeyId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a key file or key bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key file does not start with {expected:?}")]
    Tag { expected: &'static str },
    #[error("key file is not valid base64: {0}")]
    Base64(String),
    #[error("key must be 32 bytes, found {0}")]
    Length(usize),
    #[error("public key is not a valid ed25519 point, or is a weak key")]
    InvalidPoint,
}

/// A public key the verifier may trust.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PublicKey {
    key: VerifyingKey,
    id: KeyId,
}

impl PublicKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::Length(bytes.len()))?;
        let key = VerifyingKey::from_bytes(&arr).map_err(|_| KeyError::InvalidPoint)?;
        // A small-order key lets anybody forge; verify_strict refuses those signatures, and so do we here.
        if key.is_weak() {
            return Err(KeyError::InvalidPoint);
        }
        Ok(Self::from_verifying(key))
    }

    fn from_verifying(key: VerifyingKey) -> Self {
        let hash = blake3::hash(key.as_bytes());
        let id = KeyId(format!("ed25519:{}", hex::encode(&hash.as_bytes()[..16])));
        Self { key, id }
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        self.key.as_bytes()
    }

    pub(crate) fn verifying_key(&self) -> &VerifyingKey {
        &self.key
    }

    /// The one-line text form written to `NAME.pub`.
    pub fn to_file_text(&self) -> String {
        format!("{PUB_TAG} {}\n", STANDARD.encode(self.key.as_bytes()))
    }

    pub fn from_file_text(text: &str) -> Result<Self, KeyError> {
        Self::from_bytes(&parse_tagged(text, PUB_TAG)?)
    }
}

/// A signing key. Its bytes are zeroed on drop.
pub struct SecretKey {
    key: SigningKey,
    public: PublicKey,
}

impl SecretKey {
    /// Builds the key from a 32-byte seed the caller took from the operating system's randomness.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(seed);
        let public = PublicKey::from_verifying(key.verifying_key());
        Self { key, public }
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    pub fn id(&self) -> &KeyId {
        self.public.id()
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// The text form written to `NAME.key` (the caller must write it with mode 0600).
    pub fn to_file_text(&self) -> String {
        format!("{SECRET_TAG} {}\n", STANDARD.encode(self.key.to_bytes()))
    }

    pub fn from_file_text(text: &str) -> Result<Self, KeyError> {
        let bytes = parse_tagged(text, SECRET_TAG)?;
        let seed: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Length(bytes.len()))?;
        Ok(Self::from_seed(&seed))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("id", self.id())
            .finish_non_exhaustive()
    }
}

fn parse_tagged(text: &str, tag: &'static str) -> Result<Vec<u8>, KeyError> {
    let rest = text
        .trim()
        .strip_prefix(tag)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or(KeyError::Tag { expected: tag })?;
    STANDARD
        .decode(rest.trim())
        .map_err(|e| KeyError::Base64(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip() {
        let sk = SecretKey::from_seed(&[7; 32]);
        let back = SecretKey::from_file_text(&sk.to_file_text()).unwrap();
        assert_eq!(back.public(), sk.public());
        let pk = PublicKey::from_file_text(&sk.public().to_file_text()).unwrap();
        assert_eq!(&pk, sk.public());
        assert!(pk.id().as_str().starts_with("ed25519:"));
        assert_eq!(pk.id().as_str().len(), "ed25519:".len() + 32);
    }

    #[test]
    fn bad_key_files_are_named() {
        let sk = SecretKey::from_seed(&[7; 32]);
        assert_eq!(
            PublicKey::from_file_text(&sk.to_file_text()),
            Err(KeyError::Tag { expected: PUB_TAG })
        );
        assert!(matches!(
            PublicKey::from_file_text("deckhand-ed25519-pub !!!"),
            Err(KeyError::Base64(_))
        ));
        assert_eq!(
            PublicKey::from_file_text("deckhand-ed25519-pub AAAA"),
            Err(KeyError::Length(3))
        );
        // The identity point is a weak key.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(
            PublicKey::from_bytes(&identity),
            Err(KeyError::InvalidPoint)
        );
    }
}
