//! Recognition events to webhooks (`webhook = ["https://till.local/cards"]`): each event POSTed as
//! JSON, in the log's order, one at a time, with `X-Deckhand-Signature: sha256=<hex HMAC-SHA256 of the
//! body>` under `webhook_secret` and `X-Deckhand-Event: <id>`. A 2xx delivers it; a 5xx, a 408, a 429,
//! a timeout or no connection is retried with backoff (500 ms doubling to 30 s) until it is delivered
//! or ages out of the log; any other answer (a 4xx: the receiver refuses this event for good) is
//! logged, counted as rejected and passed over, so one bad event does not hold the rest.

use super::log::EventLog;
use super::{Backoff, SinkState, pause, read_after, wait_for_events};
use bytes::Bytes;
use hmac::{KeyInit as _, Mac as _};
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::Duration;

/// How long one POST may take, connection included.
const ATTEMPT: Duration = Duration::from_secs(10);
/// The most of a refusal's body kept for status.
const ERROR_BODY: usize = 200;

/// The header carrying the body's signature.
pub const SIGNATURE: &str = "x-deckhand-signature";
/// The header carrying the event's id.
pub const EVENT_ID: &str = "x-deckhand-event";

/// What a webhook sink needs.
#[derive(Clone)]
pub struct WebhookConfig {
    pub url: hyper::Uri,
    pub secret: Arc<[u8]>,
    /// PEM file of the CA(s) that sign an https:// receiver's certificate (else the system's).
    pub ca: Option<std::path::PathBuf>,
}

impl WebhookConfig {
    /// The cursor's name in the event log.
    pub fn sink(&self) -> String {
        format!("webhook:{}", self.url)
    }
}

/// `sha256=<hex>`: the HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) else {
        // HMAC takes a key of any length; this arm is never taken.
        return String::new();
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

enum Outcome {
    Delivered,
    Rejected(String),
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

fn client(cfg: &WebhookConfig) -> Result<HttpsClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(ATTEMPT));
    let tls = if cfg.url.scheme_str() == Some("https") {
        super::tls_client(cfg.ca.as_deref())?
    } else {
        // Plain http:// never uses it; an empty trust store keeps the system's out of the way.
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
    };
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1)
        .build(connector))
}

/// Delivers the log to one webhook until `stop`.
pub async fn run(
    cfg: WebhookConfig,
    log: EventLog,
    state: Arc<SinkState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let sink = cfg.sink();
    let http = match client(&cfg) {
        Ok(c) => c,
        Err(why) => {
            tracing::error!(webhook = %cfg.url, cause = %why, "webhook not started");
            state.failed(format!("TLS: {why}"));
            return;
        }
    };
    let mut head = log.watch_head();
    let mut backoff = Backoff::new();
    loop {
        let cursor = log.cursor(&sink);
        let batch = match read_after(&log, cursor).await {
            Ok(b) => b,
            Err(e) => {
                state.failed(e.to_string());
                return;
            }
        };
        if batch.is_empty() {
            if !wait_for_events(&mut head, cursor, &mut stop).await {
                return;
            }
            continue;
        }
        for stored in batch {
            loop {
                if *stop.borrow() {
                    return;
                }
                let attempt = post(&http, &cfg, &stored.json);
                let result = tokio::select! {
                    r = tokio::time::timeout(ATTEMPT, attempt) => r
                        .unwrap_or_else(|_| Err(format!("no answer within {} s", ATTEMPT.as_secs()))),
                    _ = stop.changed() => return,
                };
                match result {
                    Ok(outcome) => {
                        if let Err(e) = super::advance(&log, &sink, stored.seq).await {
                            state.failed(e.to_string());
                            return;
                        }
                        state.connected(true);
                        backoff.reset();
                        match outcome {
                            Outcome::Delivered => state.delivered(1),
                            Outcome::Rejected(why) => {
                                tracing::warn!(webhook = %cfg.url, seq = stored.seq, cause = %why, "webhook refused an event; passed over");
                                state.rejected(why);
                            }
                        }
                        break;
                    }
                    Err(why) => {
                        let delay = backoff.delay();
                        tracing::warn!(webhook = %cfg.url, cause = %why, retry_in_ms = delay.as_millis() as u64, "webhook delivery failed");
                        state.failed(why);
                        if !pause(delay, &mut stop).await {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// One POST. `Err` is worth retrying; `Ok(Rejected)` is not.
async fn post(http: &HttpsClient, cfg: &WebhookConfig, json: &str) -> Result<Outcome, String> {
    let body = Bytes::copy_from_slice(json.as_bytes());
    let id = serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned))
        .unwrap_or_default();
    let req = Request::post(cfg.url.clone())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("deckhand-agent/", env!("CARGO_PKG_VERSION")),
        )
        .header(SIGNATURE, signature(&cfg.secret, &body))
        .header(EVENT_ID, id)
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = http.request(req).await.map_err(|e| {
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            why.push_str(": ");
            why.push_str(&s.to_string());
            source = s.source();
        }
        why
    })?;
    let status = resp.status();
    // Only the start of an answer is kept; a receiver's long page is not read past it.
    let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let said = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY)]).into_owned();
    match status {
        s if s.is_success() => Ok(Outcome::Delivered),
        s if s.is_server_error()
            || s == StatusCode::REQUEST_TIMEOUT
            || s == StatusCode::TOO_MANY_REQUESTS =>
        {
            Err(format!("answered {s}: {said}"))
        }
        s => Ok(Outcome::Rejected(format!("answered {s}: {said}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
