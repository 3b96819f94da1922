//! A webhook receiver for the tests, as a till's would be: a real HTTP server on a loopback port that
//! records every request (headers and body), checks nothing itself, and answers each request with the
//! next status of a script (200 once the script is used up).

use http_body_util::BodyExt as _;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// What it was answered.
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// The receiver. Stops when dropped.
pub struct Receiver {
    pub port: u16,
    script: Arc<Mutex<VecDeque<u16>>>,
    got: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let script: Arc<Mutex<VecDeque<u16>>> = Arc::default();
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let (s, g) = (script.clone(), got.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (s, g) = (s.clone(), g.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (s, g) = (s.clone(), g.clone());
                            async move {
                                let path = req.uri().path().to_owned();
                                let headers = req
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| {
                                        (k.to_string(), v.to_str().unwrap_or_default().to_owned())
                                    })
                                    .collect();
                                let body = req.into_body().collect().await?.to_bytes().to_vec();
                                let status = s.lock().unwrap().pop_front().unwrap_or(200);
                                g.lock().unwrap().push(Received {
                                    path,
                                    headers,
                                    body,
                                    status,
                                });
                                let resp = hyper::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                        b"recorded",
                                    )))
                                    .unwrap();
                                Ok::<_, hyper::Error>(resp)
                            }
                        },
                    );
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
        Receiver {
            port,
            script,
            got,
            task,
        }
    }

    /// The agent's `--webhook` value.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/cards", self.port)
    }

    /// The next requests are answered with these statuses, in order.
    pub fn answer(&self, statuses: &[u16]) {
        self.script.lock().unwrap().extend(statuses);
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `n` requests were received, at most `limit`.
    pub async fn wait_for(&self, n: usize, limit: std::time::Duration) -> Vec<Received> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the receiver got {} requests, not {n}, within {limit:?}: {got:#?}",
                got.len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
