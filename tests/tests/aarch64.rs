//! The Pi's build, run here: the aarch64 `deckhand-agent` (cross-built with the `hailo` feature against
//! the stand-in library built for aarch64; see .ci/run) under qemu-user. It imports a release into a store,
//! serves it with no network, and answers a photo with the same card as the x86_64 binary does: on the
//! CPU backend, and on the Hailo backend through the FFI path with aarch64's ABI: a HEF with 8-bit
//! per-tensor outputs, one with 16-bit per-channel outputs (the quantisation structs read across the
//! boundary), and a board that is missing (HailoRT's status code and message read back, the CPU taking
//! over). And a release with an EfficientNet-Lite0-shaped embedder on the CPU backend's XNNPACK engine
//! (Debian's arm64 libxnnpack0, unpacked by .ci/run) answers as on x86_64. What the Hailo backend does
//! beyond the ABI (swaps, network groups, error kinds) is the same code
//! on both ISAs and is tested on x86_64 (`tests/hailo.rs`). Built with `--features aarch64`.
#![cfg(feature = "aarch64")]

use deckhand_tests::fixtures::{
    self, Perturbation, ReferenceSpec, card_image, encode_jpeg, perturb,
};
use deckhand_tests::{Agent, AgentOptions, Credentials, TestDir, bin, secs, shop};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// Where the aarch64 build of this profile is: `target/aarch64-unknown-linux-gnu/<profile>`.
fn aarch64_dir() -> PathBuf {
    let native = bin("deckhand-agent");
    let profile_dir = native
        .parent()
        .unwrap_or_else(|| panic!("odd path {}", native.display()));
    let target = profile_dir
        .parent()
        .unwrap_or_else(|| panic!("odd path {}", native.display()));
    target
        .join("aarch64-unknown-linux-gnu")
        .join(profile_dir.file_name().unwrap_or_default())
}

/// The aarch64 agent, checked to be an aarch64 ELF, behind a script that runs it under qemu-user with
/// Debian's aarch64 sysroot and the aarch64 stand-in library.
fn aarch64_agent(t: &TestDir) -> PathBuf {
    let dir = aarch64_dir();
    let agent = dir.join("deckhand-agent");
    let elf = std::fs::read(&agent).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; cross-build it first (.ci/run: cargo build --target aarch64-unknown-linux-gnu \
             -p deckhand-agent --features hailo)",
            agent.display()
        )
    });
    // ELF, 64-bit, e_machine EM_AARCH64 (183).
    assert!(
        elf.starts_with(b"\x7fELF\x02") && u16::from_le_bytes([elf[18], elf[19]]) == 183,
        "{} is not an aarch64 ELF",
        agent.display()
    );
    // Debian's arm64 libxnnpack0 (and the two libraries it needs), unpacked by .ci/run's setup.
    let xnnpack = dir
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("xnnpack-aarch64/usr/lib/aarch64-linux-gnu"))
        .unwrap_or_default();
    assert!(
        xnnpack.join("libXNNPACK.so.0").exists(),
        "{} lacks libXNNPACK.so.0: unpack Debian's arm64 libxnnpack0 there (.ci/run's setup does)",
        xnnpack.display()
    );
    let script = t.join("deckhand-agent-aarch64");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nLD_LIBRARY_PATH={}:{} exec qemu-aarch64-static -L /usr/aarch64-linux-gnu {} \"$@\"\n",
            dir.display(),
            xnnpack.display(),
            agent.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// `run` flags for an agent serving its store offline on `backend`.
