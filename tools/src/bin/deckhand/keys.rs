//! `deckhand keygen` and `deckhand keys root|rotate`: signing keys and a deployment's trust root.

use crate::output::emit;
use crate::settle::{OriginArgs, parse_duration, read_secret_key, target, usage};
use clap::{Args, Subcommand};
use deckhand_protocol::{PublicKey, SecretKey};
use deckhand_tools::{ToolError, keygen, trust_root};
use std::path::PathBuf;

// The flags of `deckhand keygen` (its help is the variant's doc comment in main.rs).
#[derive(Args)]
pub struct KeygenArgs {
    /// Path and base name of the key files.
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    json: bool,
}

pub fn keygen(a: KeygenArgs) -> Result<(), ToolError> {
    let pair = keygen::keygen(&a.out)?;
    let report = serde_json::json!({
        "key_id": pair.key_id, "secret": pair.secret, "public": pair.public,
    });
    emit(a.json, &report, |_| {
        println!("{}", pair.key_id);
        eprintln!(
            "wrote {} (keep it secret) and {}",
            pair.secret.display(),
            pair.public.display()
        );
    })
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create root version 1 of a deployment: written to --out (what agents are installed with,
    /// `--trust-root`) and to the bucket. --root-key keys sign roots and are kept offline; --key keys
    /// sign manifests. Without --root-key the --key keys sign roots too, and a leaked key can rotate.
    Root {
        #[command(flatten)]
        origin: OriginArgs,
        /// A release key the root lists (NAME.key or NAME.pub; NAME.key without --root-key); repeatable.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// How many distinct release keys must sign a manifest.
        #[arg(long, default_value_t = 1)]
        threshold: u16,
        /// A root key (NAME.key), which signs this root and the next; repeatable. Keep it offline.
        #[arg(long = "root-key")]
        root_keys: Vec<PathBuf>,
        /// How many distinct root keys must sign the next root.
        #[arg(long, default_value_t = 1)]
        root_threshold: u16,
        /// How long the root admits manifests: 365d, 52w, ...
        #[arg(long, default_value = "365d")]
        expires_in: String,
        /// Where to write the root for installing on the Pis.
        #[arg(long)]
        out: PathBuf,
    },
    /// Publish the next root of a deployment, signed by enough of the current root keys (--key) and by
    /// the new root keys. --new-key replaces the release keys (after a leak: every agent then starts
    /// the version and time floors again from this root, so a fast-forward by the leaked key freezes
    /// nothing); --new-root-key replaces the root keys. Agents follow it at their next poll.
    Rotate {
        #[command(flatten)]
        origin: OriginArgs,
        /// A root key of the current root (NAME.key); repeatable, up to its root threshold.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// A new release key (NAME.key, or NAME.pub when the root keys are separate); repeatable.
        #[arg(long = "new-key")]
        new_keys: Vec<PathBuf>,
        /// How many distinct new release keys must sign a manifest.
        #[arg(long, default_value_t = 1)]
        threshold: u16,
        /// A new root key (NAME.key); repeatable.
        #[arg(long = "new-root-key")]
        new_root_keys: Vec<PathBuf>,
        /// How many distinct new root keys must sign the next root.
        #[arg(long, default_value_t = 1)]
        root_threshold: u16,
        #[arg(long, default_value = "365d")]
        expires_in: String,
        #[arg(long)]
        json: bool,
    },
}

fn read_keys(paths: &[PathBuf]) -> Result<Vec<SecretKey>, ToolError> {
    paths.iter().map(|p| read_secret_key(p)).collect()
}

/// Keys given to `--{flag}` as secret keys (NAME.key) or public keys (NAME.pub): the public keys, and
/// the secrets of those given as secret keys.
fn read_any_keys(
    flag: &str,
    paths: &[PathBuf],
) -> Result<(Vec<PublicKey>, Vec<SecretKey>), ToolError> {
    let mut public = Vec::new();
    let mut secret = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p).map_err(ToolError::io("read key", p))?;
        if let Ok(k) = SecretKey::from_file_text(&text) {
            public.push(k.public().clone());
            secret.push(k);
            continue;
        }
        public.push(PublicKey::from_file_text(&text).map_err(|e| {
            usage(
                flag,
                &p.display().to_string(),
                format!("neither a secret key (NAME.key) nor a public key (NAME.pub): {e}"),
            )
        })?);
    }
    Ok((public, secret))
}

pub async fn keys(command: KeysCommand) -> Result<(), ToolError> {
    match command {
        KeysCommand::Root {
            origin,
            keys,
            threshold,
            root_keys,
            root_threshold,
            expires_in,
            out,
        } => {
            let expires_in = parse_duration("expires-in", &expires_in)?;
            let (release, release_secrets) = read_any_keys("key", &keys)?;
            let root = if root_keys.is_empty() {
                if release_secrets.len() != release.len() {
                    return Err(ToolError::Usage(
                        "without --root-key the --key keys sign the root: give them as NAME.key"
                            .into(),
                    ));
                }
                eprintln!(
                    "note: the release keys also sign roots; with separate --root-key keys kept offline a \
                     leaked release key can be recovered from with `deckhand keys rotate`"
                );
                trust_root::Keys {
                    keys: release_secrets,
                    threshold,
                }
            } else {
                trust_root::Keys {
                    keys: read_keys(&root_keys)?,
                    threshold: root_threshold,
                }
            };
            let t = target(&origin).await?;
            let w = trust_root::init(
                Some(&*t.origin),
                &t.deployment,
                &root,
                &trust_root::Keys {
                    keys: release,
                    threshold,
                },
                expires_in,
                jiff::Timestamp::now(),
            )
            .await?;
            std::fs::write(&out, &w.envelope).map_err(ToolError::io("write", &out))?;
            eprintln!(
                "wrote root version 1 of {} to {} and the bucket",
                t.deployment,
                out.display()
            );
            Ok(())
        }
        KeysCommand::Rotate {
            origin,
            keys,
            new_keys,
            threshold,
            new_root_keys,
            root_threshold,
            expires_in,
            json,
        } => {
            let expires_in = parse_duration("expires-in", &expires_in)?;
            if new_keys.is_empty() && new_root_keys.is_empty() {
                return Err(ToolError::Usage(
                    "a rotation needs --new-key (release keys), --new-root-key (root keys), or both"
                        .into(),
                ));
            }
            let (release, release_secrets) = read_any_keys("new-key", &new_keys)?;
            let change = trust_root::Rotation {
                root: (!new_root_keys.is_empty())
                    .then(|| read_keys(&new_root_keys))
                    .transpose()?
                    .map(|keys| trust_root::Keys {
                        keys,
                        threshold: root_threshold,
                    }),
                release: (!release.is_empty()).then_some(trust_root::Keys {
                    keys: release,
                    threshold,
                }),
                release_secrets,
            };
            let t = target(&origin).await?;
            let w = trust_root::rotate(
                &*t.origin,
                &t.deployment,
                &read_keys(&keys)?,
                change,
                expires_in,
                jiff::Timestamp::now(),
            )
            .await?;
            emit(json, &serde_json::json!({"version": w.version}), |_| {
                println!("published root version {} of {}", w.version, t.deployment);
            })
        }
    }
}
