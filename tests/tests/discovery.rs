//! LAN discovery for real: two agents in two network namespaces joined by a veth pair, both made by the
//! test and deleted after it (no traffic leaves the machine). Neither agent is told about the other: they
//! find each other by mDNS (`_deckhand._udp.local.`), and the one without the release gets it over QUIC
//! from the one that read it from a USB stick.

use deckhand_agent::fixtures::{self, ReferenceSpec};
use deckhand_agent::origin::Origin;
use deckhand_protocol::SecretKey;
use deckhand_tests::{Agent, NetNs, TestDir, TestFleet, publish_options};
use deckhand_tools::publish;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_find_each_other_by_mdns_and_sync_over_quic() {
    let t = TestDir::new("mdns");
    let (ns_a, ns_b) = (NetNs::new("a"), NetNs::new("b"));
    ns_a.link("10.231.77.1/24", &ns_b, "10.231.77.2/24");
    let fleet = TestFleet::new(t.path());
    let key = SecretKey::from_seed(&[5; 32]);
    let trust = t.join("ops.pub");
    std::fs::write(&trust, key.public().to_file_text()).unwrap();

    // The release is written to a "USB stick" that only agent A reads.
    let spec = ReferenceSpec::small(20);
    let files = fixtures::write_reference_release(&t.join("r1"), &spec).unwrap();
    let stick = t.join("usb");
    std::fs::create_dir_all(&stick).unwrap();
    let stick_origin = Origin::connect(
        &format!("file://{}", stick.display()).parse().unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    publish::publish(
        &stick_origin,
        &Default::default(),
        &key,
        &publish_options(&files),
        &t.join("work"),
    )
    .await
    .unwrap();

    let start = |ns: &NetNs, name: &str, extra: &[String]| {
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            t.join(name).display().to_string(),
            "--deployment".into(),
            "shop-1".into(),
            "--trust".into(),
            trust.display().to_string(),
            "--quic-listen".into(),
            "0.0.0.0:0".into(),
            "--mdns".into(),
            "on".into(),
        ];
        args.extend(fleet.enroll_args(name));
        args.extend(extra.iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start_in(Some(ns), &refs, &[])
    };
    let a = start(
        &ns_a,
        "pi-a",
        &["--bundle-dir".into(), stick.display().to_string()],
    );
    let b = start(&ns_b, "pi-b", &[]);

    let s = b.wait_for(120, "pi-b to find pi-a and sync from it", |s| {
        s["active"]["version"] == 1
    });
    assert_eq!(s["bytes_from_origin"], 0, "{s}");
    assert_eq!(s["bytes_from_bundles"], 0, "{s}");
    assert!(s["bytes_from_peers"].as_u64().unwrap() > 0, "{s}");
    let peers = s["peers"].as_array().unwrap();
    assert!(
        peers.iter().any(|p| p["id"] == "pi-a"
            && p["addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("10.231.77.1:"))),
        "pi-b knows pi-a by the address mDNS gave: {s}"
    );
    let s = a.wait_for(30, "pi-a to see pi-b", |s| {
        s["peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["id"] == "pi-b" && p["live"] == true))
    });
    assert_eq!(s["active"]["version"], 1);
    a.stop();
    b.stop();
}
