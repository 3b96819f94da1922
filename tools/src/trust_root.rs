//! `deckhand keys root` and `deckhand keys rotate`: a deployment's signed trust root in the bucket
//! (`deployments/{d}/root/{version}.json`, see `deckhand_protocol::root`). Roots are written as v2: root
//! keys (kept offline) sign roots, release keys sign manifests. The first root is signed by its own root
//! keys; each next one by a threshold of the previous root's root keys and a threshold of its own, and
//! is checked against the previous one here before it is written, so the operator learns of a missing
//! signature before any agent does. A rotation that changes the release keys starts a new floor epoch
//! on every agent (`deckhand_protocol::floors`): the recovery from a leaked release key.

use crate::error::ToolError;
use crate::origin::Bucket;
use bytes::Bytes;
use deckhand_protocol::layout::{Key, Name};
use deckhand_protocol::root::{Role, Root, TrustedRoot};
use deckhand_protocol::{PublicKey, SecretKey};
use jiff::{SignedDuration, Timestamp};

/// A root written: its version and envelope bytes.
#[derive(Debug)]
pub struct Written {
    pub version: u64,
    pub envelope: Vec<u8>,
}

fn root_error(context: String) -> impl FnOnce(deckhand_protocol::root::RootError) -> ToolError {
    move |e| ToolError::TrustRoot {
        context,
        why: e.to_string(),
    }
}

/// The keys of one role and their threshold.
#[derive(Clone, Debug)]
pub struct Keys<K> {
    pub keys: Vec<K>,
    pub threshold: u16,
}

impl Keys<SecretKey> {
    fn public(&self) -> Keys<PublicKey> {
        Keys {
            keys: self.keys.iter().map(|k| k.public().clone()).collect(),
            threshold: self.threshold,
        }
    }
}

