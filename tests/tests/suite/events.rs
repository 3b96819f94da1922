//! Recognitions out, through the real agent: every answer is an event, delivered to a real MQTT broker
//! (Debian's mosquitto) in order and once each, kept in the agent's durable event log while the broker
//! is away (across a crash of the agent too), with the agent's online/offline retained and `offline`
//! set by the broker's last will when the agent is killed; to a webhook, signed and retried; and as
//! Server-Sent Events at /v1/events, resumed with Last-Event-ID.

use deckhand_tests::fixtures::{card_id, card_image, encode_jpeg};
use deckhand_tests::mqtt::{Broker, Subscriber};
use deckhand_tests::webhook::Receiver;
use deckhand_tests::{AgentOptions, Credentials, Fleet, secs, shop};
use deckhand_tools::shop::Agent;
use hmac::{KeyInit as _, Mac as _};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

const SECRET: &str = "till-secret-0123456789";

fn photo(card: usize) -> Vec<u8> {
    encode_jpeg(&card_image(card, 0), 90)
}

async fn recognise(agent: &Agent, card: usize) {
    let (code, body) = agent.recognize(&photo(card)).await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["card_id"], card_id(card), "{body}");
}

/// A shop with one release (40 cards) and no agent yet.
async fn shop_with_release(name: &str) -> Fleet {
    shop(name)
        .release(2 * 1024 * 1024)
        .without_peers()
        .start()
        .await
        .unwrap()
}

fn pi(extra: &[String]) -> AgentOptions {
    AgentOptions {
        name: "pi".into(),
        origin: true,
        credentials: Credentials::None,
        extra: extra.to_vec(),
        ..AgentOptions::default()
    }
}

async fn serving(fleet: &mut Fleet, extra: &[String]) -> String {
    fleet.start_agent_with(pi(extra)).await.unwrap();
    let s = fleet.agents[0]
        .wait_for(secs(60), "version 1 active", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    s.agent_id
}

/// The MQTT sink's backlog and whether it is connected, in a status document.
fn mqtt_of(s: &deckhand_protocol::status::Status) -> (u64, bool) {
    let events = s.events.as_ref().expect("status shows the event log");
    let sink = events
        .sinks
        .iter()
        .find(|k| k.kind == "mqtt")
        .expect("an mqtt sink");
    (sink.backlog, sink.connected)
}

/// The MQTT sink's backlog and whether it is connected, now.
async fn mqtt_sink(agent: &Agent) -> (u64, bool) {
    mqtt_of(&agent.status().await.unwrap())
}

/// Waits until the MQTT sink's (backlog, connected) satisfies `pred`.
async fn wait_sink(agent: &Agent, what: &str, pred: impl Fn((u64, bool)) -> bool) {
    agent
        .wait_for(secs(30), what, |s| pred(mqtt_of(s)))
        .await
        .unwrap();
}

/// The events received on `topic`, `n` of them, each within 30 s.
async fn events_on(sub: &mut Subscriber, topic: &str, n: usize) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for i in 0..n {
        let m = sub
            .next_on(topic, secs(30))
            .await
            .unwrap_or_else(|| panic!("event {} of {n} never arrived on {topic}", i + 1));
        out.push(m.json());
    }
    out
}

fn cards_of(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["card_id"].as_str().unwrap_or("-").to_owned())
        .collect()
}

