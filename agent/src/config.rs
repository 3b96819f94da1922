//! `deckhand-agent run` settings: a TOML file (`--config`, default `/etc/deckhand/agent.toml`), every
//! setting also a flag; a flag wins over the file. Keys are the flags' names with `_` for `-`
//! (`--quic-listen` is `quic_listen`; repeatable flags are arrays: `trust = [...]`, `peers = [...]`).
//! An unknown key, a wrong type, or a missing or invalid setting is an error that names it.

use crate::daemon::RunConfig;
use crate::origin::{OriginConfig, OriginUrl};
use crate::peer::tls::CredentialPaths;
use crate::recognizer::BackendChoice;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_CONFIG: &str = "/etc/deckhand/agent.toml";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/deckhand";
pub const DEFAULT_HTTP: &str = "127.0.0.1:8640";
pub const DEFAULT_QUIC: &str = "0.0.0.0:8641";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("--{} ({setting} in the config file): {why}", flag(setting))]
    Setting { setting: &'static str, why: String },
    #[error("--{flag} is required (or {setting} in the config file)", flag = flag(.0), setting = .0)]
    Missing(&'static str),
}

fn flag(setting: &str) -> String {
    setting.replace('_', "-")
}

fn bad(setting: &'static str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError::Setting {
        setting,
        why: why.to_string(),
    }
}

/// Every setting, each optional: from flags or from the file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub data_dir: Option<PathBuf>,
    pub deployment: Option<String>,
    pub trust: Option<Vec<PathBuf>>,
    pub threshold: Option<usize>,
    pub origin: Option<String>,
    pub endpoint_url: Option<String>,
    pub poll_secs: Option<u64>,
    pub http_listen: Option<String>,
    pub quic_listen: Option<String>,
    pub peers: Option<Vec<String>>,
    /// "on" or "off".
    pub mdns: Option<String>,
    pub inbox: Option<PathBuf>,
    pub outbox: Option<PathBuf>,
    pub bundle_dir: Option<PathBuf>,
    pub store_budget: Option<u64>,
    pub backend: Option<String>,
    pub fleet_ca: Option<PathBuf>,
    pub fleet_cert: Option<PathBuf>,
    pub fleet_key: Option<PathBuf>,
    pub fleet_crl: Option<PathBuf>,
    /// Serving bandwidth cap for peers, bytes per second.
    pub serve_bytes_per_sec: Option<u64>,
    /// Seconds to wait for a chunk's designated fetcher while it makes no progress.
    pub max_wait_secs: Option<u64>,
    /// Milliseconds to let peers hear of a new release before planning its download.
    pub settle_ms: Option<u64>,
}

