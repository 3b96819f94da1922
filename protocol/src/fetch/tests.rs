use super::*;

fn release(n: usize, len: u32) -> Vec<BlobChunks> {
    let chunks = (0..n as u64)
        .map(|i| Chunk {
            offset: i * u64::from(len),
            len,
            id: BlobId::of(&i.to_le_bytes()),
        })
        .collect();
    vec![BlobChunks {
        blob: BlobId::of(b"blob"),
        chunks,
    }]
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn cfg(me: &str) -> FetchConfig {
    let mut c = FetchConfig::new(me);
    c.gather = Duration::ZERO;
    c.join_wait = Duration::ZERO;
    c.piece = 4 * 64 * 1024;
    c.max_range = 4 * 64 * 1024;
    c
}

fn gets(actions: &[Action]) -> Vec<Range<u64>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Get { range, .. } => Some(range.clone()),
            _ => None,
        })
        .collect()
}

fn range_len(a: &Action) -> u64 {
    match a {
        Action::Get { range, .. } => range.end - range.start,
        Action::Ask { len, .. } => u64::from(*len),
    }
}

#[test]
fn alone_it_pipelines_origin_ranges_and_refills_the_window_on_each_completion() {
    let r = release(64, 64 * 1024);
    let mut f = Fetch::new(cfg("a"), &r, &[vec![]], Duration::ZERO);
    let done = |f: &mut Fetch, a: &Action, t: Duration| {
        let Action::Get {
            blob,
            range,
            chunks,
        } = a.clone()
        else {
            panic!("{a:?}")
        };
        for c in &chunks {
            f.handle(Event::Stored { id: c.id }, t);
        }
        f.handle(Event::RangeDone { blob, range }, t);
    };
    // Before anything came back: the initial window, one range.
    let mut flight = f.poll(Duration::ZERO);
    let g = gets(&flight);
    assert!(
        g.len() == 1 && g[0].end - g[0].start == 4 * 64 * 1024,
        "{g:?}"
    );
    // Ranges that come back fast open the window, round by round, to a full window of full ranges.
    let mut t = Duration::ZERO;
    for _ in 0..3 {
        t += secs(0.05);
        for a in std::mem::take(&mut flight) {
            done(&mut f, &a, t);
        }
        flight = f.poll(t);
    }
    let g = gets(&flight);
    assert_eq!(g.len(), cfg("a").origin_window, "{g:?}");
    // Each at most max_range (4 chunks), all but one full (a run stops at the blob's end).
    assert!(g.iter().all(|g| g.end - g.start <= 4 * 64 * 1024), "{g:?}");
    assert!(
        g.iter()
            .filter(|g| g.end - g.start == 4 * 64 * 1024)
            .count()
            >= g.len() - 1,
        "{g:?}"
    );
    assert!(f.poll(t).is_empty(), "window full");
    // One range done: its chunks stored, one more range goes out at once.
    t += secs(0.05);
    let held = f.progress().bytes_held;
    done(&mut f, &flight[0], t);
    assert_eq!(gets(&f.poll(t)).len(), 1);
    assert_eq!(f.progress().bytes_held, held + range_len(&flight[0]));
}

