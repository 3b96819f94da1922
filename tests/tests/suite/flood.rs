//! A LAN that cannot starve the tills (issue 24): one client holds 1,100 connections that each sent a
//! header and 64 KiB of a declared 32 MiB body, another sends 24-megapixel PNG bombs 48 at a time,
//! and a till's recognitions still answer within a second while the agent's memory stays bounded. The
//! agent runs with 1,024 open files, as a shell leaves it: without its connection gate the flood takes
//! every descriptor and the till's connections are never accepted.

use deckhand_tests::fixtures::{Perturbation, card_image, encode_jpeg, encode_png, perturb};
use deckhand_tests::{MIB, peak_rss_kib, secs, shop};
use deckhand_tools::shop::{AgentOptions, Credentials};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Idle connections the flooding client holds.
const IDLE: usize = 1_100;
/// PNG bombs in flight at once.
const BOMBS: usize = 48;
/// The till's recognitions during the flood.
const TILL: usize = 50;

/// Lets this test process hold the flood's sockets (its hard limit is higher than a shell's soft one).
fn raise_own_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only `lim`, on this stack.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    assert!(
        lim.rlim_cur >= (IDLE + BOMBS + 200) as u64,
        "this test needs {} open files; the hard limit is {}",
        IDLE + BOMBS + 200,
        lim.rlim_cur
    );
}

