//! Recognition events to an MQTT broker (`mqtt = "mqtt://host:1883"`): QoS 1, in the log's order, to
//! `deckhand/{deployment}/{agent}/{source}/recognitions`, one event in flight; the cursor moves once the
//! broker acknowledged (PUBACK), so a broker that goes away gets, when back, every event it did not
//! acknowledge, each with its id. The agent's `online` / `offline` is retained at
//! `deckhand/{deployment}/{agent}/status`: `online` once connected, `offline` at a clean stop, and
//! `offline` from the broker itself (the last will) when the agent dies or its link does.
//!
//! MQTT 3.1.1's packets are rumqttc's (`rumqttc::mqttbytes::v4`); the session around them is this
//! file's, over a TCP stream or, for `mqtts://`, the same rustls (aws-lc-rs) every other part of the
//! agent uses (rumqttc's own TLS would bring a second crypto library). Each connection is a clean
//! session: nothing is retransmitted behind the log's back, so what the cursor says is what goes out.
//! A ping every half keep-alive notices a broker that went silent.

use super::log::EventLog;
use super::{Backoff, SinkState, pause, read_after, wait_for_events};
use bytes::BytesMut;
use deckhand_protocol::event::{recognitions_topic, status_topic};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, LastWill, Packet, PingReq, Publish,
};
use rumqttc::mqttbytes::{Error as PacketError, QoS};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// How long a broker has to accept the connection (TCP, TLS and CONNACK).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a broker has to acknowledge one publish (or answer a ping).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the goodbye (`offline`, DISCONNECT) may take at shutdown.
const GOODBYE: Duration = Duration::from_millis(800);
/// Keep-alive: the broker gives the agent up (and publishes its will) after 1.5x this without a word.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// The largest packet read from or written to the broker.
const MAX_PACKET: usize = 1 << 20;
/// The cursor's name in the event log.
pub const SINK: &str = "mqtt";

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("broker {target}: {source}")]
    Io {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("broker {target}: malformed packet: {why}")]
    Packet { target: String, why: String },
    #[error("broker {target}: refused the connection: {code:?}")]
    Refused {
        target: String,
        code: ConnectReturnCode,
    },
    #[error("broker {target}: no answer within {secs} s ({what})")]
    Timeout {
        target: String,
        what: &'static str,
        secs: u64,
    },
    #[error("broker {target}: closed the connection")]
    Closed { target: String },
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

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One connection to the broker: the stream, what was read and not yet parsed, the next packet id.
struct Conn {
    io: Box<dyn Stream>,
    rbuf: BytesMut,
    target: String,
    next_pkid: u16,
}

