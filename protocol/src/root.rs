//! A deployment's signed trust root, in the manner of TUF's root metadata: which keys sign what, how
//! many of them, a version and an expiry. Root version N+1 must be signed by a threshold of version N's
//! root keys *and* a threshold of its own, so a key is retired, or a leaked key replaced, by publishing
//! the next root to the bucket (`deckhand keys rotate`) instead of touching every Pi. An agent starts
//! from the root it was installed with and follows the chain one version at a time, from S3, a peer or
//! a bundle; an old root replayed, a skipped version, or a root signed by too few of the previous root
//! keys is refused and changes nothing.
//!
//! Two schemas:
//! * `deckhand.root/v2` separates the roles as TUF does: `root_keys` (with `root_threshold`) sign the
//!   next root and are kept offline; `keys` (with `threshold`) are the release keys, which sign
//!   manifests. A leaked release key cannot publish a root, and a root that changes the release keys
//!   starts a new floor epoch at its signed `created_at` ([`crate::floors`]), so a fleet the leaked key
//!   fast-forwarded recovers.
//! * `deckhand.root/v1` has one key set for both (read as `root_keys = keys`). A v1 root may be followed
//!   by a v2 one, never the other way round.
//!
//! Pure code: the caller fetches the bytes and passes the time.

use crate::envelope::{Envelope, TrustPolicy, VerifyError, decode_typed};
use crate::floors::Epoch;
use crate::keys::{PublicKey, SecretKey};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The DSSE payload type of a root: signed with the payload, so a root signature never verifies as a
/// manifest's, nor the other way round.
pub const ROOT_PAYLOAD_TYPE: &str = "application/vnd.deckhand.root+json";
/// The schema a root is written with.
pub const ROOT_SCHEMA: &str = "deckhand.root/v2";
/// The first schema: one key set signs manifests and roots.
pub const ROOT_SCHEMA_V1: &str = "deckhand.root/v1";
/// The most keys a root may list in each role.
pub const MAX_ROOT_KEYS: usize = 16;

/// The signed content of a root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    pub schema: String,
    pub deployment: String,
    /// 1 for the first root, then one more for each rotation.
    pub version: u64,
    /// v2: when the root was signed. A root that changes the release keys starts the new keys' floors
    /// here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Timestamp>,
    /// After this, the root no longer admits new manifests (the active release keeps serving) until a
    /// newer root is found.
    pub expires_at: Timestamp,
    /// v2: the keys that sign the next root (kept offline), in the text form of a `.pub` file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub root_keys: Vec<String>,
    /// v2: how many distinct `root_keys` must sign the next root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_threshold: Option<u16>,
    /// The release keys, which sign manifests (in v1, also the next root), in the text form of a
    /// `.pub` file (`ed25519 BASE64`).
    pub keys: Vec<String>,
    /// How many distinct `keys` must sign a manifest.
    pub threshold: u16,
}

/// One role's keys and threshold, to write a root with.
#[derive(Clone, Copy, Debug)]
pub struct Role<'a> {
    pub keys: &'a [PublicKey],
    pub threshold: u16,
}

/// Why a root was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RootError {
    #[error("trust root: {0}")]
    Envelope(VerifyError),
    #[error("trust root payload is not valid JSON of {ROOT_SCHEMA}: {0}")]
    Json(String),
    #[error("trust root schema is {0:?}, expected {ROOT_SCHEMA:?} or {ROOT_SCHEMA_V1:?}")]
    Schema(String),
    #[error("trust root version {version} of {schema} {why}")]
    Fields {
        version: u64,
        schema: String,
        why: &'static str,
    },
    #[error(
        "trust root version {version} is {ROOT_SCHEMA_V1}, after a {ROOT_SCHEMA} root: a downgrade would let release keys sign roots again"
    )]
    Downgrade { version: u64 },
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
        "trust root version {version} lists {keys} {role} key(s) with a threshold of {threshold}: it needs 1 to {MAX_ROOT_KEYS} keys and a threshold they can meet"
    )]
    Keys {
        version: u64,
        role: &'static str,
        keys: usize,
        threshold: u16,
    },
    #[error(
        "trust root version {version} is not signed by enough of version {previous}'s root keys: {why}"
    )]
    PreviousKeys {
        version: u64,
        previous: u64,
        why: VerifyError,
    },
    #[error("trust root version {version} is not signed by enough of its own root keys: {why}")]
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

