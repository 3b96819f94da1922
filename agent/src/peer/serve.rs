//! Serving peers: incoming connections (handshakes admitted by [`admission`]: bounded in total and per
//! address, the oldest shed, a Retry under pressure; then each identified by its fleet certificate, at
//! most [`admission::PER_MEMBER`] per member), one request per stream, answered from the store within the serving limits
//! ([`MAX_SERVING`] chunks at once, the bandwidth [`Bucket`]). A banned peer's streams are refused.

use super::*;
use frames::{FrameError, read_frame};

/// A member's connection counted while it is served.
struct MemberSlot {
    node: PeerNode,
    id: String,
}

impl Drop for MemberSlot {
    fn drop(&mut self) {
        let mut m = crate::locks::lock(&self.node.inner.members, "member connections");
        if let Some(n) = m.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.id);
            }
        }
    }
}

/// The serving bandwidth cap: a token bucket of `rate` bytes per second with one second of burst.
pub(super) struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub(super) fn new(rate: u64, now: Instant) -> Self {
        Self {
            rate: rate.max(1) as f64,
            tokens: rate.max(1) as f64,
            at: now,
        }
    }

    /// Takes `n` bytes at `now`; returns how long the caller must wait before sending them.
    fn take(&mut self, n: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

impl PeerNode {
    pub(super) async fn accept_loop(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let incoming = tokio::select! {
                i = self.inner.endpoint.accept() => i,
                _ = stop.changed() => break,
            };
            let Some(incoming) = incoming else { break };
            let Some((ticket, cancelled)) = self.admit(&incoming) else {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            };
            let node = self.clone();
            self.inner.tasks.spawn(async move {
                let remote = incoming.remote_address();
                let outcome = tokio::select! {
                    r = tokio::time::timeout(admission::HANDSHAKE_TIMEOUT, incoming) => Some(r),
                    _ = cancelled => None,
                };
                node.handshake_ended(ticket);
                let conn = match outcome {
                    Some(Ok(Ok(c))) => c,
                    Some(Ok(Err(e))) => {
                        tracing::info!(%remote, cause = %e, "refused an incoming connection");
                        return;
                    }
                    Some(Err(_)) => {
                        tracing::debug!(%remote, "an incoming handshake timed out");
                        return;
                    }
                    None => {
                        tracing::debug!(%remote, "an incoming handshake was shed for a newer one");
                        return;
                    }
                };
                let Some(id) = peer_id(&conn) else {
                    conn.close(1u8.into(), b"no fleet identity");
                    return;
                };
                // A handshake judged under credentials replaced while it ran (a revocation taken).
                if !node.still_valid(&conn) {
                    tracing::info!(peer = %id, %remote, "refused an incoming connection: the peer's certificate no longer checks");
                    conn.close(1u8.into(), b"certificate no longer valid");
                    return;
                }
                let Some(_slot) = node.member_slot(&id) else {
                    tracing::warn!(peer = %id, %remote, limit = admission::PER_MEMBER, "refused a connection: the member holds its share already");
                    conn.close(3u8.into(), b"too many connections");
                    return;
                };
                let span = tracing::info_span!("peer", peer = %id, %remote);
                node.serve_conn(id, conn, false).instrument(span).await;
            });
        }
        self.inner.endpoint.close(LEAVING.into(), LEAVING_REASON);
    }

    /// Admits an Initial ([`admission::Handshakes::admit`]): its ticket and what cancels it, or `None`
    /// to answer it with a Retry. A handshake shed to make room is cancelled here.
    fn admit(
        &self,
        incoming: &quinn::Incoming,
    ) -> Option<(u64, tokio::sync::oneshot::Receiver<()>)> {
        let mut h = crate::locks::lock(&self.inner.handshakes, "handshakes");
        let (gate, cancels) = &mut *h;
        let admit = gate.admit(
            incoming.remote_address().ip(),
            incoming.remote_address_validated(),
            Instant::now(),
        );
        match admit {
            admission::Admit::Retry => {
                self.inner.metrics.handshake_retried();
                None
            }
            admission::Admit::Start { ticket, shed } => {
                if let Some(cancel) = shed.and_then(|t| cancels.remove(&t)) {
                    // The shed handshake's task drops its connection (closing it) and frees its slot.
                    let _ = cancel.send(());
                    self.inner.metrics.handshake_shed();
                }
                let (tx, rx) = tokio::sync::oneshot::channel();
                cancels.insert(ticket, tx);
                Some((ticket, rx))
            }
        }
    }

    fn handshake_ended(&self, ticket: u64) {
        let mut h = crate::locks::lock(&self.inner.handshakes, "handshakes");
        h.0.done(ticket);
        h.1.remove(&ticket);
    }

    /// A member's connection slot, held while the connection is served; `None` when it holds
    /// [`admission::PER_MEMBER`] already.
    fn member_slot(&self, id: &str) -> Option<MemberSlot> {
        let mut m = crate::locks::lock(&self.inner.members, "member connections");
        let n = m.entry(id.to_owned()).or_default();
        if *n >= admission::PER_MEMBER {
            return None;
        }
        *n += 1;
        Some(MemberSlot {
            node: self.clone(),
            id: id.to_owned(),
        })
    }

    /// Serves the requests a peer makes on a connection, whichever side dialed it (`mine`: this agent
    /// did), until it closes. When it was the peer's connection, that is recorded at once and the
    /// peer's address is due for a dial again (the loser of a crossing of dials wakes nothing).
    pub(super) async fn serve_conn(&self, id: String, conn: quinn::Connection, mine: bool) {
        self.serve_streams(&id, &conn, mine).await;
        let forgot = crate::locks::lock(&self.inner.peers, "peers")
            .get_mut(&id)
            .is_some_and(|p| self.forget_closed(p, &conn, None));
        if forgot {
            self.inner.dial_wake.notify_one();
        }
    }

    async fn serve_streams(&self, id: &str, conn: &quinn::Connection, mine: bool) {
        let mut fleet = self.inner.fleet.subscribe();
        let ends = super::presented_ends(conn);
        loop {
            let accepted = tokio::select! {
                a = conn.accept_bi() => a,
                Ok(()) = fleet.changed() => {
                    // New credentials (a revocation, a retired CA): a peer that no longer checks
                    // is dropped from the connections it opened too.
                    if !self.still_valid(conn) {
                        tracing::warn!(peer = %id, "closing the connection: the peer's certificate no longer checks");
                        conn.close(1u8.into(), b"certificate no longer valid");
                        return;
                    }
                    continue;
                }
            };
            let (send, recv) = match accepted {
                Ok(s) => s,
                Err(_) => {
                    // A peer known only by the connections it opened says here that it left.
                    if closed_by_leaving(conn)
                        && let Some(p) = crate::locks::lock(&self.inner.peers, "peers").get_mut(id)
                    {
                        p.left = true;
                        tracing::info!(peer = %id, "the peer left");
                    }
                    return;
                }
            };
            if self.is_banned(id) {
                conn.close(2u8.into(), b"banned");
                return;
            }
            if self.outlived(ends) {
                self.close_outlived(id, conn, ends);
                return;
            }
            let node = self.clone();
            let (id2, conn2) = (id.to_owned(), conn.clone());
            self.inner.tasks.spawn(
                async move {
                    if let Err(e) = node.serve_stream(&id2, &conn2, mine, send, recv).await {
                        tracing::debug!(cause = %e, "stream ended with an error");
                    }
                }
                .in_current_span(),
            );
        }
    }

    async fn serve_stream(
        &self,
        id: &str,
        conn: &quinn::Connection,
        mine: bool,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), PeerError> {
        let conn_err = |e: &dyn std::fmt::Display| PeerError::Connection {
            peer: id.to_owned(),
            why: e.to_string(),
        };
        let body = tokio::time::timeout(READ_REQUEST_TIMEOUT, read_frame(&mut recv, MAX_REQUEST))
            .await
            .map_err(|_| PeerError::Timeout {
                peer: id.to_owned(),
                what: "request",
                after: READ_REQUEST_TIMEOUT,
            })?
            .map_err(|e| match e {
                FrameError::Wire(source) => PeerError::Wire {
                    peer: id.to_owned(),
                    source,
                },
                FrameError::Io(why) => conn_err(&why),
            })?;
        let response = match Request::decode(&body) {
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
            Ok(req) => self.answer(id, conn, mine, req).await,
        };
        let bytes = response.encode();
        if let Response::Chunk { data } = &response {
            self.throttle(data.len()).await;
            if let Some(p) = crate::locks::lock(&self.inner.peers, "peers").get_mut(id) {
                p.bytes_to += data.len() as u64;
            }
            self.inner.metrics.peer_served(data.len() as u64);
        }
        tokio::time::timeout(CHUNK_TIMEOUT, async {
            send.write_all(&bytes).await.map_err(|e| conn_err(&e))?;
            send.finish().map_err(|e| conn_err(&e))?;
            Ok::<_, PeerError>(())
        })
        .await
        .map_err(|_| PeerError::Timeout {
            peer: id.to_owned(),
            what: "response",
            after: CHUNK_TIMEOUT,
        })??;
        Ok(())
    }

    async fn answer(
        &self,
        id: &str,
        conn: &quinn::Connection,
        mine: bool,
        req: Request,
    ) -> Response {
        match req {
            Request::Hello(h) => self.answer_hello(id, conn, mine, *h),
            Request::GetManifest { deployment } => {
                if deployment != self.inner.deployment {
                    return Response::NotFound;
                }
                match self.local().envelope {
                    Some(envelope) => Response::Manifest { envelope },
                    None => Response::NotFound,
                }
            }
            Request::GetFleet => match self.inner.fleet.current().bundle() {
                Some(b) => Response::Fleet {
                    bundle: b.bytes.to_vec(),
                },
                None => Response::NotFound,
            },
            Request::GetRoot {
                deployment,
                version,
            } => {
                if deployment != self.inner.deployment {
                    return Response::NotFound;
                }
                let root = move |s: &Store| crate::ledger::Ledger::new(s).root(version);
                self.answer_from_store(root, |envelope| Response::Root { envelope })
                    .await
            }
            Request::GetChunk { id: chunk } => {
                // At the serving limit a request waits a little for a slot, then is told Busy: a
                // short queue instead of a storm of retries when many peers want one new chunk.
                let Ok(Ok(_permit)) =
                    tokio::time::timeout(BUSY_AFTER, self.inner.serving.acquire()).await
                else {
                    return Response::Busy;
                };
                self.answer_from_store(
                    move |s: &Store| s.read_chunk(&chunk),
                    |data| Response::Chunk { data },
                )
                .await
            }
            Request::GetHave { blob } => {
                self.answer_from_store(
                    move |s: &Store| s.have_bitmap(&blob),
                    |bitmap| Response::Have { bitmap },
                )
                .await
            }
            Request::Have { blob, chunks } => {
                // Bounded: when the engine falls behind, the announcement is dropped and its periodic
                // bitmap refresh catches up.
                let note = HaveNote {
                    peer: id.to_owned(),
                    blob,
                    chunks,
                };
                if self.inner.haves.try_send(note).is_err() {
                    tracing::debug!(peer = id, "have announcement dropped: the engine is behind");
                }
                Response::Ack
            }
            Request::GetStatus => {
                let source = crate::locks::lock(&self.inner.status, "status source").clone();
                if let Some(source) = source {
                    return Response::Status { json: source() };
                }
                let json = serde_json::json!({
                    "agent_id": self.inner.me,
                    "deployment": self.inner.deployment,
                    "peers": self.peers(),
                });
                Response::Status {
                    json: json.to_string().into_bytes(),
                }
            }
        }
    }

    /// A peer's Hello on `conn`: its claimed id must be its certificate's; its state is recorded, with
    /// the connection (which serves this agent's requests to the peer too), and its address is learnt
    /// (with the address it came from when it listens on any). Answered with ours.
    fn answer_hello(&self, id: &str, conn: &quinn::Connection, mine: bool, h: Hello) -> Response {
        let remote = conn.remote_address();
        if h.agent_id != id {
            return Response::Error {
                message: format!(
                    "hello names agent {:?} but the certificate names {id:?}",
                    h.agent_id
                ),
            };
        }
        // The peer's own listen address, with the address it actually came from.
        let back = h.listen.parse::<SocketAddr>().ok().map(|listen| {
            SocketAddr::new(
                if listen.ip().is_unspecified() {
                    remote.ip()
                } else {
                    listen.ip()
                },
                listen.port(),
            )
        });
        let known = crate::locks::lock(&self.inner.peers, "peers").contains_key(id);
        let addr = h
            .listen
            .parse::<SocketAddr>()
            .ok()
            .filter(|a| !a.ip().is_unspecified())
            .unwrap_or(remote);
        // Recorded before its address is given to the dial loop, which then finds it connected: it
        // is dialed only if this connection closes.
        self.record_hello(id, h, addr, conn, mine);
        if let Some(back) = back {
            self.add_addr(back);
        }
        if !known {
            tracing::info!(peer = id, "new peer");
        }
        Response::Hello(Box::new(self.hello()))
    }

    /// Answers from the store, read on a blocking thread: `found` of what `read` returns, NotFound for
    /// nothing, an error answer for a store error.
    async fn answer_from_store<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Store) -> Result<Option<T>, deckhand_store::StoreError> + Send + 'static,
        found: impl FnOnce(T) -> Response,
    ) -> Response {
        let store = self.inner.store.clone();
        match tokio::task::spawn_blocking(move || read(&store)).await {
            Ok(Ok(Some(v))) => found(v),
            Ok(Ok(None)) => Response::NotFound,
            Ok(Err(e)) => Response::Error {
                message: e.to_string(),
            },
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        }
    }

    /// Waits until the serving bucket has `n` bytes of tokens.
    async fn throttle(&self, n: usize) {
        let Some(bucket) = &self.inner.bucket else {
            return;
        };
        let wait = bucket.lock().await.take(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serving_cap_admits_rate_times_time_plus_one_second_of_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, t0);
        // One second of burst is free; then each byte costs a thousandth of a second.
        assert_eq!(b.take(1000, t0), Duration::ZERO);
        assert_eq!(b.take(500, t0), Duration::from_millis(500));
        // A sender that sleeps as told, sending 100-byte chunks for 10 virtual seconds.
        let mut b = Bucket::new(1000, t0);
        let (mut now, mut sent) = (t0, 0u64);
        let end = t0 + Duration::from_secs(10);
        loop {
            let at = now + b.take(100, now);
            if at > end {
                break;
            }
            now = at;
            sent += 100;
        }
        let allowed = 1000 * 10 + 1000;
        assert!(sent <= allowed, "{sent} bytes in 10 s at 1000 B/s");
        assert!(
            sent >= allowed - 200,
            "the cap starves: {sent} bytes in 10 s"
        );
        // Idle time refills at most one second of burst.
        let later = end + Duration::from_secs(60);
        assert_eq!(b.take(1000, later), Duration::ZERO);
        assert!(b.take(1, later) > Duration::ZERO);
        // A clock that steps back does not mint tokens.
        let mut b = Bucket::new(1000, t0 + Duration::from_secs(5));
        assert_eq!(b.take(1000, t0), Duration::ZERO);
        assert!(b.take(100, t0) > Duration::ZERO);
    }
}
