//! The agent's HTTP API server: `GET /` (the shop page), `POST /v1/recognize` (a JPEG or PNG body, a JSON
//! answer), `GET /metrics` (Prometheus text), `GET /v1/status` (JSON) and `GET /v1/fleet` (this agent's
//! view of its peers, JSON).

use crate::recognizer::preprocess::{ImageError, MAX_BODY};
use crate::recognizer::service::{RecognizeError, Service};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use deckhand_protocol::status::{FleetView, Status};
use std::fmt::Write as _;
use std::sync::Arc;

/// Produces the status document (`/v1/status`).
pub type StatusFn = Arc<dyn Fn() -> Status + Send + Sync>;
/// Produces the fleet view (`/v1/fleet`).
pub type FleetFn = Arc<dyn Fn() -> FleetView + Send + Sync>;

#[derive(Clone)]
pub struct AppState {
    pub service: Service,
    pub status: StatusFn,
    pub fleet: FleetFn,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page))
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
    let mut text = s.service.metrics().render(version);
    let disk = (s.status)().disk_full;
    let _ = write!(
        text,
        "# HELP deckhand_disk_full 1 while the store's disk is full (the pending release waits for space).\n\
         # TYPE deckhand_disk_full gauge\n\
         deckhand_disk_full {}\n\
         # HELP deckhand_disk_bytes_needed Bytes the pending release still needs while the disk is full.\n\
         # TYPE deckhand_disk_bytes_needed gauge\n\
         deckhand_disk_bytes_needed {}\n",
        u8::from(disk.is_some()),
        disk.map_or(0, |d| d.bytes_needed)
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        super::shop::PAGE,
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
