//! A deployment's signed trust root, in the manner of TUF's root metadata: the keys whose signatures a
//! manifest needs and how many of them, a version and an expiry. Root version N+1 must be signed by
//! a threshold of version N's keys *and* a threshold of its own, so a key is retired, or a leaked key
//! replaced, by publishing the next root to the bucket (`deckhand keys rotate`) instead of touching every
//! Pi. An agent starts from the root it was installed with and follows the chain one version at a time,
//! from S3 or a bundle; an old root replayed, a skipped version, or a root signed by too few of the
//! previous keys is refused and changes nothing.
//!
//! Pure code: the caller fetches the bytes and passes the time.

use crate::envelope::{Envelope, TrustPolicy, VerifyError, decode_typed};
use crate::keys::{PublicKey, SecretKey};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The DSSE payload type of a root: signed with the payload, so a root signature never verifies as a
/// manifest's, nor the other way round.
pub const ROOT_PAYLOAD_TYPE: &str = "application/vnd.deckhand.root+json";
pub const ROOT_SCHEMA: &str = "deckhand.root/v1";
/// The most manifest keys a root may list.
pub const MAX_ROOT_KEYS: usize = 16;

/// The signed content of a root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    pub schema: String,
    pub deployment: String,
    /// 1 for the first root, then one more for each rotation.
    pub version: u64,
    /// After this, the root no longer admits new manifests (the active release keeps serving) until a
    /// newer root is found.
    pub expires_at: Timestamp,
    /// The manifest keys, in the text form of a `.pub` file (`ed25519 BASE64`).
    pub keys: Vec<String>,
    /// How many distinct `keys` must sign a manifest, and the next root.
    pub threshold: u16,
}

/// Why a root was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RootError {
    #[error("trust root: {0}")]
    Envelope(VerifyError),
    #[error("trust root payload is not valid JSON of {ROOT_SCHEMA}: {0}")]
    Json(String),
    #[error("trust root schema is {0:?}, expected {ROOT_SCHEMA:?}")]
    Schema(String),
    #[error("trust root is for deployment {found:?}, expected {expected:?}")]
    Deployment { expected: String, found: String },
    #[error(
        "trust root version {found} is not the next after version {trusted}: an old root replayed, or one skipped"
    )]
    Version { trusted: u64, found: u64 },
    #[error("trust root version {version} lists an invalid key {key:?}: {why}")]
    Key {
        version: u64,
        key: String,
        why: String,
    },
    #[error(
        "trust root version {version} lists {keys} key(s) with a threshold of {threshold}: it needs 1 to {MAX_ROOT_KEYS} keys and a threshold they can meet"
    )]
    Keys {
        version: u64,
        keys: usize,
        threshold: u16,
    },
    #[error(
        "trust root version {version} is not signed by enough of version {previous}'s keys: {why}"
    )]
    PreviousKeys {
        version: u64,
        previous: u64,
        why: VerifyError,
    },
    #[error("trust root version {version} is not signed by enough of its own keys: {why}")]
    OwnKeys { version: u64, why: VerifyError },
    #[error(
        "trust root version {version} expired at {expires_at} (now {now}): a newer root is needed"
    )]
    Expired {
        version: u64,
        expires_at: Timestamp,
        now: Timestamp,
    },
}

impl Root {
    /// Root `version` of `deployment` listing `keys`, `threshold` of which must sign.
    pub fn new(
        deployment: &str,
        version: u64,
        expires_at: Timestamp,
        keys: &[PublicKey],
        threshold: u16,
    ) -> Self {
        Self {
            schema: ROOT_SCHEMA.into(),
            deployment: deployment.into(),
            version,
            expires_at,
            keys: keys
                .iter()
                .map(|k| k.to_file_text().trim().to_owned())
                .collect(),
            threshold,
        }
    }

    /// The signed envelope bytes, signed by each of `keys` (for a rotation: the previous root's and the
    /// new root's).
    pub fn sign(&self, keys: &[&SecretKey]) -> Vec<u8> {
        // Serialising plain strings and numbers cannot fail.
        let payload = serde_json::to_vec_pretty(self).unwrap_or_default();
        Envelope::sign_typed(ROOT_PAYLOAD_TYPE, &payload, keys).to_bytes()
    }

