//! The agent as a real process, with no network at all: a release is sideloaded from a bundle directory,
//! served over HTTP, survives a restart, and an older bundle can never roll it back.

use deckhand_tests::fixtures::{
    self, Perturbation, ReferenceSpec, card_image, encode_jpeg, perturb,
};
use deckhand_tests::{AgentOptions, Credentials, Fleet, copy_dir, publish_options, run, shop};
use deckhand_tools::origin::{OriginConfig, OriginUrl};
use deckhand_tools::publish;
use std::path::Path;

fn agent(args: &[&str]) -> std::process::Output {
    run("deckhand-agent", args, &[])
}

/// `deckhand-agent import` succeeded and activated `version`.
fn imported(out: &std::process::Output, version: u64) {
    assert!(out.status.success(), "{}", deckhand_tests::stderr(out));
    assert_eq!(
        deckhand_tests::stdout(out).trim(),
        format!("activated version {version}")
    );
}

/// Starts agent `pi` with no origin and no peers: it serves what its store holds.
async fn start_offline(fleet: &mut Fleet) {
    fleet
        .start_agent_with(AgentOptions {
            name: "pi".into(),
            credentials: Credentials::None,
            ..AgentOptions::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_serves_from_its_store_with_no_network_and_cannot_be_rolled_back() {
    let mut t = shop("agent-offline").start().await.unwrap();
    let trust = t.trust().to_owned();
    let spec = ReferenceSpec::small(40);
    let files = fixtures::write_reference_release(&t.join("release"), &spec).unwrap();
    let usb = t.join("usb");
    std::fs::create_dir_all(&usb).unwrap();
    let cfg = OriginConfig::default();
    let origin = deckhand_tools::origin::connect(&OriginUrl::File { root: usb.clone() }, &cfg)
        .await
        .unwrap();
    publish::publish(
        &*origin,
        &cfg,
        t.key(),
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
    imported(&import(&usb), 1);

    let photo = encode_jpeg(&perturb(&card_image(3, 0), Perturbation::Brightness, 1), 85);
    start_offline(&mut t).await;
    let (code, answer) = t.agents[0].recognize(&photo).await.unwrap();
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
    t.agents.remove(0).stop().await.unwrap();

    // Version 2 arrives on the stick, and becomes active; version 1 stays pinned as "previous".
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.metadata).unwrap()).unwrap();
    meta[spec.card_id(3)]["name"] = serde_json::json!("Card three, reprinted");
    let mut v2 = files.clone();
    v2.metadata = t.join("metadata-v2.json");
    std::fs::write(&v2.metadata, serde_json::to_vec(&meta).unwrap()).unwrap();
    publish::publish(
        &*origin,
        &cfg,
        t.key(),
        &publish_options(&v2),
        &t.join("work"),
    )
    .await
    .unwrap();
    imported(&import(&usb), 2);

    // The old stick again: a replayed older manifest is refused, even after restarts.
    let out = import(&old_usb);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("version 1 is not above the highest accepted version 2"),
        "{err}"
    );

    start_offline(&mut t).await;
    let (code, answer) = t.agents[0].recognize(&photo).await.unwrap();
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["manifest_version"], 2);
    assert_eq!(answer["metadata"]["name"], "Card three, reprinted");
    t.agents.remove(0).stop().await.unwrap();

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

/// Datagrams the agent sent to the test's NOTIFY_SOCKET, each with when it arrived.
struct Notes {
    socket: tokio::net::UnixDatagram,
    seen: Vec<(std::time::Instant, String)>,
}

impl Notes {
    /// Reads until `pred` holds of a message, or `limit` passes.
    async fn until(&mut self, limit: std::time::Duration, pred: impl Fn(&str) -> bool) -> bool {
        let end = tokio::time::Instant::now() + limit;
        let mut buf = vec![0u8; 4096];
        loop {
            match tokio::time::timeout_at(end, self.socket.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let hit = text.lines().any(&pred);
                    self.seen.push((std::time::Instant::now(), text));
                    if hit {
                        return true;
                    }
                }
                Ok(Err(e)) => panic!("notify socket: {e}"),
                Err(_) => return false,
            }
        }
    }

    fn watchdogs_between(&self, from: std::time::Instant, to: std::time::Instant) -> usize {
        self.seen
            .iter()
            .filter(|(t, m)| *t >= from && *t <= to && m.lines().any(|l| l == "WATCHDOG=1"))
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_it_notifies_ready_status_and_a_watchdog_that_stops_while_inference_is_wedged()
 {
    let mut t = shop("systemd-notify").start().await.unwrap();
    let spec = ReferenceSpec::small(40);
    let files = fixtures::write_reference_release(&t.join("release"), &spec).unwrap();
    let usb = t.join("usb");
    deckhand_tests::publish_to_dir(&t, &files, &usb).await;
    let sock_path = t.join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let mut notes = Notes {
        socket,
        seen: Vec::new(),
    };
    let wedge = t.join("wedge");
    t.start_agent_with(AgentOptions {
        name: "pi".into(),
        credentials: Credentials::None,
        extra: vec!["--bundle-dir".into(), usb.display().to_string()],
        env: vec![
            ("NOTIFY_SOCKET", sock_path.display().to_string()),
            ("WATCHDOG_USEC", "1000000".into()),
            ("JOURNAL_STREAM", "8:12345".into()),
            (
                "DECKHAND_FAULT_WEDGE_INFERENCE",
                wedge.display().to_string(),
            ),
        ],
        ..AgentOptions::default()
    })
    .await
    .unwrap();
    let s = std::time::Duration::from_secs;
    assert!(notes.until(s(30), |l| l == "READY=1").await, "no READY=1");
    assert!(
        notes
            .until(s(60), |l| l.starts_with("STATUS=serving v1 (cpu)"))
            .await,
        "no STATUS line for the release: {:?}",
        notes.seen
    );
    // Pings at half of WATCHDOG_USEC.
    let from = std::time::Instant::now();
    notes.until(s(2), |_| false).await;
    let pings = notes.watchdogs_between(from, std::time::Instant::now());
    assert!(pings >= 3, "{pings} watchdog pings in 2 s");

    // The inference thread wedges inside a batch: the pings stop once it has been stuck past the
    // limit, and resume when it comes back.
    std::fs::write(&wedge, b"").unwrap();
    let photo = encode_jpeg(&perturb(&card_image(3, 0), Perturbation::Brightness, 1), 85);
    let http = t.agents[0].http().to_owned();
    let wedged_at = std::time::Instant::now();
    // This request is what the thread hangs in (its client gives up after 10 s; the batch stays stuck).
    let stuck = {
        let photo = bytes::Bytes::from(photo.clone());
        tokio::spawn(async move {
            deckhand_agent::http::request_json(&http, "POST", "/v1/recognize", photo).await
        })
    };
    let limit = deckhand_agent::systemd::INFERENCE_LIMIT;
    notes.until(limit + s(3), |_| false).await;
    // Its client gave up after 10 s; a card answered means nothing wedged.
    let answered = stuck.await.unwrap();
    assert!(
        !matches!(answered, Ok((200, _))),
        "the request was answered with the wedge in place ({answered:?}): this deckhand-agent binary \
         was built without the test-only feature fault-injection (`cargo build -p deckhand-agent` \
         replaces the one `cargo test --workspace` builds; run that again)"
    );
    let quiet_from = wedged_at + limit + s(1);
    assert_eq!(
        notes.watchdogs_between(quiet_from, std::time::Instant::now()),
        0,
        "the watchdog kept pinging with the inference thread wedged"
    );
    assert!(
        notes.watchdogs_between(wedged_at, wedged_at + limit - s(1)) > 0,
        "pings stopped before the limit"
    );
    std::fs::remove_file(&wedge).unwrap();
    assert!(
        notes.until(s(3), |l| l == "WATCHDOG=1").await,
        "no ping after the inference thread came back"
    );
    let (code, answer) = t.agents[0].recognize(&photo).await.unwrap();
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["card_id"], spec.card_id(3));

    // Stopping says so; under the journal, log lines carry no colour and no timestamp.
    let log = t.agents[0].log().to_owned();
    t.agents.remove(0).stop().await.unwrap();
    assert!(
        notes.until(s(5), |l| l == "STOPPING=1").await,
        "no STOPPING=1"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("INFO"), "{text}");
    assert!(!text.contains('\x1b'), "colour in the journal: {text}");
    assert!(
        !text.lines().any(|l| l.starts_with("20")),
        "timestamps in the journal: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pi_without_a_clock_trusts_the_newest_signed_time_and_expiry_never_stops_service() {
    let mut t = shop("clock").start().await.unwrap();
    let spec = ReferenceSpec::small(40);
    let files = fixtures::write_reference_release(&t.join("release"), &spec).unwrap();
    let usb = t.join("usb");
    let v1 = deckhand_tests::publish_to_dir(&t, &files, &usb).await;
    let photo = encode_jpeg(&perturb(&card_image(3, 0), Perturbation::Brightness, 1), 85);
    let opts = |faketime: &str| AgentOptions {
        name: "pi".into(),
        credentials: Credentials::None,
        extra: vec!["--bundle-dir".into(), usb.display().to_string()],
        env: deckhand_tests::clock_at(faketime),
        ..AgentOptions::default()
    };
    let s = std::time::Duration::from_secs;

    // 1. The clock says 1970 (no RTC, no NTP yet): a fresh release is accepted and activates, and the
    //    agent trusts the release's signed creation time instead of its clock.
    t.start_agent_with(opts("@1970-01-02 00:00:00"))
        .await
        .unwrap();
    let st = t.agents[0]
        .wait_for(s(60), "version 1 active", |s| s.active_version() == Some(1))
        .await
        .unwrap();
    assert_eq!(
        st.clock_behind_trusting.as_deref(),
        Some(v1.manifest.created_at.to_string().as_str()),
        "{st:?}"
    );
    assert!(
        st.summary_line().contains("clock behind"),
        "{}",
        st.summary_line()
    );
    t.agents.remove(0).stop().await.unwrap();

    // 2. The clock is stale (fake-hwclock's saved time, ten days back). An operator-signed manifest
    //    that expired five days ago looks valid by that clock, but it expired before the newest time
    //    the agent trusts: refused, and version 1 keeps serving.
    let cfg = deckhand_tools::origin::OriginConfig::default();
    let origin = deckhand_tools::origin::connect(
        &deckhand_tools::origin::OriginUrl::File { root: usb.clone() },
        &cfg,
    )
    .await
    .unwrap();
    let now = jiff::Timestamp::now();
    let mut expired = v1.manifest.clone();
    expired.version = 2;
    expired.created_at = now - jiff::SignedDuration::from_hours(20 * 24);
    expired.expires_at = now - jiff::SignedDuration::from_hours(5 * 24);
    let envelope = deckhand_protocol::Envelope::sign_manifest(&expired, &[t.key()]).to_bytes();
    t.start_agent_with(opts("-10d")).await.unwrap();
    t.agents[0]
        .wait_for(s(60), "version 1 active", |s| s.active_version() == Some(1))
        .await
        .unwrap();
    publish::commit(
        &*origin,
        &publish::Prepared {
            id: deckhand_protocol::BlobId::of(&expired.to_payload()),
            manifest: expired,
            envelope,
            uploaded: Vec::new(),
            skipped: Vec::new(),
            bytes_uploaded: 0,
            warnings: Vec::new(),
        },
    )
    .await
    .unwrap();
    let st = t.agents[0]
        .wait_for(s(60), "the expired manifest refused", |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("version 2 expired"))
        })
        .await
        .unwrap();
    assert_eq!(st.active_version(), Some(1), "{st:?}");
    let (code, answer) = t.agents[0].recognize(&photo).await.unwrap();
    assert_eq!((code, answer["manifest_version"].as_u64()), (200, Some(1)));
    t.agents.remove(0).stop().await.unwrap();

    // 3. The clock runs three days ahead: version 1 has expired by it, and still serves (expiry stops
    //    new activations, not service); a fresh version 3 looks expired and is refused, not activated.
    let v3 = deckhand_tests::publish_to_dir(&t, &files, &usb).await;
    assert_eq!(v3.manifest.version, 3);
    t.start_agent_with(opts("+3d")).await.unwrap();
    let st = t.agents[0]
        .wait_for(s(60), "version 3 refused as expired", |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("version 3 expired"))
        })
        .await
        .unwrap();
    assert_eq!(st.active_version(), Some(1), "{st:?}");
    assert_eq!(st.clock_behind_trusting, None);
    let (code, answer) = t.agents[0].recognize(&photo).await.unwrap();
    assert_eq!((code, answer["manifest_version"].as_u64()), (200, Some(1)));
    t.agents.remove(0).stop().await.unwrap();

    // 4. The clock is right again: version 3 activates. Nothing was lost on the way.
    t.start_agent_with(opts("+0")).await.unwrap();
    t.agents[0]
        .wait_for(s(60), "version 3 active", |s| s.active_version() == Some(3))
        .await
        .unwrap();
    t.agents.remove(0).stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_gib_current_json_on_a_stick_is_refused_without_being_read() {
    let mut t = shop("bundle-endless").start().await.unwrap();
    let usb = t.join("usb");
    let layout = deckhand_protocol::layout::Layout::new("").unwrap();
    let current =
        usb.join(layout.current(&deckhand_protocol::layout::Name::deployment("shop-1").unwrap()));
    std::fs::create_dir_all(current.parent().unwrap()).unwrap();
    // Sparse: 2 GiB to whoever reads it, no disk used.
    std::fs::File::create(&current)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    t.start_agent_with(AgentOptions {
        name: "pi".into(),
        credentials: Credentials::None,
        extra: vec!["--bundle-dir".into(), usb.display().to_string()],
        ..AgentOptions::default()
    })
    .await
    .unwrap();
    let st = t.agents[0]
        .wait_for(
            std::time::Duration::from_secs(60),
            "the bundle refused",
            |s| {
                s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("current.json") && e.contains("over the limit"))
            },
        )
        .await
        .unwrap();
    assert_eq!(st.active_version(), None);
    // Memory stayed bounded: the agent's peak resident set is far below what reading it would take.
    let pid = t.agents[0].pid().unwrap();
    let peak_kib = deckhand_tests::peak_rss_kib(pid);
    assert!(peak_kib < 512 * 1024, "peak RSS {peak_kib} KiB");
    t.agents.remove(0).stop().await.unwrap();
}
