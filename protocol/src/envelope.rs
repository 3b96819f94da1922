//! Signed manifests: a DSSE envelope around the manifest payload, verified against a trust policy.
//!
//! The signature covers DSSE's pre-authentication encoding (PAE) of the payload type and the exact payload
//! bytes, so no canonical form of the JSON is needed: the bytes that were signed are the bytes that are
//! parsed, once, after every check passed. Verification order: envelope size, envelope shape, payload type,
//! payload size, signatures (ed25519 `verify_strict`) against a threshold of distinct trusted keys, then the
//! manifest's schema and shape, then expiry. Only then is a [`VerifiedManifest`] returned.

use crate::id::BlobId;
use crate::keys::{KeyId, PublicKey, SecretKey};
use crate::manifest::{MAX_PAYLOAD, Manifest, ManifestError};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The DSSE payload type of a deckhand manifest.
pub const PAYLOAD_TYPE: &str = "application/vnd.deckhand.manifest+json";
/// The largest envelope accepted, in bytes (a base64 payload at its limit plus signatures).
pub const MAX_ENVELOPE: usize = 128 * 1024;
/// The most signatures one envelope may carry.
pub const MAX_SIGNATURES: usize = 16;

/// A DSSE envelope, as stored at `deployments/{d}/manifest/{version}.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Base64 (standard, padded) of the payload bytes.
    pub payload: String,
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    pub signatures: Vec<Signature>,
}

/// One DSSE signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    pub keyid: String,
    /// Base64 of the 64-byte ed25519 signature.
    pub sig: String,
}

/// The keys an agent or operator trusts, and how many distinct ones must sign.
#[derive(Clone, Debug)]
pub struct TrustPolicy {
    keys: BTreeMap<KeyId, PublicKey>,
    threshold: usize,
}

/// A manifest whose envelope passed every check.
#[derive(Clone, Debug)]
pub struct VerifiedManifest {
    pub manifest: Manifest,
    /// The hash of the signed payload bytes: the manifest's id.
    pub id: BlobId,
    /// The envelope exactly as received, to store or relay to peers.
    pub envelope: Vec<u8>,
    /// The trusted keys whose signatures verified.
    pub signers: Vec<KeyId>,
}

/// Why an envelope was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerifyError {
    #[error("{what} is {len} bytes, over the limit of {limit}")]
    Oversized {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("envelope is not valid DSSE JSON: {0}")]
    Json(String),
    #[error("envelope payload type is {found:?}, expected {expected:?}")]
    PayloadType { found: String, expected: String },
    #[error("envelope carries {0} signatures, over the limit of {MAX_SIGNATURES}")]
    TooManySignatures(usize),
    #[error("envelope payload is not valid base64: {0}")]
    PayloadBase64(String),
    #[error(
        "manifest has {valid} valid signature(s) from distinct trusted keys, {required} required \
         ({untrusted} from untrusted keys, {invalid} invalid)"
    )]
    Threshold {
        valid: usize,
        required: usize,
        untrusted: usize,
        invalid: usize,
    },
    #[error("signed manifest is invalid: {0}")]
    Manifest(#[from] ManifestError),
    #[error("manifest version {version} expired at {expires_at} (now {now})")]
    Expired {
        version: u64,
        expires_at: Timestamp,
        now: Timestamp,
    },
    #[error("manifest version {version} is not above the highest accepted version {highest}")]
    Stale { version: u64, highest: u64 },
    #[error("manifest is for deployment {found:?}, expected {expected:?}")]
    Deployment { expected: String, found: String },
    #[error(
        "manifest version {version} was created at {created_at}, before trust root version {root} \
         changed the release keys ({since}): a manifest of the retired keys' days, replayed"
    )]
    BeforeEpoch {
        version: u64,
        created_at: Timestamp,
        root: u64,
        since: Timestamp,
    },
    #[error(
        "manifest version {version} was created at {created_at}, over an hour ahead of this Pi's \
         synchronised clock ({now}): a leaked key fast-forwarding the fleet, or a publisher's clock far off"
    )]
    Ahead {
        version: u64,
        created_at: Timestamp,
        now: Timestamp,
    },
    #[error("trust policy needs a threshold of 1 to {keys} for {keys} key(s), got {threshold}")]
    Policy { keys: usize, threshold: usize },
}

