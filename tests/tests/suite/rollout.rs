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

/// The shop's one Pi: the S3 origin, no fleet credentials.
fn the_pi(extra: Vec<String>, env: Vec<(&'static str, String)>) -> AgentOptions {
    AgentOptions {
        name: "pi".into(),
        origin: true,
        credentials: Credentials::None,
        extra,
        env,
        ..AgentOptions::default()
    }
}

async fn one_agent(name: &str, extra: Vec<String>, env: Vec<(&'static str, String)>) -> Fleet {
    let mut fleet = shop(name)
        .release(1024 * 1024)
        .without_peers()
        .start()
        .await
        .unwrap();
    fleet.start_agent_with(the_pi(extra, env)).await.unwrap();
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
    assert!(
        log.lines()
            .any(|l| l.contains("release held") && l.contains("4 s without a recognition")),
        "{log}"
    );
    assert!(!log.contains('\u{1b}'), "colour in a log file");
    fleet.stop().await.unwrap();
}

/// Waits until `agent` answered three more polls of the origin than it had, and returns its status.
async fn more_polls(agent: &deckhand_tests::Agent) -> deckhand_protocol::status::Status {
    let polled = agent.status().await.unwrap().origin_polls;
    agent
        .wait_for(secs(30), "three more origin polls", |s| {
            s.origin_polls >= polled + 3
        })
        .await
        .unwrap()
}

/// Restarts the shop's one agent: stopped cleanly (SIGTERM) or killed (SIGKILL, as a crash).
async fn restart(fleet: &mut Fleet, kill: bool) -> deckhand_protocol::status::Status {
    let agent = fleet.agents.remove(0);
    if kill {
        agent.kill().await.unwrap();
    } else {
        agent.stop().await.unwrap();
    }
    fleet
        .start_agent_with(the_pi(Vec::new(), Vec::new()))
        .await
        .unwrap();
    fleet.agents[0].status().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_the_agent_keeps_crashing_on_is_left_for_the_one_before() {
    let mut fleet = one_agent("rollout-crash-loop", Vec::new(), Vec::new()).await;
    fleet
        .publish(&next(&fleet, "Card three, v2"))
        .await
        .unwrap();
    let live = fleet.agents[0]
        .wait_for(secs(60), "version 2 active", |s| {
            s.active_version() == Some(2)
        })
        .await
        .unwrap();
    let went_live: jiff::Timestamp = live.probation.unwrap().since.parse().unwrap();
    // Clean restarts are not crashes, and three crashes are within the rule (more than 3 in 10 min).
    for kill in [false, false, true, true, true] {
        let s = restart(&mut fleet, kill).await;
        assert_eq!(
            s.active_version(),
            Some(2),
            "after a restart (kill: {kill})"
        );
        assert_eq!(s.fallback, None);
        // Its probation (the agent's default, 10 min) goes on from when it went live.
        let s = fleet.agents[0]
            .wait_for(secs(10), "probation resumed", |s| s.probation.is_some())
            .await
            .unwrap();
        let p = s.probation.unwrap();
        assert_eq!((p.version, p.outcome.as_str()), (2, "watching"));
        let since: jiff::Timestamp = p.since.parse().unwrap();
        assert!(
            since.duration_since(went_live).abs() < jiff::SignedDuration::from_secs(1),
            "probation since {since}, went live {went_live}"
        );
    }
    // The fourth crash: the next start serves version 1, says why, and does not take version 2 again
    // although the origin still publishes it.
    let s = restart(&mut fleet, true).await;
    assert_eq!(s.active_version(), Some(1), "{s:?}");
    let f = s.fallback.clone().unwrap();
    assert_eq!((f.from_version, f.to_version), (2, 1));
    assert!(
        f.why.contains("4 times within 10 min of version 2"),
        "{}",
        f.why
    );
    assert!(
        s.render().contains("fell back   from version 2 to 1"),
        "{}",
        s.render()
    );
    let agent = &fleet.agents[0];
    let photo =
        deckhand_tests::fixtures::encode_jpeg(&deckhand_tests::fixtures::card_image(3, 0), 90);
    let (code, r) = agent.recognize(&photo).await.unwrap();
    assert_eq!(
        (code, r["manifest_version"].as_u64()),
        (200, Some(1)),
        "{r}"
    );
    // Polls of the origin (every second here) leave it there.
    let polled = agent.status().await.unwrap();
    let s = more_polls(agent).await;
    assert_eq!(s.active_version(), Some(1), "{s:?}");
    assert_eq!(s.pending, None);
    assert!(s.last_error.is_none(), "{s:?} (before: {polled:?})");
    // The operator's next release goes live and clears the fall back.
    fleet
        .publish(&next(&fleet, "Card three, v3"))
        .await
        .unwrap();
    let s = fleet.agents[0]
        .wait_for(secs(60), "version 3 active", |s| {
            s.active_version() == Some(3)
        })
        .await
        .unwrap();
    assert_eq!(s.fallback, None);
    fleet.stop().await.unwrap();
}

/// The shop's release with every card's reference rows relabelled as the next card (as if its
/// embeddings were shuffled), and canaries the operator photographed against it: it passes them, and
/// gets every real card wrong.
fn shuffled(fleet: &Fleet) -> deckhand_agent::release::ReleaseFiles {
    let spec = ReferenceSpec::small(40);
    let moved: std::collections::HashMap<String, String> = (0..spec.cards)
        .map(|k| (spec.card_id(k), spec.card_id((k + 1) % spec.cards)))
        .collect();
    let mut files = fleet.release_files().unwrap().clone();
    let mut labels: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.labels).unwrap()).unwrap();
    let relabel = |v: &mut serde_json::Value| {
        if let Some(card) = v.as_str().and_then(|c| moved.get(c)) {
            *v = serde_json::json!(card);
        }
    };
    match &mut labels {
        serde_json::Value::Array(rows) => rows.iter_mut().for_each(relabel),
        serde_json::Value::Object(rows) => rows.values_mut().for_each(relabel),
        other => panic!("index.json: {other}"),
    }
    files.labels = fleet.join("index-shuffled.json");
    std::fs::write(&files.labels, labels.to_string()).unwrap();
    for (_, card) in &mut files.canaries {
        *card = moved[card.as_str()].clone();
    }
    files
}

/// Posts a photo of each of `cards` and returns the versions that answered.
async fn traffic(fleet: &Fleet, cards: std::ops::Range<usize>) -> Vec<u64> {
    let mut versions = Vec::new();
    for card in cards {
        let photo = deckhand_tests::fixtures::encode_jpeg(
            &deckhand_tests::fixtures::card_image(card, 0),
            90,
        );
        let (code, r) = fleet.agents[0].recognize(&photo).await.unwrap();
        assert_eq!(code, 200, "{r}");
        versions.push(r["manifest_version"].as_u64().unwrap());
    }
    versions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_gets_the_shops_own_cards_wrong_is_held_by_shadow_evaluation() {
    let fleet = one_agent("rollout-shadow", Vec::new(), Vec::new()).await;
    let agent = &fleet.agents[0];
    let policy: deckhand_protocol::shadow::Policy =
        "min-agreement=0.9,min-samples=20".parse().unwrap();
    let publish = |files: deckhand_agent::release::ReleaseFiles| {
        let fleet = &fleet;
        async move {
            fleet
                .publish_with(&files, fleet.key(), |o| o.shadow = Some(policy))
                .await
                .unwrap()
        }
    };
    // A new shop: no samples yet, and the policy says wait.
    publish(next(&fleet, "Card three, v2")).await;
    let waiting = held(&fleet, 2).await;
    assert!(
        waiting.contains("waiting for shadow samples: 0 of 20"),
        "{waiting}"
    );
    assert_eq!(agent.status().await.unwrap().active_version(), Some(1));
    // The counter's traffic (answered by version 1) fills the sample; version 2 answers alike and
    // goes live.
    assert!(traffic(&fleet, 0..24).await.iter().all(|v| *v == 1));
    let s = agent
        .wait_for(secs(60), "version 2 active", |s| {
            s.active_version() == Some(2)
        })
        .await
        .unwrap();
    let sh = s.shadow.clone().unwrap();
    assert_eq!((sh.version, sh.outcome.as_str()), (2, "passed"), "{sh:?}");
    let f = sh.figures.unwrap();
    assert!(f.samples >= 20 && f.agreement() >= 0.9, "{f:?}");

    // A release with shuffled embeddings passes its canaries and gets the shop's cards wrong: it is
    // held, not activated, and the figures say why.
    assert!(traffic(&fleet, 0..24).await.iter().all(|v| *v == 2));
    publish(shuffled(&fleet)).await;
    let waiting = held(&fleet, 3).await;
    assert!(waiting.contains("held by shadow evaluation"), "{waiting}");
    let s = agent.status().await.unwrap();
    assert_eq!(s.active_version(), Some(2));
    let sh = s.shadow.clone().unwrap();
    assert_eq!((sh.version, sh.outcome.as_str()), (3, "held"), "{sh:?}");
    let f = sh.figures.clone().unwrap();
    eprintln!("shadow evaluation of the shuffled release: {f}");
    assert!(f.samples >= 20, "{f:?}");
    assert!(f.agreement() < 0.2, "{f:?}");
    assert!(f.changed_card >= f.samples * 8 / 10, "{f:?}");
    let spec = ReferenceSpec::small(40);
    let e = &f.examples[0];
    let from: usize = (0..40)
        .find(|k| e.active.as_deref() == Some(spec.card_id(*k).as_str()))
        .unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(
        e.candidate.as_deref(),
        Some(spec.card_id((from + 1) % 40).as_str()),
        "{e:?}"
    );
    assert!(
        s.render()
            .contains("shadow      version 3: held by shadow evaluation: top-1 agreement"),
        "{}",
        s.render()
    );
    let metrics = deckhand_tests::metrics_text(agent).await;
    assert!(
        metrics.contains("deckhand_shadow_held{version=\"3\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("deckhand_shadow_agreement{version=\"3\"} "));
    // Held for good: version 2 serves on.
    more_polls(agent).await;
    assert!(traffic(&fleet, 3..4).await == [2]);
    assert_eq!(agent.status().await.unwrap().active_version(), Some(2));

    // The operator's next release replaces the one held and goes live.
    publish(next(&fleet, "Card three, v4")).await;
    let s = agent
        .wait_for(secs(60), "version 4 active", |s| {
            s.active_version() == Some(4)
        })
        .await
        .unwrap();
    let sh = s.shadow.unwrap();
    assert_eq!((sh.version, sh.outcome.as_str()), (4, "passed"), "{sh:?}");
    assert!(
        deckhand_tests::metrics_text(agent)
            .await
            .contains("deckhand_shadow_held{version=\"4\"} 0"),
        "shadow_held still set"
    );
    fleet.stop().await.unwrap();
}

/// Publishes the shop's next release with an EfficientNet-Lite0-shaped embedder (its reference rows
/// computed with it) under the rollout policy `rollout`: it recognises the cards, canaries included,
/// several times slower than the sample model.
async fn publish_slow(fleet: &Fleet, rollout: &str) {
    let spec = ReferenceSpec {
        model: deckhand_tests::fixtures::ModelShape::Lite0Large,
        ..ReferenceSpec::small(40)
    };
    let slow =
        deckhand_tests::fixtures::write_reference_release(&fleet.join("lite0"), &spec).unwrap();
    let rollout: deckhand_protocol::probation::Rollout = rollout.parse().unwrap();
    fleet
        .publish_with(&slow, fleet.key(), |o| o.rollout = Some(rollout))
        .await
        .unwrap();
}

/// Posts a photo of each of `cards` to `agent`, round and round, until `done` holds of its status
/// (looked at after each; the agent judges a probation once a second, however fast it answers), and
/// returns how many were posted. Gives up after 60 s.
async fn traffic_until(
    agent: &deckhand_tests::Agent,
    cards: std::ops::Range<usize>,
    done: impl Fn(&deckhand_protocol::status::Status) -> bool,
) -> usize {
    let deadline = std::time::Instant::now() + secs(60);
    for (n, card) in cards.cycle().enumerate() {
        if done(&agent.status().await.unwrap()) {
            return n;
        }
        if std::time::Instant::now() > deadline {
            break;
        }
        let photo = deckhand_tests::fixtures::encode_jpeg(
            &deckhand_tests::fixtures::card_image(card % 40, 0),
            90,
        );
        let (code, r) = agent.recognize(&photo).await.unwrap();
        assert_eq!(code, 200, "{r}");
    }
    panic!(
        "{} never got there: {:?}",
        agent.http(),
        agent.status().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_answers_slowly_is_rolled_back_on_probation_and_the_shop_does_not_take_it() {
    let mut fleet = deckhand_tests::serving_v1("rollout-probation", 2, deckhand_tests::MIB).await;
    // What version 1 serves at the counter of pi-0: its probation yardstick.
    assert!(traffic(&fleet, 0..30).await.iter().all(|v| *v == 1));
    // Version 2 answers several times slower.
    publish_slow(&fleet, "probation=10m,answers=20,p99=2").await;
    fleet
        .wait_all(secs(120), "version 2 active", |s| {
            s.active_version() == Some(2)
        })
        .await
        .unwrap();
    // The counter's traffic on pi-0: once it answered 20, version 2 is judged slower and rolled back.
    let posted = traffic_until(&fleet.agents[0], 30..90, |s| s.active_version() == Some(1)).await;
    let s = fleet.agents[0].status().await.unwrap();
    let p = s.probation.clone().unwrap();
    eprintln!("pi-0 rolled back after {posted} answers: {p:?}");
    assert_eq!((p.version, p.outcome.as_str()), (2, "rolled back"), "{p:?}");
    let why = p.why.clone().unwrap();
    assert!(
        why.contains("p99 latency") && why.contains("more than 2 times"),
        "{why}"
    );
    let (now, before) = (p.health.p99_ms.unwrap(), p.before.unwrap().p99_ms.unwrap());
    assert!(now > 2.0 * before, "{now} against {before}");
    assert!(p.health.requests() >= 20, "{p:?} after {posted}");
    let f = s.fallback.clone().unwrap();
    assert_eq!((f.from_version, f.to_version), (2, 1), "{f:?}");
    let at = |t: &str| t.parse::<jiff::Timestamp>().unwrap();
    assert!(
        at(&f.at) < at(&p.until),
        "rolled back after its probation: {f:?}"
    );
    let r = s.rejected.clone().unwrap();
    assert_eq!((r.version, r.by.as_str()), (2, "pi-0"), "{r:?}");
    assert_eq!(s.last_switch.clone().unwrap().why, "rolled back");
    assert!(
        s.render()
            .contains("probation   version 2 rolled back: p99 latency"),
        "{}",
        s.render()
    );
    let metrics = deckhand_tests::metrics_text(&fleet.agents[0]).await;
    for line in [
        "deckhand_probation_rolled_back{version=\"2\"} 1",
        "deckhand_release_rejected{version=\"2\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
    let log = std::fs::read_to_string(fleet.agents[0].log()).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("release rolled back on probation")),
        "{log}"
    );
    let photo =
        deckhand_tests::fixtures::encode_jpeg(&deckhand_tests::fixtures::card_image(3, 0), 90);
    let (code, answer) = fleet.agents[0].recognize(&photo).await.unwrap();
    assert_eq!(
        (code, answer["manifest_version"].as_u64()),
        (200, Some(1)),
        "{answer}"
    );

    // pi-1 runs version 2 on probation without traffic: told by pi-0, it rolls back too.
    let s = fleet.agents[1]
        .wait_for(secs(30), "pi-1 back on version 1", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    assert!(
        s.fallback
            .as_ref()
            .is_some_and(|f| f.why == "peer pi-0 rolled version 2 back"),
        "{s:?}"
    );
    assert_eq!(s.rejected.as_ref().map(|r| r.by.as_str()), Some("pi-0"));

    // A Pi that joins the shop later does not take version 2, which S3 still publishes: it takes
    // version 1, which its peers serve.
    fleet.start_agent("pi-2").await.unwrap();
    let s = fleet.agents[2]
        .wait_for(
            secs(60),
            "pi-2 serving version 1, version 2 rejected",
            |s| s.active_version() == Some(1) && s.rejected.is_some(),
        )
        .await
        .unwrap();
    // Learnt from pi-0, or from pi-1, which learnt it from pi-0 (whichever pi-2 heard first).
    let r = s.rejected.clone().unwrap();
    assert_eq!(r.version, 2, "{r:?}");
    assert!(["pi-0", "pi-1"].contains(&r.by.as_str()), "{r:?}");
    let log = std::fs::read_to_string(fleet.agents[2].log()).unwrap();
    assert!(
        !log.lines()
            .any(|l| l.contains("release accepted") && l.contains("version=2")),
        "pi-2 accepted version 2: {log}"
    );

    // The shop page says so, in a real browser: pi-0 fell back, pi-2 does not take version 2.
    let pages = [0, 2].map(|i| format!("http://{}/", fleet.agents[i].http()));
    tokio::task::spawn_blocking(move || {
        let mut b = deckhand_tests::browser::Browser::launch(1200, 900);
        for (url, says) in pages.iter().zip([
            "fell back from version 2 to 1",
            "version 2 is not taken: peer pi-",
        ]) {
            b.open(url);
            b.wait_for(
                says,
                &format!("document.getElementById('pi-attention')?.textContent.includes('{says}') === true"),
                secs(20),
            );
        }
    })
    .await
    .unwrap();

    // The operator's next release goes live everywhere and clears the rejection.
    fleet
        .publish(&next(&fleet, "Card three, v3"))
        .await
        .unwrap();
    fleet
        .wait_all(secs(120), "version 3 active, nothing rejected", |s| {
            s.active_version() == Some(3) && s.rejected.is_none() && s.fallback.is_none()
        })
        .await
        .unwrap();
    fleet.stop().await.unwrap();
}

/// The agents of `fleet` but the one at `canary`, with their indices.
fn all_but(fleet: &Fleet, canary: usize) -> impl Iterator<Item = (usize, &deckhand_tests::Agent)> {
    fleet
        .agents
        .iter()
        .enumerate()
        .filter(move |(i, _)| *i != canary)
}

/// The index of the one agent of `fleet` serving `version` (the others must not), once there is one.
async fn the_one_serving(fleet: &Fleet, version: u64) -> usize {
    let deadline = std::time::Instant::now() + secs(120);
    loop {
        let mut serving = Vec::new();
        for (i, a) in fleet.agents.iter().enumerate() {
            if a.status().await.unwrap().active_version() == Some(version) {
                serving.push(i);
            }
        }
        match serving[..] {
            [] if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            [one] => return one,
            _ => panic!("version {version} went live on {serving:?} at once"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_pis_take_a_release_after_their_canary_served_it_none_after_it_rolled_back_nor_a_fifth()
 {
    let mut fleet = deckhand_tests::serving_v1("rollout-canary", 4, deckhand_tests::MIB).await;
    // Every Pi hears the three others, so each ranks the same four.
    fleet
        .wait_all(secs(30), "three live peers each", |s| {
            s.peers.iter().filter(|p| p.live).count() == 3
        })
        .await
        .unwrap();
    let rollout: deckhand_protocol::probation::Rollout =
        "canary=1,probation=3s,answers=5".parse().unwrap();
    fleet
        .publish_with(&next(&fleet, "Card three, v2"), fleet.key(), |o| {
            o.rollout = Some(rollout)
        })
        .await
        .unwrap();
    // One Pi goes live first; the three others hold version 2 ready and say whom they wait for.
    let canary = the_one_serving(&fleet, 2).await;
    let name = format!("pi-{canary}");
    for (i, a) in all_but(&fleet, canary) {
        let s = a
            .wait_for(secs(60), "version 2 held for the canary", |s| {
                s.pending
                    .as_ref()
                    .and_then(|p| p.waiting.as_deref())
                    .is_some_and(|w| {
                        w.contains(&format!(
                            "waiting for {name} to serve version 2 through its probation"
                        ))
                    })
            })
            .await
            .unwrap();
        assert_eq!(s.active_version(), Some(1), "pi-{i}: {s:?}");
    }
    let s = fleet.agents[canary].status().await.unwrap();
    assert_eq!(s.last_switch.unwrap().why, "a canary");
    // The counter's traffic at the canary: 5 answers and 3 s later it passed its probation, and the
    // others follow.
    let photo =
        deckhand_tests::fixtures::encode_jpeg(&deckhand_tests::fixtures::card_image(3, 0), 90);
    for _ in 0..6 {
        let (code, r) = fleet.agents[canary].recognize(&photo).await.unwrap();
        assert_eq!(
            (code, r["manifest_version"].as_u64()),
            (200, Some(2)),
            "{r}"
        );
    }
    fleet
        .wait_all(secs(60), "version 2 active", |s| {
            s.active_version() == Some(2)
        })
        .await
        .unwrap();
    let s = fleet.agents[canary].status().await.unwrap();
    let p = s.probation.unwrap();
    assert_eq!(p.outcome, "passed", "{p:?}");
    let passed_after = p.until.parse::<jiff::Timestamp>().unwrap();
    for (i, a) in all_but(&fleet, canary) {
        let sw = a.status().await.unwrap().last_switch.unwrap();
        assert_eq!(sw.why, "the canary passed its probation", "pi-{i}");
        let at = sw.switched_at.parse::<jiff::Timestamp>().unwrap();
        assert!(
            at >= passed_after,
            "pi-{i} switched at {at}, before the canary's probation ended at {passed_after}"
        );
    }

    // Version 3 answers several times slower (an EfficientNet-Lite0-shaped embedder). Each Pi first
    // serves the counter with version 2 (the yardstick), then the release goes to its canary, which
    // rolls it back; none of the others switch.
    for a in &fleet.agents {
        for _ in 0..25 {
            let (code, _) = a.recognize(&photo).await.unwrap();
            assert_eq!(code, 200);
        }
    }
    publish_slow(&fleet, "canary=1,probation=10m,answers=20,p99=2").await;
    let canary = the_one_serving(&fleet, 3).await;
    traffic_until(&fleet.agents[canary], 0..80, |s| {
        s.active_version() == Some(2)
    })
    .await;
    let s = fleet.agents[canary].status().await.unwrap();
    assert_eq!(s.probation.unwrap().outcome, "rolled back");
    for (i, a) in all_but(&fleet, canary) {
        let s = a
            .wait_for(secs(30), "version 3 dropped", |s| {
                s.rejected.as_ref().is_some_and(|r| r.version == 3) && s.pending.is_none()
            })
            .await
            .unwrap();
        assert_eq!(s.active_version(), Some(2), "pi-{i}: {s:?}");
        assert_eq!(s.last_switch.unwrap().version, 2, "pi-{i} switched");
        // Learnt from the canary, or from a Pi that learnt it first.
        let by = s.rejected.unwrap().by;
        assert!(by.starts_with("pi-") && by != format!("pi-{i}"), "{by}");
    }
    // A fifth Pi joining the shop later takes version 2 from its peers, not version 3 from S3.
    fleet.start_agent("pi-4").await.unwrap();
    let s = fleet.agents[4]
        .wait_for(
            secs(60),
            "pi-4 serving version 2, version 3 rejected",
            |s| {
                s.active_version() == Some(2) && s.rejected.as_ref().is_some_and(|r| r.version == 3)
            },
        )
        .await
        .unwrap();
    assert_eq!(s.last_switch.unwrap().version, 2, "{:?}", s.probation);
    let log = std::fs::read_to_string(fleet.agents[4].log()).unwrap();
    assert!(
        !log.lines()
            .any(|l| l.contains("release accepted") && l.contains("version=3")),
        "pi-4 accepted version 3: {log}"
    );
    fleet.stop().await.unwrap();
}
