//! `deckhand keys root` and `deckhand keys rotate`: a deployment's signed trust root in the bucket
//! (`deployments/{d}/root/{version}.json`, see `deckhand_protocol::root`). The first root is signed by
//! its own keys; each next one by a threshold of the previous root's keys and a threshold of its own,
//! and is checked against the previous one here before it is written, so the operator learns of a
//! missing signature before any agent does.

use crate::error::ToolError;
use crate::origin::Bucket;
use bytes::Bytes;
use deckhand_protocol::SecretKey;
use deckhand_protocol::layout::{Key, Name};
use deckhand_protocol::root::{Root, TrustedRoot};
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

/// Writes root version 1 of `deployment` listing `keys` (all of which sign it), `threshold` of which
/// must sign a manifest; into the bucket when one is given (only if the deployment has no root yet).
pub async fn init(
    bucket: Option<&dyn Bucket>,
    deployment: &Name,
    keys: &[SecretKey],
    threshold: u16,
    expires_in: SignedDuration,
    now: Timestamp,
) -> Result<Written, ToolError> {
    let root = Root::new(
        deployment.as_str(),
        1,
        expires(now, expires_in)?,
        &keys.iter().map(|k| k.public().clone()).collect::<Vec<_>>(),
        threshold,
    );
    let envelope = root.sign(&keys.iter().collect::<Vec<_>>());
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

/// Publishes the next root: `new_keys` (which sign it) with `threshold`, signed also by `old_keys`, which
/// must meet the current root's threshold. Of two rotations racing, one wins; the other is told.
pub async fn rotate(
    bucket: &dyn Bucket,
    deployment: &Name,
    old_keys: &[SecretKey],
    new_keys: &[SecretKey],
    threshold: u16,
    expires_in: SignedDuration,
    now: Timestamp,
) -> Result<Written, ToolError> {
    let current = newest(bucket, deployment).await?;
    let version = current.version() + 1;
    let root = Root::new(
        deployment.as_str(),
        version,
        expires(now, expires_in)?,
        &new_keys
            .iter()
            .map(|k| k.public().clone())
            .collect::<Vec<_>>(),
        threshold,
    );
    let signers: Vec<&SecretKey> = old_keys.iter().chain(new_keys).collect();
    let envelope = root.sign(&signers);
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