impl Conn {
    /// TCP (and TLS for mqtts://), then CONNECT with the will, then CONNACK.
    async fn open(cfg: &MqttConfig) -> Result<Conn, MqttError> {
        let target = cfg.url.to_string();
        let io_err = |source| MqttError::Io {
            target: target.clone(),
            source,
        };
        let tcp = tokio::net::TcpStream::connect((cfg.url.host.as_str(), cfg.url.port))
            .await
            .map_err(io_err)?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Stream> = if cfg.url.tls {
            let tls_err = |why: String| MqttError::Tls {
                target: target.clone(),
                why,
            };
            let config = super::tls_client(cfg.ca.as_deref()).map_err(tls_err)?;
            let name = rustls::pki_types::ServerName::try_from(cfg.url.host.clone())
                .map_err(|e| tls_err(e.to_string()))?;
            let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| tls_err(e.to_string()))?;
            Box::new(stream)
        } else {
            Box::new(tcp)
        };
        let mut conn = Conn {
            io,
            rbuf: BytesMut::with_capacity(4096),
            target,
            next_pkid: 0,
        };
        let mut connect = Connect::new(format!("deckhand-{}", cfg.agent));
        connect.keep_alive = KEEP_ALIVE.as_secs() as u16;
        connect.clean_session = true;
        connect.last_will = Some(LastWill::new(
            status_topic(&cfg.deployment, &cfg.agent),
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
        if let Some(user) = &cfg.url.user {
            connect.set_login(user.clone(), cfg.url.password.clone().unwrap_or_default());
        }
        conn.send(|b| connect.write(b)).await?;
        match conn.recv().await? {
            Packet::ConnAck(ConnAck {
                code: ConnectReturnCode::Success,
                ..
            }) => Ok(conn),
            Packet::ConnAck(ConnAck { code, .. }) => Err(MqttError::Refused {
                target: conn.target,
                code,
            }),
            other => Err(conn.malformed(format!("expected CONNACK, got {other:?}"))),
        }
    }

    fn malformed(&self, why: String) -> MqttError {
        MqttError::Packet {
            target: self.target.clone(),
            why,
        }
    }

    async fn send(
        &mut self,
        write: impl FnOnce(&mut BytesMut) -> Result<usize, PacketError>,
    ) -> Result<(), MqttError> {
        let mut buf = BytesMut::new();
        write(&mut buf).map_err(|e| self.malformed(e.to_string()))?;
        self.io
            .write_all(&buf)
            .await
            .map_err(|source| MqttError::Io {
                target: self.target.clone(),
                source,
            })?;
        self.io.flush().await.map_err(|source| MqttError::Io {
            target: self.target.clone(),
            source,
        })
    }

    /// The next packet from the broker.
    async fn recv(&mut self) -> Result<Packet, MqttError> {
        loop {
            match Packet::read(&mut self.rbuf, MAX_PACKET) {
                Ok(p) => return Ok(p),
                Err(PacketError::InsufficientBytes(_)) => {}
                Err(e) => return Err(self.malformed(e.to_string())),
            }
            let n = self
                .io
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|source| MqttError::Io {
                    target: self.target.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(MqttError::Closed {
                    target: self.target.clone(),
                });
            }
        }
    }

    /// Publishes at QoS 1 and waits (at most [`ACK_TIMEOUT`]) for the broker's PUBACK.
    async fn publish(
        &mut self,
        topic: &str,
        retain: bool,
        payload: &[u8],
    ) -> Result<(), MqttError> {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        let pkid = self.next_pkid;
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        p.retain = retain;
        p.pkid = pkid;
        self.send(|b| p.write(b)).await?;
        self.expect(
            |p| matches!(p, Packet::PubAck(a) if a.pkid == pkid),
            "a PUBACK",
        )
        .await
    }

    /// A ping, answered within [`ACK_TIMEOUT`].
    async fn ping(&mut self) -> Result<(), MqttError> {
        self.send(|b| PingReq.write(b)).await?;
        self.expect(|p| matches!(p, Packet::PingResp), "a ping")
            .await
    }

    /// Reads until a packet `wanted` accepts, within [`ACK_TIMEOUT`]; a broker sends this client
    /// nothing else it must answer (it subscribes to nothing).
    async fn expect(
        &mut self,
        wanted: impl Fn(&Packet) -> bool,
        what: &'static str,
    ) -> Result<(), MqttError> {
        let target = self.target.clone();
        let wait = async {
            loop {
                let p = self.recv().await?;
                if wanted(&p) {
                    return Ok(());
                }
            }
        };
        tokio::time::timeout(ACK_TIMEOUT, wait)
            .await
            .map_err(|_| MqttError::Timeout {
                target,
                what,
                secs: ACK_TIMEOUT.as_secs(),
            })?
    }

    /// At a clean stop: `offline` (retained), then DISCONNECT (the broker then drops the will), bounded.
    async fn goodbye(&mut self, status: &str) {
        let bye = async {
            self.publish(status, true, b"offline").await?;
            self.send(|b| Disconnect.write(b)).await?;
            let _ = self.io.shutdown().await;
            Ok::<_, MqttError>(())
        };
        let _ = tokio::time::timeout(GOODBYE, bye).await;
    }
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
    let opened = tokio::select! {
        c = tokio::time::timeout(CONNECT_TIMEOUT, Conn::open(cfg)) => c,
        _ = stop.changed() => return Ok(()),
    };
    let mut conn = opened.map_err(|_| MqttError::Timeout {
        target: target.clone(),
        what: "connecting",
        secs: CONNECT_TIMEOUT.as_secs(),
    })??;
    let status = status_topic(&cfg.deployment, &cfg.agent);
    conn.publish(&status, true, b"online").await?;
    state.connected(true);
    backoff.reset();
    tracing::info!(broker = %target, "MQTT connected");
    let mut head = log.watch_head();
    let mut last_sent = tokio::time::Instant::now();
    loop {
        let cursor = log.cursor(SINK);
        let batch = read_after(log, cursor).await?;
        if batch.is_empty() {
            // Nothing owed: wait for events; ping when quiet for half the keep-alive.
            let ping_at = last_sent + KEEP_ALIVE / 2;
            tokio::select! {
                more = wait_for_events(&mut head, cursor, stop) => {
                    if !more {
                        conn.goodbye(&status).await;
                        state.connected(false);
                        return Ok(());
                    }
                }
                () = tokio::time::sleep_until(ping_at) => {
                    conn.ping().await?;
                    last_sent = tokio::time::Instant::now();
                }
            }
            continue;
        }
        for stored in batch {
            if *stop.borrow() {
                conn.goodbye(&status).await;
                state.connected(false);
                return Ok(());
            }
            let topic = recognitions_topic(&cfg.deployment, &cfg.agent, &source_of(&stored.json));
            conn.publish(&topic, false, stored.json.as_bytes()).await?;
            last_sent = tokio::time::Instant::now();
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
