//! The Hailo backend's FFI path against the test stand-in library (never HailoRT; see .ci/run): buffer
//! layouts, quantisation and error codes, with no Hailo device. Built with `--features hailo`.
#![cfg(feature = "hailo")]

// Run against the test stand-in library (see .ci/run): the FFI path, buffer layouts, quantisation and
// error codes, with no Hailo device.
use deckhand_agent::recognizer::cpu::CpuEmbedder;
use deckhand_agent::recognizer::hailo::*;
use deckhand_agent::recognizer::{BackendError, Embedder as _};
use deckhand_protocol::manifest::RecognizerSettings;
use deckhand_tools::shop::fixtures::{self, ReferenceSpec};
use std::sync::Mutex;

unsafe extern "C" {
    /// Exported by the test stand-in only.
    fn deckhand_standin_set_device_present(present: bool);
}

static DEVICE: Mutex<()> = Mutex::new(());

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (n(a) * n(b))
}

#[test]
fn the_hailo_path_embeds_like_the_onnx_model_and_recognises_cards() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let spec = ReferenceSpec::small(30);
    let files = fixtures::write_reference_release(dir.path(), &spec).unwrap();
    let settings = fixtures::reference_settings(spec.dim);
    let mut hailo = HailoEmbedder::load(&files.hef, &settings).unwrap();
    let mut cpu = CpuEmbedder::load(&files.onnx, &settings).unwrap();
    assert_eq!(hailo.dim(), 768);
    let mut input = Vec::new();
    for card in [0, 7] {
        deckhand_agent::recognizer::preprocess::to_tensor(
            &fixtures::card_image(card, 0),
            &settings,
            &mut input,
        );
    }
    let (h, c) = (
        hailo.embed(&input, 2).unwrap(),
        cpu.embed(&input, 2).unwrap(),
    );
    for i in 0..2 {
        let sim = cosine(&h[i * 768..(i + 1) * 768], &c[i * 768..(i + 1) * 768]);
        assert!(
            sim > 0.995,
            "quantised Hailo embedding {i} drifted from ONNX: cosine {sim}"
        );
    }
    // The whole recognizer on the Hailo backend.
    let paths = deckhand_agent::recognizer::ReleasePaths {
        hef: files.hef.clone(),
        onnx: files.onnx.clone(),
        index: files.index.clone(),
        labels: files.labels.clone(),
        metadata: files.metadata.clone(),
    };
    let rec = deckhand_agent::recognizer::Recognizer::load(
        &paths,
        &settings,
        1,
        deckhand_protocol::BlobId::of(b"1"),
        deckhand_agent::recognizer::BackendChoice::Hailo,
    )
    .unwrap();
    assert_eq!(rec.backend(), "hailo");
    let photo = fixtures::perturb(
        &fixtures::card_image(11, 0),
        fixtures::Perturbation::Jpeg60,
        1,
    );
    let r = rec
        .recognize(&[photo], &[std::time::Instant::now()])
        .unwrap();
    assert_eq!(r[0].card_id.as_deref(), Some(spec.card_id(11).as_str()));
    assert_eq!(r[0].backend, "hailo");
}

#[test]
fn a_missing_device_and_a_bad_hef_are_clear_errors() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let files =
        fixtures::write_sample_release(dir.path(), &fixtures::SampleSpec::small(2)).unwrap();
    let settings = RecognizerSettings {
        input_width: 32,
        input_height: 32,
        ..fixtures::reference_settings(64)
    };
    // No release holds the board: the vdevice an earlier test left is released with its groups.
    assert_eq!(release_unused(), 0);
    assert_eq!(standin_groups(), 0);
    // SAFETY: a plain setter exported by the stand-in.
    unsafe { deckhand_standin_set_device_present(false) };
    let err = HailoEmbedder::load(&files.hef, &settings).err().unwrap();
    unsafe { deckhand_standin_set_device_present(true) };
    assert!(
        matches!(err, BackendError::NoDevice(ref m) if m.contains("HAILO_OUT_OF_PHYSICAL_DEVICES (74)")),
        "{err}"
    );
    // auto falls back to the CPU when no device answers.
    let bad = dir.path().join("bad.hef");
    std::fs::write(&bad, fixtures::hef_v0(b"not a network")).unwrap();
    let err = HailoEmbedder::load(&bad, &settings).err().unwrap();
    assert!(err.to_string().contains("HAILO_INVALID_HEF (26)"), "{err}");
    let err = HailoEmbedder::load(&dir.path().join("missing.hef"), &settings)
        .err()
        .unwrap();
    // (Read and hashed before HailoRT opens it: the file's error, named.)
    assert!(
        err.to_string().contains("missing.hef") && err.to_string().contains("No such file"),
        "{err}"
    );
    // A release whose input size disagrees with the HEF is refused at load.
    let wrong = RecognizerSettings {
        input_width: 64,
        input_height: 64,
        ..settings
    };
    let err = HailoEmbedder::load(&files.hef, &wrong).err().unwrap();
    assert!(err.to_string().contains("input frame"), "{err}");
}

