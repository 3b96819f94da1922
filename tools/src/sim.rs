//! A shop in one process, for the demo and the fleet benchmark: a local S3 server, a signing key, a fleet
//! CA, and agents run in-process by the agent library's own daemon (`daemon::run_with`), each with its own
//! store, HTTP port and QUIC port on 127.0.0.1.

use crate::ToolError;
use crate::locals3::LocalS3;
use crate::publish::{self, PublishOptions};
use deckhand_agent::daemon::{Listening, RunConfig};
use deckhand_agent::fleet::{CaDir, CredentialPaths};
use deckhand_agent::origin::Origin;
use deckhand_agent::recognizer::BackendChoice;
use deckhand_protocol::SecretKey;
use deckhand_protocol::layout::Name;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const DEPLOYMENT: &str = "shop-1";

fn failed(what: &str) -> impl FnOnce(String) -> ToolError + '_ {
    move |e| ToolError::Failed(format!("{what}: {e}"))
}

/// An agent running in this process.
pub struct SimAgent {
    pub name: String,
    pub listening: Listening,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), deckhand_agent::daemon::DaemonError>>,
}

impl SimAgent {
    pub fn http(&self) -> String {
        self.listening.http.to_string()
    }

    pub async fn status(&self) -> Result<serde_json::Value, ToolError> {
        deckhand_agent::http::get_json(&self.http(), "/v1/status")
            .await
            .map_err(|e| ToolError::Failed(format!("agent {}: {e}", self.name)))
    }

    /// Waits until `pred` holds of the agent's status, polling every 100 ms, for at most `limit`.
    pub async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value, ToolError> {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.status().await?;
            if pred(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(ToolError::Failed(format!(
                    "agent {}: no {what} after {} s; status: {s}",
                    self.name,
                    limit.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(mut self) -> Result<(), ToolError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ToolError::Failed(format!("agent {}: {e}", self.name))),
            Err(e) => Err(ToolError::Failed(format!("agent {}: {e}", self.name))),
        }
    }
}

/// The shop: S3, a key, a fleet CA, a work directory.
pub struct Shop {
    pub dir: PathBuf,
    pub s3: LocalS3,
    pub origin: Origin,
    pub key: SecretKey,
    pub trust: deckhand_protocol::PublicKey,
    pub ca: CaDir,
}

impl Shop {
    pub async fn open(dir: &Path) -> Result<Shop, ToolError> {
        std::fs::create_dir_all(dir).map_err(ToolError::io("create", dir))?;
        let s3 =
            LocalS3::start(&dir.join("s3"), "cards").map_err(ToolError::io("start S3 in", dir))?;
        let origin = Origin::connect(&s3.origin_url("fleet"), &s3.origin_config()).await?;
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| ToolError::Failed(format!("no randomness: {e}")))?;
        let key = SecretKey::from_seed(&seed);
        let trust = key.public().clone();
        let ca = CaDir::new(dir.join("fleet-ca"));
        ca.init("demo")
            .map_err(|e| failed("fleet init")(e.to_string()))?;
        Ok(Shop {
            dir: dir.to_owned(),
            s3,
            origin,
            key,
            trust,
            ca,
        })
    }

    pub async fn publish(
        &self,
        files: &deckhand_agent::release::ReleaseFiles,
    ) -> Result<publish::Prepared, ToolError> {
        let deployment =
            Name::deployment(DEPLOYMENT).map_err(|e| failed("deployment")(e.to_string()))?;
        let opts = PublishOptions::local(deployment, files, jiff::SignedDuration::from_hours(24));
        let work = self.dir.join("work");
        std::fs::create_dir_all(&work).map_err(ToolError::io("create", &work))?;
        let (prepared, _) = publish::publish(
            &self.origin,
            &self.s3.origin_config(),
            &self.key,
            &opts,
            &work,
        )
        .await?;
        Ok(prepared)
    }

    /// Starts agent `name` in this process. With `peers` it gets fleet credentials and dials those QUIC
    /// addresses; without, it has no QUIC at all (origin only).
    pub async fn agent(
        &self,
        name: &str,
        peers: Option<&[String]>,
        poll: Duration,
    ) -> Result<SimAgent, ToolError> {
        let fleet = match peers {
            Some(_) => {
                let (cert, key) = self
                    .ca
                    .enroll(name, 30, &self.dir.join("certs"))
                    .map_err(|e| failed("fleet enroll")(e.to_string()))?;
                Some(CredentialPaths {
                    ca: self.ca.cert_path(),
                    cert,
                    key,
                    crl: None,
                })
            }
            None => None,
        };
        let cfg = RunConfig {
            data_dir: self.dir.join(name),
            deployment: DEPLOYMENT.into(),
            trust: vec![self.trust.clone()],
            threshold: 1,
            http_listen: ([127, 0, 0, 1], 0).into(),
            inbox: None,
            outbox: None,
            backend: BackendChoice::Cpu,
            store_budget: None,
            origin: Some((self.s3.origin_url("fleet"), self.s3.origin_config())),
            poll,
            fleet,
            quic_listen: ([127, 0, 0, 1], 0).into(),
            peers: peers.map(<[String]>::to_vec).unwrap_or_default(),
            mdns: false,
            bundle_dir: None,
            serve_bytes_per_sec: None,
            max_wait: Duration::from_secs(20),
            settle: Duration::from_millis(500),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Listening>();
        let task = tokio::spawn(deckhand_agent::daemon::run_with(
            cfg,
            async move {
                let _ = stop_rx.await;
            },
            move |l| {
                let _ = ready_tx.send(l);
            },
        ));
        let listening = match ready_rx.await {
            Ok(l) => l,
            Err(_) => {
                let why = match task.await {
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(())) => "stopped".into(),
                    Err(e) => e.to_string(),
                };
                return Err(ToolError::Failed(format!(
                    "agent {name} did not start: {why}"
                )));
            }
        };
        Ok(SimAgent {
            name: name.to_owned(),
            listening,
            stop: Some(stop_tx),
            task,
        })
    }
}