#[test]
fn slow_ranges_shrink_the_origin_window_to_what_arrives_in_the_target_time() {
    // The origin sends this agent 256 KiB/s: each range takes its length over that rate, times the
    // ranges sharing the line. The bytes in flight settle near 1 s worth (the target), not the
    // full window, so a change of designation finds little in flight.
    let r = release(256, 64 * 1024);
    let mut f = Fetch::new(cfg("a"), &r, &[vec![]], Duration::ZERO);
    let rate = 256.0 * 1024.0;
    let mut t = Duration::ZERO;
    let mut flight: Vec<(Duration, Action)> = Vec::new();
    let mut peak_late = 0u64;
    for _ in 0..200 {
        for a in f.poll(t) {
            flight.push((t, a));
        }
        if flight.is_empty() {
            break;
        }
        // The oldest range finishes: the line is shared by all in flight.
        let in_flight: u64 = flight.iter().map(|(_, a)| range_len(a)).sum();
        let (_, a) = flight.remove(0);
        t += Duration::from_secs_f64(range_len(&a) as f64 * (flight.len() + 1) as f64 / rate);
        if t > secs(10.0) {
            peak_late = peak_late.max(in_flight);
        }
        let Action::Get {
            blob,
            range,
            chunks,
        } = a
        else {
            panic!()
        };
        for c in &chunks {
            f.handle(Event::Stored { id: c.id }, t);
        }
        f.handle(Event::RangeDone { blob, range }, t);
    }
    assert!(f.is_complete());
    assert!(
        peak_late <= 2 * 256 * 1024,
        "{peak_late} bytes in flight at 256 KiB/s"
    );
}

#[test]
fn chunks_held_by_a_peer_are_asked_of_it_and_the_rest_waits_for_its_designated_fetcher() {
    let r = release(64, 64 * 1024);
    let blob = r[0].blob;
    let mut f = Fetch::new(cfg("a"), &r, &[vec![]], Duration::ZERO);
    f.handle(
        Event::PeerUp {
            peer: "b".into(),
            shares: true,
        },
        Duration::ZERO,
    );
    f.handle(
        Event::Have {
            peer: "b".into(),
            blob,
            chunks: vec![0, 1, 2],
        },
        Duration::ZERO,
    );
    let actions = f.poll(Duration::ZERO);
    let asks: Vec<_> = actions
        .iter()
        .filter(|a| matches!(a, Action::Ask { .. }))
        .collect();
    assert_eq!(asks.len(), 3);
    // The origin ranges are only of pieces designated to "a".
    let group = ["a".to_string(), "b".to_string()];
    let mine = |start: u64| {
        let piece = start / (4 * 64 * 1024);
        crate::sync::designated(&group, &crate::sync::piece_key(&blob, piece)) == Some("a")
    };
    for g in gets(&actions) {
        assert!(mine(g.start));
    }
    // Pieces designated to "b" wait max_wait after b's last progress, then come from the origin.
    let wake = f.next_wake().unwrap();
    assert_eq!(wake, secs(20.0));
    let mut t = Duration::ZERO;
    let mut from_origin = std::collections::BTreeSet::new();
    // Complete everything as asked, except b never makes progress again.
    let mut first = Some(actions);
    while !f.is_complete() && t < secs(60.0) {
        let actions = first.take().unwrap_or_else(|| f.poll(t));
        let idle = actions.is_empty();
        for a in actions {
            match a {
                Action::Ask { id, .. } => f.handle(Event::Stored { id }, t),
                Action::Get {
                    blob,
                    range,
                    chunks,
                } => {
                    assert!(t >= secs(20.0) || mine(range.start));
                    from_origin.insert(range.start);
                    for c in chunks {
                        f.handle(Event::Stored { id: c.id }, t);
                    }
                    f.handle(Event::RangeDone { blob, range }, t);
                }
            }
        }
        if idle {
            t = f.next_wake().unwrap_or(t + secs(1.0)).max(t + secs(0.01));
        }
    }
    assert!(f.is_complete(), "{t:?} {:?}", f.progress());
    assert!(t >= secs(20.0) && t < secs(21.0), "done at {t:?}");
}

#[test]
fn nothing_is_taken_from_the_origin_while_gathering_and_a_late_peer_takes_its_share() {
    let r = release(64, 64 * 1024);
    let blob = r[0].blob;
    let mut c = cfg("a");
    c.gather = secs(2.0);
    let mut f = Fetch::new(c, &r, &[vec![]], Duration::ZERO);
    assert!(f.poll(secs(1.0)).is_empty());
    assert_eq!(f.next_wake(), Some(secs(2.0)));
    f.handle(
        Event::PeerUp {
            peer: "b".into(),
            shares: true,
        },
        secs(1.5),
    );
    let g = gets(&f.poll(secs(2.0)));
    assert!(!g.is_empty());
    let group = ["a".to_string(), "b".to_string()];
    for r in &g {
        let piece = r.start / (4 * 64 * 1024);
        assert_eq!(
            crate::sync::designated(&group, &crate::sync::piece_key(&blob, piece)),
            Some("a")
        );
    }
}