/// DSSE's pre-authentication encoding: `"DSSEv1" SP len(type) SP type SP len(body) SP body`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    /// Signs a manifest `payload` with each key.
    pub fn sign(payload: &[u8], keys: &[&SecretKey]) -> Self {
        Self::sign_typed(PAYLOAD_TYPE, payload, keys)
    }

    /// Signs `payload` of `payload_type` with each key. The type is signed too (DSSE's PAE), so a
    /// signature over one kind of document never verifies as another.
    pub fn sign_typed(payload_type: &str, payload: &[u8], keys: &[&SecretKey]) -> Self {
        let message = pae(payload_type, payload);
        Self {
            payload: STANDARD.encode(payload),
            payload_type: payload_type.to_owned(),
            signatures: keys
                .iter()
                .map(|k| Signature {
                    keyid: k.id().to_string(),
                    sig: STANDARD.encode(k.sign(&message)),
                })
                .collect(),
        }
    }

    /// Signs a manifest's payload.
    pub fn sign_manifest(manifest: &Manifest, keys: &[&SecretKey]) -> Self {
        Self::sign(&manifest.to_payload(), keys)
    }

    /// The JSON bytes to store.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

impl TrustPolicy {
    /// `threshold` distinct keys out of `keys` must sign.
    pub fn new(
        keys: impl IntoIterator<Item = PublicKey>,
        threshold: usize,
    ) -> Result<Self, VerifyError> {
        let keys: BTreeMap<KeyId, PublicKey> =
            keys.into_iter().map(|k| (k.id().clone(), k)).collect();
        if threshold == 0 || threshold > keys.len() {
            return Err(VerifyError::Policy {
                keys: keys.len(),
                threshold,
            });
        }
        Ok(Self { keys, threshold })
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }

    /// Runs every check and returns the manifest, or the first reason to refuse it.
    pub fn verify(&self, envelope: &[u8], now: Timestamp) -> Result<VerifiedManifest, VerifyError> {
        self.check(envelope, Some(now))
    }

    /// Every check but expiry. Only for an operator re-signing old content under a new version and a new
    /// expiry (`deckhand rollback`); agents always use [`TrustPolicy::verify`].
    pub fn verify_ignoring_expiry(&self, envelope: &[u8]) -> Result<VerifiedManifest, VerifyError> {
        self.check(envelope, None)
    }

    fn check(
        &self,
        envelope: &[u8],
        now: Option<Timestamp>,
    ) -> Result<VerifiedManifest, VerifyError> {
        let (env, payload) = decode(envelope)?;
        let valid = self.signers(&env, &payload)?;
        let manifest = Manifest::from_payload(&payload)?;
        if let Some(now) = now
            && now >= manifest.expires_at
        {
            return Err(VerifyError::Expired {
                version: manifest.version,
                expires_at: manifest.expires_at,
                now,
            });
        }
        Ok(VerifiedManifest {
            id: BlobId::of(&payload),
            manifest,
            envelope: envelope.to_vec(),
            signers: valid.into_iter().collect(),
        })
    }

