//! `deckhand demo`: the whole system on an embedded sample, on one machine and in one directory: the S3
//! server runs in this process, the agents are real `deckhand-agent` processes.
//!
//! 1. Generates a sample release (a small embedding model as ONNX and HEF, a usearch index of synthetic
//!    card images, labels, metadata, canaries), deterministically.
//! 2. Starts a local S3 server, makes a signing key and a fleet CA, publishes the release.
//! 3. Starts N agents that find each other over QUIC and sync it, S3 counting what it sends.
//! 4. Recognises perturbed photos of cards on every agent.
//! 5. Starts a Pi with a camera on its counter (`deckhand scenes`: generated frames of cards brought in,
//!    left still, taken away, read through the `exec:` source a Pi reads rpicam-vid through) and prints
//!    the recognition events as they arrive on its `/v1/events` stream.
//! 6. Publishes a second release (one card renamed) while a client keeps asking: every answer comes from
//!    exactly one release, and none fails.
//! 7. Prints the fleet as one agent sees it, and the shop page's address (`--keep` keeps the shop running
//!    until Ctrl-C, so the page can be opened and a card tried).
//!
//! The story is told in plain lines on stdout. Logs (this process's and every agent's) go to files in the
//! demo's directory, whose paths are printed, unless `-v` asks for this process's logs on stderr.

use crate::ToolError;
use crate::shop::fixtures::{self, Perturbation, ReferenceSpec, card_image, encode_jpeg, perturb};
use crate::shop::{Agent, Fleet};
use deckhand_protocol::status::human_bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(180);

fn step(n: u32, what: &str) {
    println!("\n== {n}. {what}");
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// How the demo runs.
#[derive(Clone, Debug, Default)]
pub struct DemoOptions {
    /// Keep the files here (default: a temporary directory, removed at the end).
    pub dir: Option<std::path::PathBuf>,
    pub agents: usize,
    /// This process's logs on stderr instead of a file.
    pub verbose: bool,
    /// Keep the shop running at the end until Ctrl-C.
    pub keep: bool,
}

async fn recognize(a: &Agent, image: &[u8]) -> Result<(u16, serde_json::Value), ToolError> {
    a.recognize(image).await
}

pub async fn run(opts: DemoOptions) -> Result<(), ToolError> {
    let n = opts.agents;
    let tmp;
    let dir = match opts.dir.as_deref() {
        Some(d) => d.to_owned(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("deckhand-demo-")
                .tempdir()
                .map_err(ToolError::io(
                    "create a directory in",
                    &std::env::temp_dir(),
                ))?;
            tmp.path().to_owned()
        }
    };
    std::fs::create_dir_all(&dir).map_err(ToolError::io("create", &dir))?;
    logs(&dir, opts.verbose)?;
    let started = Instant::now();
    step(1, "generate a sample release");
    let (spec, files) = sample_release(&dir).await?;
    step(
        2,
        "start S3, make a signing key and a fleet CA, publish version 1",
    );
    let (mut shop, release_bytes) = start_and_publish(&dir, &files).await?;
    step(
        3,
        &format!("start {n} agents; they find each other and sync"),
    );
    start_agents(&mut shop, n, release_bytes).await?;
    step(4, "recognise photos of cards (cropped, rotated, noisy)");
    let photo_dir = dir.join("photos");
    let right = recognise_photos(&shop, &spec, &photo_dir).await?;
    step(
        5,
        "a Pi with a camera on the counter: cards placed, each recognised once",
    );
    let counted = counter(&mut shop).await?;
    step(
        6,
        "publish version 2 (a card renamed) while a client keeps asking",
    );
    let client = second_release(&shop, &spec, &files, &dir).await?;
    step(7, &format!("the fleet as {} sees it", shop.agents[0].name));
    show_fleet(&shop, &photo_dir, started, opts.keep).await?;
    shop.stop().await?;
    if client.failed > 0 || client.mixed > 0 || right == 0 || counted == 0 {
        return Err(ToolError::DemoFailed {
            failed: client.failed,
            mixed: client.mixed,
            right,
            counted,
        });
    }
    Ok(())
}

/// This process's logs: on stderr with `-v`, else in the demo's directory.
fn logs(dir: &std::path::Path, verbose: bool) -> Result<(), ToolError> {
    if verbose {
        deckhand_agent::telemetry::init(false);
        return Ok(());
    }
    let log = dir.join("demo.log");
    deckhand_agent::telemetry::init_file(&log).map_err(ToolError::io("create", &log))?;
    println!(
        "deckhand demo in {}; logs in {}",
        dir.display(),
        log.display()
    );
    Ok(())
}

/// Step 1: the sample release, generated deterministically.
async fn sample_release(
    dir: &std::path::Path,
) -> Result<(ReferenceSpec, deckhand_agent::release::ReleaseFiles), ToolError> {
    let t = Instant::now();
    let spec = ReferenceSpec::small(60);
    let (spec2, rdir) = (spec.clone(), dir.join("release-1"));
    let files =
        tokio::task::spawn_blocking(move || fixtures::write_reference_release(&rdir, &spec2))
            .await??;
    println!(
        "{} cards, {} reference rows of {} dims, model and index in {} ({})",
        spec.cards,
        spec.rows,
        spec.dim,
        dir.join("release-1").display(),
        secs(t.elapsed())
    );
    Ok((spec, files))
}

/// Step 2: S3, a key and a CA, and version 1 published. Returns the shop and the release's bytes.
async fn start_and_publish(
    dir: &std::path::Path,
    files: &deckhand_agent::release::ReleaseFiles,
) -> Result<(Fleet, u64), ToolError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(ToolError::Random)?;
    let shop = Fleet::new()
        .dir(dir)
        .key(deckhand_protocol::SecretKey::from_seed(&seed))
        .start()
        .await?;
    let t = Instant::now();
    let v1 = shop.publish(files).await?;
    println!(
        "S3 at {}; signed and published version {} ({}): {} in {} blobs ({})",
        shop.s3().endpoint(),
        v1.manifest.version,
        v1.id,
        human_bytes(v1.manifest.total_bytes()),
        v1.manifest.blobs().len(),
        secs(t.elapsed())
    );
    Ok((shop, v1.manifest.total_bytes()))
}

