//! `deckhand scenes`: a generated counter as MJPEG on stdout, a camera for the tests and the demo
//! (`--camera counter=exec:deckhand scenes --hold`), as rpicam-vid is one on a Pi.

use deckhand_tools::ToolError;
use deckhand_tools::shop::scenes::{Script, still_step};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct ScenesArgs {
    /// The script's seed: the same seed, the same frames.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Cards placed, one after another.
    #[arg(long, default_value_t = 3)]
    placements: usize,
    /// Cards are drawn from the first N of the fixtures' cards.
    #[arg(long, default_value_t = 40)]
    cards: usize,
    /// Frames a second (0: as fast as they are made).
    #[arg(long, default_value_t = 10)]
    fps: u32,
    /// Empty-counter frames sent before the script (time for the agent to get a release).
    #[arg(long, default_value_t = 0)]
    lead: usize,
    /// After the script, keep sending the empty counter until the reader goes away.
    #[arg(long)]
    hold: bool,
    /// Send this many bytes of garbage after every frame (a broken camera): the start of a JPEG, then
    /// noise.
    #[arg(long, default_value_t = 0)]
    garbage: usize,
    /// Write the script (each placement's card and corners) as JSON to this file first.
    #[arg(long)]
    truth: Option<PathBuf>,
    /// Send the empty counter until this file exists, then the script (after the lead).
    #[arg(long)]
    start_after: Option<PathBuf>,
    /// Append a line `PLACEMENT STILL_FRAME UNIX_MICROS` to this file as each frame in which a card
    /// lies still is sent (the counter benchmark's clock for still-to-message latency).
    #[arg(long)]
    still_log: Option<PathBuf>,
}

pub fn run(a: &ScenesArgs) -> Result<(), ToolError> {
    let script = Script::new(a.seed, a.placements, a.cards);
    if let Some(path) = &a.truth {
        let doc: Vec<serde_json::Value> = script
            .placements
            .iter()
            .map(|p| serde_json::json!({"card_id": p.card_id(), "corners": p.quad()}))
            .collect();
        std::fs::write(path, serde_json::to_vec_pretty(&doc).unwrap_or_default())
            .map_err(ToolError::io("write", path))?;
    }
    let stdout = Path::new("<stdout>");
    let interval = (a.fps > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(a.fps)));
    let empty = deckhand_tools::shop::fixtures::encode_jpeg(&script.empty(), 85);
    let mut out = std::io::stdout().lock();
    let mut next = Instant::now();
    let mut junk = deckhand_protocol::testdata::SplitMix(a.seed);
    let mut still_log = match &a.still_log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(ToolError::io("open", p))?,
        ),
        None => None,
    };
    // Frames sent before the script began (the lead, and the wait for `--start-after`).
    let mut before = a.lead;
    let mut waiting = a.start_after.is_some();
    for i in 0.. {
        if waiting && a.start_after.as_deref().is_some_and(Path::exists) {
            waiting = false;
            before = before.max(i);
        }
        // The script's frame and whether a card lies still in it (placement, index of the still frame).
        let mut still = None;
        let frame = if waiting || i < before {
            empty.clone()
        } else if i - before < script.len() {
            let (img, truth) = script.frame(i - before);
            still = truth.still.zip(still_step(i - before));
            deckhand_tools::shop::fixtures::encode_jpeg(&img, 85)
        } else if a.hold {
            empty.clone()
        } else {
            break;
        };
        if let Some(d) = interval {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            next += d;
        }
        let mut bytes = frame;
        if a.garbage > 0 {
            bytes.extend([0xFF, 0xD8, 0xFF, 0xE0]);
            bytes.extend((4..a.garbage).map(|_| junk.next_u64() as u8));
        }
        match out.write_all(&bytes).and_then(|()| out.flush()) {
            Ok(()) => {
                if let (Some(log), Some((k, j))) = (still_log.as_mut(), still) {
                    let at = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_micros();
                    writeln!(log, "{k} {j} {at}").map_err(ToolError::io(
                        "write",
                        a.still_log.as_deref().unwrap_or(stdout),
                    ))?;
                }
            }
            // The camera's reader went away: done.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(ToolError::io("write", stdout)(e)),
        }
    }
    Ok(())
}
