//! `deckhand bench counter`: what the counter loop costs and how fast a card placed there reaches the
//! shop's systems. On generated scenes (1280x960 JPEG frames, [`crate::shop::scenes`]) with a release
//! whose embedder is EfficientNet-Lite0-shaped, on the CPU backend. Printed:
//! - in this process, one thread: the time to decode a frame and to find the cards in it (the work
//!   every analysed frame costs, so the frames a second one camera can sustain), the time of one pass
//!   of a release's detector (a YOLO11n-OBB-shaped model at 640x640, run while something moves on the
//!   counter, on the camera's own thread), and the time to warp and embed one placement (both ways up);
//! - through a real agent whose camera reads `deckhand scenes` at 10 frames a second over `exec:`, as a
//!   Pi reads rpicam-vid, publishing to Debian's mosquitto on a loopback port: the agent's CPU while the
//!   counter is empty; frames read, analysed and dropped while cards are placed; and the time from a
//!   card lying still to its MQTT message reaching a subscriber, from the first still frame (which
//!   includes the hold of `still_frames` frames) and from the end of the hold. The scene program writes
//!   when it sent each still frame, the subscriber when each message came: one clock, one machine.

use super::footprint::cpu_time;
use crate::ToolError;
use crate::shop::Fleet;
use crate::shop::fixtures::{self, ModelShape, ReferenceSpec};
use crate::shop::mqtt::{Broker, Subscriber};
use crate::shop::scenes::{FRAMES_PER_PLACEMENT, Script};
use deckhand_agent::camera::{CROP_H, CROP_W, finder, geometry};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant, UNIX_EPOCH};

/// The agent's default hold: analysed frames a card must lie still before it is recognised.
const STILL_FRAMES: usize = 5;
/// The camera's rate, as the rpicam-vid command line sets it.
const FPS: u32 = 10;
const SEED: u64 = 5;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median_ms(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v.get(v.len() / 2).map_or(f64::NAN, |d| ms(*d))
}

pub async fn run(placements: usize, idle_secs: u64) -> Result<(), ToolError> {
    let work = tempfile::Builder::new()
        .prefix("deckhand-bench-counter-")
        .tempdir()
        .map_err(ToolError::TempDir)?;
    let spec = ReferenceSpec {
        model: ModelShape::Lite0,
        ..ReferenceSpec::small(40)
    };
    let release_dir = work.path().join("release");
    let files = {
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || fixtures::write_reference_release(&release_dir, &spec))
            .await??
    };
    let model_mb = std::fs::metadata(&files.onnx).map_or(0, |m| m.len()) as f64 / 1e6;
    println!(
        "counter benchmark: {}x{} JPEG frames of generated scenes; CPU backend (tract) with an \
         EfficientNet-Lite0-shaped embedder ({model_mb:.0} MB); {} cores",
        crate::shop::scenes::FRAME_W,
        crate::shop::scenes::FRAME_H,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    {
        let (files, spec, work) = (files.clone(), spec.clone(), work.path().to_owned());
        tokio::task::spawn_blocking(move || in_process(&files, &spec, &work)).await??;
    }
    through_an_agent(work.path(), &files, placements, idle_secs).await
}

