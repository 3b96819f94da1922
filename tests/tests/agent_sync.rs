//! An agent keeping itself in sync with a real S3 server (s3s-fs in-process, spoken to by aws-sdk-s3):
//! it resolves current.json, fetches only what it misses, activates; keeps serving when S3 goes away;
//! refuses a replayed older manifest; and restarts offline from its store.

use deckhand_agent::fixtures::{
    self, Perturbation, ReferenceSpec, card_image, encode_jpeg, perturb,
};
use deckhand_agent::origin::Origin;
use deckhand_protocol::SecretKey;
use deckhand_protocol::layout::Name;
use deckhand_tests::{Agent, TestDir, publish_options};
use deckhand_tools::locals3::LocalS3;
use deckhand_tools::publish;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_follows_s3_fetches_only_what_changed_and_survives_s3_going_away() {
    let t = TestDir::new("agent-sync");
    let s3 = LocalS3::start(&t.join("s3"), "cards").unwrap();
    let cfg = s3.origin_config();
    let origin = Origin::connect(&s3.origin_url("fleet"), &cfg)
        .await
        .unwrap();
    let key = SecretKey::from_seed(&[8; 32]);
    let trust = t.join("ops.pub");
    std::fs::write(&trust, key.public().to_file_text()).unwrap();
    let spec = ReferenceSpec::small(40);
    let files = fixtures::write_reference_release(&t.join("release"), &spec).unwrap();
    let (v1, _) = publish::publish(
        &origin,
        &cfg,
        &key,
        &publish_options(&files),
        &t.join("work"),
    )
    .await
    .unwrap();
    // Identical chunks anywhere in the release (the HEF and the ONNX carry the same weights) cross the
    // uplink once: what the agent needs from S3 is the release's unique chunk bytes.
    let unique_bytes = deckhand_tests::unique_chunk_bytes(&files);
    assert!(unique_bytes < v1.manifest.total_bytes());

    s3.stats().reset();
    let (data, trust_s, origin_arg) = (
        t.join("pi").display().to_string(),
        trust.display().to_string(),
        s3.origin_arg("fleet"),
    );
    let args = [
        "--data-dir",
        data.as_str(),
        "--deployment",
        "shop-1",
        "--trust",
        trust_s.as_str(),
        "--backend",
        "cpu",
        "--origin",
        origin_arg.as_str(),
        "--poll-secs",
        "1",
    ];
    let agent = Agent::start(&args, &s3.env());
    agent.wait_for(60, "version 1 active", |s| s["active"]["version"] == 1);
    let sent = s3.stats().bytes_sent();
    assert!(
        sent >= unique_bytes && sent < unique_bytes + 100_000,
        "S3 sent {sent} bytes for {unique_bytes} unique bytes of release"
    );
    let photo = encode_jpeg(&perturb(&card_image(6, 0), Perturbation::Crop, 2), 85);
    let (code, answer) = agent.recognize(&photo);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        (
            answer["card_id"].as_str(),
            answer["manifest_version"].as_u64()
        ),
        (Some(spec.card_id(6).as_str()), Some(1))
    );

    // Version 2 changes only metadata.json: only its changed chunks cross the uplink.
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.metadata).unwrap()).unwrap();
    meta[spec.card_id(6)]["name"] = serde_json::json!("Card six, second print");
    let mut v2 = files.clone();
    v2.metadata = t.join("metadata-v2.json");
    std::fs::write(&v2.metadata, serde_json::to_vec(&meta).unwrap()).unwrap();
    let v1_envelope = v1.envelope.clone();
    publish::publish(&origin, &cfg, &key, &publish_options(&v2), &t.join("work"))
        .await
        .unwrap();
    s3.stats().reset();
    agent.wait_for(60, "version 2 active", |s| s["active"]["version"] == 2);
    let meta_len = std::fs::metadata(&v2.metadata).unwrap().len();
    let sent = s3.stats().bytes_sent();
    assert!(
        sent < meta_len + 100_000,
        "S3 sent {sent} bytes for a change in a {meta_len}-byte file"
    );
    let (_, answer) = agent.recognize(&photo);
    assert_eq!(answer["metadata"]["name"], "Card six, second print");

    // S3 goes away: recognition goes on, status says offline since when.
    s3.set_down(true);
    let status = agent.wait_for(30, "offline_since", |s| s["offline_since"].is_string());
    assert_eq!(status["active"]["version"], 2);
    let (code, answer) = agent.recognize(&photo);
    assert_eq!((code, answer["manifest_version"].as_u64()), (200, Some(2)));

    // S3 comes back with a replayed older manifest: refused, version 2 keeps serving.
    s3.set_down(false);
    origin
        .put(
            &origin
                .layout()
                .current(&Name::deployment("shop-1").unwrap()),
            v1_envelope.into(),
        )
        .await
        .unwrap();
    agent.wait_for(30, "back online", |s| s["offline_since"].is_null());
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(agent.status()["active"]["version"], 2);
    agent.stop();

    // A restart while S3 is unreachable serves the active release from the store.
    s3.set_down(true);
    let agent = Agent::start(&args, &s3.env());
    let (code, answer) = agent.recognize(&photo);
    assert_eq!(
        (code, answer["manifest_version"].as_u64()),
        (200, Some(2)),
        "{answer}"
    );
    agent.wait_for(30, "offline_since after restart", |s| {
        s["offline_since"].is_string()
    });
    agent.stop();
}
