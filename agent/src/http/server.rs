//! The HTTP server loop: accepting behind the [`Gate`](super::gate::Gate), HTTP/1.1 with a header
//! timeout that also ends idle keep-alive connections, request bodies read within a deadline and a
//! shared budget of bytes, and a shutdown that waits for requests in flight a bounded time.
//!
//! Every connection is a task of one `JoinSet`, owned by [`serve`]; a connection shed by the gate is
//! dropped at once (it had read nothing for a while), and on shutdown every connection finishes its
//! request in flight within [`SHUTDOWN_GRACE`] or is dropped.

use super::gate::{Activity, Admission, Gate, Limits};
use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A client has this long to send a request's headers, counted from when the connection opened or its
/// previous response was sent: it is also how long an idle keep-alive connection is kept.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A request body must arrive whole within this long (a till's photo takes well under a second on a
/// LAN).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Request body bytes held at once, over every request being read or decoded.
pub const BODY_BUDGET: usize = 128 * 1024 * 1024;
/// How long requests in flight get to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long accepting pauses when the process is out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// What the server shares with its handlers (an `Extension` of every request).
#[derive(Clone)]
pub struct Conn {
    /// The connection's reads, and whether a request on it is being worked on.
    pub activity: Arc<Activity>,
    pub bodies: Arc<Semaphore>,
}

/// Why a request body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request body is over the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the request body did not arrive within {} s", BODY_TIMEOUT.as_secs())]
    TooSlow,
    #[error("too many request bytes are being read at once; try again")]
    Busy,
    #[error("reading the request body: {0}")]
    Read(String),
}

/// A request's body and the share of the budget it holds (released when dropped).
pub struct Read {
    pub bytes: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

/// Reads a request body of at most `limit` bytes within [`BODY_TIMEOUT`], taking each frame's bytes
/// from the shared budget as they arrive (a client that declares 32 MiB and sends 64 KiB holds
/// 64 KiB). Returns [`BodyError::Busy`] when the budget is spent.
pub async fn read_body(body: Body, limit: usize, conn: &Conn) -> Result<Read, BodyError> {
    let read = async {
        let mut body = body;
        let mut buf = BytesMut::new();
        let mut held: Option<OwnedSemaphorePermit> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if buf.len() + data.len() > limit {
                return Err(BodyError::TooLarge { limit });
            }
            let n = u32::try_from(data.len()).map_err(|_| BodyError::TooLarge { limit })?;
            let permit = conn
                .bodies
                .clone()
                .try_acquire_many_owned(n)
                .map_err(|_| BodyError::Busy)?;
            match &mut held {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
            buf.extend_from_slice(&data);
        }
        Ok(Read {
            bytes: buf.freeze(),
            _budget: held,
        })
    };
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .map_err(|_| BodyError::TooSlow)?
}

/// A connection's stream, recording every read in its [`Activity`].
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets requests in flight finish for
/// at most [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let gate = Arc::new(Mutex::new(Gate::new(limits)));
    let bodies = Arc::new(Semaphore::new(BODY_BUDGET));
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors (EMFILE) or a connection reset before it was
                        // accepted: pause a moment rather than spin.
                        tracing::warn!(cause = %e, "accepting an HTTP connection failed");
                        tokio::time::sleep(ACCEPT_PAUSE).await;
                        continue;
                    }
                };
                let admission = crate::locks::lock(&gate, "the HTTP gate").admit(peer.ip(), Instant::now());
                match admission {
                    Admission::Refuse(why) => {
                        tracing::debug!(%peer, cause = %why, "HTTP connection refused");
                    }
                    Admission::Admit { id, activity, shed } => {
                        let conn = Conn { activity: activity.clone(), bodies: bodies.clone() };
                        let stream = Tracked { inner: stream, activity };
                        conns.spawn(connection(stream, router.clone(), conn, shed, closing.clone(), gate.clone(), id));
                    }
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    let _ = closing_tx.send(true);
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = conns.len(),
            "HTTP requests still in flight at shutdown; dropped"
        );
        conns.abort_all();
    }
    Ok(())
}

/// One connection: HTTP/1.1 until the client closes it, the gate sheds it, or the server stops.
async fn connection(
    stream: Tracked,
    router: axum::Router,
    conn: Conn,
    shed: tokio::sync::oneshot::Receiver<()>,
    mut closing: tokio::sync::watch::Receiver<bool>,
    gate: Arc<Mutex<Gate>>,
    id: u64,
) {
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(conn.clone());
            tower_service::Service::call(&mut router.clone(), req)
        });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let mut served = std::pin::pin!(served);
    tokio::select! {
        result = served.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(cause = %e, "HTTP connection ended");
            }
        }
        _ = shed => tracing::debug!("HTTP connection shed for a newcomer"),
        () = async move { let _ = closing.wait_for(|c| *c).await; } => {
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
    }
    crate::locks::lock(&gate, "the HTTP gate").close(id);
}