/// Decode, find and recognise, timed one by one on one thread.
fn in_process(
    files: &deckhand_agent::release::ReleaseFiles,
    spec: &ReferenceSpec,
    work: &Path,
) -> Result<(), ToolError> {
    let script = Script::new(SEED, 4, spec.cards);
    let jpegs: Vec<Vec<u8>> = (0..script.len()).map(|i| script.jpeg(i)).collect();
    let mut finder = finder::Finder::new();
    let (mut decode, mut find) = (Vec::new(), Vec::new());
    let mut frames = Vec::new();
    // Twice through: the first pass warms caches and the finder's background.
    for pass in 0..2 {
        for jpeg in &jpegs {
            let t = Instant::now();
            let image = deckhand_agent::recognizer::preprocess::decode(jpeg)
                .map_err(|e| ToolError::Usage(format!("a generated frame does not decode: {e}")))?;
            let decoded = t.elapsed();
            let t = Instant::now();
            let found = finder.find(&image);
            let found_in = t.elapsed();
            if pass == 1 {
                decode.push(decoded);
                find.push(found_in);
                frames.push((image, found.cards));
            }
        }
    }
    let detect = detector_pass(work, &frames)?;
    let rec = super::recognizer::load(files, spec, 1)?;
    let mut recognise = Vec::new();
    let mut right = 0;
    for (k, p) in script.placements.iter().enumerate() {
        // The middle of the placement's still run, and the card the finder found there.
        let i = k * FRAMES_PER_PLACEMENT + FRAMES_PER_PLACEMENT - 8;
        let Some((image, cards)) = frames.get(i) else {
            continue;
        };
        let Some(quad) = cards.first() else {
            println!("    (placement {k}: no card found in its still frame)");
            continue;
        };
        let t = Instant::now();
        let crops: Vec<_> = [*quad, geometry::rotate_half(*quad)]
            .iter()
            .filter_map(|q| geometry::warp(image, q, CROP_W, CROP_H))
            .collect();
        let answers = rec.recognize(&crops, &vec![Instant::now(); crops.len()])?;
        recognise.push(t.elapsed());
        let best = answers.iter().max_by(|a, b| a.score.total_cmp(&b.score));
        right += usize::from(best.and_then(|a| a.card_id.as_deref()) == Some(&p.card_id()));
    }
    let (d, f) = (median_ms(decode), median_ms(find));
    println!(
        "\n  in this process, one thread, medians over {} frames:",
        jpegs.len()
    );
    println!("    decode a frame                      {d:>7.1} ms");
    println!("    find the cards in it                {f:>7.1} ms");
    println!(
        "    per analysed frame                  {:>7.1} ms = {:.0} frames a second per camera",
        d + f,
        1000.0 / (d + f)
    );
    println!(
        "    a detector pass ({:.1} MB model)     {:>7.1} ms: while something moves on the counter, \
         decode + detect = {:.0} frames a second",
        detect.1,
        detect.0,
        1000.0 / (d + detect.0)
    );
    println!(
        "    warp and embed a placement (x2)     {:>7.1} ms ({right} of {} named right: the model's \
         weights are random, so its names are not judged here)",
        median_ms(recognise),
        script.placements.len()
    );
    Ok(())
}

/// The median time in ms of one pass of a YOLO11n-OBB-shaped detector (640x640, one class) on the frames,
/// letterboxing and decoding included, on this thread alone as a camera's analysis thread runs it;
/// and the model's size in MB.
fn detector_pass(
    work: &Path,
    frames: &[(image::RgbImage, Vec<geometry::Quad>)],
) -> Result<(f64, f64), ToolError> {
    use deckhand_agent::camera::detector::CpuDetector;
    const PASSES: usize = 12;
    let model = work.join("detector.onnx");
    let bytes = crate::shop::onnx::yolo11n_obb_shaped_onnx(640, 1, SEED);
    std::fs::write(&model, &bytes).map_err(ToolError::io("write", &model))?;
    let mut detector = CpuDetector::load(&model, &crate::shop::onnx::yolo_settings())?;
    let step = (frames.len() / PASSES).max(1);
    let mut times = Vec::new();
    for (image, _) in frames.iter().step_by(step).take(PASSES) {
        let t = Instant::now();
        detector.detect(image)?;
        times.push(t.elapsed());
    }
    Ok((median_ms(times), bytes.len() as f64 / 1e6))
}

