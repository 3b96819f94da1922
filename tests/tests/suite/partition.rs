//! A partition of the shop's LAN, for real: four agents in four network namespaces plugged into one
//! bridge (a switch, in a fifth namespace), all made by the test and deleted after it (no traffic
//! leaves the machine). One agent reads a release from a USB stick; the others fetch it from their peers,
//! throttled so that it takes a while. Mid-transfer the cables of two agents are pulled for 20 s, then
//! plugged back: everyone converges, no download stays stuck, the QUIC connections come back, and the
//! status of the others shows the two lost and then regained.

use deckhand_tests::fixtures::{self, ReferenceSpec};
use deckhand_tests::{AgentOptions, MIB, NetNs, publish_to_dir, secs, shop};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_cut_off_for_20_s_mid_transfer_reconnect_and_converge() {
    const RELEASE: u64 = 24 * MIB;
    let mut fleet = shop("partition").start().await.unwrap();
    let hub = NetNs::new("hub").unwrap();
    hub.bridge("br0").unwrap();
    let pis: Vec<NetNs> = (0..4)
        .map(|i| NetNs::new(&format!("p{i}")).unwrap())
        .collect();
    for (i, ns) in pis.iter().enumerate() {
        hub.plug(
            "br0",
            &format!("port{i}"),
            ns,
            &format!("10.231.79.{}/24", i + 1),
        )
        .unwrap();
    }

    let spec = ReferenceSpec::small(20);
    let files = fixtures::write_sized_release(&fleet.join("r1"), &spec, RELEASE, 5).unwrap();
    let stick = fleet.join("usb");
    publish_to_dir(&fleet, &files, &stick).await;

    // Each agent serves at most 1 MiB/s, so the others take tens of seconds to fetch the release.
    for (i, ns) in pis.iter().enumerate() {
        let mut extra = vec!["--serve-bytes-per-sec".to_owned(), MIB.to_string()];
        if i == 0 {
            extra.extend(["--bundle-dir".to_owned(), stick.display().to_string()]);
        }
        fleet
            .start_agent_with(AgentOptions {
                name: format!("pi-{i}"),
                extra,
                netns: Some(ns.name.clone()),
                mdns: true,
                ..AgentOptions::default()
            })
            .await
            .unwrap();
    }
    // pi-2 is part way through the release: pull the cables of pi-2 and pi-3.
    let s = fleet.agents[2]
        .wait_for(
            secs(120),
            "pi-2 a fifth of the way through the release",
            |s| {
                s.pending.as_ref().is_some_and(|p| {
                    p.bytes_have * 5 >= p.bytes_total && p.bytes_have < p.bytes_total
                })
            },
        )
        .await
        .unwrap();
    let before = s.pending.map(|p| p.bytes_have).unwrap_or(0);
    hub.set_link("port2", false).unwrap();
    hub.set_link("port3", false).unwrap();
    let cut_at = Instant::now();
    // The others see both lost (no Hello answered within the liveness window).
    let s = fleet.agents[0]
        .wait_for(secs(18), "pi-0 to see pi-2 and pi-3 lost", |s| {
            s.live_peer("pi-2").is_none() && s.live_peer("pi-3").is_none()
        })
        .await
        .unwrap();
    assert!(
        s.peers.iter().any(|p| p.id == "pi-2" && !p.live),
        "pi-2 is shown, not live: {s:?}"
    );
    let cut_off = fleet.agents[2]
        .wait_for(secs(18), "pi-2 to see no live peer", |s| {
            s.live_peers() == 0
        })
        .await
        .unwrap();
    assert_ne!(cut_off.active_version(), Some(1), "{cut_off:?}");
    let lost_after = cut_at.elapsed();
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(cut_at.elapsed())).await;
    // While cut off, pi-2 fetched nothing more than what was in flight.
    let during = fleet.agents[2].status().await.unwrap();
    let held = during.pending.as_ref().map(|p| p.bytes_have).unwrap_or(0);
    assert!(held < RELEASE, "{during:?}");

    hub.set_link("port2", true).unwrap();
    hub.set_link("port3", true).unwrap();
    let restored = Instant::now();
    let s = fleet.agents[0]
        .wait_for(secs(60), "pi-0 to see pi-2 and pi-3 again", |s| {
            s.live_peer("pi-2").is_some() && s.live_peer("pi-3").is_some()
        })
        .await
        .unwrap();
    assert!(s.peers.iter().all(|p| p.live), "{s:?}");
    let regained_after = restored.elapsed();
    fleet.agents[2]
        .wait_for(secs(60), "pi-2 to see its three peers again", |s| {
            s.live_peers() == 3 || s.active_version() == Some(1)
        })
        .await
        .unwrap();
    let statuses = fleet
        .wait_all(secs(180), "version 1 active everywhere", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    let converged_after = restored.elapsed();
    for s in &statuses {
        assert_eq!(s.bytes_from_origin, 0, "{s:?}");
        assert!(s.last_error.is_none(), "{s:?}");
    }
    // What pi-2 held before the cut was kept: it fetched about the rest, not the release again.
    let pi2 = &statuses[2];
    assert!(
        pi2.bytes_from_peers <= RELEASE - before + 4 * MIB,
        "pi-2 fetched {} bytes from peers after holding {before} of {RELEASE}",
        pi2.bytes_from_peers
    );
    eprintln!(
        "partition: cut at {before} of {RELEASE} bytes; lost seen after {:.1} s; peers regained {:.1} s \
         and every agent on version 1 {:.1} s after the cables went back",
        lost_after.as_secs_f64(),
        regained_after.as_secs_f64(),
        converged_after.as_secs_f64()
    );
    fleet.stop().await.unwrap();
}
