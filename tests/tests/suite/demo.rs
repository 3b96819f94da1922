//! `deckhand demo`, the README's first command, run as a newcomer runs it: its output tells the story in
//! plain lines, and no log line reaches the terminal (they go to demo.log, whose path is printed).

use deckhand_tests::bin;

/// Whether a line looks like a `tracing` log line: an ANSI escape, an RFC 3339 timestamp at the start, or
/// a level word in a log's position.
fn looks_like_a_log_line(line: &str) -> bool {
    let b = line.as_bytes();
    let timestamp =
        b.len() > 20 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[10] == b'T';
    let level = [" INFO ", " WARN ", " ERROR ", " DEBUG ", " TRACE "]
        .iter()
        .any(|l| line.contains(l) || line.starts_with(l.trim_start()));
    line.contains('\u{1b}') || timestamp || level
}

#[test]
fn the_demo_tells_its_story_without_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin("deckhand"))
        .args(["demo", "--agents", "2", "--dir"])
        .arg(dir.path())
        .env("DECKHAND_AGENT_BIN", bin("deckhand-agent"))
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo failed:\n{stdout}\n{stderr}");
    let log = dir.path().join("demo.log");
    for story in [
        format!("logs in {}", log.display()),
        "== 1. generate a sample release".into(),
        "signed and published version 1".into(),
        "pi-1: started; http".into(),
        "pi-2: version 1 verified and active; fetched".into(),
        "x the release".into(),
        "== 4. recognise photos of cards".into(),
        "of 4 recognised; the photos are in".into(),
        "version 2 swapped in on every agent".into(),
        "0 failed, 0 saw a mix of two releases".into(),
        "== 5. a Pi with a camera on the counter".into(),
        "3 of 3 cards on the counter recognised, each once".into(),
        "== 7. the fleet as pi-1 sees it".into(),
        "demo done in".into(),
        "run `deckhand demo --keep`".into(),
    ] {
        assert!(
            stdout.contains(&story),
            "the story lacks {story:?}:\n{stdout}"
        );
    }
    // Sizes are for people.
    assert!(
        stdout.contains(" KiB") || stdout.contains(" MiB"),
        "no human sizes:\n{stdout}"
    );
    for line in stdout.lines().chain(stderr.lines()) {
        assert!(
            !looks_like_a_log_line(line),
            "a log line reached the terminal: {line:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
    }
    assert!(stderr.trim().is_empty(), "stderr is not empty:\n{stderr}");
    // The logs went to the file instead.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.lines().any(|l| l.contains(" INFO ")),
        "demo.log holds no log line:\n{logged}"
    );
}

/// A bench prints figures and nothing else: its logs go to a file (`--log`, or deckhand-bench.log in
/// the temporary directory), on stderr only with `-v`, and without colour codes when stderr is not a
/// terminal.
#[test]
fn a_bench_prints_figures_and_its_logs_go_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("bench.log");
    let bench = |extra: &[&str]| {
        let out = std::process::Command::new(bin("deckhand"))
            .args(["bench", "fleet", "--agents", "2", "--size", "2"])
            .args(extra)
            .env("DECKHAND_AGENT_BIN", bin("deckhand-agent"))
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (stdout, stderr) = bench(&["--log", log.to_str().unwrap()]);
    assert!(stdout.contains("fleet, warm start"), "{stdout}");
    for line in stdout.lines().chain(stderr.lines()) {
        assert!(!looks_like_a_log_line(line), "a log line: {line:?}");
    }
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains(" INFO "), "{logged}");
    assert!(!logged.contains('\u{1b}'), "colour in the log file");
    // -v: the logs on stderr, plain (stderr is a pipe here, not a terminal).
    let (_, stderr) = bench(&["-v"]);
    assert!(stderr.contains(" INFO "), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "colour on a pipe: {stderr}");
}