    /// The distinct trusted keys whose signatures over `payload` verify, if they reach the threshold.
    pub(crate) fn signers(
        &self,
        env: &Envelope,
        payload: &[u8],
    ) -> Result<BTreeSet<KeyId>, VerifyError> {
        let message = pae(&env.payload_type, payload);
        let mut valid = BTreeSet::new();
        let (mut untrusted, mut invalid) = (0, 0);
        for s in &env.signatures {
            let Some(key) = self
                .keys
                .iter()
                .find(|(id, _)| id.as_str() == s.keyid)
                .map(|(_, k)| k)
            else {
                untrusted += 1;
                continue;
            };
            let ok = STANDARD
                .decode(&s.sig)
                .ok()
                .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok())
                .is_some_and(|sig| key.verifying_key().verify_strict(&message, &sig).is_ok());
            if ok {
                valid.insert(key.id().clone());
            } else {
                invalid += 1;
            }
        }
        if valid.len() < self.threshold {
            return Err(VerifyError::Threshold {
                valid: valid.len(),
                required: self.threshold,
                untrusted,
                invalid,
            });
        }
        Ok(valid)
    }
}

/// Decodes an envelope's manifest WITHOUT checking any signature, for display only (`deckhand versions`
/// without `--trust`). Nothing may act on its result.
pub fn inspect_unverified(envelope: &[u8]) -> Result<Manifest, VerifyError> {
    let (_, payload) = decode(envelope)?;
    Ok(Manifest::from_payload(&payload)?)
}

/// An envelope's manifest id (the blake3 of its payload bytes) WITHOUT checking any signature, to name
/// a manifest that was verified earlier (the agent's recorded releases) or is about to be.
pub fn unverified_id(envelope: &[u8]) -> Result<BlobId, VerifyError> {
    let (_, payload) = decode(envelope)?;
    Ok(BlobId::of(&payload))
}

/// Size limits, DSSE shape, payload type, signature count, payload size, then the payload bytes.
fn decode(envelope: &[u8]) -> Result<(Envelope, Vec<u8>), VerifyError> {
    decode_typed(envelope, PAYLOAD_TYPE)
}

