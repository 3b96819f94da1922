//! Certificates renewed, revoked and their CA rotated without touching a Pi (issue 24): `deckhand fleet
//! renew|revoke|rotate-ca|retire-ca --origin` put the fleet bundle in the bucket; agents take it at their
//! poll, a Pi without S3 from its peers, and switch their QUIC endpoint over without a restart. Real
//! agents, the real CLI, a local S3 server.

use deckhand_protocol::status::Status;
use deckhand_tests::{MIB, deckhand_out, secs, shop};
use deckhand_tools::shop::{AgentOptions, Credentials, Fleet};

/// `deckhand fleet ARGS --dir CA --origin BUCKET`; returns the bundle's number.
fn fleet_cli(fleet: &Fleet, args: &[&str]) -> u64 {
    let dir = fleet.ca().dir.display().to_string();
    let origin = fleet.s3().origin_arg("fleet");
    let mut all = vec!["fleet"];
    all.extend_from_slice(args);
    all.extend(["--dir", &dir, "--origin", &origin]);
    let out = deckhand_out(fleet.s3(), &all);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "deckhand {all:?}: {err}");
    let number = err.lines().find_map(|l| {
        l.strip_prefix("fleet bundle ")?
            .split(' ')
            .next()?
            .parse()
            .ok()
    });
    number.unwrap_or_else(|| panic!("no bundle number in {err}"))
}

fn serial(s: &Status) -> Option<String> {
    s.fleet_trust.as_ref()?.certificate_serial.clone()
}

fn bundle(s: &Status) -> Option<u64> {
    s.fleet_trust.as_ref()?.bundle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_revocations_and_a_ca_rotation_reach_every_pi_from_the_bucket_or_its_peers() {
    let mut fleet = shop("renewal")
        .agents(2)
        .release(MIB)
        .start()
        .await
        .unwrap();
    // pi-2 has no S3: only its peers.
    let peers = fleet.quic_addrs();
    fleet
        .start_agent_with(AgentOptions {
            name: "pi-2".into(),
            origin: false,
            peers,
            credentials: Credentials::Enroll,
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    let (a, b, c) = ("pi-0", "pi-1", "pi-2");
    fleet
        .wait_all(secs(60), "version 1 active, every peer live", |s| {
            s.active_version() == Some(1) && s.live_peers() == 2
        })
        .await
        .unwrap();
    let mut before = Vec::new();
    for agent in &fleet.agents {
        let st = agent.status().await.unwrap();
        assert_eq!(st.fleet_error, None, "{st:?}");
        before.push(serial(&st).unwrap());
    }

    // 1. Renewed from the operator's machine: every Pi presents its new certificate (pi-2 took it from
    //    a peer), the peers stay live, nobody restarted.
    let renewed = fleet_cli(&fleet, &["renew", "--within", "400"]);
    fleet
        .wait_all(secs(30), "the renewal taken", |s| {
            bundle(s) == Some(renewed)
        })
        .await
        .unwrap();
    let text = deckhand_tests::metrics_text(&fleet.agents[2]).await;
    assert!(
        text.contains(&format!("deckhand_fleet_bundle {renewed}\n")),
        "{text}"
    );
    for (agent, old) in fleet.agents.iter().zip(&before) {
        let st = agent
            .wait_for(
                secs(30),
                "two live peers on the renewed certificates",
                |s| s.live_peers() == 2,
            )
            .await
            .unwrap();
        assert_ne!(serial(&st).as_ref(), Some(old), "{}: {st:?}", agent.name);
        assert_eq!(st.fleet_error, None, "{st:?}");
    }

    // 2. pi-1 revoked: the others close its connection and refuse it; it keeps serving recognitions
    //    from its store and says why it is no longer a member.
    let revoked = fleet_cli(&fleet, &["revoke", "--name", b]);
    for i in [0, 2] {
        fleet.agents[i]
            .wait_for(secs(30), "pi-1 dropped", |s| {
                bundle(s) == Some(revoked) && s.live_peer(b).is_none() && s.live_peers() == 1
            })
            .await
            .unwrap();
    }
    let st = fleet.agents[1]
        .wait_for(secs(30), "pi-1 knows it is revoked", |s| {
            s.fleet_error.is_some()
        })
        .await
        .unwrap();
    assert!(
        st.fleet_error.as_deref().unwrap().contains("Revoked"),
        "{st:?}"
    );
    assert_eq!(st.active_version(), Some(1));
    fleet.agents.remove(1).stop().await.unwrap();

    // 3. The CA rotated: pi-0 and pi-2 trust the new CA and present certificates it issued, and stay
    //    peers while they move (the cross-certificate vouches for the new ones to a Pi that has not).
    let rotated = fleet_cli(&fleet, &["rotate-ca"]);
    let moved = fleet
        .wait_all(secs(30), "both CAs trusted", |s| {
            bundle(s) == Some(rotated)
                && s.fleet_trust.as_ref().is_some_and(|t| t.cas.len() == 2)
                && s.live_peers() == 1
        })
        .await
        .unwrap();
    for st in &moved {
        assert_eq!(st.fleet_error, None, "{st:?}");
    }
    // 4. The old CA retired: one CA left, both still members.
    let retired = fleet_cli(&fleet, &["retire-ca"]);
    fleet
        .wait_all(secs(30), "the old CA retired", |s| {
            bundle(s) == Some(retired)
                && s.fleet_trust
                    .as_ref()
                    .is_some_and(|t| t.cas.len() == 1 && t.retired_cas.len() == 1)
                && s.live_peers() == 1
        })
        .await
        .unwrap();

    // 5. pi-2 restarts with what it was installed with (the old CA, its first certificate): the
    //    bundle kept in its store makes it a member of the rotated fleet at once. It now watches a
    //    stick too.
    fleet.agents.remove(1).stop().await.unwrap();
    let peers = fleet.quic_addrs();
    let stick = fleet.join("usb");
    std::fs::create_dir_all(&stick).unwrap();
    fleet
        .start_agent_with(AgentOptions {
            name: c.into(),
            origin: false,
            peers,
            credentials: Credentials::Existing,
            extra: vec!["--bundle-dir".into(), stick.display().to_string()],
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    let st = fleet.agents[1]
        .wait_for(secs(30), "pi-2 back among its peers", |s| {
            s.live_peer(a).is_some()
        })
        .await
        .unwrap();
    assert_eq!(bundle(&st), Some(retired), "{st:?}");
    assert_eq!(st.fleet_error, None, "{st:?}");

    // 6. A renewal carried on a stick (not put in the bucket) reaches pi-2 from it, and pi-0 from
    //    pi-2: a Hello announcing a higher number is asked for its bundle.
    let dir = fleet.ca().dir.display().to_string();
    let stick_origin = format!("file://{}", stick.display());
    let args = [
        "fleet",
        "renew",
        "--name",
        c,
        "--dir",
        &dir,
        "--origin",
        &stick_origin,
    ];
    let out = deckhand_out(fleet.s3(), &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let serial_before = serial(&st);
    let st = fleet.agents[1]
        .wait_for(secs(30), "the stick's renewal taken", |s| {
            bundle(s).is_some_and(|n| n > retired)
        })
        .await
        .unwrap();
    assert_ne!(serial(&st), serial_before, "{st:?}");
    let from_stick = bundle(&st);
    fleet.agents[0]
        .wait_for(secs(30), "pi-0 has the stick's bundle from pi-2", |s| {
            bundle(s) == from_stick && s.live_peer(c).is_some()
        })
        .await
        .unwrap();
    fleet.stop().await.unwrap();
}
