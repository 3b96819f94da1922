//! A real MQTT broker for the tests and the counter benchmark: Debian's `mosquitto`, on a loopback port,
//! with persistence in its own directory (a subscriber's session and the retained messages survive a
//! restart, as on a shop's broker), and a subscriber (rumqttc) that collects what it receives.

use crate::ToolError;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A mosquitto process. Killed when dropped.
pub struct Broker {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// A second listener with TLS (a certificate for localhost and 127.0.0.1), and its CA's PEM file.
    tls: Option<(u16, PathBuf)>,
}

fn broker_error(why: impl Into<String>) -> ToolError {
    ToolError::Broker(why.into())
}

/// A CA (PEM file `ca.pem`) and a server certificate it signed for `localhost` and 127.0.0.1
/// (`server.pem`, `server.key`) in `dir`.
fn write_tls_files(dir: &Path) -> Result<PathBuf, ToolError> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let cert_error = |e: rcgen::Error| broker_error(format!("a test certificate: {e}"));
    let ca_key = KeyPair::generate().map_err(cert_error)?;
    let mut ca = CertificateParams::new(Vec::new()).map_err(cert_error)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).map_err(cert_error)?;
    let issuer = Issuer::new(ca, ca_key);
    let mut server = CertificateParams::new(vec!["localhost".to_owned()]).map_err(cert_error)?;
    server
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let key = KeyPair::generate().map_err(cert_error)?;
    let cert = server.signed_by(&key, &issuer).map_err(cert_error)?;
    for (name, text) in [
        ("ca.pem", ca_cert.pem()),
        ("server.pem", cert.pem()),
        ("server.key", key.serialize_pem()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(ToolError::io("write", &path))?;
    }
    Ok(dir.join("ca.pem"))
}

