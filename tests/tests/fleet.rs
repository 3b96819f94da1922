//! A fleet of real agent processes syncing over real QUIC (mutual TLS against a test fleet CA) from a real
//! S3 server (s3s-fs in-process, spoken to by aws-sdk-s3). Bytes leaving S3 are counted at the server.

use deckhand_agent::fixtures::{
    self, Perturbation, ReferenceSpec, card_image, encode_jpeg, perturb,
};
use deckhand_agent::origin::Origin;
use deckhand_protocol::SecretKey;
use deckhand_tests::{Agent, TestDir, TestFleet, publish_options, unique_chunk_bytes};
use deckhand_tools::locals3::LocalS3;
use deckhand_tools::publish;
use std::collections::HashMap;

/// The bytes of a manifest's blob, from the release files.
fn blob_bytes(
    files: &deckhand_agent::release::ReleaseFiles,
    id: &deckhand_protocol::BlobId,
) -> Vec<u8> {
    for p in files.paths() {
        let bytes = std::fs::read(p).unwrap();
        if deckhand_protocol::BlobId::of(&bytes) == *id {
            return bytes;
        }
    }
    panic!("no release file is {id}");
}

struct Shop {
    t: TestDir,
    s3: LocalS3,
    origin: Origin,
    key: SecretKey,
    trust: String,
    fleet: TestFleet,
}

impl Shop {
    async fn new(name: &str) -> Shop {
        let t = TestDir::new(name);
        let s3 = LocalS3::start(&t.join("s3"), "cards").unwrap();
        let origin = Origin::connect(&s3.origin_url("fleet"), &s3.origin_config())
            .await
            .unwrap();
        let key = SecretKey::from_seed(&[21; 32]);
        let trust = t.join("ops.pub");
        std::fs::write(&trust, key.public().to_file_text()).unwrap();
        let fleet = TestFleet::new(t.path());
        Shop {
            trust: trust.display().to_string(),
            t,
            s3,
            origin,
            key,
            fleet,
        }
    }

    async fn publish(&self, files: &deckhand_agent::release::ReleaseFiles) -> publish::Prepared {
        publish::publish(
            &self.origin,
            &self.s3.origin_config(),
            &self.key,
            &publish_options(files),
            &self.t.join("work"),
        )
        .await
        .unwrap()
        .0
    }

    /// Starts agent `name` (enrolling it); `origin` gives it the S3 origin; `peers` are QUIC addresses to
    /// dial.
    fn agent(&self, name: &str, origin: bool, peers: &[&str], extra: &[&str]) -> Agent {
        let fleet = self.fleet.agent_args(name);
        self.start(name, origin, peers, extra, fleet)
    }

    /// Restarts agent `name` with the certificate it was enrolled with.
    fn agent_again(&self, name: &str, origin: bool, peers: &[&str], extra: &[&str]) -> Agent {
        let fleet = self.fleet.existing_args(name);
        self.start(name, origin, peers, extra, fleet)
    }