unsafe extern "C" {
    /// Exported by the test stand-in only: network groups configured on live vdevices.
    fn deckhand_standin_network_groups() -> usize;
}

fn standin_groups() -> usize {
    // SAFETY: a plain getter exported by the stand-in.
    unsafe { deckhand_standin_network_groups() }
}

fn two_cards(settings: &RecognizerSettings) -> Vec<f32> {
    let mut input = Vec::new();
    for card in [0, 7] {
        deckhand_agent::recognizer::preprocess::to_tensor(
            &fixtures::card_image(card, 0),
            settings,
            &mut input,
        );
    }
    input
}

#[test]
fn sixteen_bit_and_per_channel_outputs_are_read_as_float32_and_embed_like_onnx() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let spec = ReferenceSpec::small(8);
    let files = fixtures::write_reference_release(dir.path(), &spec).unwrap();
    let settings = fixtures::reference_settings(spec.dim);
    let input = two_cards(&settings);
    let expected = CpuEmbedder::load(&files.onnx, &settings)
        .unwrap()
        .embed(&input, 2)
        .unwrap();
    for (bits, per_channel) in [(8, true), (16, false), (16, true)] {
        let hef = dir.path().join(format!("model-{bits}-{per_channel}.hef"));
        std::fs::write(
            &hef,
            fixtures::hef_v0(&fixtures::standin_hef_body_with_output(
                224,
                14,
                spec.dim,
                spec.seed,
                bits,
                per_channel,
            )),
        )
        .unwrap();
        let got = HailoEmbedder::load(&hef, &settings)
            .unwrap()
            .embed(&input, 2)
            .unwrap();
        for i in 0..2 {
            let sim = cosine(
                &got[i * 768..(i + 1) * 768],
                &expected[i * 768..(i + 1) * 768],
            );
            assert!(
                sim > 0.995,
                "{bits}-bit output (per channel: {per_channel}), image {i}: cosine {sim} to ONNX"
            );
        }
    }
}

