//! Safe rollouts, through real agents: a verified release waits for the agent's maintenance window
//! (its clock moved by libfaketime) or an idle counter, while the agent goes on serving the old one; an
//! urgent release does not wait; a newer release replaces the one held.

use deckhand_tests::fixtures::ReferenceSpec;
use deckhand_tests::{AgentOptions, Credentials, Fleet, clock_from, secs, set_clock, shop};

/// The shop's release files and the next version of them (card `n` renamed to `name`).
fn next(fleet: &Fleet, name: &str) -> deckhand_agent::release::ReleaseFiles {
    let files = fleet.release_files().unwrap().clone();
    deckhand_tests::with_card_renamed(fleet, &files, &ReferenceSpec::small(40), 3, name)
}

async fn one_agent(name: &str, extra: Vec<String>, env: Vec<(&'static str, String)>) -> Fleet {
    let mut fleet = shop(name)
        .release(1024 * 1024)
        .without_peers()
        .start()
        .await
        .unwrap();
    fleet
        .start_agent_with(AgentOptions {
            name: "pi".into(),
            origin: true,
            credentials: Credentials::None,
            extra,
            env,
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    // The first release is not held: nothing served before it.
    fleet.agents[0]
        .wait_for(secs(60), "version 1 active", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    fleet
}

/// Waits until `version` is verified and held, and returns what status says it waits for.
async fn held(fleet: &Fleet, version: u64) -> String {
    let s = fleet.agents[0]
        .wait_for(secs(60), "the release held", |s| {
            s.pending
                .as_ref()
                .is_some_and(|p| p.version == version && p.waiting.is_some())
        })
        .await
        .unwrap();
    s.pending.unwrap().waiting.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_waits_for_the_maintenance_window_and_an_urgent_one_does_not() {
    let dir = deckhand_tests::TestDir::new("rollout-window");
    let clock = dir.join("clock");
    set_clock(&clock, "+0");
    // A window that opens two hours from now (the agent's local time is UTC) and lasts one.
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    let start = (now.hour() as u16 * 60 + now.minute() as u16 + 120) % (24 * 60);
    let end = (start + 60) % (24 * 60);
    let window = format!(
        "{:02}:{:02}-{:02}:{:02}",
        start / 60,
        start % 60,
        end / 60,
        end % 60
    );
    let mut env = clock_from(&clock);
    env.push(("TZ", "UTC".into()));
    let fleet = one_agent(
        "rollout-window",
        vec!["--activate-window".into(), window.clone()],
        env,
    )
    .await;
    let agent = &fleet.agents[0];

    // Version 2 is fetched and verified at once, and held: version 1 serves on.
    fleet
        .publish(&next(&fleet, "Card three, v2"))
        .await
        .unwrap();
    let waiting = held(&fleet, 2).await;
    assert!(
        waiting.contains(&format!("the maintenance window {window}")),
        "{waiting}"
    );
    let s = agent.status().await.unwrap();
    let p = s.pending.clone().unwrap();
    assert_eq!(p.bytes_have, p.bytes_total, "downloaded: {p:?}");
    assert_eq!(s.active_version(), Some(1));
    let photo =
        deckhand_tests::fixtures::encode_jpeg(&deckhand_tests::fixtures::card_image(3, 0), 90);
    let (code, r) = agent.recognize(&photo).await.unwrap();
    assert_eq!(
        (code, r["manifest_version"].as_u64()),
        (200, Some(1)),
        "{r}"
    );

    // A newer release replaces the one held, and is held in turn.
    fleet
        .publish(&next(&fleet, "Card three, v3"))
        .await
        .unwrap();
    held(&fleet, 3).await;
    assert_eq!(agent.status().await.unwrap().active_version(), Some(1));

    // Two hours later the window is open: version 3 goes live, and says why.
    set_clock(&clock, "+2h");
    let s = agent
        .wait_for(secs(30), "version 3 active", |s| {
            s.active_version() == Some(3)
        })
        .await
        .unwrap();
    assert_eq!(s.last_switch.unwrap().why, "in the maintenance window");
    assert_eq!(s.pending, None);

    // Out of the window again, an urgent release goes live at once.
    set_clock(&clock, "+0");
    let files = next(&fleet, "Card three, v4");
    fleet
        .publish_with(&files, fleet.key(), |o| o.urgent = true)
        .await
        .unwrap();
    let s = agent
        .wait_for(secs(60), "urgent version 4 active", |s| {
            s.active_version() == Some(4)
        })
        .await
        .unwrap();
    assert_eq!(s.last_switch.unwrap().why, "urgent");
    let (code, r) = agent.recognize(&photo).await.unwrap();
    assert_eq!(r["metadata"]["name"], "Card three, v4", "{code} {r}");
    fleet.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_waits_while_the_counter_is_busy_and_goes_live_once_it_is_idle() {
    let fleet = one_agent(
        "rollout-idle",
        vec!["--activate-when-idle".into(), "4s".into()],
        Vec::new(),
    )
    .await;
    let agent = &fleet.agents[0];
    let photo =
        deckhand_tests::fixtures::encode_jpeg(&deckhand_tests::fixtures::card_image(3, 0), 90);
    // A card recognised every half second (a till beside the test), from before version 2 is
    // published: the counter is busy, version 2 waits.
    let (code, _) = agent.recognize(&photo).await.unwrap();
    assert_eq!(code, 200);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let till = {
        let (http, stop) = (agent.http().to_owned(), stop.clone());
        tokio::spawn(async move {
            let mut answered_by = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (code, body) = deckhand_agent::http::request(
                    &http,
                    "POST",
                    "/v1/recognize",
                    bytes::Bytes::from(photo.clone()),
                )
                .await
                .unwrap();
                assert_eq!(code, 200);
                let r: serde_json::Value = serde_json::from_slice(&body).unwrap();
                answered_by.push(r["manifest_version"].as_u64().unwrap());
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            answered_by
        })
    };
    fleet
        .publish(&next(&fleet, "Card three, v2"))
        .await
        .unwrap();
    let waiting = held(&fleet, 2).await;
    assert!(waiting.contains("4 s without a recognition"), "{waiting}");
    // Held for as long as the till goes on (three times the idle time).
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered_by = till.await.unwrap();
    assert!(answered_by.len() >= 20, "{answered_by:?}");
    assert!(
        answered_by.iter().all(|v| *v == 1),
        "switched while busy: {answered_by:?}"
    );
    // Then nothing: it goes live once the counter was idle for 4 s.
    let s = agent
        .wait_for(secs(30), "version 2 active", |s| {
            s.active_version() == Some(2)
        })
        .await
        .unwrap();
    assert_eq!(s.last_switch.unwrap().why, "the counter was idle");
    // The agent's stderr is a file here: its lines carry no colour codes.
    let log = std::fs::read_to_string(agent.log()).unwrap();
    assert!(log.contains("release held for the gate"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour in a log file");
    fleet.stop().await.unwrap();
}