    fn start(
        &self,
        name: &str,
        origin: bool,
        peers: &[&str],
        extra: &[&str],
        fleet: Vec<String>,
    ) -> Agent {
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            self.t.join(name).display().to_string(),
            "--deployment".into(),
            "shop-1".into(),
            "--trust".into(),
            self.trust.clone(),
            "--backend".into(),
            "cpu".into(),
            "--poll-secs".into(),
            "1".into(),
        ];
        if origin {
            args.extend(["--origin".into(), self.s3.origin_arg("fleet")]);
        }
        for p in peers {
            args.extend(["--peer".into(), (*p).to_owned()]);
        }
        args.extend(fleet);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start(&refs, &self.s3.env())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_agents_pull_a_64_mib_release_from_s3_about_once() {
    let shop = Shop::new("fleet-five").await;
    let spec = ReferenceSpec::small(40);
    let files = fixtures::write_sized_release(&shop.t.join("r1"), &spec, 64 << 20, 1).unwrap();
    // The HEF and the ONNX share their weights, the index and embeddings.npy their vectors: what must
    // cross the uplink is the release's distinct chunk bytes.
    let need = unique_chunk_bytes(&files);
    assert!(need >= 60 << 20, "the release has {need} unique bytes");

    // Five agents; each dials those started before it (they learn the later ones from their Hellos).
    let mut agents: Vec<Agent> = Vec::new();
    for i in 0..5 {
        let peers: Vec<String> = agents.iter().map(|a| a.quic().to_owned()).collect();
        let peers: Vec<&str> = peers.iter().map(String::as_str).collect();
        agents.push(shop.agent(&format!("pi-{i}"), true, &peers, &[]));
    }
    // Wait until every agent sees the four others, then publish.
    for a in &agents {
        a.wait_for(30, "four live peers", |s| {
            s["peers"]
                .as_array()
                .is_some_and(|p| p.iter().filter(|p| p["live"] == true).count() == 4)
        });
    }
    shop.s3.stats().reset();
    let v1 = shop.publish(&files).await;
    assert!(v1.manifest.total_bytes() >= 64 << 20);
    let published = shop.s3.stats().bytes_sent();
    for a in &agents {
        a.wait_for(180, "version 1 active", |s| s["active"]["version"] == 1);
    }
    let sent = shop.s3.stats().bytes_sent() - published;
    let from_peers: u64 = agents
        .iter()
        .map(|a| a.status()["bytes_from_peers"].as_u64().unwrap())
        .sum();
    eprintln!(
        "release {} bytes ({} unique); S3 sent {sent} ({:.3}x); peers carried {from_peers}",
        v1.manifest.total_bytes(),
        need,
        sent as f64 / need as f64
    );
    assert!(
        sent as f64 <= 1.10 * need as f64,
        "S3 sent {sent} bytes for {need} unique bytes: more than 1.10x"
    );
    assert!(
        from_peers >= 3 * need,
        "peers carried only {from_peers} bytes"
    );
    // No chunk crossed the uplink twice: each agent fetched from S3 at most the chunks it was the
    // designated fetcher of (rendezvous over the five agent ids), plus the chunk maps; the rest came from
    // peers.
    let ids: Vec<String> = (0..5).map(|i| format!("pi-{i}")).collect();
    let mut designated: HashMap<String, u64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut maps = 0u64;
    for b in v1.manifest.blobs() {
        let map = deckhand_protocol::ChunkMap::build(&blob_bytes(&files, &b.blob));
        maps += map.encode().len() as u64;
        for c in map.chunks() {
            if seen.insert(c.id) {
                let d = deckhand_protocol::sync::designated(&ids, &c.id).unwrap();
                *designated.entry(d.to_owned()).or_default() += u64::from(c.len);
            }
        }
    }
    for (i, a) in agents.iter().enumerate() {
        let (peers, origin) = bytes_in(a);
        let mine = designated[&ids[i]];
        assert!(
            origin <= mine + maps,
            "pi-{i} pulled {origin} bytes from S3 but was designated for {mine} (+{maps} of chunk maps)"
        );
        assert!(peers + origin >= need - maps, "pi-{i}: {peers} + {origin}");
    }
    // Every agent answers from the new release.
    let photo = encode_jpeg(&perturb(&card_image(3, 0), Perturbation::Crop, 4), 85);
    for a in &agents {
        let (code, answer) = a.recognize(&photo);
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["card_id"], spec.card_id(3));
        assert_eq!(answer["manifest_version"], 1);
    }

