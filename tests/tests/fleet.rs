//! A fleet of real agent processes syncing over real QUIC (mutual TLS against a test fleet CA) from a real
//! S3 server (s3s-fs in-process, spoken to by aws-sdk-s3). Bytes leaving S3 are counted at the server.

use deckhand_agent::fixtures::{
    self, Perturbation, ReferenceSpec, card_image, encode_jpeg, perturb,
};
use deckhand_agent::origin::Origin;
use deckhand_protocol::SecretKey;
use deckhand_tests::{Agent, TestDir, TestFleet, publish_options};
use deckhand_tools::locals3::LocalS3;
use deckhand_tools::publish;
use std::collections::HashMap;

/// The distinct chunk bytes of a release: what must cross the uplink at least once.
fn unique_bytes(files: &deckhand_agent::release::ReleaseFiles) -> u64 {
    let mut unique = HashMap::new();
    for p in [
        &files.hef,
        &files.onnx,
        &files.index,
        &files.labels,
        &files.metadata,
        &files.canaries[0].0,
        &files.canaries[1].0,
    ]
    .into_iter()
    .chain(files.embeddings.as_ref())
    {
        for c in deckhand_protocol::ChunkMap::build(&std::fs::read(p).unwrap()).chunks() {
            unique.insert(c.id, u64::from(c.len));
        }
    }
    unique.values().sum()
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

    /// Starts agent `name`; `origin` gives it the S3 origin; `peers` are QUIC addresses to dial.
    fn agent(&self, name: &str, origin: bool, peers: &[&str], extra: &[&str]) -> Agent {
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
        args.extend(self.fleet.agent_args(name));
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
    let need = unique_bytes(&files);
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
    // Every agent answers from the new release.
    let photo = encode_jpeg(&perturb(&card_image(3, 0), Perturbation::Crop, 4), 85);
    for a in &agents {
        let (code, answer) = a.recognize(&photo);
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["card_id"], spec.card_id(3));
        assert_eq!(answer["manifest_version"], 1);
    }
    for a in agents {
        a.stop();
    }
}