/// Where mosquitto is installed, if it is.
pub fn mosquitto() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A loopback port nothing listens on now.
pub fn free_port() -> Result<u16, ToolError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| broker_error(format!("no free loopback port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| broker_error(format!("no free loopback port: {e}")))
}

impl Broker {
    /// Starts a broker with its files in `dir`.
    pub fn start(dir: &Path) -> Result<Broker, ToolError> {
        std::fs::create_dir_all(dir).map_err(ToolError::io("create", dir))?;
        let mut b = Broker {
            child: None,
            port: free_port()?,
            dir: dir.to_owned(),
            tls: None,
        };
        b.resume()?;
        Ok(b)
    }

    /// Starts a broker with a plain listener and a TLS one (its CA: [`Broker::tls_ca`]).
    pub fn start_with_tls(dir: &Path) -> Result<Broker, ToolError> {
        std::fs::create_dir_all(dir).map_err(ToolError::io("create", dir))?;
        let ca = write_tls_files(dir)?;
        let mut b = Broker {
            child: None,
            port: free_port()?,
            dir: dir.to_owned(),
            tls: Some((free_port()?, ca)),
        };
        b.resume()?;
        Ok(b)
    }

    /// The agent's `--mqtt` value for the TLS listener (`mqtts://localhost:PORT`).
    pub fn tls_url(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|(p, _)| format!("mqtts://localhost:{p}"))
    }

    /// The CA that signed the TLS listener's certificate (PEM).
    pub fn tls_ca(&self) -> Option<&Path> {
        self.tls.as_ref().map(|(_, ca)| ca.as_path())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The agent's `--mqtt` value.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Starts it again (same port, same persistence) after [`Broker::stop`]; waits until it listens.
    pub fn resume(&mut self) -> Result<(), ToolError> {
        if self.child.is_some() {
            return Err(broker_error("the broker is running"));
        }
        let exe = mosquitto().ok_or_else(|| {
            broker_error(
                "mosquitto is not installed (tests/run installs it: apt-get install mosquitto)",
            )
        })?;
        let conf = self.dir.join("mosquitto.conf");
        let mut text = format!(
            "allow_anonymous true\nuser root\n\
             persistence true\npersistence_location {dir}/\nautosave_interval 1\n\
             log_dest stderr\nlog_type all\nlistener {port} 127.0.0.1\n",
            port = self.port,
            dir = self.dir.display()
        );
        if let Some((tls, _)) = &self.tls {
            text.push_str(&format!(
                "listener {tls} 127.0.0.1\ncertfile {dir}/server.pem\nkeyfile {dir}/server.key\n",
                dir = self.dir.display()
            ));
        }
        std::fs::write(&conf, text).map_err(ToolError::io("write", &conf))?;
        let log_path = self.dir.join("mosquitto.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(ToolError::io("open", &log_path))?;
        let log2 = log.try_clone().map_err(ToolError::io("open", &log_path))?;
        let child = Command::new(&exe)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log)
            .spawn()
            .map_err(ToolError::io("start", &exe))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let ports = [Some(self.port), self.tls.as_ref().map(|t| t.0)];
        while ports
            .iter()
            .flatten()
            .any(|p| TcpStream::connect(("127.0.0.1", *p)).is_err())
        {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(broker_error(format!(
                    "mosquitto exited with {status}; see {}",
                    log_path.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(broker_error(format!(
                    "mosquitto does not listen after 10 s; see {}",
                    log_path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops it (SIGTERM: it saves its persistence) and waits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child, not yet waited for.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A message a subscriber received, and when (wall clock, for latencies measured across processes).
#[derive(Clone, Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub received: std::time::SystemTime,
}

impl Message {
    /// The payload as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// A subscriber with a persistent session (QoS 1): what is published while it is away, broker
/// restarts included, reaches it when it is back. The broker's own redeliveries to it are passed over.
pub struct Subscriber {
    rx: tokio::sync::mpsc::UnboundedReceiver<Message>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Subscribes to `filter` on the broker at `port` and returns once subscribed.
    pub async fn connect(port: u16, filter: &str) -> Result<Subscriber, ToolError> {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("deckhand-subscriber-{port}-{}-{n}", std::process::id());
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5));
        let (client, mut events) = AsyncClient::new(opts, 16);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let wanted = filter.to_owned();
        let task = tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if !ack.session_present {
                            let _ = client.subscribe(wanted.clone(), QoS::AtLeastOnce).await;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(t) = subscribed_tx.take() {
                            let _ = t.send(());
                        }
                    }
                    // The broker sending again what this subscriber already had (DUP set: its PUBACK
                    // was lost when the broker stopped). That is MQTT's at-least-once between broker and
                    // subscriber, not the publisher's doing, and the tests judge the publisher: passed
                    // over. A publisher's resend reaches a subscriber as a new message, DUP clear.
                    Ok(Event::Incoming(Packet::Publish(p))) if p.dup => {}
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Message {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            received: std::time::SystemTime::now(),
                        });
                    }
                    Ok(_) => {}
                    // The broker is away: try again shortly (the same session).
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), subscribed).await {
            Ok(Ok(())) => Ok(Subscriber { rx, task }),
            _ => {
                task.abort();
                Err(broker_error(format!(
                    "could not subscribe to {filter:?} on 127.0.0.1:{port} within 10 s"
                )))
            }
        }
    }

    /// The next message on `topic`, within `limit`; messages on other topics are passed over.
    pub async fn next_on(&mut self, topic: &str, limit: Duration) -> Option<Message> {
        self.next_where(|t| t == topic, limit).await
    }

    /// The next message whose topic `wanted` accepts, within `limit`; the others are passed over.
    pub async fn next_where(
        &mut self,
        wanted: impl Fn(&str) -> bool,
        limit: Duration,
    ) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let m = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .ok()??;
            if wanted(&m.topic) {
                return Some(m);
            }
        }
    }

    /// Every message received within `limit` from now, on any topic.
    pub async fn drain(&mut self, limit: Duration) -> Vec<Message> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut out = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            out.push(m);
        }
        out
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}