/// Step 3: `n` agents started; they sync version 1, S3 counting what it sends.
async fn start_agents(shop: &mut Fleet, n: usize, release: u64) -> Result<(), ToolError> {
    shop.s3().stats().reset();
    let t = Instant::now();
    for i in 0..n {
        let a = shop.start_agent(&format!("pi-{}", i + 1)).await?;
        println!(
            "{}: started; http {}, quic {}, log {}",
            a.name,
            a.http(),
            a.quic().unwrap_or("-"),
            a.log().display()
        );
    }
    let statuses = shop
        .wait_all(WAIT, "version 1 active", |s| s.active_version() == Some(1))
        .await?;
    for (a, s) in shop.agents.iter().zip(&statuses) {
        println!(
            "{}: version 1 verified and active; fetched {} from S3, {} from peers",
            a.name,
            human_bytes(s.bytes_from_origin),
            human_bytes(s.bytes_from_peers)
        );
    }
    let sent = shop.s3().stats().bytes_sent();
    let ratio = sent as f64 / release.max(1) as f64;
    println!(
        "S3 sent {} in all for a {} release and {n} agents: {ratio:.2}x the release{} ({})",
        human_bytes(sent),
        human_bytes(release),
        if ratio < 1.5 {
            ", so the shop's uplink carried each byte about once; the rest came from peers"
        } else {
            ""
        },
        secs(t.elapsed())
    );
    Ok(())
}

