//! `deckhand demo`: the whole system on an embedded sample, on one machine and in one directory: the S3
//! server runs in this process, the agents are real `deckhand-agent` processes.
//!
//! 1. Generates a sample release (a small embedding model as ONNX and HEF, a usearch index of synthetic
//!    card images, labels, metadata, canaries), deterministically.
//! 2. Starts a local S3 server, makes a signing key and a fleet CA, publishes the release.
//! 3. Starts N agents that find each other over QUIC and sync it, S3 counting what it sends.
//! 4. Recognises perturbed photos of cards on every agent.
//! 5. Publishes a second release (one card renamed) while a client keeps asking: every answer comes from
//!    exactly one release, and none fails.
//! 6. Prints the fleet as one agent sees it, and the shop page's address (`--keep` keeps the shop running
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
    if opts.verbose {
        deckhand_agent::telemetry::init(false);
    } else {
        let log = dir.join("demo.log");
        deckhand_agent::telemetry::init_file(&log).map_err(ToolError::io("create", &log))?;
        println!(
            "deckhand demo in {}; logs in {}",
            dir.display(),
            log.display()
        );
    }
    let started = Instant::now();
    step(1, "generate a sample release");
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

    step(
        2,
        "start S3, make a signing key and a fleet CA, publish version 1",
    );
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(ToolError::Random)?;
    let mut shop = Fleet::new()
        .dir(&dir)
        .key(deckhand_protocol::SecretKey::from_seed(&seed))
        .start()
        .await?;
    let t = Instant::now();
    let v1 = shop.publish(&files).await?;
    println!(
        "S3 at {}; signed and published version {} ({}): {} in {} blobs ({})",
        shop.s3().endpoint(),
        v1.manifest.version,
        v1.id,
        human_bytes(v1.manifest.total_bytes()),
        v1.manifest.blobs().len(),
        secs(t.elapsed())
    );

    step(
        3,
        &format!("start {n} agents; they find each other and sync"),
    );
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
    let ratio = sent as f64 / v1.manifest.total_bytes().max(1) as f64;
    println!(
        "S3 sent {} in all for a {} release and {n} agents: {ratio:.2}x the release{} ({})",
        human_bytes(sent),
        human_bytes(v1.manifest.total_bytes()),
        if ratio < 1.5 {
            ", so the shop's uplink carried each byte about once; the rest came from peers"
        } else {
            ""
        },
        secs(t.elapsed())
    );

    step(4, "recognise photos of cards (cropped, rotated, noisy)");
    let mut right = 0;
    let photos = [
        (7, Perturbation::Crop),
        (12, Perturbation::Rotate),
        (25, Perturbation::Noise),
        (41, Perturbation::Crop),
    ];
    let photo_dir = dir.join("photos");
    std::fs::create_dir_all(&photo_dir).map_err(ToolError::io("create", &photo_dir))?;
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

    step(
        5,
        "publish version 2 (a card renamed) while a client keeps asking",
    );
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
    let (asked, failed, mixed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let client = {
        let (http, photo, stop, asked, failed, mixed) = (
            shop.agents[0].http().to_owned(),
            photo.clone(),
            stop.clone(),
            asked.clone(),
            failed.clone(),
            mixed.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let r = deckhand_agent::http::request_json(
                    &http,
                    "POST",
                    "/v1/recognize",
                    bytes::Bytes::copy_from_slice(&photo),
                )
                .await;
                asked.fetch_add(1, Ordering::SeqCst);
                match r {
                    Ok((200, a)) => {
                        // Version 1 answers with the old name, version 2 with the new: never a mix.
                        let v2_name = a["metadata"]["name"] == "Card seven, second print";
                        if (a["manifest_version"] == 2) != v2_name {
                            mixed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        })
    };
    shop.s3().stats().reset();
    let t = Instant::now();
    let v2 = shop.publish(&files2).await?;
    shop.wait_all(WAIT, "version 2 active", |s| s.active_version() == Some(2))
        .await?;
    stop.store(true, Ordering::SeqCst);
    let _ = client.await;
    println!(
        "version {} swapped in on every agent ({}); S3 sent {} (only the changed metadata)",
        v2.manifest.version,
        secs(t.elapsed()),
        human_bytes(shop.s3().stats().bytes_sent()),
    );
    println!(
        "meanwhile a client asked {} times: {} failed, {} saw a mix of two releases",
        asked.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
        mixed.load(Ordering::SeqCst)
    );
    let (_, answer) = recognize(&shop.agents[0], &photo).await?;
    println!(
        "{}: now \"{}\" (version {})",
        shop.agents[0].name,
        answer["metadata"]["name"].as_str().unwrap_or("-"),
        answer["manifest_version"]
    );

    step(6, &format!("the fleet as {} sees it", shop.agents[0].name));
    let fleet = deckhand_agent::http::get_fleet(shop.agents[0].http())
        .await
        .map_err(|e| ToolError::AgentApi {
            name: shop.agents[0].name.clone(),
            why: e.to_string(),
        })?;
    print!("{}", fleet.render());
    let page = format!("http://{}/", shop.agents[0].http());
    println!("\ndemo done in {}", secs(started.elapsed()));
    if opts.keep {
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
    shop.stop().await?;
    if failed.load(Ordering::SeqCst) > 0 || mixed.load(Ordering::SeqCst) > 0 || right == 0 {
        return Err(ToolError::DemoFailed {
            failed: failed.load(Ordering::SeqCst),
            mixed: mixed.load(Ordering::SeqCst),
            right,
        });
    }
    Ok(())
}
