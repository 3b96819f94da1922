//! The one HTTP client for an agent's API, used by `deckhand-agent status`, `deckhand fleet status`, the
//! demo and the tests. Every request has a timeout. With `DECKHAND_HTTP_TOKEN` set, every request carries
//! it as a bearer token (an agent with `http_token` asks for it).

use bytes::Bytes;
use deckhand_protocol::status::{FleetView, Status};
use hyper::header;

/// Why a request to an agent's HTTP API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: timed out after {secs} s")]
    Timeout { what: String, secs: u64 },
    #[error("{what}: {source}")]
    Http {
        what: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{what}: {source}")]
    Request {
        what: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("{path} answered {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
    #[error("{path} did not answer JSON: {why}")]
    Json { path: String, why: String },
}

/// How long one request may take, connection included.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// GETs an agent's status (`/v1/status`).
pub async fn get_status(addr: &str) -> Result<Status, ClientError> {
    get_as(addr, "/v1/status").await
}

/// GETs an agent's view of the fleet (`/v1/fleet`).
pub async fn get_fleet(addr: &str) -> Result<FleetView, ClientError> {
    get_as(addr, "/v1/fleet").await
}

/// GETs a JSON document of a known shape from an agent's HTTP API.
pub async fn get_as<T: serde::de::DeserializeOwned>(
    addr: &str,
    path: &str,
) -> Result<T, ClientError> {
    let doc = get_json(addr, path).await?;
    serde_json::from_value(doc).map_err(|e| ClientError::Json {
        path: path.to_owned(),
        why: e.to_string(),
    })
}

/// GETs a JSON document from an agent's HTTP API (`addr` is host:port), within 10 seconds.
pub async fn get_json(addr: &str, path: &str) -> Result<serde_json::Value, ClientError> {
    request_json(addr, "GET", path, Bytes::new())
        .await
        .and_then(|(status, v)| {
            if status == 200 {
                Ok(v)
            } else {
                Err(ClientError::Status {
                    path: path.to_owned(),
                    status,
                    body: v.to_string(),
                })
            }
        })
}

/// One request to an agent's HTTP API, within 10 seconds: the status code and the JSON answer.
pub async fn request_json(
    addr: &str,
    method: &str,
    path: &str,
    body: Bytes,
) -> Result<(u16, serde_json::Value), ClientError> {
    let (status, body) = request(addr, method, path, body).await?;
    let value = serde_json::from_slice(&body).map_err(|e| ClientError::Json {
        path: path.to_owned(),
        why: format!("{e} (status {status})"),
    })?;
    Ok((status, value))
}

/// One request to an agent's HTTP API (`addr` is host:port), within 10 seconds: the status code and
/// the body. The connection is driven here and closed when the answer is read.
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Bytes,
) -> Result<(u16, Bytes), ClientError> {
    use http_body_util::BodyExt as _;
    let what = format!("{method} http://{addr}{path}");
    let http = |source| ClientError::Http {
        what: what.clone(),
        source,
    };
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(http)?;
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr);
        if let Some(token) = std::env::var("DECKHAND_HTTP_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
        {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(http_body_util::Full::new(body))
            .map_err(|source| ClientError::Request {
                what: what.clone(),
                source,
            })?;
        let answer = async {
            let resp = sender.send_request(req).await.map_err(http)?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
            Ok::<_, ClientError>((status, body))
        };
        let mut answer = std::pin::pin!(answer);
        tokio::select! {
            r = &mut answer => r,
            done = conn => {
                // The connection ended first (the server closed it after answering, say): what it
                // delivered is all there is.
                done.map_err(http)?;
                answer.await
            }
        }
    };
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .map_err(|_| ClientError::Timeout {
            what: what.clone(),
            secs: TIMEOUT.as_secs(),
        })?
}