    // Version 2 changes one small file; then the operator rolls back to version 1's blobs (version 3):
    // every agent activates it without downloading anything.
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.metadata).unwrap()).unwrap();
    meta[spec.card_id(3)]["name"] = serde_json::json!("Card three, second print");
    let mut files2 = files.clone();
    files2.metadata = shop.t.join("metadata-v2.json");
    std::fs::write(&files2.metadata, serde_json::to_vec(&meta).unwrap()).unwrap();
    shop.publish(&files2).await;
    for a in &agents {
        a.wait_for(60, "version 2 active", |s| s["active"]["version"] == 2);
    }
    let before: Vec<(u64, u64)> = agents.iter().map(bytes_in).collect();
    shop.s3.stats().reset();
    let policy = deckhand_protocol::TrustPolicy::new(vec![shop.key.public().clone()], 1).unwrap();
    let deployment = deckhand_protocol::layout::Name::deployment("shop-1").unwrap();
    publish::rollback(
        &shop.origin,
        &deployment,
        1,
        &shop.key,
        &policy,
        jiff::SignedDuration::from_hours(24),
    )
    .await
    .unwrap();
    for (a, b) in agents.iter().zip(&before) {
        a.wait_for(60, "version 3 active", |s| s["active"]["version"] == 3);
        assert_eq!(bytes_in(a), *b, "a rollback downloads nothing");
    }
    let (_, answer) = agents[0].recognize(&photo);
    assert_eq!(
        (
            answer["manifest_version"].as_u64(),
            answer["metadata"]["name"].as_str()
        ),
        (Some(3), meta_name(&files, &spec.card_id(3)).as_deref())
    );
    assert!(
        shop.s3.stats().bytes_sent() < 64 * 1024,
        "a rollback pulled {} bytes from S3",
        shop.s3.stats().bytes_sent()
    );

    // A replayed older manifest at S3, seen by an agent that restarts: refused, version 3 stays.
    let v1_envelope = v1.envelope.clone();
    let pi0 = agents.remove(0);
    pi0.stop();
    shop.origin
        .put(
            &shop.origin.layout().current(&deployment),
            v1_envelope.into(),
        )
        .await
        .unwrap();
    let peers: Vec<String> = agents.iter().map(|a| a.quic().to_owned()).collect();
    let peer_refs: Vec<&str> = peers.iter().map(String::as_str).collect();
    let pi0 = shop.agent_again("pi-0", true, &peer_refs, &[]);
    pi0.wait_for(30, "a poll of the replayed manifest", |s| {
        s["active"]["version"] == 3 && s["peers"].as_array().is_some_and(|p| !p.is_empty())
    });
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(pi0.status()["active"]["version"], 3);
    agents.push(pi0);

    // S3 goes away; a new Pi joins and gets version 3 entirely from its peers.
    shop.s3.set_down(true);
    shop.s3.stats().reset();
    let newcomer = shop.agent("pi-5", true, &peer_refs[..1], &[]);
    let s = newcomer.wait_for(120, "version 3 active on the newcomer", |s| {
        s["active"]["version"] == 3
    });
    assert_eq!(s["bytes_from_origin"], 0, "{s}");
    assert!(s["bytes_from_peers"].as_u64().unwrap() >= need, "{s}");
    assert_eq!(shop.s3.stats().bytes_sent(), 0);
    let (code, answer) = newcomer.recognize(&photo);
    assert_eq!((code, answer["manifest_version"].as_u64()), (200, Some(3)));
    newcomer.stop();
    for a in agents {
        a.stop();
    }
}

/// (bytes from peers, bytes from the origin) an agent stored since it started.
fn bytes_in(a: &Agent) -> (u64, u64) {
    let s = a.status();
    (
        s["bytes_from_peers"].as_u64().unwrap(),
        s["bytes_from_origin"].as_u64().unwrap(),
    )
}