fn key_texts(keys: &[PublicKey]) -> Vec<String> {
    keys.iter()
        .map(|k| k.to_file_text().trim().to_owned())
        .collect()
}

impl Root {
    /// Root `version` of `deployment` (v2), created at `created_at`: `root` signs the next root,
    /// `release` signs manifests.
    pub fn new(
        deployment: &str,
        version: u64,
        created_at: Timestamp,
        expires_at: Timestamp,
        root: Role<'_>,
        release: Role<'_>,
    ) -> Self {
        Self {
            schema: ROOT_SCHEMA.into(),
            deployment: deployment.into(),
            version,
            created_at: Some(created_at),
            expires_at,
            root_keys: key_texts(root.keys),
            root_threshold: Some(root.threshold),
            keys: key_texts(release.keys),
            threshold: release.threshold,
        }
    }

    /// A v1 root (one key set for manifests and roots), as earlier releases of deckhand wrote them.
    pub fn v1(
        deployment: &str,
        version: u64,
        expires_at: Timestamp,
        keys: &[PublicKey],
        threshold: u16,
    ) -> Self {
        Self {
            schema: ROOT_SCHEMA_V1.into(),
            deployment: deployment.into(),
            version,
            created_at: None,
            expires_at,
            root_keys: Vec::new(),
            root_threshold: None,
            keys: key_texts(keys),
            threshold,
        }
    }

    /// The signed envelope bytes, signed by each of `keys` (for a rotation: the previous root's root
    /// keys and the new root's).
    pub fn sign(&self, keys: &[&SecretKey]) -> Vec<u8> {
        // Serialising plain strings and numbers cannot fail.
        let payload = serde_json::to_vec_pretty(self).unwrap_or_default();
        Envelope::sign_typed(ROOT_PAYLOAD_TYPE, &payload, keys).to_bytes()
    }

    pub fn is_v1(&self) -> bool {
        self.schema == ROOT_SCHEMA_V1
    }

    /// The keys that sign the next root, and how many must.
    pub fn root_role(&self) -> (&[String], u16) {
        match self.root_threshold {
            Some(t) if !self.is_v1() => (&self.root_keys, t),
            _ => (&self.keys, self.threshold),
        }
    }

    /// The shape the schema asks for.
    fn check_fields(&self) -> Result<(), RootError> {
        let fields = |why| RootError::Fields {
            version: self.version,
            schema: self.schema.clone(),
            why,
        };
        match self.schema.as_str() {
            ROOT_SCHEMA_V1
                if self.created_at.is_some()
                    || !self.root_keys.is_empty()
                    || self.root_threshold.is_some() =>
            {
                Err(fields("has fields of a later schema"))
            }
            ROOT_SCHEMA_V1 => Ok(()),
            ROOT_SCHEMA
                if self.created_at.is_none()
                    || self.root_keys.is_empty()
                    || self.root_threshold.is_none() =>
            {
                Err(fields("lacks created_at, root_keys or root_threshold"))
            }
            ROOT_SCHEMA => Ok(()),
            other => Err(RootError::Schema(other.to_owned())),
        }
    }

