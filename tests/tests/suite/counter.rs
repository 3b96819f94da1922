//! The counter, through the real agent: a camera read through the same `exec:` source a Pi reads
//! rpicam-vid through (here `deckhand scenes`, a generated counter: cards brought in by a hand, left
//! still, taken away), each card recognised once when it lies still, its event on a real MQTT broker
//! with the card's corners in the frame; a camera that dies is restarted and shown, a stream with
//! garbage between its frames still works. And the classical finder held to the scenes' truth.

use deckhand_agent::camera::finder::Finder;
use deckhand_agent::camera::geometry::{corner_error, rotate_half};
use deckhand_tests::mqtt::{Broker, Subscriber};
use deckhand_tests::{AgentOptions, Credentials, Fleet, bin, secs, shop};
use deckhand_tools::shop::scenes::Script;

/// The most a found corner may be off the truth, in frame pixels (1280 x 960): 1% of the width.
const CORNER_ERROR: f32 = 12.8;

#[test]
fn the_finder_finds_each_card_of_generated_scenes_within_a_percent_of_the_frame() {
    for seed in 1..=4 {
        let script = Script::new(seed, 3, 40);
        let mut finder = Finder::new();
        let mut worst = 0f32;
        let mut still_frames = 0;
        for i in 0..script.len() {
            let (frame, truth) = script.frame(i);
            // Through JPEG, as a camera sends it.
            let frame = image::load_from_memory(&deckhand_tests::fixtures::encode_jpeg(&frame, 85))
                .unwrap()
                .into_rgb8();
            let found = finder.find(&frame);
            match truth.still {
                Some(k) => {
                    still_frames += 1;
                    assert_eq!(found.cards.len(), 1, "seed {seed} frame {i}: {found:?}");
                    let want = script.placements[k].quad();
                    let q = found.cards[0];
                    let err = corner_error(&q, &want).min(corner_error(&rotate_half(q), &want));
                    assert!(
                        err < CORNER_ERROR,
                        "seed {seed} frame {i}: corners {err:.1} px off"
                    );
                    worst = worst.max(err);
                }
                None if truth.hand => {}
                None => assert!(
                    found.cards.is_empty(),
                    "seed {seed} frame {i}: a card on an empty counter: {found:?}"
                ),
            }
        }
        assert!(still_frames > 0);
        eprintln!("seed {seed}: worst corner error {worst:.1} px");
    }
}