    /// The manifest policy this root sets.
    fn policy(&self) -> Result<TrustPolicy, RootError> {
        let too_few = || RootError::Keys {
            version: self.version,
            keys: self.keys.len(),
            threshold: self.threshold,
        };
        if self.keys.is_empty() || self.keys.len() > MAX_ROOT_KEYS {
            return Err(too_few());
        }
        let keys = self
            .keys
            .iter()
            .map(|k| {
                PublicKey::from_file_text(k).map_err(|e| RootError::Key {
                    version: self.version,
                    key: k.clone(),
                    why: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        TrustPolicy::new(keys, usize::from(self.threshold)).map_err(|_| too_few())
    }
}

/// A root this agent trusts: the installed one, or one reached from it by [`TrustedRoot::update`].
#[derive(Clone, Debug)]
pub struct TrustedRoot {
    root: Root,
    policy: TrustPolicy,
    envelope: Vec<u8>,
}

/// Decodes a root envelope: its shape, type and payload, not yet its signatures.
fn open(envelope: &[u8]) -> Result<(Envelope, Vec<u8>, Root), RootError> {
    let (env, payload) = decode_typed(envelope, ROOT_PAYLOAD_TYPE).map_err(RootError::Envelope)?;
    let root: Root =
        serde_json::from_slice(&payload).map_err(|e| RootError::Json(e.to_string()))?;
    if root.schema != ROOT_SCHEMA {
        return Err(RootError::Schema(root.schema));
    }
    Ok((env, payload, root))
}

impl TrustedRoot {
    /// The root an agent was installed with (or kept from an earlier run): for `deployment`, signed by
    /// a threshold of its own keys. Its expiry is checked when it is used, not here: an agent whose
    /// root expired keeps serving and looks for a newer root.
    pub fn installed(envelope: &[u8], deployment: &str) -> Result<Self, RootError> {
        let (env, payload, root) = open(envelope)?;
        if root.deployment != deployment {
            return Err(RootError::Deployment {
                expected: deployment.into(),
                found: root.deployment,
            });
        }
        let policy = root.policy()?;
        policy
            .signers(&env, &payload)
            .map_err(|why| RootError::OwnKeys {
                version: root.version,
                why,
            })?;
        Ok(Self {
            root,
            policy,
            envelope: envelope.to_vec(),
        })
    }

    /// The next root, if `envelope` is it: version one above this one, the same deployment, signed by a
    /// threshold of this root's keys and a threshold of its own. Expiry is not checked: a Pi that was
    /// offline walks through roots that have expired since to the newest one.
    pub fn update(&self, envelope: &[u8]) -> Result<Self, RootError> {
        let (env, payload, next) = open(envelope)?;
        if next.deployment != self.root.deployment {
            return Err(RootError::Deployment {
                expected: self.root.deployment.clone(),
                found: next.deployment,
            });
        }
        if Some(next.version) != self.root.version.checked_add(1) {
            return Err(RootError::Version {
                trusted: self.root.version,
                found: next.version,
            });
        }
        self.policy
            .signers(&env, &payload)
            .map_err(|why| RootError::PreviousKeys {
                version: next.version,
                previous: self.root.version,
                why,
            })?;
        let policy = next.policy()?;
        policy
            .signers(&env, &payload)
            .map_err(|why| RootError::OwnKeys {
                version: next.version,
                why,
            })?;
        Ok(Self {
            root: next,
            policy,
            envelope: envelope.to_vec(),
        })
    }

    /// The manifest policy, if this root has not expired at `now`.
    pub fn policy_at(&self, now: Timestamp) -> Result<&TrustPolicy, RootError> {
        if now >= self.root.expires_at {
            return Err(RootError::Expired {
                version: self.root.version,
                expires_at: self.root.expires_at,
                now,
            });
        }
        Ok(&self.policy)
    }

    /// The manifest policy whatever the time: for what was accepted before (a release restored from
    /// the store, a download resumed), never for admitting a new manifest.
    pub fn policy_ignoring_expiry(&self) -> &TrustPolicy {
        &self.policy
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    pub fn version(&self) -> u64 {
        self.root.version
    }

    /// The envelope exactly as verified, to keep or pass on.
    pub fn envelope(&self) -> &[u8] {
        &self.envelope
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed(&[n; 32])
    }

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn root(version: u64, keys: &[&SecretKey], threshold: u16) -> Root {
        let pubs: Vec<PublicKey> = keys.iter().map(|k| k.public().clone()).collect();
        Root::new(
            "shop-1",
            version,
            t("2027-06-01T00:00:00Z"),
            &pubs,
            threshold,
        )
    }

    fn now() -> Timestamp {
        t("2026-11-15T00:00:00Z")
    }

    #[test]
    fn after_a_rotation_the_retired_keys_manifests_are_refused_and_the_new_keys_accepted() {
        let (a, b) = (key(1), key(2));
        let v1 = TrustedRoot::installed(&root(1, &[&a], 1).sign(&[&a]), "shop-1").unwrap();
        let manifest_by = |k: &SecretKey| Envelope::sign_manifest(&sample(5), &[k]).to_bytes();
        assert!(
            v1.policy_at(now())
                .unwrap()
                .verify(&manifest_by(&a), now())
                .is_ok()
        );
        let v2 = v1.update(&root(2, &[&b], 1).sign(&[&a, &b])).unwrap();
        assert_eq!(v2.version(), 2);
        let policy = v2.policy_at(now()).unwrap();
        assert!(matches!(
            policy.verify(&manifest_by(&a), now()),
            Err(VerifyError::Threshold {
                valid: 0,
                untrusted: 1,
                ..
            })
        ));
        assert!(policy.verify(&manifest_by(&b), now()).is_ok());
    }

    #[test]
    fn a_root_signed_by_too_few_previous_or_own_keys_is_refused() {
        let (a, b, c) = (key(1), key(2), key(3));
        // Version 1 needs two of a, b, c.
        let v1 =
            TrustedRoot::installed(&root(1, &[&a, &b, &c], 2).sign(&[&a, &b]), "shop-1").unwrap();
        let d = key(4);
        let next = root(2, &[&d], 1);
        // One old key and the new one: one short of the old threshold.
        let err = v1.update(&next.sign(&[&a, &d])).unwrap_err();
        assert!(
            matches!(
                err,
                RootError::PreviousKeys {
                    version: 2,
                    previous: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("not signed by enough of version 1's keys")
        );
        // The new key alone (a thief of d): refused the same way.
        assert!(matches!(
            v1.update(&next.sign(&[&d])),
            Err(RootError::PreviousKeys { .. })
        ));
        // Enough old keys but not the new one: refused (the new keys must accept their role).
        assert!(matches!(
            v1.update(&next.sign(&[&a, &b])),
            Err(RootError::OwnKeys { version: 2, .. })
        ));
        assert!(v1.update(&next.sign(&[&a, &c, &d])).is_ok());
        // An installed root must be signed by its own keys.
        assert!(matches!(
            TrustedRoot::installed(&root(1, &[&a, &b], 2).sign(&[&a]), "shop-1"),
            Err(RootError::OwnKeys { .. })
        ));
    }

    #[test]
    fn an_old_root_replayed_or_a_skipped_version_is_refused() {
        let (a, b, c) = (key(1), key(2), key(3));
        let r1 = root(1, &[&a], 1).sign(&[&a]);
        let v1 = TrustedRoot::installed(&r1, "shop-1").unwrap();
        let v2 = v1.update(&root(2, &[&b], 1).sign(&[&a, &b])).unwrap();
        assert_eq!(
            v2.update(&r1).unwrap_err(),
            RootError::Version {
                trusted: 2,
                found: 1
            }
        );
        assert!(matches!(
            v2.update(&root(4, &[&c], 1).sign(&[&b, &c])),
            Err(RootError::Version {
                trusted: 2,
                found: 4
            })
        ));
        // Another deployment's root, and a manifest envelope passed off as a root.
        let other = Root::new(
            "shop-2",
            3,
            t("2027-01-01T00:00:00Z"),
            &[c.public().clone()],
            1,
        );
        assert!(matches!(
            v2.update(&other.sign(&[&b, &c])),
            Err(RootError::Deployment { .. })
        ));
        let manifest = Envelope::sign_manifest(&sample(3), &[&b]).to_bytes();
        assert!(matches!(
            v2.update(&manifest),
            Err(RootError::Envelope(VerifyError::PayloadType { .. }))
        ));
    }

    #[test]
    fn a_pi_offline_for_three_rotations_walks_the_chain_through_expired_roots() {
        let keys: Vec<SecretKey> = (1..=4).map(key).collect();
        let mut chain = Vec::new();
        for v in 1..=4u64 {
            let k = &keys[v as usize - 1];
            let mut r = root(v, &[k], 1);
            // The middle roots expired long ago; the newest has not.
            if v == 2 || v == 3 {
                r.expires_at = t("2026-01-01T00:00:00Z");
            }
            let signers: Vec<&SecretKey> = if v == 1 {
                vec![k]
            } else {
                vec![&keys[v as usize - 2], k]
            };
            chain.push(r.sign(&signers));
        }
        let mut trusted = TrustedRoot::installed(&chain[0], "shop-1").unwrap();
        for next in &chain[1..] {
            trusted = trusted.update(next).unwrap();
        }
        assert_eq!(trusted.version(), 4);
        let policy = trusted.policy_at(now()).unwrap();
        let m = Envelope::sign_manifest(&sample(9), &[&keys[3]]).to_bytes();
        assert!(policy.verify(&m, now()).is_ok());
        // An expired root admits nothing.
        let mut stale = TrustedRoot::installed(&chain[0], "shop-1").unwrap();
        stale = stale.update(&chain[1]).unwrap();
        assert!(matches!(
            stale.policy_at(now()),
            Err(RootError::Expired { version: 2, .. })
        ));
    }

    #[test]
    fn keys_and_thresholds_a_root_cannot_meet_are_refused() {
        let a = key(1);
        let r = root(1, &[&a], 2);
        assert!(matches!(
            TrustedRoot::installed(&r.sign(&[&a]), "shop-1"),
            Err(RootError::Keys { threshold: 2, .. })
        ));
        let mut bad = root(1, &[&a], 1);
        bad.keys[0] = "ed25519 AAAA".into();
        assert!(matches!(
            TrustedRoot::installed(&bad.sign(&[&a]), "shop-1"),
            Err(RootError::Key { .. })
        ));
    }
}
