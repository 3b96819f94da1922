//! LAN discovery for real: two agents in two network namespaces joined by a veth pair, both made by the
//! test and deleted after it (no traffic leaves the machine). Neither agent is told about the other: they
//! find each other by mDNS (`_deckhand._udp.local.`), and the one without the release gets it over QUIC
//! from the one that read it from a USB stick.

use deckhand_tests::fixtures::{self, ReferenceSpec};
use deckhand_tests::{AgentOptions, NetNs, publish_to_dir, secs, shop};

/// Starts pi-a in `ns_a` and pi-b in `ns_b`, both with mDNS and told of no peer. The release is on a
/// "USB stick" only pi-a reads: pi-b can only get it from pi-a.
async fn start_pair(fleet: &mut deckhand_tests::Fleet, ns_a: &NetNs, ns_b: &NetNs) {
    let spec = ReferenceSpec::small(20);
    let files = fixtures::write_reference_release(&fleet.join("r1"), &spec).unwrap();
    let stick = fleet.join("usb");
    publish_to_dir(fleet, &files, &stick).await;
    for (ns, name, extra) in [
        (
            ns_a,
            "pi-a",
            vec!["--bundle-dir".into(), stick.display().to_string()],
        ),
        (ns_b, "pi-b", vec![]),
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_find_each_other_by_mdns_and_sync_over_quic() {
    let mut fleet = shop("mdns").start().await.unwrap();
    let (ns_a, ns_b) = (NetNs::new("a").unwrap(), NetNs::new("b").unwrap());
    ns_a.link("10.231.77.1/24", &ns_b, "10.231.77.2/24")
        .unwrap();

    start_pair(&mut fleet, &ns_a, &ns_b).await;
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

/// A child process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `count` fake adverts of `deployment` from inside `ns`, registered once this returns.
fn fake_adverts(ns: &NetNs, count: usize, prefix: &str) -> Killed {
    use std::io::BufRead as _;
    let bin = deckhand_tests::bin("fake-adverts");
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(&bin)
        .args([&count.to_string(), "shop-1", prefix])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let stdout = child.stdout.take().unwrap();
    let child = Killed(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "fake-adverts did not start");
    child
}

/// Fake adverts fill both agents' dial tables before they can hear each other (their cable is plugged
/// in only then): 300 services of the shop's deployment at ports nothing answers, from each side. The
/// old table refused every address once 256 were known, so the two never dialed each other (verified:
/// no connection in 90 s). Now adverts that fail give way to new ones, and an advert that finds the
/// table full of untried ones (the other side's 300 fakes arrive with the cable) is dialed once from a
/// bounded queue: the two meet and sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_mdns_adverts_do_not_keep_two_pis_apart() {
    let mut fleet = shop("mdns-fakes").start().await.unwrap();
    let hub = NetNs::new("fhub").unwrap();
    hub.bridge("br0").unwrap();
    let (ns_a, ns_b) = (NetNs::new("fa").unwrap(), NetNs::new("fb").unwrap());
    hub.plug("br0", "port0", &ns_a, "10.231.81.1/24").unwrap();
    hub.plug("br0", "port1", &ns_b, "10.231.81.2/24").unwrap();
    hub.set_link("port1", false).unwrap();
    let _fakes = [
        fake_adverts(&ns_a, 300, "fake-a"),
        fake_adverts(&ns_b, 300, "fake-b"),
    ];
    start_pair(&mut fleet, &ns_a, &ns_b).await;
    // Both tables fill with fakes, and the fakes' dials fail (nothing answers at their ports).
    for a in &fleet.agents {
        a.wait_for(secs(60), "a full dial table of failed fakes", |s| {
            s.dial_table.as_ref().is_some_and(|d| d.known >= 256)
        })
        .await
        .unwrap();
    }
    tokio::time::sleep(secs(6)).await;
    // The cable is plugged in: each hears the other's advert at its next query.
    hub.set_link("port1", true).unwrap();
    let s = fleet.agents[1]
        .wait_for(secs(90), "pi-b to find pi-a and sync from it", |s| {
            s.active_version() == Some(1) && s.live_peer("pi-a").is_some()
        })
        .await
        .unwrap();
    assert!(s.bytes_from_peers > 0, "{s:?}");
    let mut evicted = 0;
    for a in &fleet.agents {
        let d = a.status().await.unwrap().dial_table.unwrap();
        evicted += d.evicted;
    }
    assert!(
        evicted > 0,
        "adverts heard after the cable was plugged in took failed fakes' places"
    );
    fleet.stop().await.unwrap();
}