    fn policy_of(
        &self,
        role: &'static str,
        keys: &[String],
        threshold: u16,
    ) -> Result<TrustPolicy, RootError> {
        let too_few = || RootError::Keys {
            version: self.version,
            role,
            keys: keys.len(),
            threshold,
        };
        if keys.is_empty() || keys.len() > MAX_ROOT_KEYS {
            return Err(too_few());
        }
        let keys = keys
            .iter()
            .map(|k| {
                PublicKey::from_file_text(k).map_err(|e| RootError::Key {
                    version: self.version,
                    key: k.clone(),
                    why: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        TrustPolicy::new(keys, usize::from(threshold)).map_err(|_| too_few())
    }

    /// The policies this root sets: for the next root, and for manifests.
    fn policies(&self) -> Result<(TrustPolicy, TrustPolicy), RootError> {
        let (root_keys, root_threshold) = self.root_role();
        Ok((
            self.policy_of("root", root_keys, root_threshold)?,
            self.policy_of("release", &self.keys, self.threshold)?,
        ))
    }

    /// The release keys as a set with their threshold: what a rotation compares.
    fn release_role(&self) -> (std::collections::BTreeSet<&str>, u16) {
        (
            self.keys.iter().map(String::as_str).collect(),
            self.threshold,
        )
    }
}

/// A root this agent trusts: the installed one, or one reached from it by [`TrustedRoot::update`].
#[derive(Clone, Debug)]
pub struct TrustedRoot {
    root: Root,
    /// Signs the next root.
    root_policy: TrustPolicy,
    /// Signs manifests.
    policy: TrustPolicy,
    envelope: Vec<u8>,
}

/// Decodes a root envelope: its shape, type and payload, not yet its signatures.
fn open(envelope: &[u8]) -> Result<(Envelope, Vec<u8>, Root), RootError> {
    let (env, payload) = decode_typed(envelope, ROOT_PAYLOAD_TYPE).map_err(RootError::Envelope)?;
    let root: Root =
        serde_json::from_slice(&payload).map_err(|e| RootError::Json(e.to_string()))?;
    root.check_fields()?;
    Ok((env, payload, root))
}

impl TrustedRoot {
    /// The root an agent was installed with (or kept from an earlier run): for `deployment`, signed by
    /// a threshold of its own root keys. Its expiry is checked when it is used, not here: an agent
    /// whose root expired keeps serving and looks for a newer root.
    pub fn installed(envelope: &[u8], deployment: &str) -> Result<Self, RootError> {
        let (env, payload, root) = open(envelope)?;
        if root.deployment != deployment {
            return Err(RootError::Deployment {
                expected: deployment.into(),
                found: root.deployment,
            });
        }
        let (root_policy, policy) = root.policies()?;
        root_policy
            .signers(&env, &payload)
            .map_err(|why| RootError::OwnKeys {
                version: root.version,
                why,
            })?;
        Ok(Self {
            root,
            root_policy,
            policy,
            envelope: envelope.to_vec(),
        })
    }

    /// The next root, if `envelope` is it: version one above this one, the same deployment, not a
    /// downgrade to v1, signed by a threshold of this root's root keys and a threshold of its own.
    /// Expiry is not checked: a Pi that was offline walks through roots that have expired since to the
    /// newest one.
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
        if next.is_v1() && !self.root.is_v1() {
            return Err(RootError::Downgrade {
                version: next.version,
            });
        }
        self.root_policy
            .signers(&env, &payload)
            .map_err(|why| RootError::PreviousKeys {
                version: next.version,
                previous: self.root.version,
                why,
            })?;
        let (root_policy, policy) = next.policies()?;
        root_policy
            .signers(&env, &payload)
            .map_err(|why| RootError::OwnKeys {
                version: next.version,
                why,
            })?;
        Ok(Self {
            root: next,
            root_policy,
            policy,
            envelope: envelope.to_vec(),
        })
    }

    /// The floor epoch this root starts when it follows `previous`: when it changes the release keys
    /// (or their threshold) and carries a signed `created_at` (v2). A v1 root starts none: its keys
    /// sign roots too, so a leaked key could reset the floors itself.
    pub fn epoch_after(&self, previous: &TrustedRoot) -> Option<Epoch> {
        let since = self.root.created_at?;
        (self.root.release_role() != previous.root.release_role()).then_some(Epoch {
            root: self.root.version,
            since,
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

    fn pubs(keys: &[&SecretKey]) -> Vec<PublicKey> {
        keys.iter().map(|k| k.public().clone()).collect()
    }

    /// A v2 root whose root keys and release keys are the same `keys`.
    fn root(version: u64, keys: &[&SecretKey], threshold: u16) -> Root {
        let pubs = pubs(keys);
        let role = Role {
            keys: &pubs,
            threshold,
        };
        Root::new(
            "shop-1",
            version,
            t("2026-11-01T00:00:00Z"),
            t("2027-06-01T00:00:00Z"),
            role,
            role,
        )
    }

    /// A v2 root: `root_keys` sign roots, `release` sign manifests (threshold 1 each).
    fn split(version: u64, root_keys: &[&SecretKey], release: &[&SecretKey], at: &str) -> Root {
        let (r, k) = (pubs(root_keys), pubs(release));
        Root::new(
            "shop-1",
            version,
            t(at),
            t("2027-06-01T00:00:00Z"),
            Role {
                keys: &r,
                threshold: 1,
            },
            Role {
                keys: &k,
                threshold: 1,
            },
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
                .contains("not signed by enough of version 1's root keys")
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
        let other = Root::v1("shop-2", 3, t("2027-01-01T00:00:00Z"), &pubs(&[&c]), 1);
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
        // Each schema has its own fields.
        let mut v1_with_root_keys = Root::v1("shop-1", 1, now(), &pubs(&[&a]), 1);
        v1_with_root_keys.root_keys = vec![v1_with_root_keys.keys[0].clone()];
        assert!(matches!(
            TrustedRoot::installed(&v1_with_root_keys.sign(&[&a]), "shop-1"),
            Err(RootError::Fields { .. })
        ));
        let mut v2_without = root(1, &[&a], 1);
        v2_without.created_at = None;
        assert!(matches!(
            TrustedRoot::installed(&v2_without.sign(&[&a]), "shop-1"),
            Err(RootError::Fields { .. })
        ));
    }

    #[test]
    fn release_keys_sign_manifests_and_only_the_offline_root_keys_sign_the_next_root() {
        let (offline, release, thief) = (key(1), key(2), key(3));
        let v1 = TrustedRoot::installed(
            &split(1, &[&offline], &[&release], "2026-11-01T00:00:00Z").sign(&[&offline]),
            "shop-1",
        )
        .unwrap();
        // The release key signs manifests, the root key does not.
        let policy = v1.policy_at(now()).unwrap();
        let manifest_by = |k: &SecretKey| Envelope::sign_manifest(&sample(5), &[k]).to_bytes();
        assert!(policy.verify(&manifest_by(&release), now()).is_ok());
        assert!(policy.verify(&manifest_by(&offline), now()).is_err());
        // A leaked release key cannot publish a root naming its thief.
        let grab = split(2, &[&thief], &[&thief], "2026-12-01T00:00:00Z");
        assert!(matches!(
            v1.update(&grab.sign(&[&release, &thief])),
            Err(RootError::PreviousKeys { version: 2, .. })
        ));
        // The operator's rotation, signed by the offline key alone, retires the release key and starts
        // a new floor epoch at its signed time.
        let fresh = key(4);
        let v2 = v1
            .update(&split(2, &[&offline], &[&fresh], "2026-12-01T00:00:00Z").sign(&[&offline]))
            .unwrap();
        assert_eq!(
            v2.epoch_after(&v1),
            Some(Epoch {
                root: 2,
                since: t("2026-12-01T00:00:00Z")
            })
        );
        assert!(
            v2.policy_at(now())
                .unwrap()
                .verify(&manifest_by(&release), now())
                .is_err()
        );
        // A rotation of the root keys alone keeps the release keys' floors.
        let offline2 = key(5);
        let v3 = v2
            .update(
                &split(3, &[&offline2], &[&fresh], "2026-12-02T00:00:00Z")
                    .sign(&[&offline, &offline2]),
            )
            .unwrap();
        assert_eq!(v3.epoch_after(&v2), None);
    }

    #[test]
    fn a_v1_root_is_followed_by_a_v2_one_never_the_other_way_round() {
        let (a, b) = (key(1), key(2));
        let v1 = TrustedRoot::installed(
            &Root::v1("shop-1", 1, t("2027-06-01T00:00:00Z"), &pubs(&[&a]), 1).sign(&[&a]),
            "shop-1",
        )
        .unwrap();
        // v1's keys sign the next root too.
        let v2 = v1
            .update(&split(2, &[&b], &[&b], "2026-12-01T00:00:00Z").sign(&[&a, &b]))
            .unwrap();
        assert!(v2.epoch_after(&v1).is_some());
        let back = Root::v1("shop-1", 3, t("2027-06-01T00:00:00Z"), &pubs(&[&b]), 1);
        assert_eq!(
            v2.update(&back.sign(&[&b])).unwrap_err(),
            RootError::Downgrade { version: 3 }
        );
        // A v1 rotation starts no epoch: its keys could have reset the floors themselves.
        let v1b = v1
            .update(
                &Root::v1("shop-1", 2, t("2027-06-01T00:00:00Z"), &pubs(&[&b]), 1).sign(&[&a, &b]),
            )
            .unwrap();
        assert_eq!(v1b.epoch_after(&v1), None);
    }
}
