//! A fleet of real agent processes syncing over real QUIC (mutual TLS against a test fleet CA) from a real
//! S3 server (s3s-fs in-process, spoken to by aws-sdk-s3). Bytes leaving S3 are counted at the server.

use deckhand_agent::release::ReleaseFiles;
use deckhand_protocol::layout::Name;
use deckhand_protocol::status::Status;
use deckhand_tests::fixtures::{
    self, Perturbation, ReferenceSpec, card_image, encode_jpeg, perturb,
};
use deckhand_tests::{
    Agent, AgentOptions, Credentials, Fleet, MIB, credentials, metric, publish_to_dir, secs, shop,
    unique_chunk_bytes,
};
use deckhand_tools::publish;
use std::collections::HashMap;

/// The bytes of a manifest's blob, from the release files.
fn blob_bytes(files: &ReleaseFiles, id: &deckhand_protocol::BlobId) -> Vec<u8> {
    for p in files.paths() {
        let bytes = std::fs::read(p).unwrap();
        if deckhand_protocol::BlobId::of(&bytes) == *id {
            return bytes;
        }
    }
    panic!("no release file is {id}");
}

/// (bytes from peers, bytes from the origin) an agent stored since it started.
async fn bytes_in(a: &Agent) -> (u64, u64) {
    let s = a.status().await.unwrap();
    (s.bytes_from_peers, s.bytes_from_origin)
}

fn meta_name(files: &ReleaseFiles, card: &str) -> Option<String> {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.metadata).unwrap()).unwrap();
    meta[card]["name"].as_str().map(str::to_owned)
}

/// `files` with one card renamed in metadata.json.
fn with_renamed_card(fleet: &Fleet, files: &ReleaseFiles, card: &str, name: &str) -> ReleaseFiles {
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.metadata).unwrap()).unwrap();
    meta[card]["name"] = serde_json::json!(name);
    let mut out = files.clone();
    out.metadata = fleet.join(format!("metadata-{name}.json"));
    std::fs::write(&out.metadata, serde_json::to_vec(&meta).unwrap()).unwrap();
    out
}

/// The lines of the agents' logs that say why a piece's designated origin fetcher changed during a
/// download (a peer that stopped sharing, an origin that failed, a verdict), for a failure's message.
fn group_changes(fleet: &Fleet) -> String {
    let mut out = String::new();
    for a in &fleet.agents {
        let text = std::fs::read_to_string(a.log()).unwrap_or_default();
        for line in text.lines().filter(|l| {
            [
                "origin fetches",
                "set aside",
                "banned",
                "stalled",
                "range GET",
                "release accepted",
            ]
            .iter()
            .any(|k| l.contains(k))
        }) {
            out.push_str(&format!("{}: {line}\n", a.name));
        }
    }
    out
}

