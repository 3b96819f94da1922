//! The `deckhand` command line: help, usage errors (exit 2) that name the flag.
//! (Also makes `cargo test --workspace` build the binary the integration tests in `tests/` run.)

// Test helpers fail the test by panicking.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::process::Command;

fn deckhand(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_deckhand"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn help_and_usage_errors() {
    let out = deckhand(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "keygen", "publish", "versions", "rollback", "verify", "bundle", "bench",
    ] {
        assert!(help.contains(cmd), "{cmd} missing from --help");
    }
    let out = deckhand(&["keygen"]);
    assert_eq!(out.status.code(), Some(2));
    let out = deckhand(&[
        "verify",
        "--origin",
        "http://bucket",
        "--deployment",
        "shop-1",
        "--trust",
        "k.pub",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--origin"));
    let out = deckhand(&[
        "versions",
        "--origin",
        "file:///tmp",
        "--deployment",
        "../x",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--deployment"));
}