/// Step 4: perturbed photos of cards recognised, spread over the agents. Returns how many were right.
async fn recognise_photos(
    shop: &Fleet,
    spec: &ReferenceSpec,
    photo_dir: &std::path::Path,
) -> Result<usize, ToolError> {
    let mut right = 0;
    let photos = [
        (7, Perturbation::Crop),
        (12, Perturbation::Rotate),
        (25, Perturbation::Noise),
        (41, Perturbation::Crop),
    ];
    std::fs::create_dir_all(photo_dir).map_err(ToolError::io("create", photo_dir))?;
    for (i, (card, p)) in photos.iter().enumerate() {
        let a = &shop.agents[i % shop.agents.len()];
        let photo = encode_jpeg(&perturb(&card_image(*card, 0), *p, i as u64 + 1), 85);
        let path = photo_dir.join(format!("{}-{p:?}.jpg", spec.card_id(*card)).to_lowercase());
        std::fs::write(&path, &photo).map_err(ToolError::io("write", &path))?;
        let (code, answer) = recognize(a, &photo).await?;
        let ok = code == 200 && answer["card_id"] == spec.card_id(*card);
        right += usize::from(ok);
        println!(
            "{}: photo of {} ({p:?}) -> {} score {:.3}, \"{}\", version {}, {:.1} ms",
            a.name,
            spec.card_id(*card),
            answer["card_id"],
            answer["score"].as_f64().unwrap_or(0.0),
            answer["metadata"]["name"].as_str().unwrap_or("-"),
            answer["manifest_version"],
            answer["latency_ms"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "{right} of {} recognised; the photos are in {}",
        photos.len(),
        photo_dir.display()
    );
    Ok(right)
}

/// Cards the demo's counter shows.
const PLACEMENTS: usize = 3;

/// Step 5: a Pi whose camera reads `deckhand scenes` (this binary); the events of its counter, read
/// from its `/v1/events` stream as they come. Returns how many were the card placed.
async fn counter(shop: &mut Fleet) -> Result<usize, ToolError> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let me =
        std::env::current_exe().map_err(ToolError::io("find", std::path::Path::new("deckhand")))?;
    let seed = 11;
    let script = crate::shop::scenes::Script::new(seed, PLACEMENTS, 40);
    // 8 s of empty counter first: the new Pi takes the release from its peers meanwhile.
    let camera = format!(
        "counter=exec:{} scenes --seed {seed} --placements {PLACEMENTS} --lead 80 --hold",
        me.display()
    );
    let a = shop
        .start_agent_args("pi-counter", vec!["--camera".into(), camera])
        .await?;
    println!(
        "{}: started with a camera on its counter; log {}",
        a.name,
        a.log().display()
    );
    a.wait_for(WAIT, "version 1 active", |s| s.active_version() == Some(1))
        .await?;
    let http = a.http().to_owned();
    let io = |e: std::io::Error| ToolError::Usage(format!("the event stream of {http}: {e}"));
    let mut stream = tokio::net::TcpStream::connect(&http).await.map_err(io)?;
    stream
        .write_all(format!("GET /v1/events HTTP/1.1\r\nHost: {http}\r\n\r\n").as_bytes())
        .await
        .map_err(io)?;
    let mut lines = tokio::io::BufReader::new(stream).lines();
    let mut right = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut seen = 0;
    while seen < PLACEMENTS {
        let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(l))) => l,
            _ => break,
        };
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let Ok(e) = serde_json::from_str::<serde_json::Value>(data.trim()) else {
            continue;
        };
        let placed = &script.placements[seen];
        seen += 1;
        right += usize::from(e["card_id"] == placed.card_id());
        println!(
            "event {}: camera {} saw {} \"{}\" (placed: {}), score {:.3}, corners {}",
            e["id"].as_str().unwrap_or("-"),
            e["source"].as_str().unwrap_or("-"),
            e["card_id"].as_str().unwrap_or("no card"),
            e["metadata"]["name"].as_str().unwrap_or("-"),
            placed.card_id(),
            e["score"].as_f64().unwrap_or(0.0),
            e["corners"]
        );
    }
    println!("{right} of {PLACEMENTS} cards on the counter recognised, each once");
    Ok(right)
}

/// What the client asking through the swap saw.
#[derive(Default)]
struct ClientCounts {
    asked: AtomicU64,
    failed: AtomicU64,
    mixed: AtomicU64,
}

/// The counts at the end.
struct ClientSaw {
    failed: u64,
    mixed: u64,
}