/// The detector path on a model whose output is known: a generated ONNX detector that always answers
/// the boxes written into it (the card of a generated scene where it lies, that card again from a
/// neighbouring anchor with a lower score, a second box elsewhere, one below the score), run by the
/// agent's CPU detector on the scene's frame: decoded, the duplicate suppressed, the low score dropped,
/// the card's corners mapped back to the frame within the finder's error, and the card warped from them
/// recognised.
#[test]
fn the_detector_path_decodes_suppresses_and_warps_a_known_output_to_the_right_card() {
    use deckhand_agent::camera::detector::{CpuDetector, Letterbox};
    use deckhand_agent::camera::{CROP_H, CROP_W, geometry};
    use deckhand_protocol::manifest::DetectorSettings;
    let t = deckhand_tests::TestDir::new("detector-path");
    let script = Script::new(7, 1, 40);
    let placed = &script.placements[0];
    // A frame in which the card lies still, through JPEG as a camera sends it.
    let i = (0..script.len())
        .find(|i| script.frame(*i).1.still.is_some())
        .unwrap();
    let frame = image::load_from_memory(&script.jpeg(i))
        .unwrap()
        .into_rgb8();
    let s = deckhand_tools::shop::onnx::yolo_settings();
    // The card as a rotated box in the detector's input: centre, width (short side), height, angle.
    let lb = Letterbox::of(frame.width(), frame.height(), &s);
    let q = placed.quad().map(|p| lb.to_input(p));
    let card = deckhand_tools::shop::onnx::obb_anchor(&q, 0.91, 1);
    let c = geometry::centre(&q);
    let far = [
        if c[0] < 320.0 { 520.0 } else { 120.0 },
        if c[1] < 320.0 { 480.0 } else { 160.0 },
    ];
    let (w, h, angle) = (card[2], card[3], card[5]);
    let anchors = vec![
        card,
        vec![
            c[0] + 2.0,
            c[1] - 1.5,
            w * 0.97,
            h * 1.02,
            0.83,
            angle + 0.03,
        ],
        vec![far[0], far[1], 60.0, 84.0, 0.66, 0.2],
        vec![320.0, 320.0, 60.0, 84.0, 0.3, 0.0],
    ];
    let model = t.join("detector.onnx");
    std::fs::write(
        &model,
        deckhand_tools::shop::onnx::known_output_detector_onnx(640, 640, &anchors),
    )
    .unwrap();
    let mut detector = CpuDetector::load(&model, &s).unwrap();
    let found = detector.detect(&frame).unwrap();
    assert_eq!(
        found.iter().map(|d| d.score).collect::<Vec<_>>(),
        [0.91, 0.66],
        "{found:?}"
    );
    let quad = found[0].quad;
    let want = placed.quad();
    let err = corner_error(&quad, &want).min(corner_error(&rotate_half(quad), &want));
    assert!(
        err < CORNER_ERROR,
        "corners {err:.1} px off: {quad:?} {want:?}"
    );

    // Warped from the detector's quad (both ways up, as the counter does) and recognised.
    let spec = deckhand_tools::shop::fixtures::ReferenceSpec::small(40);
    let files =
        deckhand_tools::shop::fixtures::write_reference_release(&t.join("release"), &spec).unwrap();
    let rec = deckhand_tools::bench::recognizer::load(&files, &spec, 1).unwrap();
    let crops: Vec<_> = [quad, rotate_half(quad)]
        .iter()
        .map(|q| geometry::warp(&frame, q, CROP_W, CROP_H).unwrap())
        .collect();
    let answers = rec
        .recognize(&crops, &[std::time::Instant::now(); 2])
        .unwrap();
    let best = answers
        .iter()
        .max_by(|a, b| a.score.total_cmp(&b.score))
        .unwrap();
    assert_eq!(best.card_id.as_deref(), Some(placed.card_id().as_str()));

    // A model whose output is not the settings' shape is refused when it loads, naming the shape.
    let wrong = DetectorSettings { classes: 2, ..s };
    let err = CpuDetector::load(&model, &wrong).err().unwrap().to_string();
    assert!(err.contains("[1, 6, 4]"), "{err}");
}

fn scenes_camera(args: &str) -> String {
    format!("counter=exec:{} scenes {args}", bin("deckhand").display())
}

