//! LAN discovery for real: two agents in two network namespaces joined by a veth pair, both made by the
//! test and deleted after it (no traffic leaves the machine). Neither agent is told about the other: they
//! find each other by mDNS (`_deckhand._udp.local.`), and the one without the release gets it over QUIC
//! from the one that read it from a USB stick.

use deckhand_tests::fixtures::{self, ReferenceSpec};
use deckhand_tests::{AgentOptions, NetNs, publish_to_dir, secs, shop};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_find_each_other_by_mdns_and_sync_over_quic() {
    let mut fleet = shop("mdns").start().await.unwrap();
    let (ns_a, ns_b) = (NetNs::new("a"), NetNs::new("b"));
    ns_a.link("10.231.77.1/24", &ns_b, "10.231.77.2/24");

    // The release is written to a "USB stick" that only agent A reads.
    let spec = ReferenceSpec::small(20);
    let files = fixtures::write_reference_release(&fleet.join("r1"), &spec).unwrap();
    let stick = fleet.join("usb");
    publish_to_dir(&fleet, &files, &stick).await;

    for (ns, name, extra) in [
        (
            &ns_a,
            "pi-a",
            vec!["--bundle-dir".into(), stick.display().to_string()],
        ),
        (&ns_b, "pi-b", vec![]),
    ] {
        fleet
            .start_agent_with(AgentOptions {
                name: name.into(),
                extra,
                netns: Some(ns.name.clone()),
                mdns: true,
                ..AgentOptions::default()
            })
            .await
            .unwrap();
    }
    let (a, b) = (&fleet.agents[0], &fleet.agents[1]);
    let s = b
        .wait_for(secs(120), "pi-b to find pi-a and sync from it", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    assert_eq!(s.bytes_from_origin, 0, "{s:?}");
    assert_eq!(s.bytes_from_bundles, 0, "{s:?}");
    assert!(s.bytes_from_peers > 0, "{s:?}");
    assert!(
        s.peers
            .iter()
            .any(|p| p.id == "pi-a" && p.addr.starts_with("10.231.77.1:")),
        "pi-b knows pi-a by the address mDNS gave: {s:?}"
    );
    let s = a
        .wait_for(secs(30), "pi-a to see pi-b", |s| {
            s.live_peer("pi-b").is_some()
        })
        .await
        .unwrap();
    assert_eq!(s.active_version(), Some(1));
    fleet.stop().await.unwrap();
}
