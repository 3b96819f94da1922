//! The recognizer and its service, in-process with real files: accuracy on perturbed photos, swaps under
//! load, bad input over HTTP, and the inbox answering exactly as HTTP does.

use deckhand_agent::http::{AppState, router, serve};
use deckhand_agent::metrics::Metrics;
use deckhand_agent::recognizer::inbox::Inbox;
use deckhand_agent::recognizer::service::{RecognizeError, Service, SwapError};
use deckhand_agent::recognizer::{BackendChoice, Recognizer};
use deckhand_tests::TestDir;
use deckhand_tests::fixtures::{
    self, Perturbation, ReferenceSpec, card_image, encode_jpeg, encode_png, perturb,
};
use deckhand_tools::bench::recognizer::{
    self as bench_recognizer, TEST_CARDS, TEST_PHOTOS, TEST_SEED,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The accuracy `deckhand bench recognizer` printed for this configuration when the test was written
/// (400 cards, 60 photos per perturbation): crop 95.0%, every other perturbation 100.0%.
const RECORDED: [(Perturbation, f64); 5] = [
    (Perturbation::Crop, 0.95),
    (Perturbation::Rotate, 1.0),
    (Perturbation::Brightness, 1.0),
    (Perturbation::Jpeg60, 1.0),
    (Perturbation::Noise, 1.0),
];
const MARGIN: f64 = 0.05;

#[test]
fn top1_accuracy_on_perturbed_photos_holds_at_the_recorded_level() {
    let t = TestDir::new("accuracy");
    let spec = ReferenceSpec::small(TEST_CARDS);
    let files = fixtures::write_reference_release(t.path(), &spec).unwrap();
    let rec = bench_recognizer::load(&files, &spec, 1).unwrap();
    let measured = bench_recognizer::accuracy(&rec, &spec, TEST_PHOTOS, TEST_SEED).unwrap();
    assert_eq!(
        measured.len(),
        RECORDED.len(),
        "one figure per recorded perturbation: {measured:?}"
    );
    for ((p, got), (rp, recorded)) in measured.iter().zip(RECORDED) {
        assert_eq!(*p, rp);
        assert!(
            *got >= recorded - MARGIN,
            "{p:?}: top-1 {got:.3} fell below the recorded {recorded:.3} - {MARGIN}"
        );
    }
}

fn release(
    t: &TestDir,
    version: u64,
    prefix: &str,
) -> (
    Recognizer,
    deckhand_agent::release::ReleaseFiles,
    ReferenceSpec,
) {
    let spec = ReferenceSpec {
        id_prefix: prefix.to_owned(),
        ..ReferenceSpec::small(60)
    };
    let files =
        fixtures::write_reference_release(&t.join(format!("release-{version}{prefix}")), &spec)
            .unwrap();
    let rec = bench_recognizer::load(&files, &spec, version).unwrap();
    (rec, files, spec)
}

fn canaries(files: &deckhand_agent::release::ReleaseFiles) -> Vec<(Vec<u8>, String)> {
    files
        .canaries
        .iter()
        .map(|(p, c)| (std::fs::read(p).unwrap(), c.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swapping_releases_under_load_fails_no_request_and_never_mixes_releases() {
    let t = TestDir::new("swap-under-load");
    let service = Service::start(
        Arc::new(Metrics::default()),
        deckhand_agent::recognizer::cpu::Cores::one(),
    )
    .unwrap();
    let (first, files, _) = release(&t, 1, "v1-");
    service.activate(first, &canaries(&files)).unwrap();

    let photos: Vec<bytes::Bytes> = (0..12)
        .map(|i| {
            bytes::Bytes::from(encode_jpeg(
                &perturb(&card_image(i, 0), Perturbation::Noise, i as u64),
                85,
            ))
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, versions_seen) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new())),
    );
    let mut clients = Vec::new();
    for c in 0..4 {
        let (service, photos, stop, ok, seen) = (
            service.clone(),
            photos.clone(),
            stop.clone(),
            ok.clone(),
            versions_seen.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut i = c;
            while !stop.load(Ordering::SeqCst) {
                let r = service.recognize(photos[i % photos.len()].clone()).await;
                let r = r.unwrap_or_else(|e| panic!("a request failed during swaps: {e}"));
                // The card id carries its release's prefix: it must match the answer's version.
                let card = r
                    .card_id
                    .clone()
                    .unwrap_or_else(|| panic!("no card: {:?}", r.reason));
                assert!(
                    card.starts_with(&format!("v{}-", r.manifest_version)),
                    "answer mixes releases: {card} from version {}",
                    r.manifest_version
                );
                assert_eq!(
                    card,
                    format!(
                        "v{}-{}",
                        r.manifest_version,
                        fixtures::card_id(i % photos.len())
                    )
                );
                seen.lock().unwrap().insert(r.manifest_version);
                ok.fetch_add(1, Ordering::SeqCst);
                i += 4;
            }
        }));
    }

    // Four more releases activated in turn, each loaded off the serving path. Each is swapped in only
    // once the clients were answered by the one before: every version must be seen.
    let answered_by = |seen: &std::sync::Mutex<std::collections::BTreeSet<u64>>, v: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !seen.lock().unwrap().contains(&v) {
            assert!(Instant::now() < deadline, "no answer came from version {v}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let swapper = {
        let (service, t_path, seen) = (service.clone(), t.path().to_owned(), versions_seen.clone());
        tokio::task::spawn_blocking(move || {
            let t = TestDir::new("swap-releases");
            let _ = t_path;
            for v in 2..=5u64 {
                let (rec, files, _) = release(&t, v, &format!("v{v}-"));
                answered_by(&seen, v - 1);
                service.activate(rec, &canaries(&files)).unwrap();
                if v == 3 {
                    // A release whose canary fails is refused, and version 3 keeps serving.
                    let (bad, _, spec) = release(&t, 33, "v33-");
                    let img = encode_png(&card_image(3, 0));
                    let err = service
                        .activate(bad, &[(img, spec.card_id(7))])
                        .unwrap_err();
                    assert!(matches!(err, SwapError::Canary { .. }), "{err}");
                    assert!(err.to_string().contains("set0-8"), "{err}");
                    assert_eq!(service.active().unwrap().version, 3);
                    let refusal = service.last_refusal().unwrap();
                    assert_eq!(refusal.version, 33, "the refusal is recorded for status");
                    assert!(refusal.reason.contains("set0-8"), "{}", refusal.reason);
                    // A release whose model disagrees with its manifest's dimension does not load at all.
                    let spec = ReferenceSpec {
                        dim: 64,
                        id_prefix: "v44-".into(),
                        ..ReferenceSpec::small(10)
                    };
                    let f = fixtures::write_reference_release(&t.join("dim64"), &spec).unwrap();
                    let mut settings = fixtures::reference_settings(768);
                    settings.embedding_dim = 768;
                    let err = Recognizer::load(
                        &deckhand_agent::recognizer::ReleasePaths {
                            hef: f.hef,
                            onnx: f.onnx,
                            index: f.index,
                            labels: f.labels,
                            metadata: f.metadata,
                        },
                        &settings,
                        44,
                        deckhand_protocol::BlobId::of(b"44"),
                        BackendChoice::Cpu,
                    )
                    .unwrap_err();
                    assert!(err.to_string().contains("64 dimensions"), "{err}");
                    assert_eq!(service.active().unwrap().version, 3);
                }
            }
            answered_by(&seen, 5);
        })
    };
    swapper.await.unwrap();
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let seen = versions_seen.lock().unwrap().clone();
    assert_eq!(service.active().unwrap().version, 5);
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5],
        "every release answered"
    );
    assert!(ok.load(Ordering::SeqCst) > 20);
    assert_eq!(service.metrics().swaps(), 5);
    let metrics = service.metrics().render(Some(5));
    assert!(
        metrics.contains("deckhand_releases_refused_total 1"),
        "{metrics}"
    );
    service.shutdown();
}