#[test]
fn a_hundred_swaps_between_two_hefs_fail_no_request_and_reuse_their_network_groups() {
    use deckhand_agent::metrics::Metrics;
    use deckhand_agent::recognizer::service::Service;
    use deckhand_agent::recognizer::{BackendChoice, Recognizer, ReleasePaths};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let spec = ReferenceSpec::small(20);
    let files = fixtures::write_reference_release(dir.path(), &spec).unwrap();
    let settings = fixtures::reference_settings(spec.dim);
    // Two HEFs of the same network with different bytes (8- and 16-bit output): every answer is the same
    // card whichever is live.
    let other_hef = dir.path().join("model-16.hef");
    std::fs::write(
        &other_hef,
        fixtures::hef_v0(&fixtures::standin_hef_body_with_output(
            224, 14, spec.dim, spec.seed, 16, false,
        )),
    )
    .unwrap();
    let paths = |hef: &std::path::Path| ReleasePaths {
        hef: hef.to_owned(),
        onnx: files.onnx.clone(),
        index: files.index.clone(),
        labels: files.labels.clone(),
        metadata: files.metadata.clone(),
    };
    let load = |version: u64| {
        let hef = if version % 2 == 1 {
            files.hef.as_path()
        } else {
            other_hef.as_path()
        };
        Recognizer::load(
            &paths(hef),
            &settings,
            version,
            deckhand_protocol::BlobId::of(&version.to_le_bytes()),
            BackendChoice::Hailo,
        )
        .unwrap_or_else(|e| panic!("version {version} did not load: {e}"))
    };
    let canary = fixtures::encode_jpeg(&fixtures::card_image(4, 0), 90);
    let canaries = [(canary, spec.card_id(4))];
    let service = Service::start(
        Arc::new(Metrics::default()),
        deckhand_agent::recognizer::cpu::Cores::one(),
    )
    .unwrap();
    service.activate(load(1), &canaries).unwrap();
    let groups_before = standin_groups();

    // A client recognises a card the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = {
        let (service, stop, answered, failed) = (
            service.clone(),
            stop.clone(),
            answered.clone(),
            failed.clone(),
        );
        let photo = fixtures::encode_jpeg(
            &fixtures::perturb(&fixtures::card_image(9, 0), fixtures::Perturbation::Crop, 1),
            85,
        );
        let want = spec.card_id(9);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match service.recognize_blocking(&photo) {
                    Ok(r)
                        if r.card_id.as_deref() == Some(want.as_str()) && r.backend == "hailo" =>
                    {
                        answered.fetch_add(1, Ordering::Relaxed)
                    }
                    other => {
                        eprintln!("failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };
    for version in 2..=101 {
        service
            .activate(load(version), &canaries)
            .unwrap_or_else(|e| panic!("swap to version {version}: {e}"));
    }
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    assert_eq!(service.active().unwrap().version, 101);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed");
    assert!(answered.load(Ordering::Relaxed) > 0);
    // 100 swaps on a device allowing 32 groups: the two HEFs' groups were configured once each.
    let groups_after = standin_groups();
    assert!(
        groups_after <= groups_before + 1,
        "network groups went from {groups_before} to {groups_after} over 100 swaps"
    );
    service.shutdown();
}

#[test]
fn a_full_vdevice_is_recreated_once_no_release_uses_it() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let settings = RecognizerSettings {
        input_width: 32,
        input_height: 32,
        ..fixtures::reference_settings(64)
    };
    let hef = |seed: u64| {
        let p = dir.path().join(format!("model-{seed}.hef"));
        std::fs::write(
            &p,
            fixtures::hef_v0(&fixtures::standin_hef_body(32, 4, 64, seed)),
        )
        .unwrap();
        p
    };
    // Distinct HEFs, all held (as live releases would): the vdevice fills, then refuses, naming why.
    let mut held = Vec::new();
    let err = loop {
        match HailoEmbedder::load(&hef(1000 + held.len() as u64), &settings) {
            Ok(e) => held.push(e),
            Err(e) => break e,
        }
        assert!(
            held.len() <= GROUP_LIMIT,
            "more groups than a vdevice holds"
        );
    };
    assert!(matches!(err, BackendError::DeviceFull(_)), "{err}");
    assert!(err.to_string().contains("32 network groups"), "{err}");
    assert_eq!(standin_groups(), GROUP_LIMIT);
    assert_eq!(configured_groups().0, GROUP_LIMIT);

    // With the device full, a release under `auto` runs on the CPU; one under `hailo` is refused.
    let sample =
        fixtures::write_sample_release(dir.path(), &fixtures::SampleSpec::small(2)).unwrap();
    let paths = deckhand_agent::recognizer::ReleasePaths {
        hef: hef(5000),
        onnx: sample.onnx.clone(),
        index: sample.index.clone(),
        labels: sample.labels.clone(),
        metadata: sample.metadata.clone(),
    };
    let rec = deckhand_agent::recognizer::Recognizer::load(
        &paths,
        &settings,
        1,
        deckhand_protocol::BlobId::of(b"full"),
        deckhand_agent::recognizer::BackendChoice::Auto,
    )
    .unwrap();
    assert_eq!(rec.backend(), "cpu");

    // Once nothing uses it, the next load releases the vdevice (and every group) and starts afresh.
    drop(held);
    let fresh = HailoEmbedder::load(&hef(2000), &settings).unwrap();
    assert_eq!(standin_groups(), 1);
    assert_eq!(configured_groups(), (1, 1));
    drop(fresh);
}

/// A release's detector on the Hailo: its HEF is a second network group on the embedder's vdevice
/// (one vdevice, two groups), and it finds what the same detector finds on the CPU, the frame written
/// as float32 NHWC and the output read as float32. A detector HEF whose output does not fit the
/// release's settings leaves the detector on the CPU.
#[test]
fn the_detector_shares_the_embedders_vdevice_and_finds_what_the_cpu_finds() {
    use deckhand_agent::camera::detector::{CpuDetector, Letterbox};
    use deckhand_agent::recognizer::{BackendChoice, Recognizer, ReleasePaths, load_detector};
    use deckhand_protocol::manifest::DetectorSettings;
    use deckhand_tools::shop::scenes::Script;
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(release_unused(), 0);
    let dir = tempfile::tempdir().unwrap();
    let spec = ReferenceSpec::small(40);
    let files = fixtures::write_reference_release(&dir.path().join("release"), &spec).unwrap();
    let s = DetectorSettings {
        input_width: 640,
        input_height: 480,
        classes: 1,
        card_class: 0,
        min_score: 0.5,
        iou: 0.5,
    };
    let script = Script::new(3, 2, 40);
    let lb = Letterbox::of(1280, 960, &s);
    let mut anchors: Vec<Vec<f32>> = script
        .placements
        .iter()
        .zip([0.9, 0.7])
        .map(|(p, score)| {
            deckhand_tools::shop::onnx::obb_anchor(&p.quad().map(|c| lb.to_input(c)), score, 1)
        })
        .collect();
    anchors.resize(60, vec![10.0, 10.0, 5.0, 5.0, 0.1, 0.0]);
    let det =
        fixtures::write_known_detector(&dir.path().join("detector"), 640, 480, &anchors).unwrap();

    let paths = ReleasePaths {
        hef: files.hef.clone(),
        onnx: files.onnx.clone(),
        index: files.index.clone(),
        labels: files.labels.clone(),
        metadata: files.metadata.clone(),
    };
    let rec = Recognizer::load(
        &paths,
        &fixtures::reference_settings(spec.dim),
        1,
        deckhand_protocol::BlobId::of(b"1"),
        BackendChoice::Hailo,
    )
    .unwrap();
    assert_eq!(rec.backend(), "hailo");
    let mut hailo = load_detector(&det.onnx, &det.hef, &s, rec.backend()).unwrap();
    assert_eq!(hailo.name(), "hailo");
    assert_eq!(configured_groups(), (2, 2), "embedder and detector");
    assert_eq!(standin_groups(), 2, "on one vdevice");

    let frame = script.empty();
    let mut cpu = CpuDetector::load(&det.onnx, &s).unwrap();
    let (h, c) = (hailo.detect(&frame).unwrap(), cpu.detect(&frame).unwrap());
    assert_eq!(h.len(), 2, "{h:?}");
    for (a, b) in h.iter().zip(&c) {
        assert_eq!(a.score, b.score);
        let err = deckhand_agent::camera::geometry::corner_error(&a.quad, &b.quad);
        assert!(err < 0.01, "{err} px apart: {a:?} {b:?}");
    }
    // The recognizer holds it as the live release's detector.
    let rec = rec.with_detector(hailo);
    assert_eq!(rec.detector_backend(), Some("hailo"));
    let found = rec.detect(&frame).unwrap().unwrap();
    assert_eq!(found.len(), 2);

    // Settings with two classes expect 7 values an anchor; the HEF's 360 values are not whole
    // anchors of 7, so the Hailo refuses it and the CPU's tract plan is asked (which refuses it too,
    // naming its shape): no half-working detector.
    let wrong = DetectorSettings { classes: 2, ..s };
    let err = load_detector(&det.onnx, &det.hef, &wrong, "hailo")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("[1, 6, 60]"), "{err}");
    drop(rec);
    assert_eq!(release_unused(), 0);
}
