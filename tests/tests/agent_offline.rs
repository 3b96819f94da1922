//! The agent as a real process, with no network at all: a release is sideloaded from a bundle directory,
//! served over HTTP, survives a restart, and an older bundle can never roll it back.

use deckhand_agent::fixtures::{
    self, Perturbation, ReferenceSpec, card_image, encode_jpeg, perturb,
};
use deckhand_agent::origin::{Origin, OriginConfig, OriginUrl};
use deckhand_protocol::SecretKey;
use deckhand_tests::{Agent, TestDir, bin, publish_options};
use deckhand_tools::publish;
use std::path::Path;
use std::process::Command;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(bin("deckhand-agent"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_serves_from_its_store_with_no_network_and_cannot_be_rolled_back() {
    let t = TestDir::new("agent-offline");
    let key = SecretKey::from_seed(&[5; 32]);
    let trust = t.join("ops.pub");
    std::fs::write(&trust, key.public().to_file_text()).unwrap();
    let spec = ReferenceSpec::small(40);
    let files = fixtures::write_reference_release(&t.join("release"), &spec).unwrap();
    let usb = t.join("usb");
    std::fs::create_dir_all(&usb).unwrap();
    let cfg = OriginConfig::default();
    let origin = Origin::connect(&OriginUrl::File { root: usb.clone() }, &cfg)
        .await
        .unwrap();
    publish::publish(
        &origin,
        &cfg,
        &key,
        &publish_options(&files),
        &t.join("work"),
    )
    .await
    .unwrap();
    let old_usb = t.join("old-usb");
    copy_dir(&usb, &old_usb);

    let data = t.join("pi");
    let p = |p: &Path| p.to_str().unwrap().to_owned();
    let import = |bundle: &Path| {
        agent(&[
            "import",
            "--data-dir",
            &p(&data),
            "--deployment",
            "shop-1",
            "--trust",
            &p(&trust),
            "--backend",
            "cpu",
            "--bundle",
            &p(bundle),
        ])
    };
    let out = import(&usb);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "activated version 1"
    );

    let photo = encode_jpeg(&perturb(&card_image(3, 0), Perturbation::Brightness, 1), 85);
    let (data_s, trust_s) = (p(&data), p(&trust));
    let run_args = [
        "--data-dir",
        data_s.as_str(),
        "--deployment",
        "shop-1",
        "--trust",
        trust_s.as_str(),
        "--backend",
        "cpu",
    ];
    let running = Agent::start(&run_args, &[]);
    let (code, answer) = running.recognize(&photo);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["card_id"], spec.card_id(3));
    assert_eq!(answer["manifest_version"], 1);
    // One process owns a store: a second one is told so, and nothing changes.
    let out = import(&usb);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another process"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    running.stop();

    // Version 2 arrives on the stick, and becomes active; version 1 stays pinned as "previous".
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.metadata).unwrap()).unwrap();
    meta[spec.card_id(3)]["name"] = serde_json::json!("Card three, reprinted");
    let mut v2 = files.clone();
    v2.metadata = t.join("metadata-v2.json");
    std::fs::write(&v2.metadata, serde_json::to_vec(&meta).unwrap()).unwrap();
    publish::publish(&origin, &cfg, &key, &publish_options(&v2), &t.join("work"))
        .await
        .unwrap();
    let out = import(&usb);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "activated version 2"
    );

    // The old stick again: a replayed older manifest is refused, even after restarts.
    let out = import(&old_usb);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("version 1 is not above the highest accepted version 2"),
        "{err}"
    );

    let running = Agent::start(&run_args, &[]);
    let (code, answer) = running.recognize(&photo);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["manifest_version"], 2);
    assert_eq!(answer["metadata"]["name"], "Card three, reprinted");
    running.stop();

    let ls = agent(&["store", "ls", "--data-dir", &p(&data), "--json"]);
    let listing: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    let pins = listing["pins"].as_array().unwrap();
    assert_eq!(pins[0][0], "active");
    assert_eq!(pins[1][0], "previous");
    assert!(
        !pins[1][1].as_array().unwrap().is_empty(),
        "the previous release stays pinned for rollback"
    );
    let out = agent(&["store", "verify", "--data-dir", &p(&data)]);
    assert!(out.status.success());
}
