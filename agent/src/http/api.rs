//! The agent's HTTP API server: `GET /` (the shop page), `POST /v1/recognize` (a JPEG or PNG body, a JSON
//! answer), `GET /metrics` (Prometheus text), `GET /v1/status` (JSON) and `GET /v1/fleet` (this agent's
//! view of its peers, JSON). With `http_token` set, everything but the page asks for
//! `Authorization: Bearer <token>` (the page asks its user for the token once).

use super::server::{BodyError, Conn, read_body};
use crate::recognizer::preprocess::{ImageError, MAX_BODY};
use crate::recognizer::service::{RecognizeError, Service};
use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use deckhand_protocol::status::{FleetView, Status};
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
    /// The bearer token every request but the page's must carry (`http_token`), if one is set.
    pub token: Option<Arc<str>>,
    /// The recognition event log `/v1/events` streams, if the agent keeps one.
    pub events: Option<crate::events::log::EventLog>,
    /// Set when the server begins to stop: event streams end.
    pub closing: tokio::sync::watch::Receiver<bool>,
    /// The counter's cameras (their newest frames, for the page).
    pub cameras: Vec<Arc<crate::camera::CameraState>>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/v1/recognize", post(recognize))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/fleet", get(fleet))
        .route("/v1/events", get(super::events::events))
        .route("/v1/cameras/{name}", get(camera))
        .route("/v1/cameras/{name}/frame", get(camera_frame))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .with_state(state)
}

/// With a token set, every request but `GET /` carries it; compared in constant time.
async fn authorize(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let Some(token) = &s.token else {
        return next.run(req).await;
    };
    if req.uri().path() == "/" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if equal_in_constant_time(given.as_bytes(), token.as_bytes()) {
        return next.run(req).await;
    }
    let mut resp = (
        StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({ "error": "this agent asks for its access token (Authorization: Bearer, http_token in agent.toml)" })),
    )
        .into_response();
    if let Ok(v) = "Bearer".parse() {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// Whether `a` and `b` are equal, taking the same time wherever they differ (a token is not guessed
/// a byte at a time from response times).
fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    let a = blake3::hash(a);
    let b = blake3::hash(b);
    a == b
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

/// A JSON error answer; a 503 says when to try again.
fn error_response(code: StatusCode, message: String) -> Response {
    let mut resp = (code, axum::Json(serde_json::json!({ "error": message }))).into_response();
    if code == StatusCode::SERVICE_UNAVAILABLE
        && let Ok(v) = "1".parse()
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

async fn recognize(
    State(s): State<AppState>,
    Extension(conn): Extension<Conn>,
    body: Body,
) -> Response {
    let read = match read_body(body, MAX_BODY, &conn).await {
        Ok(r) => r,
        Err(e) => {
            let code = match e {
                BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                BodyError::TooSlow => StatusCode::REQUEST_TIMEOUT,
                BodyError::Busy => StatusCode::SERVICE_UNAVAILABLE,
                BodyError::Read(_) => StatusCode::BAD_REQUEST,
            };
            return error_response(code, e.to_string());
        }
    };
    // Read whole: the connection is at work until it is answered, and never shed meanwhile.
    let _working = conn.activity.working();
    match s.service.recognize(read.bytes.clone()).await {
        Ok(r) => (StatusCode::OK, axum::Json(r)).into_response(),
        Err(e) => error_response(status_code(&e), e.to_string()),
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let version = s.service.active().map(|r| r.version);
    let mut text = s.service.metrics().render(version);
    crate::metrics::render_status(&mut text, &(s.status)(), jiff::Timestamp::now());
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

async fn fleet(State(s): State<AppState>) -> Response {
    axum::Json((s.fleet)()).into_response()
}

fn find_camera(s: &AppState, name: &str) -> Option<crate::camera::Analysed> {
    s.cameras.iter().find(|c| c.name() == name)?.latest()
}

/// `GET /v1/cameras/{name}`: the newest analysed frame's size and the cards found in it (corners in
/// frame pixels, clockwise from a card's top left).
async fn camera(
    State(s): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    match find_camera(&s, &name) {
        Some(a) => axum::Json(serde_json::json!({
            "name": name,
            "width": a.width,
            "height": a.height,
            "cards": a.cards,
        }))
        .into_response(),
        None => error_response(
            StatusCode::NOT_FOUND,
            format!("no camera {name:?} with a frame analysed"),
        ),
    }
}

/// `GET /v1/cameras/{name}/frame`: the newest analysed frame as a JPEG: as the camera sent it, or
/// encoded now from a camera's uncompressed (YUYV) frame.
async fn camera_frame(
    State(s): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    let Some(a) = find_camera(&s, &name) else {
        return error_response(
            StatusCode::NOT_FOUND,
            format!("no camera {name:?} with a frame analysed"),
        );
    };
    // A camera's JPEG is served as it came, with the standard Huffman tables added when it had
    // none (cheap: a scan of its markers); YUYV is encoded on a blocking thread.
    let jpeg = match a.frame.as_ref() {
        crate::camera::Frame::Jpeg(_) => a.frame.jpeg(),
        _ => tokio::task::spawn_blocking(move || a.frame.jpeg())
            .await
            .unwrap_or_else(|e| Err(crate::camera::FrameError::Encode(e.to_string()))),
    };
    match jpeg {
        Ok(jpeg) => (
            [
                (header::CONTENT_TYPE, "image/jpeg"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            jpeg,
        )
            .into_response(),
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