impl Settings {
    /// Reads a config file. A missing file is an error only when it was asked for by name.
    pub fn from_file(path: &Path, explicit: bool) -> Result<Settings, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Settings::default());
            }
            Err(e) => {
                return Err(ConfigError::File {
                    path: path.to_owned(),
                    why: e.to_string(),
                });
            }
        };
        toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            why: e.to_string().trim().to_owned(),
        })
    }

    /// `self` (flags) over `file`.
    pub fn over(self, file: Settings) -> Settings {
        macro_rules! pick {
            ($($f:ident),*) => { Settings { $($f: self.$f.or(file.$f)),* } };
        }
        pick!(
            data_dir,
            deployment,
            trust,
            threshold,
            origin,
            endpoint_url,
            poll_secs,
            http_listen,
            quic_listen,
            peers,
            mdns,
            inbox,
            outbox,
            bundle_dir,
            store_budget,
            backend,
            fleet_ca,
            fleet_cert,
            fleet_key,
            fleet_crl,
            serve_bytes_per_sec,
            max_wait_secs,
            settle_ms
        )
    }

    /// Checks every setting and reads the trusted keys.
    pub fn resolve(self) -> Result<RunConfig, ConfigError> {
        let deployment = self.deployment.ok_or(ConfigError::Missing("deployment"))?;
        deckhand_protocol::layout::Name::deployment(&deployment)
            .map_err(|e| bad("deployment", format!("{deployment:?}: {e}")))?;
        let backend = self.backend.as_deref().unwrap_or("auto");
        let backend: BackendChoice = backend
            .parse()
            .map_err(|e| bad("backend", format!("{backend:?}: {e}")))?;
        let addr = |setting: &'static str, v: Option<String>, default: &str| {
            let v = v.unwrap_or_else(|| default.to_owned());
            v.parse::<SocketAddr>()
                .map_err(|e| bad(setting, format!("{v:?}: {e}")))
        };
        let http_listen = addr("http_listen", self.http_listen, DEFAULT_HTTP)?;
        let quic_listen = addr("quic_listen", self.quic_listen, DEFAULT_QUIC)?;
        let mdns = match self.mdns.as_deref().unwrap_or("on") {
            "on" => true,
            "off" => false,
            other => return Err(bad("mdns", format!("{other:?}: use on or off"))),
        };
        let fleet = match (self.fleet_ca, self.fleet_cert, self.fleet_key) {
            (None, None, None) => {
                if self.fleet_crl.is_some() {
                    return Err(bad("fleet_crl", "given without the fleet credentials"));
                }
                None
            }
            (Some(ca), Some(cert), Some(key)) => Some(CredentialPaths {
                ca,
                cert,
                key,
                crl: self.fleet_crl,
            }),
            (ca, cert, key) => {
                let missing: Vec<&str> = [
                    ("fleet_ca", ca.is_none()),
                    ("fleet_cert", cert.is_none()),
                    ("fleet_key", key.is_none()),
                ]
                .iter()
                .filter(|(_, m)| *m)
                .map(|(n, _)| *n)
                .collect();
                return Err(bad(
                    "fleet",
                    format!(
                        "the fleet credentials come as three files; missing {}",
                        missing.join(", ")
                    ),
                ));
            }
        };
        let peers = self.peers.unwrap_or_default();
        for p in &peers {
            if !p.contains(':') {
                return Err(bad("peers", format!("{p:?} is not host:port")));
            }
        }
        let origin = match self.origin {
            None => None,
            Some(o) => {
                let url: OriginUrl = o
                    .parse()
                    .map_err(|e| bad("origin", format!("{o:?}: {e}")))?;
                Some((
                    url,
                    OriginConfig {
                        endpoint_url: self.endpoint_url.filter(|e| !e.is_empty()),
                        ..Default::default()
                    },
                ))
            }
        };
        let poll = self.poll_secs.unwrap_or(30);
        if !(1..=86_400).contains(&poll) {
            return Err(bad(
                "poll_secs",
                format!("{poll} is not between 1 and 86400"),
            ));
        }
        if let Some(dir) = &self.bundle_dir
            && !dir.is_dir()
        {
            return Err(bad(
                "bundle_dir",
                format!("{} is not a directory", dir.display()),
            ));
        }
        if self.serve_bytes_per_sec == Some(0) {
            return Err(bad("serve_bytes_per_sec", "0 would serve nothing"));
        }
        let trust_paths = self.trust.unwrap_or_default();
        if trust_paths.is_empty() {
            return Err(ConfigError::Missing("trust"));
        }
        let trust = trust_paths
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| bad("trust", format!("{}: {e}", p.display())))?;
                deckhand_protocol::PublicKey::from_file_text(&text)
                    .map_err(|e| bad("trust", format!("{}: {e}", p.display())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Files are read last: every flag is checked first.
        let threshold = self.threshold.unwrap_or(1);
        if threshold == 0 || threshold > trust.len() {
            return Err(bad(
                "threshold",
                format!(
                    "{threshold} is not between 1 and the {} trusted key(s)",
                    trust.len()
                ),
            ));
        }
        Ok(RunConfig {
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            deployment,
            trust,
            threshold,
            http_listen,
            inbox: self.inbox,
            outbox: self.outbox,
            backend,
            store_budget: self.store_budget,
            origin,
            poll: Duration::from_secs(poll),
            fleet,
            quic_listen,
            peers,
            mdns,
            bundle_dir: self.bundle_dir,
            serve_bytes_per_sec: self.serve_bytes_per_sec,
            max_wait: Duration::from_secs(self.max_wait_secs.unwrap_or(20)),
            settle: Duration::from_millis(self.settle_ms.unwrap_or(500)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(dir: &Path) -> PathBuf {
        let sk = deckhand_protocol::SecretKey::from_seed(&[7; 32]);
        let p = dir.join("k.pub");
        std::fs::write(&p, sk.public().to_file_text()).unwrap();
        p
    }

    #[test]
    fn flags_win_over_the_file_and_errors_name_the_setting() {
        let tmp = tempfile::tempdir().unwrap();
        let k = key_file(tmp.path());
        let cfg = tmp.path().join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "deployment = \"shop-1\"\ntrust = [{k:?}]\nhttp_listen = \"127.0.0.1:9000\"\nmdns = \"off\"\npeers = [\"10.0.0.2:8641\"]\n"
            ),
        )
        .unwrap();
        let file = Settings::from_file(&cfg, true).unwrap();
        let flags = Settings {
            http_listen: Some("127.0.0.1:9001".into()),
            ..Default::default()
        };
        let run = flags.over(file.clone()).resolve().unwrap();
        assert_eq!(run.http_listen.port(), 9001);
        assert!(!run.mdns);
        assert_eq!(run.peers, vec!["10.0.0.2:8641".to_owned()]);
        assert_eq!(run.deployment, "shop-1");

        std::fs::write(&cfg, "deploymnet = \"x\"\n").unwrap();
        let err = Settings::from_file(&cfg, true).unwrap_err().to_string();
        assert!(err.contains("deploymnet"), "{err}");
        assert!(
            Settings::from_file(&tmp.path().join("none.toml"), true).is_err(),
            "an explicit missing file is an error"
        );
        assert_eq!(
            Settings::from_file(&tmp.path().join("none.toml"), false).unwrap(),
            Settings::default()
        );

        let err = Settings {
            quic_listen: Some("nowhere".into()),
            ..file.clone()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("--quic-listen"), "{err}");
        let err = Settings {
            fleet_ca: Some("ca.crt".into()),
            ..file.clone()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("fleet_cert") && err.contains("fleet_key"),
            "{err}"
        );
        let err = Settings {
            mdns: Some("maybe".into()),
            ..file.clone()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("--mdns"), "{err}");
        let err = Settings {
            deployment: None,
            ..file
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("--deployment is required"), "{err}");
    }
}