/// One request through the agent's own HTTP client: (status, body as text).
async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let (status, body) = deckhand_agent::http::request(
        &addr.to_string(),
        method,
        path,
        bytes::Bytes::copy_from_slice(body),
    )
    .await
    .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_the_inbox_answers_as_http_does() {
    let t = TestDir::new("http-inbox");
    let service = Service::start(
        Arc::new(Metrics::default()),
        deckhand_agent::recognizer::cpu::Cores::one(),
    )
    .unwrap();
    let app = router(AppState {
        service: service.clone(),
        status: Arc::new(deckhand_protocol::status::Status::default),
        fleet: Arc::new(deckhand_protocol::status::FleetView::default),
        token: None,
        events: None,
        closing: tokio::sync::watch::channel(false).1,
        cameras: Vec::new(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        app,
        deckhand_agent::http::gate::Limits::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));

    let photo = encode_jpeg(&perturb(&card_image(5, 0), Perturbation::Rotate, 3), 80);
    let (code, body) = http(addr, "POST", "/v1/recognize", &photo).await;
    assert_eq!(code, 503, "no release yet: {body}");
    assert!(body.contains("no release is active"), "{body}");

    let (rec, files, spec) = release(&t, 1, "");
    service.activate(rec, &canaries(&files)).unwrap();

    let huge = encode_png(&image::RgbImage::new(8000, 6250));
    for (what, bytes, want, phrase) in [
        ("empty body", Vec::new(), 400, "empty"),
        (
            "not an image",
            b"GET me a card please".to_vec(),
            415,
            "not an image",
        ),
        (
            "truncated JPEG",
            photo[..photo.len() / 3].to_vec(),
            400,
            "does not decode",
        ),
        ("50-megapixel image", huge, 413, "megapixels"),
    ] {
        let (code, body) = http(addr, "POST", "/v1/recognize", &bytes).await;
        assert_eq!(code, want, "{what}: {body}");
        assert!(body.contains(phrase), "{what}: {body}");
    }
    let (code, body) = http(addr, "POST", "/v1/recognize", &photo).await;
    assert_eq!(code, 200, "{body}");
    let via_http: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(via_http["card_id"], spec.card_id(5));
    assert_eq!(via_http["manifest_version"], 1);
    assert_eq!(via_http["backend"], "cpu");
    assert!(via_http["margin"].as_f64().unwrap() > 0.0);
    assert!(via_http["metadata"]["name"].is_string());

    let (code, metrics) = http(addr, "GET", "/metrics", b"").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("deckhand_recognitions_total{outcome=\"bad_input\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("deckhand_recognition_latency_seconds_count 1"),
        "{metrics}"
    );

    // The inbox gives the same answer for the same bytes.
    let (inbox_dir, outbox) = (t.join("inbox"), t.join("outbox"));
    let _inbox = Inbox::start(service.clone(), inbox_dir.clone(), outbox.clone()).unwrap();
    std::fs::write(inbox_dir.join(".photo.jpg.tmp"), &photo).unwrap();
    std::fs::rename(
        inbox_dir.join(".photo.jpg.tmp"),
        inbox_dir.join("photo.jpg"),
    )
    .unwrap();
    let via_inbox = wait_json(&outbox.join("photo.jpg.json")).await;
    for field in [
        "card_id",
        "score",
        "margin",
        "manifest_version",
        "manifest_id",
        "backend",
    ] {
        assert_eq!(via_inbox[field], via_http[field], "{field}");
    }
    assert!(outbox.join("photo.jpg").exists() && !inbox_dir.join("photo.jpg").exists());

    // A half-written file is not read early: nothing happens until the writer closes it.
    let other = encode_png(&card_image(9, 0));
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(inbox_dir.join("slow.png")).unwrap();
        f.write_all(&other[..other.len() / 2]).unwrap();
        f.flush().unwrap();
        // A complete file dropped after it is answered: the inbox has seen the half-written one, and
        // left it alone.
        std::fs::write(inbox_dir.join(".later.jpg.tmp"), &photo).unwrap();
        std::fs::rename(
            inbox_dir.join(".later.jpg.tmp"),
            inbox_dir.join("later.jpg"),
        )
        .unwrap();
        wait_json(&outbox.join("later.jpg.json")).await;
        assert!(
            !outbox.join("slow.png.json").exists(),
            "a half-written file was read"
        );
        f.write_all(&other[other.len() / 2..]).unwrap();
    }
    let slow = wait_json(&outbox.join("slow.png.json")).await;
    assert_eq!(slow["card_id"], spec.card_id(9), "{slow}");

    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
    service.shutdown();
}