/// [`decode`] for an envelope of `payload_type`.
pub(crate) fn decode_typed(
    envelope: &[u8],
    payload_type: &str,
) -> Result<(Envelope, Vec<u8>), VerifyError> {
    if envelope.len() > MAX_ENVELOPE {
        return Err(VerifyError::Oversized {
            what: "envelope",
            len: envelope.len(),
            limit: MAX_ENVELOPE,
        });
    }
    let env: Envelope =
        serde_json::from_slice(envelope).map_err(|e| VerifyError::Json(e.to_string()))?;
    if env.payload_type != payload_type {
        return Err(VerifyError::PayloadType {
            found: env.payload_type,
            expected: payload_type.to_owned(),
        });
    }
    if env.signatures.len() > MAX_SIGNATURES {
        return Err(VerifyError::TooManySignatures(env.signatures.len()));
    }
    // Base64 is 4/3 the size of what it encodes; refuse before decoding anything over the limit.
    if env.payload.len() > MAX_PAYLOAD.div_ceil(3) * 4 {
        return Err(VerifyError::Oversized {
            what: "manifest payload",
            len: env.payload.len() / 4 * 3,
            limit: MAX_PAYLOAD,
        });
    }
    let payload = STANDARD
        .decode(&env.payload)
        .map_err(|e| VerifyError::PayloadBase64(e.to_string()))?;
    Ok((env, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;
    use proptest::prelude::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed(&[n; 32])
    }

    fn now() -> Timestamp {
        "2026-11-15T00:00:00Z".parse().unwrap()
    }

    fn policy(keys: &[&SecretKey], threshold: usize) -> TrustPolicy {
        TrustPolicy::new(keys.iter().map(|k| k.public().clone()), threshold).unwrap()
    }

    #[test]
    fn pae_matches_the_dsse_spec_example() {
        // The example from the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }

    #[test]
    fn a_signed_manifest_verifies() {
        let (a, b) = (key(1), key(2));
        let m = sample(5);
        let env = Envelope::sign_manifest(&m, &[&a, &b]).to_bytes();
        let v = policy(&[&a, &b], 2).verify(&env, now()).unwrap();
        assert_eq!(v.manifest, m);
        assert_eq!(v.id, BlobId::of(&m.to_payload()));
        assert_eq!(v.signers.len(), 2);
    }

    #[test]
    fn threshold_counts_distinct_keys_only() {
        let (a, b) = (key(1), key(2));
        let m = sample(1);
        // Two signatures by the same key are one key.
        let env = Envelope::sign_manifest(&m, &[&a, &a]).to_bytes();
        let err = policy(&[&a, &b], 2).verify(&env, now()).unwrap_err();
        assert_eq!(
            err,
            VerifyError::Threshold {
                valid: 1,
                required: 2,
                untrusted: 0,
                invalid: 0
            }
        );
        // An untrusted key does not count.
        let c = key(3);
        let env = Envelope::sign_manifest(&m, &[&a, &c]).to_bytes();
        let err = policy(&[&a, &b], 2).verify(&env, now()).unwrap_err();
        assert_eq!(
            err,
            VerifyError::Threshold {
                valid: 1,
                required: 2,
                untrusted: 1,
                invalid: 0
            }
        );
        // A signature claiming a trusted key id but made by another key is invalid.
        let mut env = Envelope::sign_manifest(&m, &[&a, &c]);
        env.signatures[1].keyid = b.id().to_string();
        let err = policy(&[&a, &b], 2)
            .verify(&env.to_bytes(), now())
            .unwrap_err();
        assert_eq!(
            err,
            VerifyError::Threshold {
                valid: 1,
                required: 2,
                untrusted: 0,
                invalid: 1
            }
        );
    }

    #[test]
    fn expired_manifests_are_refused() {
        let a = key(1);
        let m = sample(1);
        let env = Envelope::sign_manifest(&m, &[&a]).to_bytes();
        let err = policy(&[&a], 1).verify(&env, m.expires_at).unwrap_err();
        assert!(matches!(err, VerifyError::Expired { version: 1, .. }));
        policy(&[&a], 1)
            .verify(&env, m.expires_at - jiff::SignedDuration::from_secs(1))
            .unwrap();
        // Only the operator's re-signing path may look past expiry, and it still checks signatures.
        assert_eq!(
            policy(&[&a], 1)
                .verify_ignoring_expiry(&env)
                .unwrap()
                .manifest,
            m
        );
        let other = key(2);
        assert!(matches!(
            policy(&[&other], 1).verify_ignoring_expiry(&env),
            Err(VerifyError::Threshold { .. })
        ));
    }

    #[test]
    fn limits_are_checked_before_signatures() {
        let a = key(1);
        let pol = policy(&[&a], 1);
        let huge = vec![b'{'; MAX_ENVELOPE + 1];
        assert!(matches!(
            pol.verify(&huge, now()),
            Err(VerifyError::Oversized {
                what: "envelope",
                ..
            })
        ));

        let big_payload = vec![b' '; MAX_PAYLOAD + 10];
        let env = Envelope::sign(&big_payload, &[&a]).to_bytes();
        assert!(matches!(
            pol.verify(&env, now()),
            Err(VerifyError::Oversized {
                what: "manifest payload",
                ..
            })
        ));

        let mut env = Envelope::sign_manifest(&sample(1), &[&a]);
        env.signatures = vec![env.signatures[0].clone(); MAX_SIGNATURES + 1];
        assert_eq!(
            pol.verify(&env.to_bytes(), now()).unwrap_err(),
            VerifyError::TooManySignatures(17)
        );

        let mut env = Envelope::sign_manifest(&sample(1), &[&a]);
        env.payload_type = "application/json".into();
        assert!(matches!(
            pol.verify(&env.to_bytes(), now()),
            Err(VerifyError::PayloadType { .. })
        ));

        assert!(matches!(
            pol.verify(b"not json", now()),
            Err(VerifyError::Json(_))
        ));

        // A payload with a bad schema, but properly signed, fails on the manifest after signatures pass.
        let env = Envelope::sign(b"{\"schema\":\"other/v9\"}", &[&a]).to_bytes();
        assert!(matches!(
            pol.verify(&env, now()),
            Err(VerifyError::Manifest(ManifestError::UnknownSchema(_)))
        ));
    }

    #[test]
    fn policy_threshold_must_be_satisfiable() {
        let a = key(1);
        assert!(TrustPolicy::new([a.public().clone()], 0).is_err());
        assert!(TrustPolicy::new([a.public().clone()], 2).is_err());
        // The same key twice is one key.
        assert!(TrustPolicy::new([a.public().clone(), a.public().clone()], 2).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn envelopes_round_trip(version in 1u64..u64::MAX, min_score in -1.0f32..1.0) {
            let a = key(9);
            let mut m = sample(version);
            m.recognizer.min_score = min_score;
            let bytes = Envelope::sign_manifest(&m, &[&a]).to_bytes();
            let env: Envelope = serde_json::from_slice(&bytes).unwrap();
            prop_assert_eq!(env.to_bytes(), bytes.clone());
            let v = policy(&[&a], 1).verify(&bytes, now()).unwrap();
            prop_assert_eq!(v.manifest, m);
        }

        /// A signed envelope, damaged anywhere (its JSON, its base64, its signatures): verifying never
        /// panics, and nothing but the signed manifest itself is ever accepted.
        #[test]
        fn damaged_envelopes_never_panic_and_never_verify_another_manifest(
            edits in proptest::collection::vec((any::<u32>(), any::<u8>(), 0u8..3), 1..6),
        ) {
            let a = key(9);
            let m = sample(7);
            let mut bytes = Envelope::sign_manifest(&m, &[&a]).to_bytes();
            crate::testdata::mutate(&mut bytes, &edits);
            if let Ok(v) = policy(&[&a], 1).verify(&bytes, now()) {
                prop_assert_eq!(v.manifest, m);
            }
        }

        #[test]
        fn any_single_byte_change_to_payload_is_rejected(pos in any::<prop::sample::Index>(), flip in 1u8..=255) {
            let a = key(9);
            let m = sample(7);
            let mut env = Envelope::sign_manifest(&m, &[&a]);
            let mut payload = STANDARD.decode(&env.payload).unwrap();
            let i = pos.index(payload.len());
            payload[i] ^= flip;
            env.payload = STANDARD.encode(&payload);
            let err = policy(&[&a], 1).verify(&env.to_bytes(), now()).unwrap_err();
            let is_threshold = matches!(err, VerifyError::Threshold { valid: 0, invalid: 1, .. });
            prop_assert!(is_threshold, "{:?}", err);
        }

        #[test]
        fn any_single_byte_change_to_a_signature_is_rejected(pos in 0usize..64, flip in 1u8..=255) {
            let a = key(9);
            let mut env = Envelope::sign_manifest(&sample(7), &[&a]);
            let mut sig = STANDARD.decode(&env.signatures[0].sig).unwrap();
            sig[pos] ^= flip;
            env.signatures[0].sig = STANDARD.encode(&sig);
            let err = policy(&[&a], 1).verify(&env.to_bytes(), now()).unwrap_err();
            let is_threshold = matches!(err, VerifyError::Threshold { valid: 0, invalid: 1, .. });
            prop_assert!(is_threshold, "{:?}", err);
        }

        #[test]
        fn any_single_byte_change_to_the_envelope_never_verifies_a_different_payload(
            pos in any::<prop::sample::Index>(), flip in 1u8..=255
        ) {
            let a = key(9);
            let m = sample(7);
            let mut bytes = Envelope::sign_manifest(&m, &[&a]).to_bytes();
            let i = pos.index(bytes.len());
            bytes[i] ^= flip;
            // Some edits only touch JSON whitespace and still verify; then the manifest is the signed one.
            if let Ok(v) = policy(&[&a], 1).verify(&bytes, now()) {
                prop_assert_eq!(v.manifest, m);
            }
        }
    }
}
