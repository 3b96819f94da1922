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
    let _g = DEVICE.lock().unwrap();
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
    let _g = DEVICE.lock().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files =
        fixtures::write_sample_release(dir.path(), &fixtures::SampleSpec::small(2)).unwrap();
    let settings = RecognizerSettings {
        input_width: 32,
        input_height: 32,
        ..fixtures::reference_settings(64)
    };
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
    assert!(
        err.to_string().contains("HAILO_OPEN_FILE_FAILURE (13)"),
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