async fn wait_json(path: &std::path::Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(b) = std::fs::read(path) {
            return serde_json::from_slice(&b).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn no_release_means_a_clear_error_not_a_hang() {
    let service = Service::start(
        Arc::new(Metrics::default()),
        deckhand_agent::recognizer::cpu::Cores::one(),
    )
    .unwrap();
    let err = service
        .recognize_blocking(&encode_png(&card_image(1, 0)))
        .unwrap_err();
    assert!(matches!(err, RecognizeError::NoRelease));
    service.shutdown();
    assert!(matches!(
        service.recognize_blocking(b"x"),
        Err(RecognizeError::NoRelease | RecognizeError::Stopped)
    ));
}

/// CPU time (user + system, in clock ticks) of this process's threads whose name starts with `prefix`.
fn threads_cpu_ticks(prefix: &str) -> (usize, u64) {
    let (mut threads, mut ticks) = (0, 0);
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        threads += 1;
        ticks += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    (threads, ticks)
}

/// On both CPU engines (XNNPACK, whose pool's threads are deckhand-xnn; tract, whose are
/// deckhand-cpu-N), one image on two cores answers as on one, and the pool's threads do some of the
/// work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_image_on_two_cores_answers_as_on_one_and_the_pool_does_the_work() {
    // Tract first: a rayon pool's threads end after it is dropped, not before, and the second run's
    // would be counted with the first's.
    for (backend, engine, pool, threads) in [
        (BackendChoice::Tract, "tract", "deckhand-cpu", 2),
        (BackendChoice::Cpu, "xnnpack", "deckhand-xnn", 1),
    ] {
        two_cores_answer_as_one(backend, engine, pool, threads).await;
    }
}

/// The pool's threads are those named `pool`, `threads` of them (XNNPACK's pool of two has one
/// thread beside the caller, tract's two).
async fn two_cores_answer_as_one(backend: BackendChoice, engine: &str, pool: &str, threads: usize) {
    use deckhand_agent::recognizer::cpu::Cores;
    let t = TestDir::new(&format!("cpu-cores-{engine}"));
    let (_, files, spec) = release(&t, 1, "c-");
    // The EfficientNet-Lite0-shaped embedder: its convolutions are large enough for a pool to share.
    let paths = deckhand_agent::recognizer::ReleasePaths {
        hef: files.hef.clone(),
        onnx: t.join("lite0.onnx"),
        index: files.index.clone(),
        labels: files.labels.clone(),
        metadata: files.metadata.clone(),
    };
    std::fs::write(&paths.onnx, fixtures::efficientnet_lite0_onnx(spec.dim, 5)).unwrap();
    let load = |paths: &deckhand_agent::recognizer::ReleasePaths| {
        Recognizer::load(
            paths,
            &fixtures::reference_settings(spec.dim),
            1,
            deckhand_protocol::BlobId::of(b"lite0"),
            backend,
        )
        .unwrap()
    };
    let photos: Vec<bytes::Bytes> = (0..4)
        .map(|i| bytes::Bytes::from(encode_jpeg(&card_image(i * 7, 0), 85)))
        .collect();
    let mut answers = Vec::new();
    for cores in [Cores::one(), Cores::new(2).0] {
        assert!(cores.threads() <= 2);
        let service = Service::start(Arc::new(Metrics::default()), cores.clone()).unwrap();
        let release = load(&paths);
        assert_eq!(release.engine(), engine, "is libxnnpack0 installed?");
        service.activate(release, &[]).unwrap();
        let (_, before) = threads_cpu_ticks(pool);
        let mut got = Vec::new();
        // Enough images for the pool's threads to be seen working (CPU time is counted in 1/100 s).
        for round in 0..15 {
            for p in &photos {
                let r = service.recognize(p.clone()).await.unwrap();
                if round == 0 {
                    got.push((r.card_id, r.score, r.candidates.len()));
                }
            }
        }
        let (named, after) = threads_cpu_ticks(pool);
        if cores.threads() == 2 {
            assert_eq!(named, threads, "the pool's threads named {pool}");
            assert!(
                after > before,
                "the pool's threads did none of the work ({before} ticks before, {after} after)"
            );
        }
        answers.push(got);
        service.shutdown();
    }
    for (one, two) in answers[0].iter().zip(&answers[1]) {
        assert_eq!(one.0, two.0, "the same card on one core and on two");
        assert!(
            (one.1 - two.1).abs() < 1e-5,
            "the same score on one core ({}) and on two ({})",
            one.1,
            two.1
        );
        assert_eq!(one.2, two.2);
    }
    assert_eq!(answers[0].len(), photos.len());
}

#[test]
fn strided_and_narrow_depthwise_convolutions_move_channel_last_and_answer_as_exported() {
    use deckhand_agent::recognizer::cpu::{DepthwiseLayout, image_shape, plan_model, run_plan};
    let t = TestDir::new("dw-layout");
    let dim = 64;
    let onnx = t.join("lite0.onnx");
    std::fs::write(&onnx, fixtures::efficientnet_lite0_onnx(dim, 3)).unwrap();
    let shape = image_shape(&fixtures::reference_settings(dim));
    let (chosen, moved) = plan_model(&onnx, "onnx", &shape, DepthwiseLayout::Chosen).unwrap();
    let (exported, none) = plan_model(&onnx, "onnx", &shape, DepthwiseLayout::AsExported).unwrap();
    assert_eq!(none, 0);
    // The model's four strided depthwise convolutions and the four on 7x7 (EfficientNet-Lite0's last
    // stage); the other eight stay as exported.
    assert_eq!(moved, 8, "depthwise convolutions moved channel-last");
    let mut seed = 0x9e37_79b9u32;
    let input: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32
        })
        .collect();
    let (a, a_shape) = run_plan(&chosen, &shape, &input).unwrap();
    let (b, b_shape) = run_plan(&exported, &shape, &input).unwrap();
    assert_eq!(a_shape, b_shape);
    assert_eq!(a.len(), dim);
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "the model answers zeros");
    let worst = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        worst <= 1e-4 * scale,
        "the embedding moved by {worst} (its largest value {scale}) with the layout"
    );
}