fn meta_name(files: &deckhand_agent::release::ReleaseFiles, card: &str) -> Option<String> {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.metadata).unwrap()).unwrap();
    meta[card]["name"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_s3_unreachable_throughout_one_bundle_reaches_the_whole_fleet() {
    let shop = Shop::new("fleet-bundle").await;
    shop.s3.set_down(true);
    let spec = ReferenceSpec::small(30);
    let files = fixtures::write_reference_release(&shop.t.join("r1"), &spec).unwrap();
    let stick = shop.t.join("usb");
    std::fs::create_dir_all(&stick).unwrap();
    let stick_s = stick.display().to_string();
    let a = shop.agent("pi-0", true, &[], &["--bundle-dir", stick_s.as_str()]);
    let b = shop.agent("pi-1", true, &[a.quic()], &[]);
    let c = shop.agent("pi-2", true, &[b.quic()], &[]);
    // pi-1 knows both; the others know pi-1 (no peer lists are exchanged: pi-2 gets everything through
    // pi-1).
    b.wait_for(30, "two live peers", |s| {
        s["peers"]
            .as_array()
            .is_some_and(|p| p.iter().filter(|p| p["live"] == true).count() == 2)
    });
    // The operator writes a bundle onto the stick (a file:// origin has the bundle layout).
    let origin = Origin::connect(
        &format!("file://{}", stick.display()).parse().unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    publish::publish(
        &origin,
        &Default::default(),
        &shop.key,
        &publish_options(&files),
        &shop.t.join("work"),
    )
    .await
    .unwrap();
    for agent in [&a, &b, &c] {
        let s = agent.wait_for(90, "version 1 active", |s| s["active"]["version"] == 1);
        assert_eq!(s["bytes_from_origin"], 0, "{s}");
    }
    assert!(a.status()["bytes_from_bundles"].as_u64().unwrap() > 0);
    assert!(c.status()["bytes_from_peers"].as_u64().unwrap() > 0);
    assert!(c.status()["offline_since"].is_string());
    assert_eq!(shop.s3.stats().bytes_sent(), 0);
    let photo = encode_jpeg(&perturb(&card_image(2, 0), Perturbation::Rotate, 1), 85);
    let (code, answer) = c.recognize(&photo);
    assert_eq!(
        (code, answer["card_id"].as_str()),
        (200, Some(spec.card_id(2).as_str()))
    );
    for agent in [a, b, c] {
        agent.stop();
    }
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
}

/// A fleet member with a valid certificate that lies. Returns its QUIC address.
/// With `introduce`, it also sends that agent a Hello, as a new peer does, so the agent dials it.
fn fake_peer(
    creds: deckhand_agent::fleet::FleetCredentials,
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
                .connect_with(client, agent, deckhand_agent::fleet::PEER_NAME)
                .unwrap()
                .await
                .unwrap();
            let hello_req = Request::Hello(hello.clone());
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
            tokio::spawn(deckhand_agent::peer::serve_with(conn, move |req| {
                let (hello, how) = (hello.clone(), how.clone());
                async move {
                    match (req, how) {
                        (Request::Hello(_), _) => Response::Hello(hello),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupting_peer_is_banned_and_a_replaying_peer_refused() {
    let shop = Shop::new("fleet-liars").await;
    let spec = ReferenceSpec::small(30);
    let files = fixtures::write_sized_release(&shop.t.join("r1"), &spec, 8 << 20, 3).unwrap();
    let v1 = shop.publish(&files).await;
    let liar = fake_peer(
        shop.fleet.credentials("liar"),
        deckhand_protocol::wire::ReleaseRef {
            version: 1,
            manifest: v1.id,
        },
        Misbehave::CorruptChunks,
        None,
    )
    .to_string();
    let a = shop.agent("pi-0", true, &[liar.as_str()], &[]);
    let b = shop.agent("pi-1", true, &[liar.as_str(), a.quic()], &[]);
    let c = shop.agent("pi-2", false, &[liar.as_str(), a.quic(), b.quic()], &[]);
    for agent in [&a, &b, &c] {
        agent.wait_for(90, "version 1 active", |s| s["active"]["version"] == 1);
    }
    // pi-2 has no origin: everything it holds came through peers, the liar's garbage refused on the way.
    for (agent, name) in [(&a, "pi-0"), (&b, "pi-1"), (&c, "pi-2")] {
        let s = agent.wait_for(30, "the liar banned", |s| {
            s["peers"].as_array().is_some_and(|p| {
                p.iter().any(|p| {
                    p["id"] == "liar" && p["banned"] == true && p["banned_until"].is_string()
                })
            })
        });
        assert_eq!(s["active"]["version"], 1, "{name}: {s}");
    }
    let fleet = c.request("GET", "/v1/fleet", b"").1;
    assert!(
        fleet["agents"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["id"] == "liar" && a["banned"] == true)),
        "{fleet}"
    );

    // Version 2 reaches every agent.
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.metadata).unwrap()).unwrap();
    meta[spec.card_id(1)]["name"] = serde_json::json!("renamed");
    let mut files2 = files.clone();
    files2.metadata = shop.t.join("metadata-v2.json");
    std::fs::write(&files2.metadata, serde_json::to_vec(&meta).unwrap()).unwrap();
    shop.publish(&files2).await;
    for agent in [&a, &b, &c] {
        agent.wait_for(60, "version 2 active", |s| s["active"]["version"] == 2);
    }
    // A fleet member announcing version 99 and relaying version 1's (validly signed) manifest as it:
    // refused, and the member banned for the lie.
    fake_peer(
        shop.fleet.credentials("replayer"),
        deckhand_protocol::wire::ReleaseRef {
            version: 99,
            manifest: deckhand_protocol::BlobId::of(b"no such release"),
        },
        Misbehave::ReplayManifest(v1.envelope.clone()),
        Some(c.quic()),
    );
    let s = c.wait_for(30, "the replayer banned", |s| {
        s["peers"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["id"] == "replayer" && p["banned"] == true)
        })
    });
    assert!(
        s["last_refused_manifest"]
            .as_str()
            .is_some_and(|m| m.contains("replayer")),
        "{s}"
    );
    for agent in [&a, &b, &c] {
        assert_eq!(agent.status()["active"]["version"], 2);
    }
    // Every blob the agents hold hashes to its id.
    let dirs: Vec<_> = (0..3).map(|i| shop.t.join(format!("pi-{i}"))).collect();
    for agent in [a, b, c] {
        agent.stop();
    }
    for dir in dirs {
        let out = std::process::Command::new(deckhand_tests::bin("deckhand-agent"))
            .args(["store", "verify", "--data-dir"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_half_way_resumes_without_fetching_stored_chunks_again() {
    let shop = Shop::new("fleet-kill").await;
    let spec = ReferenceSpec::small(30);
    let files = fixtures::write_sized_release(&shop.t.join("r1"), &spec, 24 << 20, 5).unwrap();
    let need = unique_chunk_bytes(&files);
    // A slow uplink (8 MiB/s), so the download takes a few seconds and the kill lands in the middle.
    shop.s3.stats().set_uplink(8 << 20);
    let a = shop.agent("pi-0", true, &[], &[]);
    shop.publish(&files).await;
    shop.s3.stats().reset();
    let s = a.wait_for(60, "half of the release stored", |s| {
        let (have, total) = (
            s["pending"]["bytes_have"].as_u64().unwrap_or(0),
            s["pending"]["bytes_total"].as_u64().unwrap_or(u64::MAX),
        );
        2 * have >= total
    });
    // Both in blob bytes: chunks shared by two blobs (the HEF and the ONNX share weights) count twice.
    let have = s["pending"]["bytes_have"].as_u64().unwrap();
    let total = s["pending"]["bytes_total"].as_u64().unwrap();
    assert!(
        s["active"].is_null(),
        "the release activated before the kill: {s}"
    );
    a.kill();
    let before_restart = shop.s3.stats().bytes_sent();
    assert!(
        before_restart < need,
        "{before_restart} of {need} bytes were sent before the kill"
    );
    let a = shop.agent_again("pi-0", true, &[], &[]);
    let s = a.wait_for(120, "version 1 active after the restart", |s| {
        s["active"]["version"] == 1
    });
    let after = shop.s3.stats().bytes_sent() - before_restart;
    eprintln!(
        "stored {have} of {total} bytes ({need} unique) at the kill; S3 sent {after} bytes after the restart"
    );
    // What was stored at the kill is never fetched again: after the restart S3 sends at most the rest
    // (plus the small manifest and chunk maps, re-read while resuming).
    assert!(
        after <= total - have + (256 << 10),
        "S3 sent {after} bytes after the restart, but only {} were missing",
        total - have
    );
    assert!(s["bytes_from_origin"].as_u64().unwrap() <= total - have + (256 << 10));
    let photo = encode_jpeg(&perturb(&card_image(4, 0), Perturbation::Noise, 2), 85);
    let (code, answer) = a.recognize(&photo);
    assert_eq!(
        (code, answer["card_id"].as_str()),
        (200, Some(spec.card_id(4).as_str()))
    );
    a.stop();
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
async fn a_device_without_a_fleet_certificate_gets_no_chunk_and_no_manifest() {
    use deckhand_protocol::wire::{Request, Response};
    let shop = Shop::new("fleet-outsider").await;
    let spec = ReferenceSpec::small(20);
    let files = fixtures::write_reference_release(&shop.t.join("r1"), &spec).unwrap();
    let v1 = shop.publish(&files).await;
    let a = shop.agent("pi-0", true, &[], &[]);
    a.wait_for(60, "version 1 active", |s| s["active"]["version"] == 1);
    let chunk =
        deckhand_protocol::ChunkMap::build(&std::fs::read(&files.labels).unwrap()).chunks()[0].id;
    let addr: std::net::SocketAddr = a.quic().parse().unwrap();
    let ask = |cfg: quinn::ClientConfig| async move {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = match endpoint
            .connect_with(cfg, addr, deckhand_agent::fleet::PEER_NAME)
            .unwrap()
            .await
        {
            Ok(c) => c,
            Err(e) => return vec![Err(e.to_string())],
        };
        let mut out = Vec::new();
        for req in [
            Request::GetManifest {
                deployment: "shop-1".into(),
            },
            Request::GetChunk { id: chunk },
        ] {
            let r = deckhand_agent::peer::roundtrip(
                &conn,
                "agent",
                &req,
                "probe",
                std::time::Duration::from_secs(5),
            )
            .await;
            out.push(r.map_err(|e| e.to_string()));
        }
        out
    };
    let ca = shop.fleet.ca.cert_path();
    // A fleet member gets both: the check itself can succeed.
    let member = shop.fleet.credentials("pi-9");
    let answers = ask(member.client_config().unwrap()).await;
    assert!(
        matches!(&answers[0], Ok(Response::Manifest { envelope }) if *envelope == v1.envelope),
        "{answers:?}"
    );
    assert!(
        matches!(&answers[1], Ok(Response::Chunk { .. })),
        "{answers:?}"
    );
    // No certificate at all, and a certificate from another CA: refused, nothing served.
    let other = TestFleet::new(&shop.t.join("other-fleet"));
    other.agent_args("pi-7");
    let stranger = (
        shop.t.join("other-fleet/certs/pi-7.crt"),
        shop.t.join("other-fleet/certs/pi-7.key"),
    );
    for (who, cfg) in [
        ("no certificate", outsider(&ca, None)),
        (
            "another CA's certificate",
            outsider(&ca, Some((stranger.0.as_path(), stranger.1.as_path()))),
        ),
    ] {
        let answers = ask(cfg).await;
        assert!(
            answers.iter().all(Result::is_err),
            "{who}: the agent answered {answers:?}"
        );
    }
    let s = a.status();
    assert!(
        s["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["id"] != "pi-7"),
        "{s}"
    );
    a.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_peer_is_abandoned_and_the_release_comes_from_elsewhere() {
    let shop = Shop::new("fleet-stall").await;
    let spec = ReferenceSpec::small(20);
    let files = fixtures::write_sized_release(&shop.t.join("r1"), &spec, 8 << 20, 7).unwrap();
    let v1 = shop.publish(&files).await;
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
    let staller = fake_peer(
        shop.fleet.credentials("staller"),
        deckhand_protocol::wire::ReleaseRef {
            version: 1,
            manifest: v1.id,
        },
        Misbehave::Stall(asked.clone()),
        None,
    )
    .to_string();
    let a = shop.agent("pi-0", true, &[staller.as_str()], &[]);
    let s = a.wait_for(120, "version 1 active", |s| s["active"]["version"] == 1);
    let asked = asked.load(std::sync::atomic::Ordering::SeqCst) as usize;
    eprintln!("the staller was asked for {asked} of {chunks} chunks");
    // The first requests in flight time out, the staller is set aside, and nothing queued behind them is
    // sent to it: the release came from S3.
    assert!(asked > 0, "the staller was never tried");
    assert!(
        asked <= 16 && asked * 4 < chunks,
        "the staller was asked for {asked} of {chunks} chunks"
    );
    assert!(s["bytes_from_origin"].as_u64().unwrap() >= unique_chunk_bytes(&files) / 2);
    let peer = s["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "staller")
        .cloned()
        .unwrap();
    assert!(
        peer["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out") || e.contains("timeout")),
        "{peer}"
    );
    a.stop();
}
