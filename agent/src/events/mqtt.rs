//! Recognition events to an MQTT broker (`mqtt = "mqtt://host:1883"`): QoS 1, in the log's order, to
//! `deckhand/{deployment}/{agent}/{source}/recognitions`, one event in flight; the cursor moves once the
//! broker acknowledged (PUBACK), so a broker that goes away gets, when back, every event it did not
//! acknowledge, each with its id. The agent's `online` / `offline` is retained at
//! `deckhand/{deployment}/{agent}/status`: `online` once connected, `offline` at a clean stop, and
//! `offline` from the broker itself (the last will) when the agent dies or its link does.
//!
//! Each session is a new client with a clean session: nothing is retransmitted behind the log's back,
//! so what the cursor says is what goes out.

use super::log::EventLog;
use super::{Backoff, SinkState, pause, read_after, wait_for_events};
use deckhand_protocol::event::{recognitions_topic, status_topic};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, Transport};
use std::sync::Arc;
use std::time::Duration;

/// How long a broker has to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a broker has to acknowledge one publish.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the goodbye (`offline`, DISCONNECT) may take at shutdown.
const GOODBYE: Duration = Duration::from_millis(800);
/// Keep-alive: the broker gives the agent up (and publishes its will) after 1.5x this without a word.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// The cursor's name in the event log.
pub const SINK: &str = "mqtt";

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("{0}")]
    Url(String),
    #[error("broker {target}: {source}")]
    Connection {
        target: String,
        #[source]
        source: Box<rumqttc::ConnectionError>,
    },
    #[error("broker {target}: {source}")]
    Client {
        target: String,
        #[source]
        source: Box<rumqttc::ClientError>,
    },
    #[error("broker {target}: refused the connection: {code:?}")]
    Refused {
        target: String,
        code: rumqttc::ConnectReturnCode,
    },
    #[error("broker {target}: no answer within {secs} s ({what})")]
    Timeout {
        target: String,
        what: &'static str,
        secs: u64,
    },
    #[error("broker {target}: TLS: {why}")]
    Tls { target: String, why: String },
    #[error(transparent)]
    Log(#[from] super::log::LogError),
}

/// A broker's address: `mqtt://[user[:password]@]host[:port]` (1883) or `mqtts://...` (TLS, 8883).
#[derive(Clone, PartialEq, Eq)]
pub struct MqttUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for MqttUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// The URL without its credentials.
impl std::fmt::Display for MqttUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

impl std::str::FromStr for MqttUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err("is not mqtt://host[:port] or mqtts://host[:port]".into());
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('?') {
            return Err("takes no path: mqtt://[user[:password]@]host[:port]".into());
        }
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => (Some(decode(u)?), Some(decode(p)?)),
                None => (Some(decode(a)?), None),
            },
        };
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("port {p:?} is not a number from 1 to 65535"))?,
            ),
            _ => (hostport, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err("names no host (or port 0)".into());
        }
        Ok(MqttUrl {
            tls,
            host: host.to_owned(),
            port,
            user,
            password,
        })
    }
}