impl Keys<PublicKey> {
    fn role(&self) -> Role<'_> {
        Role {
            keys: &self.keys,
            threshold: self.threshold,
        }
    }

    /// The keys and threshold a root lists for a role.
    fn listed(version: u64, texts: &[String], threshold: u16) -> Result<Self, ToolError> {
        let keys = texts
            .iter()
            .map(|t| {
                PublicKey::from_file_text(t).map_err(|e| ToolError::TrustRoot {
                    context: format!("root version {version}"),
                    why: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { keys, threshold })
    }
}

/// Writes root version 1 of `deployment`: `root` keys (which sign it, and the next root) and `release`
/// keys (which sign manifests); into the bucket when one is given (only if the deployment has no root
/// yet).
pub async fn init(
    bucket: Option<&dyn Bucket>,
    deployment: &Name,
    root: &Keys<SecretKey>,
    release: &Keys<PublicKey>,
    expires_in: SignedDuration,
    now: Timestamp,
) -> Result<Written, ToolError> {
    let root_public = root.public();
    let root_doc = Root::new(
        deployment.as_str(),
        1,
        now,
        expires(now, expires_in)?,
        root_public.role(),
        release.role(),
    );
    let envelope = root_doc.sign(&root.keys.iter().collect::<Vec<_>>());
    // The checks an agent makes at install.
    TrustedRoot::installed(&envelope, deployment.as_str())
        .map_err(root_error("the new trust root".into()))?;
    if let Some(b) = bucket {
        let key = b.layout().trust_root(deployment, 1);
        b.put_new(&key, Bytes::from(envelope.clone()))
            .await
            .map_err(|e| match e {
                crate::origin::OriginError::AlreadyExists { .. } => ToolError::TrustRoot {
                    context: format!("deployment {deployment}"),
                    why: "it has a trust root already: use `deckhand keys rotate`".into(),
                },
                other => other.into(),
            })?;
    }
    Ok(Written {
        version: 1,
        envelope,
    })
}

fn expires(now: Timestamp, expires_in: SignedDuration) -> Result<Timestamp, ToolError> {
    now.checked_add(expires_in)
        .map_err(|e| ToolError::Usage(format!("--expires-in: {e}")))
}

/// The newest root of `deployment` in the bucket, verified along the chain from version 1.
pub async fn newest(bucket: &dyn Bucket, deployment: &Name) -> Result<TrustedRoot, ToolError> {
    let layout = bucket.layout().clone();
    let dir = layout.trust_root(deployment, 1);
    let prefix = dir.rsplit_once('/').map_or("", |(p, _)| p);
    let mut versions: Vec<u64> = bucket
        .list(&format!("{prefix}/"))
        .await?
        .into_iter()
        .filter_map(|o| match layout.classify(&o.key) {
            Ok(Key::Root { version, .. }) => Some(version),
            _ => None,
        })
        .collect();
    versions.sort_unstable();
    if versions.first() != Some(&1) {
        return Err(ToolError::TrustRoot {
            context: format!("deployment {deployment}"),
            why: "it has no trust root: create one with `deckhand keys root`".into(),
        });
    }
    let read = |v: u64| {
        let key = layout.trust_root(deployment, v);
        async move {
            bucket
                .get_capped(&key, deckhand_protocol::envelope::MAX_ENVELOPE as u64)
                .await
        }
    };
    let mut trusted = TrustedRoot::installed(&read(1).await?, deployment.as_str()).map_err(
        root_error(format!("deployment {deployment} root version 1")),
    )?;
    for v in versions.into_iter().skip(1) {
        if v != trusted.version() + 1 {
            break;
        }
        trusted = trusted.update(&read(v).await?).map_err(root_error(format!(
            "deployment {deployment} root version {v}"
        )))?;
    }
    Ok(trusted)
}

/// What a rotation changes; what it leaves out is kept from the current root.
#[derive(Debug, Default)]
pub struct Rotation {
    /// The new root keys (they sign the new root). Left out: the current root keys, unless the current
    /// root has one key set for both roles (v1, or v2 written so), whose root keys follow the new
    /// release keys (which must then be given as secret keys).
    pub root: Option<Keys<SecretKey>>,
    /// The new release keys. Left out: the current ones (a rotation of the root keys alone).
    pub release: Option<Keys<PublicKey>>,
    /// The new release keys' secrets, when they were given as secret keys (to sign as root keys).
    pub release_secrets: Vec<SecretKey>,
}

/// Publishes the next root, signed by `old_keys` (which must meet the current root's root threshold)
/// and by the new root keys. Of two rotations racing, one wins; the other is told.
pub async fn rotate(
    bucket: &dyn Bucket,
    deployment: &Name,
    old_keys: &[SecretKey],
    change: Rotation,
    expires_in: SignedDuration,
    now: Timestamp,
) -> Result<Written, ToolError> {
    let current = newest(bucket, deployment).await?;
    let version = current.version() + 1;
    let cur = current.root();
    let one_set = {
        let (root_keys, root_threshold) = cur.root_role();
        root_keys == cur.keys.as_slice() && root_threshold == cur.threshold
    };
    let release = match change.release {
        Some(r) => r,
        None => Keys::listed(version - 1, &cur.keys, cur.threshold)?,
    };
    // The new root keys, with the secrets that sign for them.
    let (root, root_signers): (Keys<PublicKey>, Vec<SecretKey>) = match change.root {
        Some(r) => (r.public(), r.keys),
        None if one_set => {
            if change.release_secrets.len() != release.keys.len() {
                return Err(ToolError::TrustRoot {
                    context: format!("root version {version}"),
                    why: "the current root's keys sign roots too, so the new keys must as well: give \
                          --new-key as secret keys (NAME.key), or give --new-root-key"
                        .into(),
                });
            }
            (release.clone(), change.release_secrets)
        }
        None => {
            let (texts, threshold) = cur.root_role();
            (Keys::listed(version - 1, texts, threshold)?, Vec::new())
        }
    };
    let doc = Root::new(
        deployment.as_str(),
        version,
        now,
        expires(now, expires_in)?,
        root.role(),
        release.role(),
    );
    let signers: Vec<&SecretKey> = old_keys.iter().chain(&root_signers).collect();
    let envelope = doc.sign(&signers);
    // The checks every agent will make.
    current
        .update(&envelope)
        .map_err(root_error(format!("root version {version}")))?;
    let key = bucket.layout().trust_root(deployment, version);
    bucket
        .put_new(&key, Bytes::from(envelope.clone()))
        .await
        .map_err(|e| match e {
            crate::origin::OriginError::AlreadyExists { .. } => ToolError::TrustRoot {
                context: format!("root version {version}"),
                why: "another rotation wrote it first; nothing was overwritten".into(),
            },
            other => other.into(),
        })?;
    Ok(Written { version, envelope })
}
