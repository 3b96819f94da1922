//! `deckhand fleet init|enroll|revoke|status`: the fleet's certificate authority (who may exchange
//! chunks and manifests over QUIC), and the fleet as one agent sees it.

use crate::output::emit;
use clap::Subcommand;
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
    /// Revoke an agent's certificates: rewrites DIR/crl.pem; give it to agents with --fleet-crl.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
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
        FleetCommand::Revoke { dir, name } => {
            let ca = CaDir::new(&dir);
            let n = ca.revoke(&name).map_err(fleet_err)?;
            println!(
                "revoked {n} certificate(s) of {name}; give {} to every agent (--fleet-crl)",
                ca.crl_path().display()
            );
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