fn decode(s: &str) -> Result<String, String> {
    percent_decode(s).ok_or_else(|| "has a malformed %-escape in its credentials".to_owned())
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What the MQTT sink needs.
#[derive(Clone, Debug)]
pub struct MqttConfig {
    pub url: MqttUrl,
    /// PEM file of the CA(s) that sign the broker's certificate, for mqtts:// (else the system's).
    pub ca: Option<std::path::PathBuf>,
    pub deployment: String,
    pub agent: String,
}

/// Delivers the log to the broker until `stop`, reconnecting with backoff.
pub async fn run(
    cfg: MqttConfig,
    log: EventLog,
    state: Arc<SinkState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new();
    loop {
        match session(&cfg, &log, &state, &mut stop, &mut backoff).await {
            Ok(()) => return,
            Err(e) => {
                state.failed(e.to_string());
                let delay = backoff.delay();
                tracing::warn!(cause = %e, retry_in_ms = delay.as_millis() as u64, "MQTT delivery paused");
                if !pause(delay, &mut stop).await {
                    return;
                }
            }
        }
    }
}

fn options(cfg: &MqttConfig) -> Result<MqttOptions, MqttError> {
    let target = cfg.url.to_string();
    let mut o = MqttOptions::new(
        format!("deckhand-{}", cfg.agent),
        cfg.url.host.clone(),
        cfg.url.port,
    );
    o.set_keep_alive(KEEP_ALIVE)
        .set_clean_session(true)
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_last_will(LastWill::new(
            status_topic(&cfg.deployment, &cfg.agent),
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
    if let Some(user) = &cfg.url.user {
        o.set_credentials(user.clone(), cfg.url.password.clone().unwrap_or_default());
    }
    if cfg.url.tls {
        let tls = super::tls_client(cfg.ca.as_deref()).map_err(|why| MqttError::Tls {
            target: target.clone(),
            why,
        })?;
        o.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
        ));
    }
    Ok(o)
}

/// One connection: connect, `online`, then deliver until stop (`Ok`) or a failure (`Err`).
async fn session(
    cfg: &MqttConfig,
    log: &EventLog,
    state: &SinkState,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    backoff: &mut Backoff,
) -> Result<(), MqttError> {
    let target = cfg.url.to_string();
    let (client, mut events) = AsyncClient::new(options(cfg)?, 16);
    let conn = |source| MqttError::Connection {
        target: target.clone(),
        source: Box::new(source),
    };
    let timeout = |what, d: Duration| MqttError::Timeout {
        target: target.clone(),
        what,
        secs: d.as_secs().max(1),
    };
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(ack)) = events.poll().await.map_err(conn)? {
                if ack.code != rumqttc::ConnectReturnCode::Success {
                    return Err(MqttError::Refused {
                        target: target.clone(),
                        code: ack.code,
                    });
                }
                return Ok(());
            }
        }
    });
    tokio::select! {
        r = connected => r.map_err(|_| timeout("connecting", CONNECT_TIMEOUT))??,
        _ = stop.changed() => return Ok(()),
    }
    let status = status_topic(&cfg.deployment, &cfg.agent);
    publish(
        &client,
        &mut events,
        &target,
        &status,
        true,
        b"online".to_vec(),
    )
    .await?;
    state.connected(true);
    backoff.reset();
    tracing::info!(broker = %target, "MQTT connected");
    let mut head = log.watch_head();
    loop {
        let cursor = log.cursor(SINK);
        let batch = read_after(log, cursor).await?;
        if batch.is_empty() {
            // Nothing owed: wait for events, keeping the connection alive (pings) meanwhile.
            tokio::select! {
                more = wait_for_events(&mut head, cursor, stop) => {
                    if !more {
                        goodbye(&client, &mut events, &status).await;
                        state.connected(false);
                        return Ok(());
                    }
                }
                polled = events.poll() => { polled.map_err(conn)?; }
            }
            continue;
        }
        for stored in batch {
            if *stop.borrow() {
                goodbye(&client, &mut events, &status).await;
                state.connected(false);
                return Ok(());
            }
            let topic = recognitions_topic(&cfg.deployment, &cfg.agent, &source_of(&stored.json));
            publish(
                &client,
                &mut events,
                &target,
                &topic,
                false,
                stored.json.as_bytes().to_vec(),
            )
            .await?;
            super::advance(log, SINK, stored.seq).await?;
            state.delivered(1);
        }
    }
}

/// The `source` field of an event as stored (a topic level; `unknown` if it is not one).
fn source_of(json: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Source {
        source: String,
    }
    serde_json::from_str::<Source>(json)
        .ok()
        .map(|s| s.source)
        .filter(|s| deckhand_protocol::event::valid_source(s))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Publishes at QoS 1 and drives the connection until the broker acknowledges it.
async fn publish(
    client: &AsyncClient,
    events: &mut rumqttc::EventLoop,
    target: &str,
    topic: &str,
    retain: bool,
    payload: Vec<u8>,
) -> Result<(), MqttError> {
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload)
        .await
        .map_err(|source| MqttError::Client {
            target: target.to_owned(),
            source: Box::new(source),
        })?;
    let acked = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(source) => {
                    return Err(MqttError::Connection {
                        target: target.to_owned(),
                        source: Box::new(source),
                    });
                }
            }
        }
    };
    tokio::time::timeout(ACK_TIMEOUT, acked)
        .await
        .map_err(|_| MqttError::Timeout {
            target: target.to_owned(),
            what: "acknowledging a publish",
            secs: ACK_TIMEOUT.as_secs(),
        })?
}

/// At a clean stop: `offline` (retained), then DISCONNECT (the broker then drops the will), bounded.
async fn goodbye(client: &AsyncClient, events: &mut rumqttc::EventLoop, status: &str) {
    let bye = async {
        if publish(client, events, "", status, true, b"offline".to_vec())
            .await
            .is_err()
        {
            return;
        }
        if client.disconnect().await.is_err() {
            return;
        }
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(GOODBYE, bye).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_with_their_defaults_and_credentials() {
        let u: MqttUrl = "mqtt://broker.local".parse().unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (false, "broker.local", 1883)
        );
        let u: MqttUrl = "mqtts://till:s%40cret@10.0.0.2:8884".parse().unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (true, "10.0.0.2", 8884));
        assert_eq!(u.user.as_deref(), Some("till"));
        assert_eq!(u.password.as_deref(), Some("s@cret"));
        assert_eq!(
            u.to_string(),
            "mqtts://10.0.0.2:8884",
            "credentials are never shown"
        );
        let u: MqttUrl = "mqtt://[::1]:1884".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 1884));
        for bad in [
            "http://x",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:99999",
            "mqtt://h/topic",
            "mqtt://u:%zz@h",
        ] {
            assert!(bad.parse::<MqttUrl>().is_err(), "{bad} parsed");
        }
    }
}