/// A TCP connection to `to` from the loopback address `from` (each flooding client is its own host).
async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// POSTs `body` to /v1/recognize from `from` on a connection of its own; the answer's status code (0
/// when the connection was closed or reset before an answer).
async fn post_from(from: IpAddr, to: SocketAddr, body: &[u8]) -> u16 {
    let Ok(mut s) = connect_from(from, to).await else {
        return 0;
    };
    let head = format!(
        "POST /v1/recognize HTTP/1.1\r\nHost: pi\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes()).await.is_err() || s.write_all(body).await.is_err() {
        return 0;
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_and_png_bombs_does_not_keep_the_tills_out() {
    raise_own_open_files();
    let mut fleet = shop("flood")
        .without_peers()
        .release(2 * MIB)
        .start()
        .await
        .unwrap();
    fleet
        .start_agent_with(AgentOptions {
            name: "pi".into(),
            origin: true,
            credentials: Credentials::None,
            open_files: Some(1024),
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    let pi = &fleet.agents[0];
    pi.wait_for(secs(60), "version 1 active", |s| {
        s.active_version() == Some(1)
    })
    .await
    .unwrap();
    let api: SocketAddr = pi.http().parse().unwrap();
    let photo = encode_jpeg(&perturb(&card_image(3, 0), Perturbation::Brightness, 1), 85);
    let bomb = tokio::task::spawn_blocking(|| encode_png(&image::RgbImage::new(6000, 4000)))
        .await
        .unwrap();

    // 1. The idle flood, from 127.0.0.2: a header and 64 KiB of a declared 32 MiB body, then nothing.
    let flooder: IpAddr = [127, 0, 0, 2].into();
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let Ok(mut s) = connect_from(flooder, api).await else {
            continue;
        };
        let head = "POST /v1/recognize HTTP/1.1\r\nHost: pi\r\nContent-Length: 33554432\r\n\r\n";
        if s.write_all(head.as_bytes()).await.is_ok() {
            let _ = s.write_all(&[7u8; 64 * 1024]).await;
        }
        idle.push(s);
    }

    // 2. PNG bombs from 127.0.0.3, 48 in flight, for as long as the till works.
    let bomber: IpAddr = [127, 0, 0, 3].into();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut bombers = tokio::task::JoinSet::new();
    for _ in 0..BOMBS {
        let (bomb, stop) = (bomb.clone(), stop.clone());
        bombers.spawn(async move {
            let mut codes = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                codes.push(post_from(bomber, api, &bomb).await);
            }
            codes
        });
    }

    // 3. The till, from 127.0.0.1: 50 recognitions 100 ms apart, each answered within 1 s.
    let mut slowest = Duration::ZERO;
    for answered in 0..TILL {
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(1), pi.recognize(&photo)).await;
        let took = started.elapsed();
        let (code, body) = answer
            .unwrap_or_else(|_| {
                panic!("a till's recognition had no answer within 1 s (after {answered} answered)")
            })
            .unwrap_or_else(|e| {
                panic!("a till's recognition failed after {answered} answered: {e}")
            });
        assert_eq!(code, 200, "the till's recognition: {body}");
        assert!(body["card_id"].as_str().is_some(), "{body}");
        slowest = slowest.max(took);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut codes = std::collections::BTreeMap::<u16, usize>::new();
    while let Some(done) = bombers.join_next().await {
        for c in done.unwrap() {
            *codes.entry(c).or_default() += 1;
        }
    }
    let peak_mib = peak_rss_kib(pi.pid().unwrap()) / 1024;
    eprintln!(
        "flood: {} idle connections held by the client, {TILL} till recognitions (slowest {} ms), bomb answers {codes:?}, agent peak RSS {peak_mib} MiB",
        idle.len(),
        slowest.as_millis()
    );
    assert!(peak_mib < 512, "the agent's peak RSS was {peak_mib} MiB");
    // Bombs were decoded one budget's worth at a time: some answered (a 24-megapixel blank has no
    // card), the rest told to come back (503), none left unanswered by a stuck server.
    assert!(codes.get(&503).copied().unwrap_or(0) > 0, "{codes:?}");
    assert!(codes.get(&200).copied().unwrap_or(0) > 0, "{codes:?}");

    // The flooding client is still shut out of nothing it can use: its quiet connections were shed or
    // timed out, and its next connection is answered.
    drop(idle);
    let (code, _) = pi.recognize(&photo).await.unwrap();
    assert_eq!(code, 200);
    let status = pi.status().await.unwrap();
    assert_eq!(status.active_version(), Some(1));
    fleet.agents.remove(0).stop().await.unwrap();
}

/// One request on a connection of its own with extra header lines; the status code and the body.
async fn raw(to: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: pi\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_asks_for_its_token_and_ends_silent_and_slow_connections() {
    let token = "counter-7f3a9c1e55d2";
    let mut fleet = shop("http-token")
        .without_peers()
        .release(2 * MIB)
        .start()
        .await
        .unwrap();
    fleet
        .start_agent_with(AgentOptions {
            name: "pi".into(),
            origin: true,
            credentials: Credentials::None,
            env: vec![("DECKHAND_HTTP_TOKEN", token.into())],
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    let pi = &fleet.agents[0];
    let api: SocketAddr = pi.http().parse().unwrap();
    // The page itself is open (it asks its user for the token); nothing else is without the token.
    let (code, page) = raw(api, "GET", "/", "").await;
    assert_eq!(code, 200);
    assert!(page.contains("deckhand"), "the page");
    for path in ["/v1/status", "/v1/fleet", "/metrics"] {
        let (code, body) = raw(api, "GET", path, "").await;
        assert_eq!(code, 401, "{path}: {body}");
        assert!(body.contains("access token"), "{body}");
        assert!(
            body.contains("WWW-Authenticate: Bearer") || body.contains("www-authenticate: Bearer"),
            "{body}"
        );
        let (code, _) = raw(
            api,
            "GET",
            path,
            "Authorization: Bearer wrong-token-0000000\r\n",
        )
        .await;
        assert_eq!(code, 401, "{path} with a wrong token");
        let (code, body) = raw(
            api,
            "GET",
            path,
            &format!("Authorization: Bearer {token}\r\n"),
        )
        .await;
        assert_eq!(code, 200, "{path}: {body}");
    }
    let (code, _) = raw(api, "POST", "/v1/recognize", "").await;
    assert_eq!(code, 401, "recognitions too");
    // `deckhand-agent status` takes the token from DECKHAND_HTTP_TOKEN, as every reader of the API.
    let status = |env: &[(&str, String)]| {
        deckhand_tests::run(
            "deckhand-agent",
            &["status", "--json", "--http", pi.http()],
            env,
        )
    };
    let refused = status(&[]);
    assert!(!refused.status.success());
    assert!(
        deckhand_tests::stderr(&refused).contains("401"),
        "{}",
        deckhand_tests::stderr(&refused)
    );
    let read = status(&[("DECKHAND_HTTP_TOKEN", token.into())]);
    assert!(read.status.success(), "{}", deckhand_tests::stderr(&read));

    // A connection that sends nothing is closed by the header timeout; one that sends a header and a
    // little of its body is answered 408 when the body timeout passes.
    let started = Instant::now();
    let silent = async {
        let mut s = tokio::net::TcpStream::connect(api).await.unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        started.elapsed()
    };
    let slow = async {
        let mut s = tokio::net::TcpStream::connect(api).await.unwrap();
        let head = format!(
            "POST /v1/recognize HTTP/1.1\r\nHost: pi\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&[0u8; 1000]).await.unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        (
            started.elapsed(),
            String::from_utf8_lossy(&buf).into_owned(),
        )
    };
    let (silent, (slow, answer)) =
        tokio::time::timeout(secs(30), async { tokio::join!(silent, slow) })
            .await
            .expect("the server closed neither connection within 30 s");
    let timeout = deckhand_agent::http::server::HEADER_TIMEOUT;
    assert!(
        silent >= timeout && silent < timeout + secs(5),
        "silent connection closed after {silent:?}"
    );
    assert!(
        slow >= timeout && slow < timeout + secs(5),
        "slow body answered after {slow:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    fleet.agents.remove(0).stop().await.unwrap();
}

/// A stranger replays captured QUIC Initials at a member, 128 a second from fresh ports, never
/// answering one: without admission each took one of the member's 64 connection slots for 5 s, so a
/// Pi joining the shop had its handshake refused at every try and never reached its peer. With
/// admission (a share per address, the oldest shed, a Retry for unproved addresses under pressure),
/// the newcomer joins and syncs from the member while the flood goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_quic_initials_do_not_keep_a_new_pi_from_its_peer() {
    let mut fleet = deckhand_tests::serving_v1("quic-flood", 1, MIB).await;
    let target: SocketAddr = fleet.agents[0].quic().unwrap().parse().unwrap();
    let initials = deckhand_tests::quic_flood::capture_initials(1024).await;
    let flood =
        deckhand_tests::quic_flood::stall_handshakes(target, initials, 128, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The newcomer knows only the flooded member, and has no S3.
    fleet
        .start_agent_with(AgentOptions {
            name: "pi-new".into(),
            origin: false,
            peers: vec![target.to_string()],
            credentials: Credentials::Enroll,
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    let st = fleet.agents[1]
        .wait_for(secs(30), "the newcomer synced from its peer", |s| {
            s.active_version() == Some(1) && s.live_peer("pi-0").is_some()
        })
        .await;
    let text = deckhand_tests::metrics_text(&fleet.agents[0]).await;
    flood.abort();
    let st = st.unwrap();
    assert!(st.bytes_from_peers > 0, "{st:?}");
    let retried = text
        .lines()
        .find_map(|l| l.strip_prefix("deckhand_quic_retries_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(retried > 100, "the flood reached the member: {text}");
    fleet.stop().await.unwrap();
}