/// A real agent, its camera reading `deckhand scenes`, its events going to mosquitto.
async fn through_an_agent(
    work: &Path,
    files: &deckhand_agent::release::ReleaseFiles,
    placements: usize,
    idle_secs: u64,
) -> Result<(), ToolError> {
    let Some(_) = crate::shop::mqtt::mosquitto() else {
        println!(
            "\n  mosquitto is not installed (apt-get install mosquitto): the agent's figures are not measured"
        );
        return Ok(());
    };
    let broker = Broker::start(&work.join("broker"))?;
    let mut sub = Subscriber::connect(broker.port(), "deckhand/#").await?;
    let me = std::env::current_exe().map_err(ToolError::io("find", Path::new("deckhand")))?;
    let (start, still_log) = (work.join("start"), work.join("still.log"));
    let camera = format!(
        "counter=exec:{} scenes --seed {SEED} --placements {placements} --fps {FPS} --hold \
         --start-after {} --still-log {}",
        me.display(),
        start.display(),
        still_log.display()
    );
    let mut fleet = Fleet::new()
        .name("counter")
        .dir(&work.join("shop"))
        .without_peers()
        .start()
        .await?;
    fleet.publish(files).await?;
    let args = vec![
        "--camera".into(),
        camera,
        "--camera-fps".into(),
        FPS.to_string(),
        "--mqtt".into(),
        broker.url(),
    ];
    let agent = fleet.start_agent_args("pi", args).await?;
    let pid = agent.pid().ok_or_else(|| ToolError::AgentApi {
        name: "pi".into(),
        why: "no process id".into(),
    })?;
    let wait = Duration::from_secs(120);
    agent
        .wait_for(wait, "version 1 active and the camera running", |s| {
            s.active_version() == Some(1)
                && s.cameras
                    .first()
                    .is_some_and(|c| c.state == "running" && c.frames_analysed > 0)
        })
        .await?;
    println!(
        "\n  through an agent: camera exec:deckhand scenes at {FPS} frames a second, events over MQTT \
         to mosquitto on loopback"
    );

    // The empty counter.
    let camera =
        |s: &deckhand_protocol::status::Status| s.cameras.first().cloned().unwrap_or_default();
    let before = camera(&agent.status().await?);
    let cpu_before = cpu_time(pid)?;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle = t.elapsed().as_secs_f64();
    let cpu = cpu_time(pid)?.saturating_sub(cpu_before).as_secs_f64() / idle * 100.0;
    let after = camera(&agent.status().await?);
    println!(
        "    empty counter, {idle:.0} s: agent CPU {cpu:.1}% of one core; frames read {:.1}/s, \
         analysed {:.1}/s",
        (after.frames_read - before.frames_read) as f64 / idle,
        (after.frames_analysed - before.frames_analysed) as f64 / idle
    );

    // Cards placed one after another.
    let script = Script::new(SEED, placements, 40);
    let before = after;
    let cpu_before = cpu_time(pid)?;
    std::fs::write(&start, b"").map_err(ToolError::io("write", &start))?;
    let t = Instant::now();
    let limit = Duration::from_secs_f64((script.len() as f64 / f64::from(FPS)) * 2.0 + 30.0);
    let mut messages = Vec::new();
    while messages.len() < placements {
        let Some(m) = sub
            .next_where(
                |topic| topic.ends_with("/counter/recognitions"),
                limit.saturating_sub(t.elapsed()),
            )
            .await
        else {
            break;
        };
        messages.push(m);
    }
    // The rest of the script (the last card taken away), so the frame counts cover all of it.
    let script_time = Duration::from_secs_f64(script.len() as f64 / f64::from(FPS) + 0.5);
    tokio::time::sleep(script_time.saturating_sub(t.elapsed())).await;
    let busy = t.elapsed().as_secs_f64();
    let cpu = cpu_time(pid)?.saturating_sub(cpu_before).as_secs_f64() / busy * 100.0;
    let after = camera(&agent.status().await?);
    fleet.stop().await?;

    let right = messages
        .iter()
        .zip(&script.placements)
        .filter(|(m, p)| m.json()["card_id"] == p.card_id())
        .count();
    println!(
        "    {placements} placements over {busy:.0} s: {} messages ({right} naming the card placed: \
         random weights); agent CPU {cpu:.0}% of one core",
        messages.len()
    );
    println!(
        "    frames read {:.1}/s, analysed {:.1}/s, dropped {:.1}/s (the empty counter between cards is \
         analysed 2 times a second)",
        (after.frames_read - before.frames_read) as f64 / busy,
        (after.frames_analysed - before.frames_analysed) as f64 / busy,
        (after.frames_dropped - before.frames_dropped) as f64 / busy
    );

    // When each placement's still frames were sent.
    let log = std::fs::read_to_string(&still_log).map_err(ToolError::io("read", &still_log))?;
    let mut sent: HashMap<(usize, usize), u128> = HashMap::new();
    for line in log.lines() {
        let v: Vec<u128> = line.split(' ').filter_map(|f| f.parse().ok()).collect();
        if let [k, j, at] = v[..] {
            sent.insert((k as usize, j as usize), at);
        }
    }
    let (mut from_still, mut from_hold) = (Vec::new(), Vec::new());
    for (k, m) in messages.iter().enumerate() {
        let at = m
            .received
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros();
        let delta = |j: usize| sent.get(&(k, j)).map(|s| (at as f64 - *s as f64) / 1000.0);
        if let (Some(a), Some(b)) = (delta(0), delta(STILL_FRAMES - 1)) {
            from_still.push(a);
            from_hold.push(b);
        }
    }
    from_still.sort_by(f64::total_cmp);
    from_hold.sort_by(f64::total_cmp);
    println!(
        "    card lying still -> its MQTT message, {} placements: p50 {:.0} ms, p99 {:.0} ms \
         (includes the hold of {STILL_FRAMES} frames, {:.0} ms at {FPS} fps)",
        from_still.len(),
        percentile(&from_still, 0.5),
        percentile(&from_still, 0.99),
        (STILL_FRAMES - 1) as f64 * 1000.0 / f64::from(FPS)
    );
    println!(
        "    end of the hold -> its MQTT message:       p50 {:.0} ms, p99 {:.0} ms, worst {:.0} ms",
        percentile(&from_hold, 0.5),
        percentile(&from_hold, 0.99),
        from_hold.last().copied().unwrap_or(f64::NAN)
    );
    Ok(())
}