/// Asks `http` to recognise `photo` until `stop`, counting failures and answers that mix the two
/// releases (version 1 answers with the old name, version 2 with the new: never a mix).
async fn keep_asking(
    http: String,
    photo: Vec<u8>,
    stop: Arc<AtomicBool>,
    counts: Arc<ClientCounts>,
) {
    while !stop.load(Ordering::SeqCst) {
        let body = bytes::Bytes::copy_from_slice(&photo);
        let r = deckhand_agent::http::request_json(&http, "POST", "/v1/recognize", body).await;
        counts.asked.fetch_add(1, Ordering::SeqCst);
        match r {
            Ok((200, a)) => {
                let v2_name = a["metadata"]["name"] == "Card seven, second print";
                if (a["manifest_version"] == 2) != v2_name {
                    counts.mixed.fetch_add(1, Ordering::SeqCst);
                }
            }
            _ => {
                counts.failed.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// Step 5: version 2 (one card renamed) published and swapped in while a client keeps asking.
async fn second_release(
    shop: &Fleet,
    spec: &ReferenceSpec,
    files: &deckhand_agent::release::ReleaseFiles,
    dir: &std::path::Path,
) -> Result<ClientSaw, ToolError> {
    let renamed = spec.card_id(7);
    let mut meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&files.metadata).map_err(ToolError::io("read", &files.metadata))?,
    )
    .map_err(crate::shop::fixtures::FixtureError::from)?;
    meta[&renamed]["name"] = serde_json::json!("Card seven, second print");
    let mut files2 = files.clone();
    files2.metadata = dir.join("metadata-v2.json");
    std::fs::write(
        &files2.metadata,
        serde_json::to_vec(&meta).map_err(crate::shop::fixtures::FixtureError::from)?,
    )
    .map_err(ToolError::io("write", &files2.metadata))?;
    let photo = encode_jpeg(&perturb(&card_image(7, 0), Perturbation::Crop, 9), 85);
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(ClientCounts::default());
    let client = tokio::spawn(keep_asking(
        shop.agents[0].http().to_owned(),
        photo.clone(),
        stop.clone(),
        counts.clone(),
    ));
    shop.s3().stats().reset();
    let t = Instant::now();
    let v2 = shop.publish(&files2).await?;
    let waited = shop
        .wait_all(WAIT, "version 2 active", |s| s.active_version() == Some(2))
        .await;
    stop.store(true, Ordering::SeqCst);
    let _ = client.await;
    waited?;
    println!(
        "version {} swapped in on every agent ({}); S3 sent {} (only the changed metadata)",
        v2.manifest.version,
        secs(t.elapsed()),
        human_bytes(shop.s3().stats().bytes_sent()),
    );
    let saw = ClientSaw {
        failed: counts.failed.load(Ordering::SeqCst),
        mixed: counts.mixed.load(Ordering::SeqCst),
    };
    println!(
        "meanwhile a client asked {} times: {} failed, {} saw a mix of two releases",
        counts.asked.load(Ordering::SeqCst),
        saw.failed,
        saw.mixed
    );
    let (_, answer) = recognize(&shop.agents[0], &photo).await?;
    println!(
        "{}: now \"{}\" (version {})",
        shop.agents[0].name,
        answer["metadata"]["name"].as_str().unwrap_or("-"),
        answer["manifest_version"]
    );
    Ok(saw)
}

/// Step 6: the fleet as the first agent sees it; with `--keep`, the shop runs until Ctrl-C.
async fn show_fleet(
    shop: &Fleet,
    photo_dir: &std::path::Path,
    started: Instant,
    keep: bool,
) -> Result<(), ToolError> {
    let fleet = deckhand_agent::http::get_fleet(shop.agents[0].http())
        .await
        .map_err(|e| ToolError::AgentApi {
            name: shop.agents[0].name.clone(),
            why: e.to_string(),
        })?;
    print!("{}", fleet.render());
    let page = format!("http://{}/", shop.agents[0].http());
    println!("\ndemo done in {}", secs(started.elapsed()));
    if keep {
        println!(
            "the shop keeps running: open {page} for the shop page (try a card: a photo from {}); \
             Ctrl-C to stop",
            photo_dir.display()
        );
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(cause = %e, "cannot wait for Ctrl-C; stopping now");
        }
        println!("stopping the shop");
    } else {
        println!(
            "the shop page was at {page}; run `deckhand demo --keep` to keep the shop running and look"
        );
    }
    Ok(())
}
