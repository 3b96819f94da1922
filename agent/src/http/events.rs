//! `GET /v1/events`: recognition events as Server-Sent Events (`event: recognition`, `id: <event id>`,
//! `data: <the event's JSON>`), live from the event log.
//!
//! Without `Last-Event-ID` (or `?after=ID`) the stream starts at the next event. With an id of this
//! log it resumes after that event (what the log still keeps of what came after it); with an id of
//! another log (this agent's log was set aside, or the id is another agent's) it replays every event
//! kept. `?recent=N` (without a last id: a reconnecting client's id wins) starts with the newest `N`
//! events kept, at most [`RECENT_MAX`]: how the shop page fills its lists before following. Each stream reads the log from its own cursor, at most [`READ_BATCH`](crate::events::READ_BATCH)
//! events at a time: a slow reader holds no events in memory, only its place. A comment every 15 s keeps
//! proxies from closing an idle stream. Streams end when the agent stops.

use super::api::AppState;
use crate::events::log::EventLog;
use crate::events::{read_after, wait_for_events};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use deckhand_protocol::event::EventId;
use std::collections::VecDeque;
use std::time::Duration;

#[derive(serde::Deserialize)]
pub struct EventsQuery {
    /// The id of the last event seen (as `Last-Event-ID`, for clients that cannot set headers).
    after: Option<String>,
    /// How many of the newest kept events to replay first, when no last id is given.
    recent: Option<u64>,
}

/// The most events `?recent=` replays.
pub const RECENT_MAX: u64 = 100;

struct Reader {
    log: EventLog,
    cursor: u64,
    head: tokio::sync::watch::Receiver<u64>,
    closing: tokio::sync::watch::Receiver<bool>,
    ready: VecDeque<crate::events::log::Stored>,
}

/// Where a stream starts: after the event `last` names, else `recent` events before the next one
/// (the log keeps a gapless run of seqs), else at the next event.
pub fn start_after(log: &EventLog, last: Option<&str>, recent: Option<u64>) -> Result<u64, String> {
    let Some(last) = last else {
        let back = recent.unwrap_or(0);
        if back > RECENT_MAX {
            return Err(format!(
                "recent={back} asks for more than the {RECENT_MAX} events a stream replays"
            ));
        }
        return Ok(log.head().saturating_sub(back));
    };
    let id: EventId = last
        .parse()
        .map_err(|e: deckhand_protocol::event::EventIdError| e.to_string())?;
    Ok(if id.log == log.id() {
        id.seq.min(log.head())
    } else {
        0
    })
}

pub async fn events(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Response {
    let Some(log) = s.events.clone() else {
        return (StatusCode::NOT_FOUND, "this agent keeps no event log\n").into_response();
    };
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(q.after.as_deref());
    let cursor = match start_after(&log, last, q.recent) {
        Ok(c) => c,
        Err(why) => return (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response(),
    };
    let reader = Reader {
        head: log.watch_head(),
        log,
        cursor,
        closing: s.closing.clone(),
        ready: VecDeque::new(),
    };
    let stream = futures::stream::unfold(reader, |mut r| async move {
        loop {
            if let Some(stored) = r.ready.pop_front() {
                let id = EventId::new(r.log.id(), stored.seq).to_string();
                let event = SseEvent::default()
                    .event("recognition")
                    .id(id)
                    .data(&*stored.json);
                return Some((Ok::<_, std::convert::Infallible>(event), r));
            }
            if *r.closing.borrow() {
                return None;
            }
            match read_after(&r.log, r.cursor).await {
                Ok(batch) if batch.is_empty() => {
                    if !wait_for_events(&mut r.head, r.cursor, &mut r.closing).await {
                        return None;
                    }
                }
                Ok(batch) => {
                    if let Some(last) = batch.last() {
                        r.cursor = last.seq;
                    }
                    r.ready.extend(batch);
                }
                Err(e) => {
                    tracing::warn!(cause = %e, "an event stream ended: the log did not read");
                    return None;
                }
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