#[test]
fn a_new_release_waits_for_the_live_peers_to_take_it_up_but_not_longer_than_join_wait() {
    let r = release(64, 64 * 1024);
    let blob = r[0].blob;
    let mut c = cfg("a");
    c.join_wait = secs(2.0);
    let up = |f: &mut Fetch, peer: &str, shares: bool, t: f64| {
        f.handle(
            Event::PeerUp {
                peer: peer.into(),
                shares,
            },
            secs(t),
        )
    };
    // Alone: nothing to wait for.
    let mut alone = Fetch::new(c.clone(), &r, &[vec![]], Duration::ZERO);
    assert!(!gets(&alone.poll(Duration::ZERO)).is_empty());
    // b and c are up but have not taken the release up yet: the origin waits.
    let mut f = Fetch::new(c.clone(), &r, &[vec![]], Duration::ZERO);
    up(&mut f, "b", false, 0.0);
    up(&mut f, "c", false, 0.0);
    assert!(gets(&f.poll(Duration::ZERO)).is_empty());
    assert_eq!(f.next_wake(), Some(secs(2.0)));
    up(&mut f, "b", true, 0.1);
    assert!(gets(&f.poll(secs(0.1))).is_empty(), "c does not share yet");
    // Once both share, the pieces are shared out at once, and "a" takes only its own.
    up(&mut f, "c", true, 0.2);
    let g = gets(&f.poll(secs(0.2)));
    assert!(!g.is_empty());
    let group = ["a".to_string(), "b".to_string(), "c".to_string()];
    for r in &g {
        let piece = r.start / (4 * 64 * 1024);
        assert_eq!(
            crate::sync::designated(&group, &crate::sync::piece_key(&blob, piece)),
            Some("a")
        );
    }
    // A peer that never takes the release up holds the origin back join_wait at most.
    let mut f = Fetch::new(c, &r, &[vec![]], Duration::ZERO);
    up(&mut f, "b", false, 0.0);
    assert!(gets(&f.poll(secs(1.9))).is_empty());
    assert!(!gets(&f.poll(secs(2.0))).is_empty());
}