fn is_version(v: u64) -> impl Fn(&Status) -> bool {
    move |s| s.active_version() == Some(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_agents_pull_a_64_mib_release_from_s3_about_once_and_a_newcomer_needs_no_s3() {
    // Five agents; each dials those started before it (they learn the later ones from their Hellos).
    // Once every agent sees the four others and is connected to them, the release is published.
    let mut fleet = shop("fleet-five")
        .agents(5)
        .release(64 * MIB)
        .start()
        .await
        .unwrap();
    let files = fleet.release_files().unwrap().clone();
    let v1 = fleet.release_published().unwrap().clone();
    let spec = ReferenceSpec::small(40);
    // The HEF and the ONNX share their weights, the index and embeddings.npy their vectors: what must
    // cross the uplink is the release's distinct chunk bytes.
    let need = unique_chunk_bytes(&files);
    assert!(need >= 60 << 20, "the release has {need} unique bytes");
    assert!(v1.manifest.total_bytes() >= 64 << 20);
    // And packed, as the uplink carries them.
    let packed = deckhand_tests::packed_chunk_bytes(&files);
    fleet
        .wait_all(secs(180), "version 1 active", is_version(1))
        .await
        .unwrap();
    let sent = fleet.s3().stats().bytes_sent();
    let mut from_peers = 0;
    for a in &fleet.agents {
        from_peers += bytes_in(a).await.0;
    }
    eprintln!(
        "release {} bytes ({} unique, {packed} packed); S3 sent {sent} ({:.3}x packed); peers carried {from_peers}",
        v1.manifest.total_bytes(),
        need,
        sent as f64 / packed as f64
    );
    assert!(
        sent as f64 <= 1.10 * packed as f64,
        "S3 sent {sent} bytes for {packed} unique bytes packed: more than 1.10x"
    );
    assert!(
        from_peers >= 3 * need,
        "peers carried only {from_peers} bytes"
    );
    // No chunk crossed the uplink twice: each agent fetched from S3 at most the chunks it was the
    // designated fetcher of (rendezvous over the five agent ids, per 4 MiB piece of a blob, a chunk named
    // twice by its first place), packed, plus the chunk maps; the rest came from peers.
    let ids: Vec<String> = (0..5).map(|i| format!("pi-{i}")).collect();
    let mut designated: HashMap<String, u64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut maps = 0u64;
    for b in v1.manifest.blobs() {
        let bytes = blob_bytes(&files, &b.blob);
        let map = deckhand_protocol::ChunkMap::build(&bytes);
        maps += map.encode().len() as u64;
        let stored =
            deckhand_protocol::pack::stored(&map, &bytes, deckhand_protocol::pack::PACK_LEVEL);
        for (c, stored) in map.chunks().iter().zip(&stored) {
            if seen.insert(c.id) {
                let d = deckhand_protocol::sync::piece_fetcher(
                    &ids,
                    &b.blob,
                    c.offset,
                    deckhand_protocol::fetch::PIECE,
                )
                .unwrap();
                *designated.entry(d.to_owned()).or_default() += stored.len() as u64;
            }
        }
    }
    for (i, a) in fleet.agents.iter().enumerate() {
        let (peers, origin) = bytes_in(a).await;
        let mine = designated[&ids[i]];
        assert!(
            origin <= mine + maps,
            "pi-{i} pulled {origin} bytes from S3 but was designated for {mine} (+{maps} of chunk maps); \
             what changed the agents' origin groups:\n{}",
            group_changes(&fleet)
        );
        // Every chunk arrived, raw from peers or packed from S3.
        assert!(
            peers + origin >= packed - maps,
            "pi-{i}: {peers} + {origin}"
        );
    }
    // Every agent answers from the new release.
    let photo = encode_jpeg(&perturb(&card_image(3, 0), Perturbation::Crop, 4), 85);
    for a in &fleet.agents {
        let (code, answer) = a.recognize(&photo).await.unwrap();
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["card_id"], spec.card_id(3));
        assert_eq!(answer["manifest_version"], 1);
    }
    // Each pair holds one QUIC connection, which carried chunks both ways: an agent has four open, not
    // one dialed and one accepted per peer. The gauge in /metrics says the same.
    for a in &fleet.agents {
        a.wait_for(secs(20), "one connection per peer", |s| {
            s.dial_table.as_ref().is_some_and(|d| d.connections == 4)
        })
        .await
        .unwrap();
    }
    assert_eq!(
        metric(&fleet.agents[0], "deckhand_quic_connections").await,
        4
    );

    // S3 goes away; a new Pi joins (it knows one peer) and gets the release entirely from its peers. It
    // does try S3: the server counts the connections it refused.
    fleet.s3().set_down(true);
    fleet.s3().stats().reset();
    let first = fleet.agents[0].quic().unwrap().to_owned();
    fleet
        .start_agent_with(AgentOptions {
            name: "pi-5".into(),
            origin: true,
            peers: vec![first],
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    let newcomer = &fleet.agents[5];
    let s = newcomer
        .wait_for(secs(120), "version 1 active on the newcomer", is_version(1))
        .await
        .unwrap();
    assert_eq!(s.bytes_from_origin, 0, "{s:?}");
    assert!(s.bytes_from_peers >= need, "{s:?}");
    assert_eq!(fleet.s3().stats().bytes_sent(), 0);
    // The newcomer does try S3, and finds it down: a poll it makes after it had the release from its
    // peers (when that came first) still counts.
    let s = newcomer
        .wait_for(secs(30), "the newcomer finding S3 down", |s| {
            s.offline_since.is_some()
        })
        .await
        .unwrap();
    assert!(
        fleet.s3().stats().refused() > 0,
        "the server refused nothing, so S3 being down proved nothing"
    );
    assert_eq!(s.bytes_from_origin, 0, "{s:?}");
    assert_eq!(fleet.s3().stats().bytes_sent(), 0);
    let (code, answer) = newcomer.recognize(&photo).await.unwrap();
    assert_eq!((code, answer["manifest_version"].as_u64()), (200, Some(1)));
    fleet.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_downloads_nothing_and_a_replay_seen_after_a_restart_is_refused() {
    let mut fleet = shop("fleet-rollback")
        .agents(3)
        .release(8 * MIB)
        .start()
        .await
        .unwrap();
    let files = fleet.release_files().unwrap().clone();
    let v1 = fleet.release_published().unwrap().clone();
    let card = ReferenceSpec::small(40).card_id(3);
    fleet
        .wait_all(secs(120), "version 1 active", is_version(1))
        .await
        .unwrap();

    // Version 2 changes one small file; then the operator rolls back to version 1's blobs (version 3):
    // every agent activates it without downloading anything.
    let files2 = with_renamed_card(&fleet, &files, &card, "Card three, second print");
    fleet.publish(&files2).await.unwrap();
    fleet
        .wait_all(secs(60), "version 2 active", is_version(2))
        .await
        .unwrap();
    let mut before = Vec::new();
    for a in &fleet.agents {
        before.push(bytes_in(a).await);
    }
    fleet.s3().stats().reset();
    let policy =
        deckhand_protocol::TrustPolicy::new(vec![fleet.key().public().clone()], 1).unwrap();
    let deployment = Name::deployment("shop-1").unwrap();
    publish::rollback(
        fleet.origin(),
        &deployment,
        1,
        fleet.key(),
        &policy,
        jiff::SignedDuration::from_hours(24),
    )
    .await
    .unwrap();
    for (a, b) in fleet.agents.iter().zip(&before) {
        a.wait_for(secs(60), "version 3 active", is_version(3))
            .await
            .unwrap();
        assert_eq!(bytes_in(a).await, *b, "a rollback downloads nothing");
    }
    let photo = encode_jpeg(&perturb(&card_image(3, 0), Perturbation::Crop, 4), 85);
    let (_, answer) = fleet.agents[0].recognize(&photo).await.unwrap();
    assert_eq!(
        (
            answer["manifest_version"].as_u64(),
            answer["metadata"]["name"].as_str()
        ),
        (Some(3), meta_name(&files, &card).as_deref())
    );
    assert!(
        fleet.s3().stats().bytes_sent() < 64 * 1024,
        "a rollback pulled {} bytes from S3",
        fleet.s3().stats().bytes_sent()
    );

    // A replayed older manifest at S3, seen by an agent that restarts: refused (status names it),
    // version 3 stays.
    fleet.agents.remove(0).stop().await.unwrap();
    fleet
        .origin()
        .put(
            &fleet.origin().layout().current(&deployment),
            v1.envelope.clone().into(),
        )
        .await
        .unwrap();
    let peers = fleet.quic_addrs();
    let pi0 = fleet
        .start_agent_with(AgentOptions {
            name: "pi-0".into(),
            origin: true,
            peers,
            credentials: Credentials::Existing,
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    let s = pi0
        .wait_for(secs(30), "the replayed manifest refused", |s| {
            s.last_refused_manifest.is_some()
        })
        .await
        .unwrap();
    assert_eq!(s.active_version(), Some(3), "{s:?}");
    let refused = s.last_refused_manifest.unwrap_or_default();
    assert!(
        refused.contains("version 1 is not above the highest accepted version 3"),
        "{refused}"
    );
    fleet.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_s3_unreachable_throughout_one_bundle_reaches_the_whole_fleet() {
    let mut fleet = shop("fleet-bundle").s3_down().start().await.unwrap();
    let spec = ReferenceSpec::small(30);
    let files = fixtures::write_reference_release(&fleet.join("r1"), &spec).unwrap();
    let stick = fleet.join("usb");
    std::fs::create_dir_all(&stick).unwrap();
    // pi-1 knows both; the others know pi-1 (no peer lists are exchanged: pi-2 gets everything through
    // pi-1).
    let mut dial = Vec::new();
    for (i, extra) in [
        vec!["--bundle-dir".to_owned(), stick.display().to_string()],
        vec![],
        vec![],
    ]
    .into_iter()
    .enumerate()
    {
        let a = fleet
            .start_agent_with(AgentOptions {
                name: format!("pi-{i}"),
                origin: true,
                peers: dial,
                extra,
                ..AgentOptions::default()
            })
            .await
            .unwrap();
        dial = vec![a.quic().unwrap().to_owned()];
    }
    fleet.agents[1]
        .wait_for(secs(30), "two live peers", |s| s.live_peers() == 2)
        .await
        .unwrap();
    // The operator writes a bundle onto the stick (a file:// origin has the bundle layout).
    publish_to_dir(&fleet, &files, &stick).await;
    let statuses = fleet
        .wait_all(secs(90), "version 1 active", is_version(1))
        .await
        .unwrap();
    for s in &statuses {
        assert_eq!(s.bytes_from_origin, 0, "{s:?}");
    }
    assert!(statuses[0].bytes_from_bundles > 0);
    let c = fleet.agents[2].status().await.unwrap();
    assert!(c.bytes_from_peers > 0, "{c:?}");
    assert!(c.offline_since.is_some(), "{c:?}");
    assert_eq!(fleet.s3().stats().bytes_sent(), 0);
    let photo = encode_jpeg(&perturb(&card_image(2, 0), Perturbation::Rotate, 1), 85);
    let (code, answer) = fleet.agents[2].recognize(&photo).await.unwrap();
    assert_eq!(
        (code, answer["card_id"].as_str()),
        (200, Some(spec.card_id(2).as_str()))
    );
    fleet.stop().await.unwrap();
}

/// How a fake fleet member misbehaves.
#[derive(Clone)]
enum Misbehave {
    /// Claims to hold the release and answers every chunk request with garbage.
    CorruptChunks,
    /// Announces a much newer release and relays an old (validly signed) manifest as it.
    ReplayManifest(Vec<u8>),
    /// Claims to hold the release and never answers a chunk request (counting them).
    Stall(std::sync::Arc<std::sync::atomic::AtomicU64>),
    /// Claims to hold the release and answers every chunk request with one frame that never ends: a
    /// header declaring 4 GiB, then bytes for as long as the stream stays open (counting them).
    EndlessFrame(std::sync::Arc<std::sync::atomic::AtomicU64>),
}

/// A fleet member with a valid certificate that lies. Returns its QUIC address.
/// With `introduce`, it also sends that agent a Hello, as a new peer does, so the agent dials it.
fn fake_peer(
    creds: deckhand_agent::peer::tls::FleetCredentials,
    active: deckhand_protocol::wire::ReleaseRef,
    how: Misbehave,
    introduce: Option<&str>,
) -> std::net::SocketAddr {
    use deckhand_protocol::wire::{Hello, Request, Response};
    let endpoint = quinn::Endpoint::server(
        creds.server_config(8).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let hello = Hello {
        agent_id: creds.agent_id.clone(),
        deployment: "shop-1".into(),
        active: Some(active),
        pending: None,
        listen: addr.to_string(),
        origin: false,
        ready: None,
        root: None,
        fleet: None,
        rejected: None,
        proven: None,
    };
    if let Some(agent) = introduce {
        let (endpoint, hello, client) = (
            endpoint.clone(),
            hello.clone(),
            creds.client_config().unwrap(),
        );
        let agent: std::net::SocketAddr = agent.parse().unwrap();
        tokio::spawn(async move {
            let conn = endpoint
                .connect_with(client, agent, deckhand_protocol::wire::PEER_NAME)
                .unwrap()
                .await
                .unwrap();
            let hello_req = Request::Hello(Box::new(hello.clone()));
            deckhand_agent::peer::roundtrip(
                &conn,
                "agent",
                &hello_req,
                "hello",
                std::time::Duration::from_secs(5),
            )
            .await
            .unwrap();
        });
    }
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let (hello, how) = (hello.clone(), how.clone());
            if let Misbehave::EndlessFrame(sent) = how {
                tokio::spawn(endless_frames(conn, hello, sent));
                continue;
            }
            tokio::spawn(deckhand_agent::peer::serve_with(conn, move |req| {
                let (hello, how) = (hello.clone(), how.clone());
                async move {
                    match (req, how) {
                        (Request::Hello(_), _) => Response::Hello(Box::new(hello.clone())),
                        (Request::GetHave { .. }, Misbehave::CorruptChunks) => Response::Have {
                            bitmap: vec![0xff; 4096],
                        },
                        (Request::GetChunk { id }, Misbehave::CorruptChunks) => Response::Chunk {
                            data: deckhand_tests::noise(u64::from(id.as_bytes()[0]), 65536),
                        },
                        (Request::GetManifest { .. }, Misbehave::ReplayManifest(env)) => {
                            Response::Manifest { envelope: env }
                        }
                        (Request::GetHave { .. }, Misbehave::Stall(_)) => Response::Have {
                            bitmap: vec![0xff; 4096],
                        },
                        (Request::GetChunk { .. }, Misbehave::Stall(asked)) => {
                            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            std::future::pending::<()>().await;
                            Response::NotFound
                        }
                        _ => Response::NotFound,
                    }
                }
            }));
        }
    });
    addr
}

/// Starts pi-0 (with S3) dialling a fake fleet member `name` that holds `v1` and misbehaves as `how`;
/// returns pi-0's status once version 1 is active.
async fn beside_a_fake_peer(
    fleet: &mut Fleet,
    v1: &deckhand_tools::publish::Prepared,
    name: &str,
    how: Misbehave,
) -> Status {
    let peer = fake_peer(
        credentials(fleet, name),
        deckhand_protocol::wire::ReleaseRef {
            version: 1,
            manifest: v1.id,
        },
        how,
        None,
    )
    .to_string();
    fleet
        .start_agent_with(AgentOptions {
            name: "pi-0".into(),
            origin: true,
            peers: vec![peer],
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    fleet.agents[0]
        .wait_for(secs(120), "version 1 active", is_version(1))
        .await
        .unwrap()
}

/// Serves `conn` as [`Misbehave::EndlessFrame`]: Hellos and bitmaps answered properly, every chunk request
/// with a frame declaring 4 GiB followed by bytes until the reader goes away.
async fn endless_frames(
    conn: quinn::Connection,
    hello: deckhand_protocol::wire::Hello,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use deckhand_protocol::wire::{Request, Response};
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let (hello, sent) = (hello.clone(), sent.clone());
        tokio::spawn(async move {
            let mut header = [0u8; 4];
            if recv.read_exact(&mut header).await.is_err() {
                return;
            }
            let mut body = vec![0u8; u32::from_be_bytes(header).min(4096) as usize];
            if recv.read_exact(&mut body).await.is_err() {
                return;
            }
            let answer = match Request::decode(&body) {
                Ok(Request::Hello(_)) => Response::Hello(Box::new(hello.clone())),
                Ok(Request::GetHave { .. }) => Response::Have {
                    bitmap: vec![0xff; 4096],
                },
                Ok(Request::GetChunk { .. }) => {
                    if send.write_all(&u32::MAX.to_be_bytes()).await.is_err() {
                        return;
                    }
                    let piece = vec![0x5a; 64 * 1024];
                    while send.write_all(&piece).await.is_ok() {
                        sent.fetch_add(piece.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    return;
                }
                _ => Response::NotFound,
            };
            let _ = send.write_all(&answer.encode()).await;
            let _ = send.finish();
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_streaming_one_frame_forever_is_refused_at_its_header_with_bounded_memory() {
    let mut fleet = shop("fleet-endless").start().await.unwrap();
    let spec = ReferenceSpec::small(20);
    let files = fixtures::write_sized_release(&fleet.join("r1"), &spec, 8 << 20, 9).unwrap();
    let v1 = fleet.publish(&files).await.unwrap();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let s = beside_a_fake_peer(
        &mut fleet,
        &v1,
        "endless",
        Misbehave::EndlessFrame(sent.clone()),
    )
    .await;
    let pid = fleet.agents[0].pid().unwrap();
    let peak_kib = deckhand_tests::peak_rss_kib(pid);
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "endless peer: it pushed {sent} bytes before the agent stopped reading; agent peak RSS {peak_kib} KiB"
    );
    // The peer was asked, its frame refused at the header (nothing allocated for it), the peer banned
    // for it, and the release came from S3.
    let peer = s.peers.iter().find(|p| p.id == "endless").unwrap();
    assert!(
        peer.last_error
            .as_deref()
            .is_some_and(|e| e.contains("frame of 4294967295 bytes is over the limit")),
        "{peer:?}"
    );
    assert!(peer.banned, "{peer:?}");
    assert_eq!(peer.bytes_from, 0, "{peer:?}");
    assert!(
        s.bytes_from_origin >= unique_chunk_bytes(&files) / 2,
        "{s:?}"
    );
    assert!(peak_kib < 512 * 1024, "peak RSS {peak_kib} KiB");
    fleet.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupting_peer_is_banned_and_a_replaying_peer_refused() {
    let mut fleet = shop("fleet-liars").start().await.unwrap();
    let spec = ReferenceSpec::small(30);
    let files = fixtures::write_sized_release(&fleet.join("r1"), &spec, 8 << 20, 3).unwrap();
    let v1 = fleet.publish(&files).await.unwrap();
    let liar = fake_peer(
        credentials(&fleet, "liar"),
        deckhand_protocol::wire::ReleaseRef {
            version: 1,
            manifest: v1.id,
        },
        Misbehave::CorruptChunks,
        None,
    )
    .to_string();
    // pi-2 has no origin: everything it holds comes through peers, the liar's garbage refused on the
    // way.
    for (name, origin) in [("pi-0", true), ("pi-1", true), ("pi-2", false)] {
        let mut peers = vec![liar.clone()];
        peers.extend(fleet.quic_addrs());
        fleet
            .start_agent_with(AgentOptions {
                name: name.into(),
                origin,
                peers,
                ..AgentOptions::default()
            })
            .await
            .unwrap();
    }
    fleet
        .wait_all(secs(90), "version 1 active", is_version(1))
        .await
        .unwrap();
    let statuses = fleet
        .wait_all(secs(30), "the liar banned", |s| {
            s.peers
                .iter()
                .any(|p| p.id == "liar" && p.banned && p.banned_until.is_some())
        })
        .await
        .unwrap();
    for s in &statuses {
        assert_eq!(s.active_version(), Some(1), "{s:?}");
    }
    let view = deckhand_agent::http::get_fleet(fleet.agents[2].http())
        .await
        .unwrap();
    assert!(
        view.agents.iter().any(|a| a.id == "liar" && a.banned),
        "{view:?}"
    );

    // Version 2 reaches every agent.
    let files2 = with_renamed_card(&fleet, &files, &spec.card_id(1), "renamed");
    fleet.publish(&files2).await.unwrap();
    fleet
        .wait_all(secs(60), "version 2 active", is_version(2))
        .await
        .unwrap();
    // A fleet member announcing version 99 and relaying version 1's (validly signed) manifest as it:
    // refused, and the member banned for the lie.
    fake_peer(
        credentials(&fleet, "replayer"),
        deckhand_protocol::wire::ReleaseRef {
            version: 99,
            manifest: deckhand_protocol::BlobId::of(b"no such release"),
        },
        Misbehave::ReplayManifest(v1.envelope.clone()),
        fleet.agents[2].quic(),
    );
    // The ban is recorded before the relayed manifest is judged (refused as older): both are waited
    // for, as a status read between the two shows only the first.
    fleet.agents[2]
        .wait_for(
            secs(30),
            "the replayer banned and its manifest refused",
            |s| {
                s.peers.iter().any(|p| p.id == "replayer" && p.banned)
                    && s.last_refused_manifest
                        .as_deref()
                        .is_some_and(|m| m.contains("replayer"))
            },
        )
        .await
        .unwrap();
    for a in &fleet.agents {
        assert_eq!(a.status().await.unwrap().active_version(), Some(2));
    }
    // Every blob the agents hold hashes to its id.
    let dirs: Vec<_> = (0..3).map(|i| fleet.join(format!("pi-{i}"))).collect();
    fleet.stop().await.unwrap();
    for dir in dirs {
        deckhand_tests::verify_store(&dir);
    }
}

/// How an agent is interrupted in the middle of a download.
#[derive(Clone, Copy, Debug)]
enum Interrupt {
    /// SIGKILL: no chance to clean up.
    Kill,
    /// SIGTERM, as systemd stops the service: it must exit within 2 s.
    Term,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_half_way_resumes_without_fetching_stored_chunks_again() {
    interrupted_half_way("fleet-kill", Interrupt::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stopped_half_way_exits_within_two_seconds_and_resumes_without_refetching() {
    interrupted_half_way("fleet-term", Interrupt::Term).await;
}

/// An agent interrupted at half of a 24 MiB download restarts, fetches only what it had not stored, and
/// serves the release.
async fn interrupted_half_way(name: &str, how: Interrupt) {
    let mut fleet = shop(name).start().await.unwrap();
    let spec = ReferenceSpec::small(30);
    let files = fixtures::write_sized_release(&fleet.join("r1"), &spec, 24 << 20, 5).unwrap();
    let need = unique_chunk_bytes(&files);
    // A slow uplink (8 MiB/s), so the download takes a few seconds and the kill lands in the middle.
    fleet.s3().stats().set_uplink(8 << 20);
    fleet.start_agent("pi-0").await.unwrap();
    fleet.publish(&files).await.unwrap();
    fleet.s3().stats().reset();
    let s = fleet.agents[0]
        .wait_for(secs(60), "half of the release stored", |s| {
            s.pending
                .as_ref()
                .is_some_and(|p| 2 * p.bytes_have >= p.bytes_total)
        })
        .await
        .unwrap();
    // Both in blob bytes: chunks shared by two blobs (the HEF and the ONNX share weights) count twice.
    let pending = s.pending.clone().unwrap();
    let (have, total) = (pending.bytes_have, pending.bytes_total);
    assert!(
        s.active.is_none(),
        "the release activated before the kill: {s:?}"
    );
    let agent = fleet.agents.remove(0);
    let t = std::time::Instant::now();
    match how {
        Interrupt::Kill => agent.kill().await.unwrap(),
        Interrupt::Term => agent.stop_within(secs(2)).await.unwrap(),
    }
    eprintln!(
        "{how:?}: the agent was gone {} ms later",
        t.elapsed().as_millis()
    );
    // Every chunk the store recorded at the kill, by blob and index.
    let data = fleet.join("pi-0");
    let recorded = stored_chunks(&data, &files);
    assert!(!recorded.is_empty(), "nothing was stored before the kill");
    let before_restart = fleet.s3().stats().bytes_sent();
    assert!(
        before_restart < need,
        "{before_restart} of {need} bytes were sent before the kill"
    );
    fleet.s3().stats().reset();
    fleet
        .start_agent_with(AgentOptions {
            name: "pi-0".into(),
            origin: true,
            credentials: Credentials::Existing,
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    let a = &fleet.agents[0];
    let s = a
        .wait_for(
            secs(120),
            "version 1 active after the restart",
            is_version(1),
        )
        .await
        .unwrap();
    let after = fleet.s3().stats().bytes_sent();
    eprintln!(
        "stored {have} of {total} bytes ({need} unique) at the kill; S3 sent {after} bytes after the restart"
    );
    // What was stored at the kill is never fetched again: after the restart S3 sends at most the rest
    // (plus the small manifest and chunk maps, re-read while resuming), and no range it served after
    // the restart covers a chunk recorded before the kill.
    assert!(
        after <= total - have + (256 << 10),
        "S3 sent {after} bytes after the restart, but only {} were missing",
        total - have
    );
    assert!(s.bytes_from_origin <= total - have + (256 << 10));
    let refetched = refetched_chunks(&fleet, &files, &recorded);
    assert!(
        refetched.is_empty(),
        "chunks recorded before the kill were fetched again: {refetched:?}"
    );
    let photo = encode_jpeg(&perturb(&card_image(4, 0), Perturbation::Noise, 2), 85);
    let (code, answer) = a.recognize(&photo).await.unwrap();
    assert_eq!(
        (code, answer["card_id"].as_str()),
        (200, Some(spec.card_id(4).as_str()))
    );
    fleet.stop().await.unwrap();
}

/// The (blob, chunk index) pairs a stopped agent's store records as held, of the release's blobs.
fn stored_chunks(
    data: &std::path::Path,
    files: &ReleaseFiles,
) -> std::collections::HashSet<(String, u64)> {
    let store = deckhand_store::Store::open(data.join("store"), deckhand_store::Options::default())
        .unwrap();
    let mut out = std::collections::HashSet::new();
    for p in files.paths() {
        let id = deckhand_protocol::BlobId::of(&std::fs::read(p).unwrap());
        let Some(bits) = store.have_bitmap(&id).unwrap() else {
            continue;
        };
        for i in 0..bits.len() * 8 {
            if deckhand_protocol::sync::bit(&bits, i) {
                out.insert((id.to_string(), i as u64));
            }
        }
    }
    out
}

/// The recorded chunks that a ranged GET served after the restart overlapped.
fn refetched_chunks(
    fleet: &Fleet,
    files: &ReleaseFiles,
    recorded: &std::collections::HashSet<(String, u64)>,
) -> Vec<(String, u64)> {
    use deckhand_protocol::pack;
    let served = fleet.s3().stats().ranges();
    let mut out = Vec::new();
    for p in files.paths() {
        let bytes = std::fs::read(p).unwrap();
        let id = deckhand_protocol::BlobId::of(&bytes);
        let key = fleet.origin().layout().blob(&id);
        let map = deckhand_protocol::ChunkMap::build(&bytes);
        // A chunk is read from the blob, or from the blob's pack (its header aside).
        let pack_key = fleet.origin().layout().pack(&map.id());
        let header = pack::header_len(&map);
        let pack = pack::build(&map, &bytes, pack::PACK_LEVEL);
        let index = pack::PackIndex::decode(&map, &pack[..header as usize]).unwrap();
        for (i, c) in map.chunks().iter().enumerate() {
            if !recorded.contains(&(id.to_string(), i as u64)) {
                continue;
            }
            let (start, end) = (c.offset, c.offset + u64::from(c.len));
            let (packed, _) = index.locate(&c.range()).unwrap();
            if served.iter().any(|(k, r)| {
                (*k == key && r.start < end && start < r.end)
                    || (*k == pack_key && r.start < packed.end && packed.start < r.end)
            }) {
                out.push((id.to_string(), i as u64));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_without_a_fleet_certificate_or_with_a_revoked_one_gets_no_chunk_and_no_manifest()
{
    use deckhand_protocol::wire::{Hello, Request, Response};
    let mut fleet = shop("fleet-outsider").start().await.unwrap();
    let spec = ReferenceSpec::small(20);
    let files = fixtures::write_reference_release(&fleet.join("r1"), &spec).unwrap();
    let v1 = fleet.publish(&files).await.unwrap();
    fleet.start_agent("pi-0").await.unwrap();
    fleet.agents[0]
        .wait_for(secs(60), "version 1 active", is_version(1))
        .await
        .unwrap();
    let chunk =
        deckhand_protocol::ChunkMap::build(&std::fs::read(&files.labels).unwrap()).chunks()[0].id;
    let quic = |fleet: &Fleet| -> std::net::SocketAddr {
        fleet.agents[0].quic().unwrap().parse().unwrap()
    };
    let addr = quic(&fleet);
    // Each probe introduces itself (a Hello, as a new peer does), then asks for the manifest and a chunk.
    let ask = |cfg: quinn::ClientConfig, name: &'static str, addr: std::net::SocketAddr| async move {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = match endpoint
            .connect_with(cfg, addr, deckhand_protocol::wire::PEER_NAME)
            .unwrap()
            .await
        {
            Ok(c) => c,
            Err(e) => return vec![Err(e.to_string())],
        };
        let mut out = Vec::new();
        for req in [
            Request::Hello(Box::new(Hello {
                agent_id: name.into(),
                deployment: "shop-1".into(),
                active: None,
                pending: None,
                listen: "127.0.0.1:9".into(),
                origin: false,
                ready: None,
                root: None,
                fleet: None,
                rejected: None,
                proven: None,
            })),
            Request::GetManifest {
                deployment: "shop-1".into(),
            },
            Request::GetChunk { id: chunk },
        ] {
            let r = deckhand_agent::peer::roundtrip(&conn, "agent", &req, "probe", secs(5)).await;
            out.push(r.map_err(|e| e.to_string()));
        }
        out
    };
    let ca = fleet.ca().cert_path();
    // A fleet member gets both, and the agent learns of it from its Hello: the checks can succeed.
    let member = credentials(&fleet, "pi-9");
    let answers = ask(member.client_config().unwrap(), "pi-9", addr).await;
    assert!(
        matches!(&answers[1], Ok(Response::Manifest { envelope }) if *envelope == v1.envelope),
        "{answers:?}"
    );
    assert!(
        matches!(&answers[2], Ok(Response::Chunk { .. })),
        "{answers:?}"
    );
    fleet.agents[0]
        .wait_for(secs(10), "the member pi-9 among the peers", |s| {
            s.peers.iter().any(|p| p.id == "pi-9")
        })
        .await
        .unwrap();
    // No certificate at all, and a certificate from another CA: refused, nothing served, and the
    // agent never heard their Hello.
    let other = deckhand_tools::fleet_ca::CaDir::new(fleet.join("other-fleet"));
    other.init("other").unwrap();
    let (crt, key) = other
        .enroll("pi-7", 30, &fleet.join("other-fleet/certs"))
        .unwrap();
    for (who, cfg) in [
        ("no certificate", outsider(&ca, None)),
        (
            "another CA's certificate",
            outsider(&ca, Some((crt.as_path(), key.as_path()))),
        ),
    ] {
        let answers = ask(cfg, "pi-7", addr).await;
        assert!(
            answers.iter().all(Result::is_err),
            "{who}: the agent answered {answers:?}"
        );
    }
    let s = fleet.agents[0].status().await.unwrap();
    assert!(s.peers.iter().all(|p| p.id != "pi-7"), "{s:?}");

    // The CA revokes pi-9 and the agent restarts with the revocation list: pi-9's own certificate,
    // which was answered above, is now refused like an outsider's, while another member still gets
    // answers from the same agent.
    assert_eq!(fleet.ca().revoke("pi-9").unwrap().0, 1);
    fleet.agents.remove(0).stop().await.unwrap();
    let crl = fleet.ca().crl_path().display().to_string();
    fleet
        .start_agent_with(AgentOptions {
            name: "pi-0".into(),
            origin: true,
            credentials: Credentials::Existing,
            extra: vec!["--fleet-crl".into(), crl],
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    let addr = quic(&fleet);
    let answers = ask(member.client_config().unwrap(), "pi-9", addr).await;
    assert!(
        answers.iter().all(Result::is_err),
        "the revoked pi-9: the agent answered {answers:?}"
    );
    let other = credentials(&fleet, "pi-8");
    let answers = ask(other.client_config().unwrap(), "pi-8", addr).await;
    assert!(
        matches!(&answers[1], Ok(Response::Manifest { envelope }) if *envelope == v1.envelope),
        "{answers:?}"
    );
    let s = fleet.agents[0]
        .wait_for(secs(10), "the member pi-8 among the peers", |s| {
            s.peers.iter().any(|p| p.id == "pi-8")
        })
        .await
        .unwrap();
    assert!(s.peers.iter().all(|p| p.id != "pi-9"), "{s:?}");
    fleet.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_peer_is_abandoned_and_the_release_comes_from_elsewhere() {
    let mut fleet = shop("fleet-stall").start().await.unwrap();
    let spec = ReferenceSpec::small(20);
    let files = fixtures::write_sized_release(&fleet.join("r1"), &spec, 8 << 20, 7).unwrap();
    let v1 = fleet.publish(&files).await.unwrap();
    let chunks: usize = files
        .paths()
        .into_iter()
        .map(|p| {
            deckhand_protocol::ChunkMap::build(&std::fs::read(p).unwrap())
                .chunks()
                .len()
        })
        .sum();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let s = beside_a_fake_peer(&mut fleet, &v1, "staller", Misbehave::Stall(asked.clone())).await;
    let asked = asked.load(std::sync::atomic::Ordering::SeqCst) as usize;
    eprintln!("the staller was asked for {asked} of {chunks} chunks");
    // The first requests in flight time out, the staller is set aside, and nothing queued behind them is
    // sent to it: the release came from S3.
    assert!(asked > 0, "the staller was never tried");
    assert!(
        asked <= 16 && asked * 4 < chunks,
        "the staller was asked for {asked} of {chunks} chunks"
    );
    assert!(s.bytes_from_origin >= unique_chunk_bytes(&files) / 2);
    let peer = s.peers.iter().find(|p| p.id == "staller").unwrap();
    assert!(
        peer.last_error
            .as_deref()
            .is_some_and(|e| e.contains("timed out") || e.contains("timeout")),
        "{peer:?}"
    );
    fleet.stop().await.unwrap();
}
/// A QUIC client presenting `cert` (or no certificate at all) that trusts the fleet CA, so the agent's
/// own certificate checks out and only the agent can refuse.
fn outsider(
    fleet_ca: &std::path::Path,
    cert: Option<(&std::path::Path, &std::path::Path)>,
) -> quinn::ClientConfig {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(fleet_ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match cert {
        Some((crt, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(crt)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![deckhand_protocol::wire::ALPN.to_vec()];
    quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stops_is_shown_gone_at_once() {
    // Without a word from the member, its peers would see it live until its last Hello ages out (8 s).
    let mut fleet = shop("fleet-leave").agents(2).start().await.unwrap();
    fleet.agents.remove(1).stop().await.unwrap();
    let s = fleet.agents[0]
        .wait_for(secs(3), "pi-1 shown gone", |s| {
            s.peers.iter().any(|p| p.id == "pi-1" && !p.live)
        })
        .await
        .unwrap();
    assert_eq!(s.live_peers(), 0, "{s:?}");
    fleet.stop().await.unwrap();
}

/// Starts one more agent (dialling every running one) and waits until every agent sees all the others.
async fn join_and_meet(fleet: &mut Fleet, mut opts: AgentOptions) {
    opts.peers = fleet.quic_addrs();
    fleet.start_agent_with(opts).await.unwrap();
    let others = fleet.agents.len() - 1;
    fleet
        .wait_all(secs(30), "every other agent live", |s| {
            s.live_peers() == others
        })
        .await
        .unwrap();
}

/// Every agent's last switch: (ready_at, switched_at, why), for version `v`.
async fn switches(fleet: &Fleet, v: u64) -> Vec<(jiff::Timestamp, jiff::Timestamp, String)> {
    let mut out = Vec::new();
    for a in &fleet.agents {
        let s = a.status().await.unwrap();
        let sw = s
            .last_switch
            .unwrap_or_else(|| panic!("{}: no switch", a.name));
        assert_eq!(sw.version, v, "{}", a.name);
        out.push((
            sw.ready_at.parse().unwrap(),
            sw.switched_at.parse().unwrap(),
            sw.why,
        ));
    }
    out
}

/// The largest difference between the times, in seconds.
fn spread(times: impl Iterator<Item = jiff::Timestamp> + Clone) -> f64 {
    let (lo, hi) = (times.clone().min().unwrap(), times.max().unwrap());
    hi.duration_since(lo).as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_marked_together_goes_live_on_five_agents_within_a_second() {
    // Four agents with the origin, and a fifth without it, which can only take chunks once the others
    // stored them: the five are ready at different moments. The operator marks the release `together`
    // in its manifest (no agent setting says so).
    let mut fleet = shop("switch-together").agents(4).start().await.unwrap();
    join_and_meet(
        &mut fleet,
        AgentOptions {
            name: "pi-4".into(),
            origin: false,
            ..AgentOptions::default()
        },
    )
    .await;
    let files = fixtures::write_sized_release(
        &fleet.join("release-1"),
        &ReferenceSpec::small(40),
        8 * MIB,
        1,
    )
    .unwrap();
    let mut opts = deckhand_tests::publish_options(&files);
    opts.activate = Some(deckhand_protocol::switch::Mode::Together);
    let work = fleet.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let (v1, _) = publish::publish(
        fleet.origin(),
        &fleet.s3().origin_config(),
        fleet.key(),
        &opts,
        &work,
    )
    .await
    .unwrap();
    assert_eq!(
        v1.manifest.activate,
        Some(deckhand_protocol::switch::Mode::Together)
    );
    fleet
        .wait_all(secs(120), "version 1 active", is_version(1))
        .await
        .unwrap();
    let sw = switches(&fleet, 1).await;
    eprintln!("switches: {sw:?}");
    // Nobody went live before the last one was ready, and all went live within a second.
    let last_ready = sw.iter().map(|s| s.0).max().unwrap();
    for (i, (_, switched, why)) in sw.iter().enumerate() {
        assert!(
            *switched >= last_ready,
            "pi-{i} switched at {switched} ({why}), before the last agent was ready at {last_ready}"
        );
        assert_ne!(why, "deadline", "pi-{i}");
    }
    assert!(
        spread(sw.iter().map(|s| s.0)) > 0.0,
        "the agents were ready at different moments"
    );
    let s = spread(sw.iter().map(|s| s.1));
    assert!(s <= 1.0, "activations spread over {s:.3} s");
    fleet.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_cannot_finish_holds_the_shop_only_until_the_deadline() {
    // The agents switch together by their own setting, with a 3 s deadline. pi-2's store budget is too
    // small for the release: it stays live, on no release, and never becomes ready.
    let mut fleet = shop("switch-deadline")
        .agents(2)
        .agent_args(&[
            "--activate",
            "together",
            "--activate-deadline-secs",
            "3",
            // pi-2's designated pieces are not waited for long: it never fetches them.
            "--max-wait-secs",
            "2",
        ])
        .start()
        .await
        .unwrap();
    join_and_meet(
        &mut fleet,
        AgentOptions {
            name: "pi-2".into(),
            origin: true,
            extra: vec!["--store-budget".into(), "1MiB".into()],
            ..AgentOptions::default()
        },
    )
    .await;
    let files = fixtures::write_sized_release(
        &fleet.join("release-1"),
        &ReferenceSpec::small(40),
        4 * MIB,
        1,
    )
    .unwrap();
    fleet.publish(&files).await.unwrap();
    // While it waits, status says for whom.
    fleet.agents[0]
        .wait_for(secs(60), "waiting for pi-2", |s| {
            s.pending
                .as_ref()
                .and_then(|p| p.waiting.as_deref())
                .is_some_and(|w| w.contains("waiting for pi-2"))
        })
        .await
        .unwrap();
    for a in &fleet.agents[..2] {
        a.wait_for(secs(60), "version 1 active", is_version(1))
            .await
            .unwrap();
    }
    let mut sw = Vec::new();
    for a in &fleet.agents[..2] {
        let s = a.status().await.unwrap().last_switch.unwrap();
        let (ready, switched): (jiff::Timestamp, jiff::Timestamp) =
            (s.ready_at.parse().unwrap(), s.switched_at.parse().unwrap());
        eprintln!("{}: ready {ready}, switched {switched} ({})", a.name, s.why);
        sw.push((ready, switched, s.why));
    }
    // The first to reach its deadline switched after 3 s (not much later); the other followed it.
    let first = sw.iter().min_by_key(|s| s.1).unwrap();
    assert_eq!(first.2, "deadline");
    let waited = first.1.duration_since(first.0).as_secs_f64();
    assert!((3.0..6.0).contains(&waited), "waited {waited:.2} s");
    assert!(
        sw.iter()
            .all(|s| s.2 == "deadline" || s.2 == "a member switched")
    );
    let s = spread(sw.iter().map(|s| s.1));
    assert!(s <= 1.0, "activations spread over {s:.3} s");
    // pi-2 still has no release, and says why.
    let s = fleet.agents[2].status().await.unwrap();
    assert_eq!(s.active_version(), None);
    assert!(s.last_error.is_some(), "{s:?}");
    fleet.stop().await.unwrap();
}