fn seqs(events: &[serde_json::Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| {
            let id = e["id"].as_str().unwrap();
            id.rsplit_once('-').unwrap().1.parse().unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recognitions_reach_the_broker_once_each_in_order_across_outages_and_restarts() {
    let mut fleet = shop_with_release("events-mqtt").await;
    let mut broker = Broker::start(&fleet.join("broker")).unwrap();
    let mut sub = Subscriber::connect(broker.port(), "deckhand/#")
        .await
        .unwrap();
    let args = vec!["--mqtt".to_owned(), broker.url()];
    let me = serving(&mut fleet, &args).await;
    let status_topic = format!("deckhand/shop-1/{me}/status");
    let topic = format!("deckhand/shop-1/{me}/http/recognitions");
    let online = sub.next_on(&status_topic, secs(30)).await.expect("online");
    assert_eq!(online.text(), "online");
    assert_eq!(
        retained_status(broker.port(), &status_topic).await,
        "online"
    );

    // Three recognitions: three events, in order, each with its card, its details and the release.
    for card in [1, 2, 3] {
        recognise(&fleet.agents[0], card).await;
    }
    let first = events_on(&mut sub, &topic, 3).await;
    assert_eq!(cards_of(&first), [card_id(1), card_id(2), card_id(3)]);
    let e = &first[0];
    assert_eq!(e["outcome"], "card");
    assert_eq!(e["agent"], me.as_str());
    assert_eq!(e["deployment"], "shop-1");
    assert_eq!(e["source"], "http");
    assert_eq!(e["release_version"], 1);
    assert!(e["metadata"]["name"].is_string(), "{e}");
    assert!(e["score"].as_f64().unwrap() > 0.5, "{e}");
    assert_eq!(e["candidates"][0]["card_id"], card_id(1));
    let log = e["id"]
        .as_str()
        .unwrap()
        .rsplit_once('-')
        .unwrap()
        .0
        .to_owned();
    let s = seqs(&first);
    assert!(s.windows(2).all(|w| w[1] == w[0] + 1), "{s:?}");

    // The broker goes away (once it acknowledged those three: an event the broker forwarded but whose
    // PUBACK it never sent is sent again, at least once): recognitions go on, their events wait in the
    // log, shown in status.
    wait_sink(&fleet.agents[0], "the three acknowledged", |k| {
        k == (0, true)
    })
    .await;
    broker.stop();
    for card in [4, 5, 6] {
        recognise(&fleet.agents[0], card).await;
    }
    wait_sink(&fleet.agents[0], "three waiting, the broker down", |k| {
        k == (3, false)
    })
    .await;
    let metrics = deckhand_tests::metrics_text(&fleet.agents[0]).await;
    assert!(
        metrics.contains("deckhand_event_backlog{sink=\"mqtt\"} 3"),
        "{metrics}"
    );
    // ...and across a crash of the agent (one more recognised first, and committed: status counts it).
    recognise(&fleet.agents[0], 7).await;
    wait_sink(&fleet.agents[0], "the fourth committed", |k| k.0 == 4).await;
    fleet.agents.remove(0).kill().await.unwrap();
    fleet.start_agent_with(pi(&args)).await.unwrap();
    fleet.agents[0]
        .wait_for(secs(60), "version 1 active", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    assert_eq!(
        mqtt_sink(&fleet.agents[0]).await.0,
        4,
        "kept across the restart"
    );

    // The broker is back: the four arrive, in order, once each, with the ids they were given.
    broker.resume().unwrap();
    let later = events_on(&mut sub, &topic, 4).await;
    assert_eq!(
        cards_of(&later),
        [card_id(4), card_id(5), card_id(6), card_id(7)]
    );
    assert_eq!(seqs(&later), [s[2] + 1, s[2] + 2, s[2] + 3, s[2] + 4]);
    assert!(
        later
            .iter()
            .all(|e| e["id"].as_str().unwrap().starts_with(&log)),
        "one log"
    );
    wait_sink(&fleet.agents[0], "all delivered", |k| k == (0, true)).await;
    // Nothing more: no event was sent twice. The next message on the topic is the next recognition's.
    recognise(&fleet.agents[0], 8).await;
    let next = events_on(&mut sub, &topic, 1).await;
    assert_eq!(
        cards_of(&next),
        [card_id(8)],
        "an event delivered twice: {next:?}"
    );
    assert_eq!(seqs(&next), [s[2] + 5]);

    // Killed: the broker says offline for it (its last will), retained.
    fleet.agents.remove(0).kill().await.unwrap();
    let mut status = Vec::new();
    while let Some(m) = sub.next_on(&status_topic, secs(30)).await {
        let last = (m.text(), m.retain);
        status.push(last.clone());
        if last.0 == "offline" {
            break;
        }
    }
    assert_eq!(
        status.last().map(|s| s.0.as_str()),
        Some("offline"),
        "{status:?}"
    );
    // A new subscriber sees the retained offline.
    assert_eq!(
        retained_status(broker.port(), &status_topic).await,
        "offline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recognitions_reach_a_broker_over_tls_checked_against_the_ca_given() {
    let mut fleet = shop_with_release("events-mqtts").await;
    let broker = Broker::start_with_tls(&fleet.join("broker")).unwrap();
    let mut sub = Subscriber::connect(broker.port(), "deckhand/#")
        .await
        .unwrap();
    // Without the broker's CA the agent refuses its certificate, and says so.
    let untrusted = vec!["--mqtt".to_owned(), broker.tls_url().unwrap()];
    serving(&mut fleet, &untrusted).await;
    let s = fleet.agents[0]
        .wait_for(secs(30), "a TLS error", |s| {
            s.events.as_ref().is_some_and(|e| {
                e.sinks
                    .iter()
                    .any(|k| k.last_error.as_deref().is_some_and(|e| e.contains("TLS")))
            })
        })
        .await
        .unwrap();
    let sink = &s.events.unwrap().sinks[0];
    assert!(!sink.connected, "{sink:?}");
    fleet.agents.remove(0).stop().await.unwrap();
    // With it, events go out over TLS.
    let trusted = vec![
        "--mqtt".to_owned(),
        broker.tls_url().unwrap(),
        "--mqtt-ca".to_owned(),
        broker.tls_ca().unwrap().display().to_string(),
    ];
    let me = serving(&mut fleet, &trusted).await;
    recognise(&fleet.agents[0], 9).await;
    let topic = format!("deckhand/shop-1/{me}/http/recognitions");
    let got = events_on(&mut sub, &topic, 1).await;
    assert_eq!(cards_of(&got), [card_id(9)]);
    fleet.agents.remove(0).stop().await.unwrap();
}

/// What a new subscriber to `topic` is sent first: the retained message, which must be one.
async fn retained_status(port: u16, topic: &str) -> String {
    let mut late = Subscriber::connect(port, topic).await.unwrap();
    let m = late
        .next_on(topic, secs(10))
        .await
        .expect("a retained message");
    assert!(m.retain, "{m:?} is not the retained message");
    m.text()
}

/// The HMAC-SHA256 of `body` under the secret, as `sha256=<hex>`, computed here, apart from the agent.
fn expected_signature(body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_after_a_500_and_a_refused_event_does_not_hold_the_rest() {
    let mut fleet = shop_with_release("events-webhook").await;
    let till = Receiver::start().await;
    let args = vec![
        "--webhook".to_owned(),
        till.url(),
        "--webhook-secret".to_owned(),
        SECRET.to_owned(),
    ];
    serving(&mut fleet, &args).await;
    // The first event is answered 500 twice, then 200; the second 400 (refused for good); the third 200.
    till.answer(&[500, 500, 200, 400]);
    for card in [1, 2, 3] {
        recognise(&fleet.agents[0], card).await;
    }
    let got = till.wait_for(5, secs(30)).await;
    let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 200, 400, 200]);
    let cards: Vec<String> = got
        .iter()
        .map(|r| r.json()["card_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        cards,
        [card_id(1), card_id(1), card_id(1), card_id(2), card_id(3)]
    );
    for r in &got {
        assert_eq!(r.path, "/cards");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(
            r.header("x-deckhand-signature"),
            Some(expected_signature(&r.body).as_str()),
            "the signature checks"
        );
        assert_eq!(r.header("x-deckhand-event"), r.json()["id"].as_str());
    }
    assert_eq!(
        got[0].body, got[2].body,
        "a retry is the same event, byte for byte"
    );
    let s = fleet.agents[0]
        .wait_for(secs(10), "delivered", |s| {
            s.events
                .as_ref()
                .is_some_and(|e| e.sinks.iter().any(|k| k.delivered == 2 && k.backlog == 0))
        })
        .await
        .unwrap();
    let sink = &s.events.unwrap().sinks[0];
    assert_eq!((sink.kind.as_str(), sink.rejected), ("webhook", 1));
    assert!(
        sink.last_rejected
            .as_deref()
            .unwrap_or_default()
            .contains("400 Bad Request"),
        "{sink:?}"
    );
    // Nothing was sent twice after it was delivered: the next request is the next recognition's.
    recognise(&fleet.agents[0], 4).await;
    let got = till.wait_for(6, secs(30)).await;
    assert_eq!(got.len(), 6, "{got:#?}");
    assert_eq!(got[5].json()["card_id"], card_id(4));
}

/// Opens `GET /v1/events` with raw HTTP/1.1 and returns a reader of its lines.
async fn open_stream(
    agent: &Agent,
    last: Option<&str>,
) -> (
    u16,
    tokio::io::Lines<tokio::io::BufReader<tokio::net::TcpStream>>,
) {
    open_stream_at(agent, "/v1/events", last).await
}

/// Opens `path` (`/v1/events` with a query) as [`open_stream`] does.
async fn open_stream_at(
    agent: &Agent,
    path: &str,
    last: Option<&str>,
) -> (
    u16,
    tokio::io::Lines<tokio::io::BufReader<tokio::net::TcpStream>>,
) {
    let addr = agent.http().trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
    if let Some(id) = last {
        req.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut lines = tokio::io::BufReader::new(stream).lines();
    let status_line = lines.next_line().await.unwrap().unwrap();
    let code = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    // The headers.
    while let Some(l) = lines.next_line().await.unwrap() {
        if l.is_empty() {
            break;
        }
    }
    (code, lines)
}

/// The next `n` SSE events (id, data), skipping keep-alive comments and chunk sizes.
async fn sse_events(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::net::TcpStream>>,
    n: usize,
) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    let (mut id, mut data) = (None, None);
    while out.len() < n {
        let line = tokio::time::timeout(secs(30), lines.next_line())
            .await
            .expect("an event within 30 s")
            .unwrap()
            .expect("the stream stays open");
        if let Some(v) = line.strip_prefix("id: ").or(line.strip_prefix("id:")) {
            id = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("data: ").or(line.strip_prefix("data:")) {
            data = Some(serde_json::from_str::<serde_json::Value>(v).unwrap());
        } else if line.is_empty()
            && let (Some(i), Some(d)) = (id.take(), data.take())
        {
            out.push((i, d));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_is_live_and_resumes_after_the_last_event_seen() {
    let mut fleet = shop_with_release("events-sse").await;
    serving(&mut fleet, &[]).await;
    let agent = &fleet.agents[0];
    let (code, mut live) = open_stream(agent, None).await;
    assert_eq!(code, 200);
    for card in [1, 2] {
        recognise(agent, card).await;
    }
    let seen = sse_events(&mut live, 2).await;
    assert_eq!(seen[0].1["card_id"], card_id(1));
    assert_eq!(seen[1].1["card_id"], card_id(2));
    assert_eq!(
        seen[0].0,
        seen[0].1["id"].as_str().unwrap(),
        "the SSE id is the event's"
    );
    drop(live);
    // Two more while nobody watches; a client that saw the second resumes at the third.
    for card in [3, 4] {
        recognise(agent, card).await;
    }
    let (_, mut resumed) = open_stream(agent, Some(&seen[1].0)).await;
    let rest = sse_events(&mut resumed, 2).await;
    assert_eq!(rest[0].1["card_id"], card_id(3));
    assert_eq!(rest[1].1["card_id"], card_id(4));
    // A fresh stream starts at the next event, not at the past.
    let (_, mut fresh) = open_stream(agent, None).await;
    recognise(agent, 5).await;
    let next = sse_events(&mut fresh, 1).await;
    assert_eq!(next[0].1["card_id"], card_id(5));
    // The stream that resumed sees it too.
    assert_eq!(sse_events(&mut resumed, 1).await[0].0, next[0].0);
    // The shop page's start: the newest two kept events, then what comes; a last id seen wins.
    let (code, mut recent) = open_stream_at(agent, "/v1/events?recent=2", None).await;
    assert_eq!(code, 200);
    let two = sse_events(&mut recent, 2).await;
    assert_eq!(
        (&two[0].1["card_id"], &two[1].1["card_id"]),
        (&card_id(4).into(), &card_id(5).into())
    );
    let (_, mut after) = open_stream_at(agent, "/v1/events?recent=2", Some(&rest[1].0)).await;
    recognise(agent, 6).await;
    assert_eq!(sse_events(&mut recent, 1).await[0].1["card_id"], card_id(6));
    let after = sse_events(&mut after, 2).await;
    assert_eq!(
        (&after[0].1["card_id"], &after[1].1["card_id"]),
        (&card_id(5).into(), &card_id(6).into())
    );
    let (code, _) = open_stream_at(agent, "/v1/events?recent=101", None).await;
    assert_eq!(code, 400, "more than a stream replays");
    // An id that is not one is refused, and says why.
    let (code, _) = open_stream(agent, Some("yesterday")).await;
    assert_eq!(code, 400);
    // The agent stops promptly with streams open.
    fleet.agents.remove(0).stop_within(secs(5)).await.unwrap();
}