#[test]
fn failures_set_peers_aside_ban_liars_and_back_the_origin_off() {
    let r = release(8, 64 * 1024);
    let blob = r[0].blob;
    let mut f = Fetch::new(cfg("a"), &r, &[vec![]], Duration::ZERO);
    for p in ["b", "c"] {
        f.handle(
            Event::PeerUp {
                peer: p.into(),
                shares: false,
            },
            Duration::ZERO,
        );
        f.handle(
            Event::Bitmap {
                peer: p.into(),
                blob,
                bitmap: vec![0xff],
            },
            Duration::ZERO,
        );
    }
    let asks = f.poll(Duration::ZERO);
    assert_eq!(asks.len(), 8, "all from peers, none from the origin");
    let mut by_peer: HashMap<String, Vec<BlobId>> = HashMap::new();
    for a in &asks {
        if let Action::Ask { peer, id, .. } = a {
            by_peer.entry(peer.clone()).or_default().push(*id);
        }
    }
    assert_eq!(by_peer.len(), 2, "spread over both holders");
    // b lies: banned; its chunks go to c.
    for id in by_peer["b"].clone() {
        f.handle(
            Event::PeerFailed {
                peer: "b".into(),
                id,
                failure: PeerFailure::Corrupt,
            },
            secs(1.0),
        );
    }
    let again = f.poll(secs(1.0));
    assert!(!again.is_empty());
    assert!(
        again
            .iter()
            .all(|a| matches!(a, Action::Ask { peer, .. } if peer == "c"))
    );
    // c times out: set aside; with no peer left the origin is used.
    for a in by_peer["c"]
        .iter()
        .copied()
        .chain(again.iter().filter_map(|a| match a {
            Action::Ask { id, .. } => Some(*id),
            _ => None,
        }))
    {
        f.handle(
            Event::PeerFailed {
                peer: "c".into(),
                id: a,
                failure: PeerFailure::Timeout,
            },
            secs(2.0),
        );
    }
    let origin = f.poll(secs(2.0));
    let g = gets(&origin);
    assert!(!g.is_empty());
    // The origin fails with a 5xx: backed off, doubling.
    let Action::Get { blob, range, .. } = origin[0].clone() else {
        panic!()
    };
    f.handle(
        Event::RangeFailed {
            blob,
            range: range.clone(),
            unreachable: false,
        },
        secs(2.0),
    );
    assert!(gets(&f.poll(secs(2.1))).is_empty());
    let retry = f.poll(secs(2.2));
    assert!(!gets(&retry).is_empty());
    assert!(f.origin_reachable());
    // Unreachable: left alone for origin_retry, and no longer announced as reaching it.
    for a in retry.into_iter().chain(origin.into_iter().skip(1)) {
        if let Action::Get { blob, range, .. } = a {
            f.handle(
                Event::RangeFailed {
                    blob,
                    range,
                    unreachable: true,
                },
                secs(3.0),
            );
        }
    }
    assert!(!f.origin_reachable());
    assert!(gets(&f.poll(secs(7.9))).is_empty());
    assert!(!f.stalled(secs(44.0)));
    assert!(f.stalled(secs(45.0)));
}

#[test]
fn an_uplink_budget_is_shared_among_the_agents_fetching_and_holds_over_time() {
    let r = release(400, 64 * 1024);
    let mut f = Fetch::new(cfg("a"), &r, &[vec![]], Duration::ZERO);
    f.handle(
        Event::PeerUp {
            peer: "b".into(),
            shares: true,
        },
        Duration::ZERO,
    );
    // 2 MB/s for the shop, two agents fetching: 1 MB/s each.
    f.handle(
        Event::Budget {
            bytes_per_sec: Some(2_000_000),
        },
        Duration::ZERO,
    );
    assert_eq!(f.origin_share(Duration::ZERO), Some(1_000_000.0));
    let mut t = Duration::ZERO;
    let mut asked = 0u64;
    let end = secs(10.0);
    while t < end {
        for a in f.poll(t) {
            if let Action::Get {
                blob,
                range,
                chunks,
            } = a
            {
                asked += range.end - range.start;
                for c in chunks {
                    f.handle(Event::Stored { id: c.id }, t);
                }
                f.handle(Event::RangeDone { blob, range }, t);
            }
        }
        t = f.next_wake().unwrap_or(end).max(t + secs(0.001));
    }
    // At most the share over the time, plus one range of burst.
    let most = 1_000_000.0 * end.as_secs_f64() + 4.0 * 64.0 * 1024.0;
    assert!(asked as f64 <= most, "asked {asked} in 10 s");
    assert!(
        asked as f64 >= 0.8 * 1_000_000.0 * end.as_secs_f64(),
        "asked only {asked}"
    );
    // The other agent finishes (leaves the group): the whole budget is this agent's.
    f.handle(Event::PeerDown { peer: "b".into() }, t);
    assert_eq!(f.origin_share(t), Some(2_000_000.0));
    f.handle(
        Event::Budget {
            bytes_per_sec: None,
        },
        t,
    );
    assert_eq!(f.origin_share(t), None);
}

