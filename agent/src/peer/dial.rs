//! Finding and keeping peers: dialing the addresses discovery and configuration give (with backoff),
//! exchanging Hellos, gossiping this agent's state when it changes, and recording what peers announce.

use super::*;

impl PeerNode {
    /// Records a peer's Hello, learnt on `conn` (`mine`: this agent dialed it). The connection becomes
    /// the peer's unless another is open to it that the pair keeps instead ([`keeps_new`]): the one
    /// not kept is closed. Sends a hint if the Hello announces a newer release of our deployment.
    pub(super) fn record_hello(
        &self,
        id: &str,
        hello: Hello,
        addr: SocketAddr,
        conn: &quinn::Connection,
        mine: bool,
    ) {
        let local = self.local();
        let announced = hello.newest().unwrap_or(0);
        // A peer on an older root announces what that root's keys signed: nothing to take before it
        // catches up (from us). A peer on a newer root has a rotation to pass on, whatever it announces.
        let newer_release = hello.announces_newer(local.newest(), local.root);
        let newer_root = hello.newer_root(local.root);
        let newer_fleet = hello.newer_fleet(self.inner.fleet.current().number());
        let ours = hello.deployment == self.inner.deployment;
        let rejects = hello.rejected;
        let mut dropped = None;
        let rejection_changed = {
            let mut peers = crate::locks::lock(&self.inner.peers, "peers");
            if !peers.contains_key(id) && peers.len() >= MAX_PEERS {
                return;
            }
            let p = peers
                .entry(id.to_owned())
                .or_insert_with(|| PeerState::new(addr));
            match p.conn.clone().filter(|c| c.close_reason().is_none()) {
                Some(old) if old.stable_id() == conn.stable_id() => p.addr = addr,
                Some(_) if !keeps_new(&self.inner.me, id, p.mine, mine) => {
                    dropped = Some(conn.clone())
                }
                old => {
                    dropped = old;
                    p.conn = Some(conn.clone());
                    p.mine = mine;
                    p.addr = addr;
                }
            }
            let before = p.hello.as_ref().and_then(|h| h.rejected);
            p.hello = Some(hello);
            p.last_hello = Some(Instant::now());
            p.left = false;
            rejects.is_some() && before != rejects
        };
        if let Some(c) = dropped {
            tracing::debug!(peer = %id, "a second connection to the peer: closing one of the two");
            c.close(0u8.into(), DUPLICATE);
        }
        if ours && rejection_changed {
            self.inner.rejections.notify_one();
        }
        if ours
            && (newer_release || newer_root.is_some() || newer_fleet.is_some())
            && !self.is_banned(id)
        {
            // Bounded: when the engine is busy, a later Hello repeats the hint.
            let _ = self.inner.hints.try_send(Hint {
                peer: id.to_owned(),
                version: announced,
                newer_root,
                newer_fleet,
            });
        }
    }
    /// Dials each address when it is due, and sleeps until the next one is: a new address
    /// ([`PeerNode::add_addr`]), a connection found closed (by the gossip loop, or when a peer's
    /// connection to us ends) and the end of a backoff wake it, so a shop whose peers are all connected
    /// does not wake it at all (but for [`DIAL_IDLE`]).
    pub(super) async fn dial_loop(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let round = tokio::time::Instant::now();
            let now = Instant::now();
            let connected: HashSet<SocketAddr> = crate::locks::lock(&self.inner.peers, "peers")
                .values()
                .filter(|s| s.conn.as_ref().is_some_and(|c| c.close_reason().is_none()))
                .map(|s| s.addr)
                .collect();
            // Each is given its next attempt as if it fails; it backs off while it keeps failing.
            let (due, next) = {
                let mut table = crate::locks::lock(&self.inner.addrs, "addresses");
                let due = table.due(now, &connected);
                (due, table.next_due(now, &connected))
            };
            for addr in due {
                let node = self.clone();
                self.inner
                    .tasks
                    .spawn(async move { node.dial(addr).await }.in_current_span());
            }
            let wait = next.map_or(DIAL_IDLE, |n| {
                n.saturating_duration_since(now).min(DIAL_IDLE)
            });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.inner.dial_wake.notified() => {}
                _ = stop.changed() => return,
            }
            // Rounds are spaced, however many addresses arrive (a LAN full of adverts).
            tokio::select! {
                _ = tokio::time::sleep_until(round + DIAL_ROUND) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn dial(&self, addr: SocketAddr) {
        if !self.try_dial(addr).await {
            crate::locks::lock(&self.inner.addrs, "addresses").failed(addr, Instant::now());
        }
    }

    /// One dial: `false` when it reached no member (nothing answered, or not with a fleet identity).
    async fn try_dial(&self, addr: SocketAddr) -> bool {
        let connecting =
            match self
                .inner
                .endpoint
                .connect_with(self.client_config(), addr, PEER_NAME)
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%addr, cause = %e, "cannot dial");
                    return false;
                }
            };
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(%addr, cause = %e, "dial failed");
                return false;
            }
            Err(_) => {
                tracing::debug!(%addr, "dial timed out");
                return false;
            }
        };
        let Some(id) = peer_id(&conn) else {
            conn.close(1u8.into(), b"no fleet identity");
            return false;
        };
        // A handshake judged under credentials replaced while it ran (a revocation taken).
        if !self.still_valid(&conn) {
            conn.close(1u8.into(), b"certificate no longer valid");
            return false;
        }
        crate::locks::lock(&self.inner.addrs, "addresses").connected(addr, Instant::now());
        if id == self.inner.me {
            conn.close(0u8.into(), b"self");
            {
                let mut own = crate::locks::lock(&self.inner.own, "own");
                own.insert(addr);
            }
            {
                let mut a = crate::locks::lock(&self.inner.addrs, "addrs");
                a.remove(&addr);
            }
            return true;
        }
        // One connection per peer, whichever side dialed it: a peer connected already (by either
        // side, at this address or another) is not dialed again.
        let already = self.conn(&id).is_ok();
        if already {
            conn.close(0u8.into(), DUPLICATE);
            {
                let mut a = crate::locks::lock(&self.inner.addrs, "addrs");
                a.remove(&addr);
            }
            return true;
        }
        if self.is_banned(&id) {
            // Counted as a failed dial: the address backs off while the ban stands.
            conn.close(2u8.into(), b"banned");
            return false;
        }
        if let Err(e) = self.exchange_hello(&id, addr, conn.clone(), true).await {
            tracing::debug!(peer = %id, cause = %e, "hello failed");
            return true;
        }
        // Kept (a dial that crossed the peer's may have lost): serve the peer's requests on it too.
        if self
            .conn(&id)
            .is_ok_and(|c| c.stable_id() == conn.stable_id())
        {
            tracing::info!(peer = %id, %addr, "connected");
            let node = self.clone();
            let span = tracing::info_span!("peer", peer = %id, remote = %addr);
            self.inner
                .tasks
                .spawn(async move { node.serve_conn(id, conn, true).await }.instrument(span));
        }
        true
    }

    /// Sends this agent's Hello on `conn` (`mine`: this agent dialed it) and records the answer.
    async fn exchange_hello(
        &self,
        id: &str,
        addr: SocketAddr,
        conn: quinn::Connection,
        mine: bool,
    ) -> Result<(), PeerError> {
        let resp = roundtrip(
            &conn,
            id,
            &Request::Hello(Box::new(self.hello())),
            "hello",
            HELLO_TIMEOUT,
        )
        .await?;
        match resp {
            Response::Hello(h) if h.agent_id == id => {
                self.record_hello(id, *h, addr, &conn, mine);
                Ok(())
            }
            Response::Hello(h) => Err(PeerError::Remote {
                peer: id.to_owned(),
                message: format!("hello names {:?}, not its certificate", h.agent_id),
            }),
            other => Err(unexpected(id, "hello", other)),
        }
    }

    /// A peer's connection found closed: whether it said it was leaving is kept, the connection
    /// dropped, and its address handed to the dial table. Nothing is done when the peer's connection
    /// is another one by now (`conn` lost a crossing of dials, or was replaced). Returns whether it
    /// was the peer's connection: then the caller wakes the dial loop. Called with the peers lock held
    /// (peers before addresses, as everywhere).
    pub(super) fn forget_closed(
        &self,
        p: &mut PeerState,
        conn: &quinn::Connection,
        error: Option<String>,
    ) -> bool {
        if p.conn
            .as_ref()
            .is_none_or(|c| c.stable_id() != conn.stable_id())
        {
            return false;
        }
        p.left |= closed_by_leaving(conn);
        p.conn = None;
        if error.is_some() {
            p.last_error = error;
        }
        crate::locks::lock(&self.inner.addrs, "addrs").add(p.addr, false, Instant::now());
        true
    }

    pub(super) async fn gossip_loop(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let changed = tokio::select! {
                _ = tokio::time::sleep(GOSSIP) => false,
                _ = self.inner.changed.notified() => true,
                _ = stop.changed() => return,
            };
            let now = Instant::now();
            let mut closed = false;
            let conns: Vec<(String, SocketAddr, quinn::Connection, bool, bool)> =
                crate::locks::lock(&self.inner.peers, "peers")
                    .iter_mut()
                    .filter_map(|(id, s)| {
                        let c = s.conn.clone()?;
                        if c.close_reason().is_some() {
                            // Recorded once: the next round does not find it again.
                            closed |= self.forget_closed(s, &c, None);
                            return None;
                        }
                        // A change goes to everyone; the timer skips a peer just heard from.
                        let heard =
                            !changed && s.last_hello.is_some_and(|t| now.duration_since(t) < HEARD);
                        Some((id.clone(), s.addr, c, s.mine, !heard))
                    })
                    .collect();
            if closed {
                // Its address is dialed again at once.
                self.inner.dial_wake.notify_one();
            }
            let jobs = conns.into_iter().map(|(id, addr, conn, mine, exchange)| {
                let node = self.clone();
                async move {
                    let ends = super::presented_ends(&conn);
                    // A connection closed here is still tried, so that it is recorded as closed.
                    if node.outlived(ends) {
                        node.close_outlived(&id, &conn, ends);
                    } else if !exchange {
                        return;
                    }
                    if let Err(e) = node.exchange_hello(&id, addr, conn.clone(), mine).await {
                        tracing::debug!(peer = %id, cause = %e, "gossip failed");
                        if conn.close_reason().is_some()
                            && let Some(p) =
                                crate::locks::lock(&node.inner.peers, "peers").get_mut(&id)
                            && node.forget_closed(p, &conn, Some(e.to_string()))
                        {
                            node.inner.dial_wake.notify_one();
                        }
                    }
                }
            });
            futures::future::join_all(jobs).await;
        }
    }
}
