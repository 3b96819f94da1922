//! `deckhand keygen` and `deckhand keys root|rotate`: signing keys and a deployment's trust root.

use crate::output::emit;
use crate::settle::{OriginArgs, parse_duration, read_secret_key, target};
use clap::{Args, Subcommand};
use deckhand_protocol::SecretKey;
use deckhand_tools::{ToolError, keygen};
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
    /// Create root version 1 of a deployment, signed by every --key it lists: written to --out (what
    /// agents are installed with, `--trust-root`) and to the bucket.
    Root {
        #[command(flatten)]
        origin: OriginArgs,
        /// A signing key the root lists (NAME.key); repeatable.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// How many distinct listed keys must sign a manifest (and the next root).
        #[arg(long, default_value_t = 1)]
        threshold: u16,
        /// How long the root admits manifests: 365d, 52w, ...
        #[arg(long, default_value = "365d")]
        expires_in: String,
        /// Where to write the root for installing on the Pis.
        #[arg(long)]
        out: PathBuf,
    },
    /// Publish the next root of a deployment: --new-key replaces the keys, signed by enough of the
    /// current root's keys (--key) and by the new ones. Agents follow it at their next poll.
    Rotate {
        #[command(flatten)]
        origin: OriginArgs,
        /// A key of the current root (NAME.key); repeatable, up to its threshold.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// A key of the new root (NAME.key); repeatable.
        #[arg(long = "new-key", required = true)]
        new_keys: Vec<PathBuf>,
        #[arg(long, default_value_t = 1)]
        threshold: u16,
        #[arg(long, default_value = "365d")]
        expires_in: String,
        #[arg(long)]
        json: bool,
    },
}

fn read_keys(paths: &[PathBuf]) -> Result<Vec<SecretKey>, ToolError> {
    paths.iter().map(|p| read_secret_key(p)).collect()
}

pub async fn keys(command: KeysCommand) -> Result<(), ToolError> {
    match command {
        KeysCommand::Root {
            origin,
            keys,
            threshold,
            expires_in,
            out,
        } => {
            let expires_in = parse_duration("expires-in", &expires_in)?;
            let t = target(&origin).await?;
            let w = deckhand_tools::trust_root::init(
                Some(&*t.origin),
                &t.deployment,
                &read_keys(&keys)?,
                threshold,
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
            expires_in,
            json,
        } => {
            let expires_in = parse_duration("expires-in", &expires_in)?;
            let t = target(&origin).await?;
            let w = deckhand_tools::trust_root::rotate(
                &*t.origin,
                &t.deployment,
                &read_keys(&keys)?,
                &read_keys(&new_keys)?,
                threshold,
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
