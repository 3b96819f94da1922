//! Logging set-up shared by deckhand's binaries: structured `tracing` output to stderr.

use tracing_subscriber::EnvFilter;

/// Installs a stderr subscriber filtered by `RUST_LOG` (default `info`), as JSON when `json` is set.
/// Under systemd (`JOURNAL_STREAM` set: stderr goes to the journal, which stamps every line itself)
/// lines are plain: no colour, no timestamp. Colour only ever goes to a terminal: stderr redirected
/// to a file or a pipe gets plain lines.
pub fn init(json: bool) {
    use std::io::IsTerminal as _;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests running several commands in one process) keeps the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else if journal {
        builder.with_ansi(false).without_time().try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}

/// Installs a subscriber writing plain lines (no colour) to `path`, filtered like [`init`]: for a
/// command whose stdout tells a story of its own (`deckhand demo`).
pub fn init_file(path: &std::path::Path) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    Ok(())
}
