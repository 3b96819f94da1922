//! Fleet identity over a year (issue 24): a certificate's dates or a clock at 1970 never stop a Pi
//! from serving, and peers judge certificates at the trusted clock (the store's time floor, the Pi's own
//! certificate's start), not at the system clock. Real agents, their clocks moved by libfaketime.

use deckhand_tests::fixtures::{Perturbation, card_image, encode_jpeg, perturb};
use deckhand_tests::{MIB, clock_at, metric, secs};
use deckhand_tools::shop::{AgentOptions, Credentials};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pi_at_1970_or_with_an_expired_certificate_serves_and_peers_judge_by_the_trusted_clock() {
    let mut fleet = deckhand_tests::serving_v1("identity", 2, 2 * MIB).await;
    let photo = encode_jpeg(&perturb(&card_image(3, 0), Perturbation::Brightness, 1), 85);
    let (a, b) = ("pi-0", "pi-1");
    let st = fleet.agents[1].status().await.unwrap();
    assert_eq!(st.fleet_error, None, "{st:?}");
    let certificate = st.expiries.iter().find(|e| e.what == "certificate");
    assert!(
        certificate.is_some_and(|e| e.warning.is_none()),
        "a new certificate (365 days) is not warned of: {:?}",
        st.expiries
    );
    assert!(st.newest_manifest_at.is_some(), "{st:?}");
    let restart = |faketime: &str, peers: Vec<String>| AgentOptions {
        name: b.into(),
        origin: true,
        peers,
        credentials: Credentials::Existing,
        env: clock_at(faketime),
        ..AgentOptions::default()
    };

    // 1. pi-1 boots at 1970 (no RTC battery, no NTP yet). It starts, serves version 1 from its store,
    //    and takes pi-0 as a peer: pi-0's certificate is judged at pi-1's time floor, not at 1970.
    fleet.agents.remove(1).stop().await.unwrap();
    let peers = fleet.quic_addrs();
    fleet
        .start_agent_with(restart("@1970-01-02 00:00:00", peers.clone()))
        .await
        .unwrap();
    let st = fleet.agents[1]
        .wait_for(secs(30), "pi-0 live to pi-1 at 1970", |s| {
            s.live_peer(a).is_some()
        })
        .await
        .unwrap();
    assert_eq!(st.active_version(), Some(1), "{st:?}");
    assert_eq!(st.fleet_error, None, "{st:?}");
    assert!(st.clock_behind_trusting.is_some(), "{st:?}");
    fleet.agents[0]
        .wait_for(secs(30), "pi-1 live to pi-0", |s| s.live_peer(b).is_some())
        .await
        .unwrap();
    let (code, answer) = fleet.agents[1].recognize(&photo).await.unwrap();
    assert_eq!((code, answer["manifest_version"].as_u64()), (200, Some(1)));
    assert_eq!(
        metric(&fleet.agents[1], "deckhand_fleet_credentials_ok").await,
        1
    );
    fleet.agents.remove(1).stop().await.unwrap();

    // 2. A year and a month on, nobody renewed pi-1's certificate: it has expired. pi-1 still starts
    //    and serves from its store; status, its summary line and /metrics say why it is no longer a
    //    fleet member.
    fleet
        .start_agent_with(restart("+400d", peers))
        .await
        .unwrap();
    let st = fleet.agents[1]
        .wait_for(secs(30), "version 1 served", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    let error = st.fleet_error.clone().unwrap_or_default();
    assert!(error.contains("expired"), "{st:?}");
    let warning = st
        .expiries
        .iter()
        .find(|e| e.what == "certificate")
        .and_then(|e| e.warning.clone())
        .unwrap_or_default();
    assert!(warning.contains("certificate expired"), "{:?}", st.expiries);
    assert!(
        st.summary_line().contains("certificate expired"),
        "{}",
        st.summary_line()
    );
    let (code, answer) = fleet.agents[1].recognize(&photo).await.unwrap();
    assert_eq!((code, answer["manifest_version"].as_u64()), (200, Some(1)));
    let pi1 = &fleet.agents[1];
    assert_eq!(metric(pi1, "deckhand_fleet_credentials_ok").await, 0);
    assert_eq!(
        metric(pi1, "deckhand_expiry_warning{what=\"certificate\"}").await,
        1
    );
    assert_eq!(
        metric(pi1, "deckhand_expiry_warning{what=\"fleet_ca\"}").await,
        0
    );
    assert!(metric(pi1, "deckhand_newest_manifest_age_seconds").await >= 399 * 86_400);
    fleet.agents.remove(1).stop().await.unwrap();

    // 3. A new Pi joins at 1970 with an empty store: it judges its peers at its own certificate's
    //    start (the CA signed it then), so the members enrolled before it are valid to it.
    fleet
        .start_agent_with(AgentOptions {
            name: "pi-2".into(),
            origin: true,
            peers: fleet.quic_addrs(),
            env: clock_at("@1970-01-02 00:00:00"),
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    let st = fleet.agents[1]
        .wait_for(secs(60), "version 1 from pi-0 at 1970", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    assert!(st.live_peer(a).is_some(), "{st:?}");
    assert!(st.bytes_from_peers > 0, "{st:?}");
    fleet.agents.remove(1).stop().await.unwrap();
}
