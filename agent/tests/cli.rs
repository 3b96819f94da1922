//! The `deckhand-agent` command line: wrong or missing settings are clear errors naming the flag.
//! (Also makes `cargo test --workspace` build the binary the integration tests in `tests/` run.)

// Test helpers fail the test by panicking.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::process::Command;

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_deckhand-agent"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn wrong_or_missing_settings_are_named() {
    let out = agent(&["run", "--deployment", "shop-1"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a missing --trust is a usage error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--trust"));

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pub");
    std::fs::write(&key, "deckhand-ed25519-pub AAAA").unwrap();
    let data = dir.path().join("data");
    let base = [
        "run",
        "--data-dir",
        data.to_str().unwrap(),
        "--deployment",
        "shop-1",
        "--trust",
        key.to_str().unwrap(),
    ];
    let out = agent(&[&base[..], &["--backend", "gpu"]].concat());
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--backend") && err.contains("gpu"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = agent(&base);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--trust")
            && String::from_utf8_lossy(&out.stderr).contains("32 bytes")
    );
    let out = agent(&[
        "run",
        "--deployment",
        "shop 1",
        "--trust",
        key.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--deployment"));

    // Settings from a config file; a flag wins; a wrong key is named.
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "deployment = \"shop-1\"\nmdns = \"sometimes\"\n").unwrap();
    let out = agent(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--trust",
        key.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--mdns") && err.contains("sometimes"), "{err}");
    std::fs::write(&cfg, "deploy = \"shop-1\"\n").unwrap();
    let out = agent(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown setting \"deploy\"") && err.contains(cfg.to_str().unwrap()),
        "{err}"
    );
    let out = agent(&["run", "--config", "/nonexistent/agent.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/agent.toml"), "{err}");
}

#[test]
fn store_maintenance_on_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let out = agent(&[
        "store",
        "verify",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("checked 0 blobs"));
}