fn offline_args(fleet: &deckhand_tests::Fleet, name: &str, backend: &str) -> Vec<String> {
    let mut args = fleet
        .run_args(&AgentOptions {
            name: name.to_owned(),
            origin: false,
            credentials: Credentials::None,
            ..AgentOptions::default()
        })
        .unwrap();
    let at = args.iter().position(|a| a == "--backend").unwrap() + 1;
    args[at] = backend.to_owned();
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aarch64_agent_serves_offline_and_answers_like_the_x86_64_one() {
    let t = TestDir::new("aarch64");
    let arm = aarch64_agent(&t);
    let fleet = shop("aarch64-fleet").start().await.unwrap();
    let spec = ReferenceSpec::small(24);
    let files = fixtures::write_reference_release(&fleet.join("release"), &spec).unwrap();
    let bundle = fleet.join("bundle");
    deckhand_tests::publish_to_dir(&fleet, &files, &bundle).await;
    // The same release with a HEF whose output is 16-bit, quantised per channel.
    let files16 = fixtures::write_reference_release(&fleet.join("release-16"), &spec).unwrap();
    std::fs::write(
        &files16.hef,
        fixtures::hef_v0(&fixtures::standin_hef_body_with_output(
            224, 14, spec.dim, spec.seed, 16, true,
        )),
    )
    .unwrap();
    let bundle16 = fleet.join("bundle-16");
    deckhand_tests::publish_to_dir(&fleet, &files16, &bundle16).await;
    let photo = encode_jpeg(&perturb(&card_image(5, 0), Perturbation::Crop, 2), 85);
    let no_board = [("DECKHAND_STANDIN_NO_DEVICE", "1".to_owned())];

    let mut answers = Vec::new();
    for (name, binary, backend, bundle, env, answered_by) in [
        (
            "pi-x86",
            bin("deckhand-agent"),
            "cpu",
            &bundle,
            &[][..],
            "cpu",
        ),
        ("pi-arm", arm.clone(), "cpu", &bundle, &[][..], "cpu"),
        (
            "pi-arm-hailo",
            arm.clone(),
            "hailo",
            &bundle,
            &[][..],
            "hailo",
        ),
        (
            "pi-arm-hailo-16",
            arm.clone(),
            "hailo",
            &bundle16,
            &[][..],
            "hailo",
        ),
        (
            "pi-arm-no-board",
            arm.clone(),
            "auto",
            &bundle,
            &no_board[..],
            "cpu",
        ),
    ] {
        let answer = answer(&fleet, name, &binary, backend, bundle, env, &photo).await;
        assert_eq!(answer["backend"], answered_by, "{name}: {answer}");
        answers.push((name, answer["card_id"].clone(), answer["score"].as_f64()));
        if !env.is_empty() {
            // HailoRT's status code and its message came back across the aarch64 boundary.
            let log = fleet.join("logs").join(format!("{name}.log"));
            let logged = std::fs::read_to_string(&log).unwrap();
            assert!(
                logged.contains("HAILO_OUT_OF_PHYSICAL_DEVICES (74)"),
                "{name}: the missing board is not named in {}:\n{logged}",
                log.display()
            );
        }
    }
    // The same card everywhere, with the same score on the CPU (the same model on another ISA) and
    // within quantisation on the Hailo stand-in.
    let want = serde_json::json!(spec.card_id(5));
    let reference = answers[0].2.unwrap_or(f64::NAN);
    for (name, card, score) in &answers {
        assert_eq!(
            card, &want,
            "{name} answered {card}, not {want}: {answers:?}"
        );
        let tolerance = if name.contains("hailo") { 0.01 } else { 1e-4 };
        assert!(
            score.is_some_and(|s| (s - reference).abs() < tolerance),
            "{name}'s score differs from x86_64's: {answers:?}"
        );
    }
}

/// Imports `bundle` the Pi way (offline, by the binary under test), serves it with `binary` on
/// `backend` and returns its answer to `photo`, with the engine its status names under `"engine"`.
async fn answer(
    fleet: &deckhand_tests::Fleet,
    name: &str,
    binary: &Path,
    backend: &str,
    bundle: &Path,
    env: &[(&str, String)],
    photo: &[u8],
) -> serde_json::Value {
    let data_dir = fleet.join(name).display().to_string();
    let trust = fleet.trust().display().to_string();
    let out = run_path(
        binary,
        &[
            "import",
            "--data-dir",
            &data_dir,
            "--deployment",
            "shop-1",
            "--trust",
            &trust,
            "--bundle",
            &bundle.display().to_string(),
            "--backend",
            "cpu",
        ],
    );
    assert!(
        out.status.success(),
        "{name} import: {}",
        deckhand_tests::stderr(&out)
    );
    let log = fleet.join("logs").join(format!("{name}.log"));
    let agent = Agent::spawn(
        binary,
        name,
        &offline_args(fleet, name, backend),
        env,
        &[],
        &log,
    )
    .await
    .unwrap();
    let status = agent
        .wait_for(secs(120), "version 1 active", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    let (code, mut answer) = agent.recognize(photo).await.unwrap();
    assert_eq!(code, 200, "{name}: {answer}");
    answer["engine"] = serde_json::json!(status.active.and_then(|a| a.engine));
    agent.stop().await.unwrap();
    answer
}

/// A release whose embedder is EfficientNet-Lite0-shaped runs on XNNPACK on the Pi as on x86_64 (Debian's
/// arm64 libxnnpack0: its NEON kernels, and the FFI's float arguments in aarch64's registers), and
/// answers the same card with the same score as the x86_64 agent on XNNPACK and the aarch64 one on tract.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aarch64_agent_runs_a_lite0_shaped_release_on_xnnpack_and_answers_like_x86_64() {
    let t = TestDir::new("aarch64-xnnpack");
    let arm = aarch64_agent(&t);
    let fleet = shop("aarch64-xnnpack").start().await.unwrap();
    let spec = ReferenceSpec {
        model: fixtures::ModelShape::Lite0,
        ..ReferenceSpec::small(12)
    };
    let files = fixtures::write_reference_release(&fleet.join("release"), &spec).unwrap();
    let bundle = fleet.join("bundle");
    deckhand_tests::publish_to_dir(&fleet, &files, &bundle).await;
    // The very image of card 5's reference row, losslessly: the model's random weights tell cards
    // apart only by a little (they all score above 0.99), so nothing short of its own image is
    // answered by a margin no engine's rounding could upset.
    let photo = fixtures::encode_png(&card_image(5, 0));
    let mut answers = Vec::new();
    for (name, binary, backend, engine) in [
        ("pi-x86", bin("deckhand-agent"), "cpu", "xnnpack"),
        ("pi-arm", arm.clone(), "cpu", "xnnpack"),
        ("pi-arm-tract", arm.clone(), "tract", "tract"),
    ] {
        let answer = answer(&fleet, name, &binary, backend, &bundle, &[], &photo).await;
        assert_eq!(answer["engine"], engine, "{name}: {answer}");
        let margin = answer["margin"].as_f64().unwrap_or(0.0);
        assert!(margin > 1e-3, "{name}: a margin of {margin}: {answer}");
        answers.push((name, answer["card_id"].clone(), answer["score"].as_f64()));
    }
    let want = serde_json::json!(spec.card_id(5));
    let reference = answers[0].2.unwrap_or(f64::NAN);
    for (name, card, score) in &answers {
        assert_eq!(
            card, &want,
            "{name} answered {card}, not {want}: {answers:?}"
        );
        assert!(
            score.is_some_and(|s| (s - reference).abs() < 1e-4),
            "{name}'s score differs from x86_64's: {answers:?}"
        );
    }
}

/// Runs a binary (or the qemu script) and returns its output.
fn run_path(binary: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(binary)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()))
}