#[test]
fn a_chunk_named_twice_is_fetched_once_and_held_chunks_are_not_fetched() {
    let mut r = release(6, 64 * 1024);
    r[0].chunks[5].id = r[0].chunks[1].id;
    let mut f = Fetch::new(cfg("a"), &r, &[vec![0, 2]], Duration::ZERO);
    assert_eq!(f.progress().chunks_missing, 4);
    let all: Vec<Chunk> = f
        .poll(Duration::ZERO)
        .into_iter()
        .flat_map(|a| match a {
            Action::Get { chunks, .. } => chunks,
            Action::Ask { .. } => vec![],
        })
        .collect();
    let ids: BTreeSet<BlobId> = all.iter().map(|c| c.id).collect();
    assert_eq!(ids.len(), all.len(), "no id twice");
    assert_eq!(all.len(), 3);
    for c in all {
        f.handle(Event::Stored { id: c.id }, secs(0.1));
    }
    assert!(f.is_complete());
}

/// `peer` comes up (not sharing the origin fetches) holding what `bitmap` says of `blob`.
fn up_holding(f: &mut Fetch, peer: &str, blob: BlobId, bitmap: Vec<u8>) {
    let (peer, shares) = (peer.to_owned(), false);
    f.handle(
        Event::PeerUp {
            peer: peer.clone(),
            shares,
        },
        Duration::ZERO,
    );
    f.handle(Event::Bitmap { peer, blob, bitmap }, Duration::ZERO);
}

#[test]
fn every_verdict_comes_out_once_with_the_configs_duration_and_honest_answers_earn_none() {
    let r = release(4, 64 * 1024);
    let blob = r[0].blob;
    let c = cfg("a");
    let mut f = Fetch::new(c.clone(), &r, &[vec![]], Duration::ZERO);
    for p in ["b", "c", "d", "e"] {
        up_holding(&mut f, p, blob, vec![0x0f]);
    }
    let id = r[0].chunks[0].id;
    for (peer, failure) in [
        ("b", PeerFailure::Corrupt),
        ("c", PeerFailure::Timeout),
        ("d", PeerFailure::Busy),
        ("e", PeerFailure::NotFound),
    ] {
        f.handle(
            Event::PeerFailed {
                peer: peer.into(),
                id,
                failure,
            },
            secs(1.0),
        );
    }
    let judged = f.judgements();
    assert_eq!(
        judged,
        vec![
            Judgement {
                peer: "b".into(),
                verdict: Verdict::Banned,
                lasts: c.ban,
                failure: PeerFailure::Corrupt,
            },
            Judgement {
                peer: "c".into(),
                verdict: Verdict::SetAside,
                lasts: c.set_aside,
                failure: PeerFailure::Timeout,
            },
        ]
    );
    assert!(f.judgements().is_empty(), "taken once");
    // The same rule judges outside a download (a chunk map, a relayed manifest).
    assert_eq!(
        c.judge("x", PeerFailure::Other).map(|j| j.lasts),
        Some(c.set_aside)
    );
    assert_eq!(c.judge("x", PeerFailure::Busy), None);
    // A banned peer is not asked before its ban ends, and is again after (no origin here to take its
    // chunks meanwhile).
    let c = FetchConfig {
        has_origin: false,
        ..c
    };
    let mut f = Fetch::new(c.clone(), &r, &[vec![]], Duration::ZERO);
    up_holding(&mut f, "b", blob, vec![0x0f]);
    for a in f.poll(Duration::ZERO) {
        if let Action::Ask { peer, id, .. } = a {
            let failure = PeerFailure::Corrupt;
            f.handle(Event::PeerFailed { peer, id, failure }, secs(1.0));
        }
    }
    assert_eq!(f.judgements().len(), 4);
    let asked = |f: &mut Fetch, t: f64| {
        f.poll(secs(t))
            .into_iter()
            .filter(|a| matches!(a, Action::Ask { peer, .. } if peer == "b"))
            .count()
    };
    assert_eq!(asked(&mut f, 2.0), 0);
    assert_eq!(asked(&mut f, 1.0 + c.ban.as_secs_f64()), 4);
}
