//! `deckhand fleet init|enroll|renew|revoke|rotate-ca|retire-ca|publish|status`: the fleet's certificate
//! authority (who may exchange chunks and manifests over QUIC), and the fleet as one agent sees it.
//! Each change rewrites DIR/bundle.pem; with `--origin` it is put in the bucket (`fleet/bundle.pem`),
//! where every agent reads it at its poll and passes it on to its peers.

use crate::output::emit;
use clap::{Args, Subcommand};
use deckhand_tools::ToolError;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum FleetCommand {
    /// Make the fleet CA in DIR: ca.crt (copy it to every Pi), ca.key (keep it with the operator).
    Init {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// A name for the fleet (shown in the CA certificate).
        #[arg(long, default_value = "deckhand")]
        name: String,
    },
    /// Issue an agent certificate: OUT/NAME.crt and OUT/NAME.key, for the Pi with that agent id.
    Enroll {
        #[arg(long)]
        dir: PathBuf,
        /// The agent id (lowercase letters, digits, '-').
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = deckhand_tools::fleet_ca::ENROLL_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
    },
    /// Renew certificates for the keys they were issued to (the Pis keep their keys): the agents
    /// named, or every live certificate ending within --within days.
    Renew {
        #[arg(long)]
        dir: PathBuf,
        /// An agent to renew (repeatable); none: every certificate ending within --within days.
        #[arg(long = "name")]
        names: Vec<String>,
        /// Renew what ends within this many days.
        #[arg(long, default_value_t = 30)]
        within: u32,
        /// Days the new certificates are valid.
        #[arg(long, default_value_t = deckhand_tools::fleet_ca::ENROLL_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        #[command(flatten)]
        to: PublishTo,
    },
    /// Revoke an agent's certificates: agents refuse them once they take the bundle.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        to: PublishTo,
    },
    /// Rotate the fleet CA: a new CA, cross-signed by the current one, and every live certificate
    /// renewed under it. Agents move over from the bundle; retire the old CA once they have.
    RotateCa {
        #[arg(long)]
        dir: PathBuf,
        /// Days the renewed certificates are valid.
        #[arg(long, default_value_t = deckhand_tools::fleet_ca::ENROLL_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        #[command(flatten)]
        to: PublishTo,
    },
    /// Retire the CA the last rotation replaced: agents stop trusting it and its certificates.
    RetireCa {
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        to: PublishTo,
    },
    /// Write the bundle again (a new number) and put it in the bucket.
    Publish {
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        to: PublishTo,
    },
    /// The fleet as one agent sees it: its peers, their versions and what was exchanged.
    Status {
        /// The agent's HTTP address (host:port).
        #[arg(long)]
        agent: String,
        #[arg(long)]
        json: bool,
    },
}

/// Where the fleet bundle goes besides DIR/bundle.pem.
#[derive(Args, Clone)]
pub struct PublishTo {
    /// Put the bundle in this bucket (s3://bucket/prefix, or file:///dir for a stick).
    #[arg(long)]
    origin: Option<String>,
    /// An S3-compatible endpoint; path-style addressing is used with it.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    endpoint_url: Option<String>,
}

/// Reports what a change wrote, and puts the bundle in the bucket when asked.
async fn published(
    written: deckhand_tools::fleet_ca::Written,
    to: &PublishTo,
) -> Result<(), ToolError> {
    for name in &written.issued {
        println!("renewed {name}");
    }
    eprintln!(
        "fleet bundle {} written to {}",
        written.number,
        written.bundle.display()
    );
    let Some(origin) = &to.origin else {
        return Ok(());
    };
    let bucket = crate::settle::bucket(origin, to.endpoint_url.as_deref()).await?;
    let body = std::fs::read(&written.bundle).map_err(ToolError::io("read", &written.bundle))?;
    let key = bucket.layout().fleet();
    bucket.put(&key, body.into()).await?;
    eprintln!("fleet bundle {} put at {origin} ({key})", written.number);
    Ok(())
}

pub async fn run(command: FleetCommand) -> Result<(), ToolError> {
    use deckhand_tools::fleet_ca::CaDir;
    let fleet_err = |e: deckhand_tools::fleet_ca::CaError| match e {
        e @ deckhand_tools::fleet_ca::CaError::AgentId(_) => {
            ToolError::Usage(format!("--name: {e}"))
        }
        e => ToolError::Ca(e),
    };
    match command {
        FleetCommand::Init { dir, name } => {
            let ca = CaDir::new(&dir);
            ca.init(&name).map_err(fleet_err)?;
            println!("fleet CA in {}", dir.display());
            eprintln!(
                "copy {} to every Pi; keep ca.key with the operator",
                ca.cert_path().display()
            );
        }
        FleetCommand::Enroll {
            dir,
            name,
            out,
            days,
        } => {
            let (crt, key) = CaDir::new(&dir)
                .enroll(&name, days, &out)
                .map_err(fleet_err)?;
            println!("{name}");
            eprintln!(
                "wrote {} and {} (copy both to the Pi, with ca.crt)",
                crt.display(),
                key.display()
            );
        }
        FleetCommand::Renew {
            dir,
            names,
            within,
            days,
            to,
        } => {
            let written = CaDir::new(&dir)
                .renew(&names, within, days)
                .map_err(fleet_err)?;
            if written.issued.is_empty() {
                eprintln!("nothing ends within {within} days; nothing renewed");
            }
            published(written, &to).await?;
        }
        FleetCommand::Revoke { dir, name, to } => {
            let ca = CaDir::new(&dir);
            let (n, written) = ca.revoke(&name).map_err(fleet_err)?;
            println!("revoked {n} certificate(s) of {name}");
            published(written, &to).await?;
        }
        FleetCommand::RotateCa { dir, days, to } => {
            let written = CaDir::new(&dir).rotate_ca(days).map_err(fleet_err)?;
            eprintln!(
                "a new fleet CA in {}; retire the old one (deckhand fleet retire-ca) once every Pi shows it",
                dir.display()
            );
            published(written, &to).await?;
        }
        FleetCommand::RetireCa { dir, to } => {
            let written = CaDir::new(&dir).retire_ca().map_err(fleet_err)?;
            published(written, &to).await?;
        }
        FleetCommand::Publish { dir, to } => {
            let written = CaDir::new(&dir).publish().map_err(fleet_err)?;
            published(written, &to).await?;
        }
        FleetCommand::Status { agent, json } => {
            let view =
                deckhand_agent::http::get_fleet(&agent)
                    .await
                    .map_err(|e| ToolError::AgentApi {
                        name: format!("--agent {agent}"),
                        why: e.to_string(),
                    })?;
            emit(json, &view, |view| print!("{}", view.render()))?;
        }
    }
    Ok(())
}
