//! The agent's HTTP API: `POST /v1/recognize` (a JPEG or PNG body, a JSON answer), `GET /metrics`
//! (Prometheus text), `GET /v1/status` (JSON) and `GET /v1/fleet` (this agent's view of its peers, JSON).

use crate::recognizer::preprocess::{ImageError, MAX_BODY};
use crate::recognizer::service::{RecognizeError, Service};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::sync::Arc;

/// Produces the status document.
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

#[derive(Clone)]
pub struct AppState {
    pub service: Service,
    pub status: StatusFn,
    pub fleet: StatusFn,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/recognize", post(recognize))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/fleet", get(fleet))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// The HTTP status for a failed recognition: the client's fault is a 4xx, being busy a 503.
pub fn status_code(e: &RecognizeError) -> StatusCode {
    match e {
        RecognizeError::Image(ImageError::Empty | ImageError::Decode(_)) => StatusCode::BAD_REQUEST,
        RecognizeError::Image(ImageError::NotAnImage | ImageError::Format(_)) => {
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        }
        RecognizeError::Image(ImageError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
        RecognizeError::Busy | RecognizeError::NoRelease | RecognizeError::Stopped => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        RecognizeError::Backend(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn recognize(State(s): State<AppState>, body: Bytes) -> Response {
    match s.service.recognize(body).await {
        Ok(r) => (StatusCode::OK, axum::Json(r)).into_response(),
        Err(e) => {
            let code = status_code(&e);
            let mut resp = (
                code,
                axum::Json(serde_json::json!({ "error": e.to_string() })),
            )
                .into_response();
            if code == StatusCode::SERVICE_UNAVAILABLE
                && let Ok(v) = "1".parse()
            {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            resp
        }
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let version = s.service.active().map(|r| r.version);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.service.metrics().render(version),
    )
        .into_response()
}

async fn status(State(s): State<AppState>) -> Response {
    axum::Json((s.status)()).into_response()
}

/// Serves until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn fleet(State(s): State<AppState>) -> Response {
    axum::Json((s.fleet)()).into_response()
}

/// Errors of [`get_json`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {why}")]
    Connect { addr: String, why: String },
    #[error("{0} timed out")]
    Timeout(String),
    #[error("http: {0}")]
    Http(String),
    #[error("{path} answered {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
    #[error("{path} did not answer JSON: {why}")]
    Json { path: String, why: String },
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
    use http_body_util::BodyExt as _;
    let fut = async {
        let stream =
            tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| ClientError::Connect {
                    addr: addr.to_owned(),
                    why: e.to_string(),
                })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(conn);
        let req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr)
            .body(http_body_util::Full::new(body))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        let value = serde_json::from_slice(&body).map_err(|e| ClientError::Json {
            path: path.to_owned(),
            why: format!("{e} (status {status})"),
        })?;
        Ok((status, value))
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), fut)
        .await
        .map_err(|_| ClientError::Timeout(format!("{method} http://{addr}{path}")))?
}
