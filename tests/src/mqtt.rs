//! A real MQTT broker for the tests: Debian's `mosquitto`, on a loopback port, with persistence in the
//! test's directory (a subscriber's session and the retained messages survive a restart, as on a shop's
//! broker), and a subscriber (rumqttc) that collects what it receives.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A mosquitto process. Killed when dropped.
pub struct Broker {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

fn mosquitto() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("mosquitto is not installed (tests/run installs it: apt-get install mosquitto)")
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Broker {
    /// Starts a broker with its files in `dir`.
    pub fn start(dir: &Path) -> Broker {
        std::fs::create_dir_all(dir).unwrap();
        let mut b = Broker {
            child: None,
            port: free_port(),
            dir: dir.to_owned(),
        };
        b.resume();
        b
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The agent's `--mqtt` value.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Starts it again (same port, same persistence) after [`Broker::stop`]; waits until it listens.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        let conf = self.dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n\
                 persistence true\npersistence_location {dir}/\nautosave_interval 1\n\
                 log_dest stderr\nlog_type all\n",
                port = self.port,
                dir = self.dir.display()
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))
            .unwrap();
        let child = Command::new(mosquitto())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "mosquitto exited with {status}; see {}",
                    self.dir.join("mosquitto.log").display()
                );
            }
            assert!(Instant::now() < deadline, "mosquitto does not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
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

/// A message a subscriber received.
#[derive(Clone, Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Message {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", self.topic))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// A subscriber with a persistent session (QoS 1): what is published while it is away, broker
/// restarts included, reaches it when it is back.
pub struct Subscriber {
    rx: tokio::sync::mpsc::UnboundedReceiver<Message>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Subscribes to `filter` on the broker at `port` and returns once subscribed.
    pub async fn connect(port: u16, filter: &str) -> Subscriber {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("test-subscriber-{port}-{}-{n}", std::process::id());
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5));
        let (client, mut events) = AsyncClient::new(opts, 16);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let filter = filter.to_owned();
        let task = tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if !ack.session_present {
                            let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(t) = subscribed_tx.take() {
                            let _ = t.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Message {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    // The broker is away: try again shortly (the same session).
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed)
            .await
            .expect("the subscriber was not subscribed within 10 s")
            .expect("subscriber task ended");
        Subscriber { rx, task }
    }

    /// The next message on `topic`, within `limit`; messages on other topics are passed over.
    pub async fn next_on(&mut self, topic: &str, limit: Duration) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let m = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .ok()??;
            if m.topic == topic {
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