async fn shop_with_counter(name: &str, extra: Vec<String>) -> (Fleet, String) {
    let mut fleet = shop(name)
        .release(2 * 1024 * 1024)
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
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    let s = fleet.agents[0]
        .wait_for(secs(60), "version 1 active", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    (fleet, s.agent_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_card_placed_on_the_counter_is_recognised_once_and_reaches_the_broker() {
    let dir = deckhand_tests::TestDir::new("counter-broker");
    let broker = Broker::start(&dir.join("broker")).unwrap();
    let mut sub = Subscriber::connect(broker.port(), "deckhand/#")
        .await
        .unwrap();
    let (seed, placements) = (5, 4);
    let script = Script::new(seed, placements, 40);
    let camera = scenes_camera(&format!("--seed {seed} --placements {placements} --hold"));
    let (fleet, me) = shop_with_counter(
        "counter-broker",
        vec!["--camera".into(), camera, "--mqtt".into(), broker.url()],
    )
    .await;
    let topic = format!("deckhand/shop-1/{me}/counter/recognitions");
    let mut events = Vec::new();
    for i in 0..placements {
        let m = sub
            .next_on(&topic, secs(60))
            .await
            .unwrap_or_else(|| panic!("placement {} of {placements} was not recognised", i + 1));
        events.push(m.json());
    }
    for (e, p) in events.iter().zip(&script.placements) {
        assert_eq!(e["outcome"], "card", "{e}");
        assert_eq!(e["card_id"], p.card_id(), "{e}");
        assert_eq!(e["source"], "counter");
        let corners: [[f32; 2]; 4] = serde_json::from_value(e["corners"].clone()).unwrap();
        // The better reading is the card's own way up: the corners start at the card's top left.
        let err = corner_error(&corners, &p.quad());
        assert!(err < CORNER_ERROR, "corners {err:.1} px off: {e}");
    }
    let cards: Vec<String> = events
        .iter()
        .map(|e| e["card_id"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = script.placements.iter().map(|p| p.card_id()).collect();
    assert_eq!(cards, expected);
    // Once per placement: nothing more while the counter stays empty.
    let more: Vec<_> = sub
        .drain(secs(3))
        .await
        .into_iter()
        .filter(|m| m.topic == topic)
        .map(|m| m.json()["card_id"].clone())
        .collect();
    assert!(more.is_empty(), "recognised again: {more:?}");
    let s = fleet.agents[0].status().await.unwrap();
    let cam = &s.cameras[0];
    assert_eq!(
        (cam.name.as_str(), cam.state.as_str()),
        ("counter", "running"),
        "{cam:?}"
    );
    assert_eq!(cam.placements, placements as u64, "{cam:?}");
    assert!(cam.frames_analysed > 0 && cam.restarts == 0, "{cam:?}");
    // The newest frame and what was found in it (nothing now: the counter is clear).
    let (code, meta) = fleet.agents[0]
        .request("GET", "/v1/cameras/counter", &[])
        .await
        .unwrap();
    assert_eq!(code, 200, "{meta}");
    assert_eq!(
        (meta["width"].as_u64(), meta["height"].as_u64()),
        (Some(1280), Some(960))
    );
    assert_eq!(meta["cards"], serde_json::json!([]));
    let (code, _) = fleet.agents[0]
        .request("GET", "/v1/cameras/till/frame", &[])
        .await
        .unwrap();
    assert_eq!(code, 404, "no such camera");
    // The shop page shows the counter: the camera's frame and the cards recognised there, the events
    // from the agent's event stream (/v1/events: their ids are on the page).
    let url = format!("http://{}/", fleet.agents[0].http());
    let names: Vec<String> = script.placements.iter().map(|p| p.card_id()).collect();
    let mut ids: Vec<String> = events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    let (b, shown, on_page) = tokio::task::spawn_blocking(move || {
        let mut b = deckhand_tests::browser::Browser::launch(1200, 1000);
        b.open(&url);
        b.wait_for(
            "the counter's frame and cards",
            "(() => { const f = document.querySelector('figure.camera[data-camera=counter]');\
              return f && f.querySelector('img').naturalWidth === 1280 \
                && f.querySelector('svg').getAttribute('viewBox') === '0 0 1280 960' \
                && f.querySelectorAll('li.counter-card[data-event]').length === 4 \
                && !document.getElementById('counter').hidden; })()",
            secs(30),
        );
        let text = b.eval("document.querySelector('figure.camera').textContent");
        let ids = b.eval(
            "JSON.stringify([...document.querySelectorAll('li.counter-card')].map((l) => l.dataset.event))",
        );
        (b, text, ids)
    })
    .await
    .unwrap();
    let text = shown.as_str().unwrap_or_default().to_owned();
    for n in names {
        assert!(text.contains(&n), "{n} not on the page: {text}");
    }
    let mut on_page: Vec<String> = serde_json::from_str(on_page.as_str().unwrap()).unwrap();
    on_page.sort();
    ids.sort();
    assert_eq!(
        on_page, ids,
        "the page's cards are the events the broker got"
    );
    // A recognition made while the page is open appears on it from the stream: the next event id.
    let last: deckhand_protocol::event::EventId =
        events[3]["id"].as_str().unwrap().parse().unwrap();
    let next = deckhand_protocol::event::EventId::new(&last.log, last.seq + 1).to_string();
    let photo =
        deckhand_tests::fixtures::encode_jpeg(&deckhand_tests::fixtures::card_image(3, 0), 90);
    let (code, body) = fleet.agents[0].recognize(&photo).await.unwrap();
    assert_eq!(code, 200, "{body}");
    let card = deckhand_tests::fixtures::card_id(3);
    tokio::task::spawn_blocking(move || {
        let mut b = b;
        b.wait_for(
            "the live recognition",
            &format!(
                "(() => {{ const r = document.querySelector('#recent-rows tr.recognition[data-event=\"{next}\"]');\
                  return r !== null && r.textContent.includes('{card}'); }})()"
            ),
            secs(30),
        );
    })
    .await
    .unwrap();
    fleet.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_that_dies_is_restarted_and_garbage_in_its_stream_is_refused() {
    // One placement at 50 frames a second with 3 KB of garbage after every frame, then the command
    // exits: the camera is restarted (and plays it again), shown in status; the agent serves on.
    let camera = scenes_camera("--seed 2 --placements 1 --fps 50 --garbage 3000");
    let (fleet, _) = shop_with_counter(
        "counter-dies",
        vec![
            "--camera".into(),
            camera,
            "--camera-fps".into(),
            "50".into(),
        ],
    )
    .await;
    let s = fleet.agents[0]
        .wait_for(secs(60), "the camera restarted", |s| {
            s.cameras.first().is_some_and(|c| c.restarts >= 1)
        })
        .await
        .unwrap();
    let cam = &s.cameras[0];
    assert!(
        cam.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("exited"),
        "{cam:?}"
    );
    assert!(
        cam.refused_in_stream > 0,
        "the garbage was refused: {cam:?}"
    );
    let s = fleet.agents[0]
        .wait_for(secs(60), "the card recognised", |s| {
            s.cameras.first().is_some_and(|c| c.placements >= 1)
        })
        .await
        .unwrap();
    let script = Script::new(2, 1, 40);
    assert_eq!(
        s.cameras[0].last_card.as_deref(),
        Some(script.placements[0].card_id().as_str())
    );
    // Recognitions over HTTP go on meanwhile.
    let photo =
        deckhand_tests::fixtures::encode_jpeg(&deckhand_tests::fixtures::card_image(1, 0), 90);
    let (code, _) = fleet.agents[0].recognize(&photo).await.unwrap();
    assert_eq!(code, 200);
    fleet.stop().await.unwrap();
}

/// Waits until camera 0 recognised `n` cards, and returns its status.
async fn recognised(fleet: &Fleet, n: u64) -> deckhand_protocol::status::CameraStatus {
    let s = fleet.agents[0]
        .wait_for(secs(90), "the cards recognised", |s| {
            s.cameras.first().is_some_and(|c| c.placements >= n)
        })
        .await
        .unwrap();
    s.cameras[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_day_in_a_directory_is_replayed() {
    let dir = deckhand_tests::TestDir::new("counter-dir");
    let frames = dir.join("day");
    std::fs::create_dir_all(&frames).unwrap();
    let script = Script::new(8, 2, 40);
    // Some empty counter first, as a recording starts.
    for i in 0..5 {
        std::fs::write(
            frames.join(format!("{i:05}.jpg")),
            deckhand_tests::fixtures::encode_jpeg(&script.empty(), 85),
        )
        .unwrap();
    }
    for i in 0..script.len() {
        std::fs::write(frames.join(format!("{:05}.jpg", i + 5)), script.jpeg(i)).unwrap();
    }
    std::fs::write(frames.join("notes.txt"), "not a frame").unwrap();
    let camera = format!("shelf=dir:{}", frames.display());
    let (fleet, _) = shop_with_counter("counter-dir", vec!["--camera".into(), camera]).await;
    let cam = recognised(&fleet, 2).await;
    assert_eq!(
        cam.last_card,
        Some(script.placements[1].card_id()),
        "{cam:?}"
    );
    let s = fleet.agents[0]
        .wait_for(secs(30), "the replay ended", |s| {
            s.cameras[0].state == "ended"
        })
        .await
        .unwrap();
    assert_eq!(s.cameras[0].placements, 2, "each once");
    let recent: Vec<_> = s.recent.iter().filter(|r| r.source == "shelf").collect();
    assert_eq!(recent.len(), 2, "{recent:?}");
    fleet.stop().await.unwrap();
}

/// An IP camera: multipart MJPEG over HTTP, the script's frames at 10 a second.
async fn ip_camera(script: std::sync::Arc<Script>) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let script = script.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut req = [0u8; 1024];
                let _ = stream.read(&mut req).await;
                let head = "HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\nConnection: close\r\n\r\n";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for i in 0.. {
                    let jpeg = if i < script.len() {
                        script.jpeg(i)
                    } else {
                        deckhand_tests::fixtures::encode_jpeg(&script.empty(), 85)
                    };
                    let part = format!(
                        "--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
                        jpeg.len()
                    );
                    if stream.write_all(part.as_bytes()).await.is_err()
                        || stream.write_all(&jpeg).await.is_err()
                        || stream.write_all(b"\r\n").await.is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            });
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ip_camera_streaming_multipart_mjpeg_is_read() {
    let script = std::sync::Arc::new(Script::new(9, 2, 40));
    let (port, server) = ip_camera(script.clone()).await;
    let camera = format!("door=http://127.0.0.1:{port}/video.mjpg");
    let (fleet, _) = shop_with_counter("counter-http", vec!["--camera".into(), camera]).await;
    let cam = recognised(&fleet, 2).await;
    assert_eq!(
        cam.last_card,
        Some(script.placements[1].card_id()),
        "{cam:?}"
    );
    assert_eq!(cam.source, format!("http://127.0.0.1:{port}/video.mjpg"));
    assert!(
        cam.skipped_bytes > 0,
        "the part headers were skipped: {cam:?}"
    );
    fleet.stop().await.unwrap();
    server.abort();
}

/// A release that carries a detector: the counter finds cards with it. Two cards lie touching, which
/// the classical finder sees as one region that is not card-shaped (asserted here, in-process, on the
/// same frame); the release's detector (a generated model that answers both cards' boxes) finds each,
/// and each is recognised once, through the real agent reading an `exec:` camera.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_with_a_detector_finds_two_touching_cards_the_classical_finder_cannot() {
    use deckhand_agent::camera::detector::Letterbox;
    use deckhand_protocol::manifest::DetectorSettings;
    use deckhand_tools::shop::scenes::Placement;
    let dir = deckhand_tests::TestDir::new("counter-detector");
    let script = Script::new(9, 0, 40);
    let cards = [
        Placement {
            card: 3,
            centre: [500.0, 450.0],
            width: 200.0,
            angle: 0.0,
        },
        // Touching the first (5 px over its edge), and upside down.
        Placement {
            card: 11,
            centre: [695.0, 560.0],
            width: 200.0,
            angle: 180.0,
        },
    ];
    let two = script.still_life(&cards);
    let jpeg = |img: &image::RgbImage| deckhand_tests::fixtures::encode_jpeg(img, 85);
    let (empty_jpg, two_jpg) = (dir.join("empty.jpg"), dir.join("two.jpg"));
    std::fs::write(&empty_jpg, jpeg(&script.empty())).unwrap();
    std::fs::write(&two_jpg, jpeg(&two)).unwrap();

    // The classical finder, on the same frames through JPEG, finds no card in them.
    let decoded = |p: &std::path::Path| {
        image::load_from_memory(&std::fs::read(p).unwrap())
            .unwrap()
            .into_rgb8()
    };
    let mut finder = Finder::new();
    for _ in 0..5 {
        assert!(finder.find(&decoded(&empty_jpg)).cards.is_empty());
    }
    for i in 0..10 {
        let found = finder.find(&decoded(&two_jpg));
        assert!(found.foreground > 0, "frame {i}: {found:?}");
        assert!(found.cards.is_empty(), "frame {i}: {found:?}");
    }

    // Version 2 carries a detector that answers both cards where they lie.
    let settings = DetectorSettings {
        input_width: 640,
        input_height: 640,
        classes: 1,
        card_class: 0,
        min_score: 0.5,
        iou: 0.5,
    };
    let lb = Letterbox::of(1280, 960, &settings);
    // Among 100 anchors, as a real model has thousands; the others below the score.
    let mut anchors: Vec<Vec<f32>> = cards
        .iter()
        .zip([0.93, 0.88])
        .map(|(p, score)| {
            let q = p.quad().map(|c| lb.to_input(c));
            deckhand_tools::shop::onnx::obb_anchor(&q, score, 1)
        })
        .collect();
    anchors.resize(100, vec![320.0, 320.0, 60.0, 84.0, 0.02, 0.0]);
    let go = dir.join("go");
    let fleet = {
        let mut fleet = shop("counter-detector")
            .release(2 * 1024 * 1024)
            .without_peers()
            .start()
            .await
            .unwrap();
        let mut files = fleet.release_files().unwrap().clone();
        files.detector = Some(
            deckhand_tools::shop::fixtures::write_known_detector(
                &dir.join("detector"),
                640,
                640,
                &anchors,
            )
            .unwrap(),
        );
        let v2 = fleet.publish(&files).await.unwrap();
        assert_eq!(v2.manifest.detector, Some(settings.clone()));
        // The camera shows the empty counter until told to go on, then the two cards for 2 s, then
        // the empty counter again.
        let camera = format!(
            "counter=exec:while [ ! -e {go} ]; do cat {empty}; sleep 0.1; done; \
             i=0; while [ $i -lt 20 ]; do cat {two}; sleep 0.1; i=$((i+1)); done; \
             while :; do cat {empty}; sleep 0.1; done",
            go = go.display(),
            empty = empty_jpg.display(),
            two = two_jpg.display(),
        );
        fleet
            .start_agent_with(AgentOptions {
                name: "pi".into(),
                origin: true,
                credentials: Credentials::None,
                extra: vec!["--camera".into(), camera],
                ..AgentOptions::default()
            })
            .await
            .unwrap();
        fleet
    };
    fleet.agents[0]
        .wait_for(secs(60), "version 2 active", |s| {
            s.active_version() == Some(2)
        })
        .await
        .unwrap();
    std::fs::write(&go, b"").unwrap();
    let cam = recognised(&fleet, 2).await;
    assert_eq!(cam.finder, "detector", "{cam:?}");
    // Each once: after the cards are gone, still two.
    let s = fleet.agents[0]
        .wait_for(secs(30), "the counter clear again", |s| {
            s.cameras[0].cards_in_view == 0
        })
        .await
        .unwrap();
    assert_eq!(s.cameras[0].placements, 2, "{:?}", s.cameras[0]);
    let mut seen: Vec<Option<String>> = s
        .recent
        .iter()
        .filter(|r| r.source == "counter")
        .map(|r| r.card_id.clone())
        .collect();
    seen.sort();
    let mut want: Vec<Option<String>> = cards.iter().map(|p| Some(p.card_id())).collect();
    want.sort();
    assert_eq!(seen, want);
    assert_eq!(s.recent.iter().filter(|r| r.version == 2).count(), 2);
    fleet.stop().await.unwrap();
}

/// Stand-in USB cameras, each `(name, formats offered, script)`, mounted under `dir`, and an agent
/// reading them through `v4l2:` (the cameras in that order in its status). The cameras come first:
/// bound in that order, the agent is dropped (killed) before the cameras are unmounted.
async fn shop_with_usb_cameras(
    name: &str,
    dir: &deckhand_tests::TestDir,
    cameras: &[(&str, &[u32], &std::sync::Arc<Script>)],
) -> (Vec<deckhand_tests::v4l2cam::StandIn>, Fleet) {
    let mut args = Vec::new();
    let mut mounted = Vec::new();
    for (cam, formats, script) in cameras {
        let at = dir.join(cam);
        std::fs::create_dir_all(&at).unwrap();
        let s = deckhand_tests::v4l2cam::StandIn::mount(&at, formats, (*script).clone(), 10);
        args.extend([
            "--camera".into(),
            format!("{cam}=v4l2:{}", s.path().display()),
        ]);
        mounted.push(s);
    }
    let (fleet, _) = shop_with_counter(name, args).await;
    (mounted, fleet)
}

/// A USB camera through `v4l2:`, on the stand-in device (a FUSE file answering V4L2's ioctls, its
/// buffers mapped through the kernel): one camera offers MJPEG beside YUYV and is read in MJPEG,
/// one offers only YUYV and is read in YUYV; both at the largest size up to 1280x960 (they also
/// offer 1920x1080). Each camera's cards are recognised, and both frames are served to the page as
/// JPEGs that decode (the YUYV one encoded, the table-less MJPEG one with the standard tables).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usb_cameras_are_read_through_v4l2_in_mjpeg_and_in_yuyv() {
    use deckhand_tests::v4l2cam::{MJPG, YUYV};
    let dir = deckhand_tests::TestDir::new("counter-v4l2");
    let (desk_script, till_script) = (
        std::sync::Arc::new(Script::new(11, 2, 40)),
        std::sync::Arc::new(Script::new(12, 1, 40)),
    );
    let (cams, fleet) = shop_with_usb_cameras(
        "counter-v4l2",
        &dir,
        &[
            ("desk", &[YUYV, MJPG], &desk_script),
            ("till", &[YUYV], &till_script),
        ],
    )
    .await;
    let (desk, till) = (&cams[0], &cams[1]);
    let s = fleet.agents[0]
        .wait_for(secs(120), "both cameras' cards recognised", |s| {
            s.cameras.len() == 2 && s.cameras[0].placements >= 2 && s.cameras[1].placements >= 1
        })
        .await
        .unwrap();
    let (d, t) = (&s.cameras[0], &s.cameras[1]);
    assert_eq!(
        d.last_card,
        Some(desk_script.placements[1].card_id()),
        "{d:?}"
    );
    assert_eq!(
        t.last_card,
        Some(till_script.placements[0].card_id()),
        "{t:?}"
    );
    for c in [d, t] {
        assert_eq!((c.state.as_str(), c.restarts), ("running", 0), "{c:?}");
    }
    assert_eq!(d.source, format!("v4l2:{}", desk.path().display()));
    // MJPEG preferred where offered, YUYV where not; 1280x960, not the larger size.
    assert_eq!(desk.seen().formats, vec![(MJPG, 1280, 960)]);
    assert_eq!(till.seen().formats, vec![(YUYV, 1280, 960)]);
    assert!(desk.seen().streaming && till.seen().streaming);
    let (code, meta) = fleet.agents[0]
        .request("GET", "/v1/cameras/till", &[])
        .await
        .unwrap();
    assert_eq!(code, 200, "{meta}");
    assert_eq!(
        (meta["width"].as_u64(), meta["height"].as_u64()),
        (Some(1280), Some(960))
    );
    // Both frames reach the page as JPEGs a decoder takes: the YUYV one encoded, the MJPEG one
    // (sent without Huffman tables) with the standard tables.
    for camera in ["till", "desk"] {
        let (code, jpeg) = deckhand_agent::http::request(
            fleet.agents[0].http(),
            "GET",
            &format!("/v1/cameras/{camera}/frame"),
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
        assert_eq!(code, 200, "{camera}");
        let frame = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg)
            .unwrap_or_else(|e| panic!("{camera}'s frame: {e}"));
        assert_eq!((frame.width(), frame.height()), (1280, 960), "{camera}");
    }
    fleet.stop().await.unwrap();
    // The agent stopped streaming and closed the devices.
    assert!(!desk.seen().streaming && !till.seen().streaming);
}

/// A USB camera pulled out is shown in status and read again when it is plugged back in; a device
/// that offers neither MJPEG nor YUYV is refused by name. The agent serves on throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usb_camera_unplugged_is_shown_and_read_again_when_it_returns() {
    use deckhand_tests::v4l2cam::MJPG;
    let dir = deckhand_tests::TestDir::new("counter-v4l2-unplug");
    let script = std::sync::Arc::new(Script::new(13, 2, 40));
    let grey = u32::from_le_bytes(*b"GREY");
    let (cams, fleet) = shop_with_usb_cameras(
        "counter-v4l2-unplug",
        &dir,
        &[("counter", &[MJPG], &script), ("mono", &[grey], &script)],
    )
    .await;
    let cam = &cams[0];
    let s = fleet.agents[0]
        .wait_for(secs(90), "the first card", |s| {
            s.cameras.first().is_some_and(|c| c.placements >= 1)
        })
        .await
        .unwrap();
    assert_eq!(s.cameras[0].last_card, Some(script.placements[0].card_id()));
    let m = &s.cameras[1];
    assert!(m.state.starts_with("restarting"), "{m:?}");
    assert!(
        m.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("deckhand stand-in camera): offers neither MJPEG nor YUYV (it offers GREY)"),
        "{m:?}"
    );
    cam.unplug();
    let s = fleet.agents[0]
        .wait_for(secs(30), "the unplugged camera shown", |s| {
            s.cameras[0].restarts >= 1
        })
        .await
        .unwrap();
    let c = &s.cameras[0];
    assert!(c.state.starts_with("restarting"), "{c:?}");
    assert!(
        c.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("is gone (unplugged?)"),
        "{c:?}"
    );
    // Recognitions over HTTP go on meanwhile.
    let photo =
        deckhand_tests::fixtures::encode_jpeg(&deckhand_tests::fixtures::card_image(1, 0), 90);
    let (code, _) = fleet.agents[0].recognize(&photo).await.unwrap();
    assert_eq!(code, 200);
    let opens = cam.seen().opens;
    cam.plug();
    let s = fleet.agents[0]
        .wait_for(
            secs(90),
            "the second card, after the camera came back",
            |s| s.cameras[0].placements >= 2,
        )
        .await
        .unwrap();
    let c = &s.cameras[0];
    assert_eq!(c.last_card, Some(script.placements[1].card_id()), "{c:?}");
    assert_eq!(c.state, "running", "{c:?}");
    assert!(cam.seen().opens > opens, "reopened");
    fleet.stop().await.unwrap();
}

/// MJPEG as many USB cameras send it, without Huffman tables, decodes with JPEG's standard ones; a
/// JPEG with its own tables, or anything else, is left as it is.
#[test]
fn a_usb_cameras_mjpeg_without_huffman_tables_decodes_with_the_standard_ones() {
    use deckhand_agent::camera::{Frame, with_huffman_tables};
    let img = image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, 90])
    });
    let jpeg = deckhand_tests::fixtures::encode_jpeg(&img, 90);
    let bare = deckhand_tests::v4l2cam::without_huffman_tables(&jpeg);
    assert!(bare.len() < jpeg.len(), "the tables were there to strip");
    assert!(!bare.windows(2).any(|w| w == [0xFF, 0xC4]), "no DHT left");
    for same in [&jpeg[..], b"not a jpeg", &jpeg[..40]] {
        assert!(matches!(
            with_huffman_tables(same),
            std::borrow::Cow::Borrowed(_)
        ));
    }
    let with = Frame::Jpeg(jpeg).decode().unwrap();
    let without = Frame::Jpeg(bare).decode().unwrap();
    assert_eq!(with, without);
}
