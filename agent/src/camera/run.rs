//! A camera at work: its source read by a task into a one-frame slot, its frames analysed by a thread.

use super::{CROP_H, CROP_W, Frame, finder, geometry, source, tracker};
use crate::events::Recorder;
use crate::metrics::Via;
use crate::recognizer::service::Service;
use deckhand_protocol::status::CameraStatus;
use geometry::Quad;
use source::Source;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A crop less sharp than this (variance of the Laplacian) is not recognised; the card is tried again
/// when it is next still.
const MIN_SHARPNESS: f32 = 15.0;
/// The analysis rate while nothing on the counter differs from the background.
const IDLE_INTERVAL: Duration = Duration::from_millis(500);

/// `NAME=SOURCE`, as `--camera` takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CameraSpec {
    pub name: String,
    pub source: Source,
}

impl std::str::FromStr for CameraSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, source) = s
            .split_once('=')
            .ok_or("a camera is NAME=SOURCE, e.g. counter=exec:rpicam-vid ... -o -")?;
        if !deckhand_protocol::event::valid_source(name) || name == "http" || name == "inbox" {
            return Err(format!(
                "camera name {name:?}: use up to 32 of a-z, 0-9, - and _ (not http or inbox)"
            ));
        }
        Ok(CameraSpec {
            name: name.to_owned(),
            source: source.parse()?,
        })
    }
}

/// The newest frame read and not yet analysed.
#[derive(Default)]
pub struct Slot {
    frame: Mutex<(Option<Frame>, bool)>,
    ready: Condvar,
    /// Frames replaced before they were analysed.
    dropped: AtomicU64,
    /// Frames read.
    read: AtomicU64,
}

impl Slot {
    pub fn put(&self, frame: Frame) {
        self.read.fetch_add(1, Ordering::Relaxed);
        let mut f = crate::locks::lock(&self.frame, "camera frame");
        if f.0.replace(frame).is_some() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.ready.notify_one();
    }

    /// Waits (at most `limit`) for a frame; `Err` once closed.
    fn take(&self, limit: Duration) -> Result<Option<Frame>, ()> {
        let f = crate::locks::lock(&self.frame, "camera frame");
        let (mut f, _) = self
            .ready
            .wait_timeout_while(f, limit, |f| f.0.is_none() && !f.1)
            .map_err(|_| ())?;
        if f.1 {
            return Err(());
        }
        Ok(f.0.take())
    }

    fn close(&self) {
        crate::locks::lock(&self.frame, "camera frame").1 = true;
        self.ready.notify_all();
    }
}

/// A frame as analysed: the frame the camera sent and the cards found in it.
#[derive(Clone, Debug)]
pub struct Analysed {
    pub frame: Arc<Frame>,
    pub width: u32,
    pub height: u32,
    pub cards: Vec<Quad>,
}

/// What a camera shows in status, updated by its reader and its analysis.
pub struct CameraState {
    status: Mutex<CameraStatus>,
    /// The newest frame analysed, for the page.
    latest: Mutex<Option<Analysed>>,
    slot: Arc<Slot>,
}

impl CameraState {
    fn new(spec: &CameraSpec, slot: Arc<Slot>) -> Arc<Self> {
        Arc::new(CameraState {
            status: Mutex::new(CameraStatus {
                name: spec.name.clone(),
                source: spec.source.to_string(),
                state: "starting".into(),
                ..CameraStatus::default()
            }),
            latest: Mutex::new(None),
            slot,
        })
    }

    fn with(&self, f: impl FnOnce(&mut CameraStatus)) {
        f(&mut crate::locks::lock(&self.status, "camera status"));
    }

    pub(super) fn running(&self) {
        self.with(|s| s.state = "running".into());
    }

    pub(super) fn ended(&self) {
        self.with(|s| s.state = "ended".into());
    }

    pub(super) fn failed(&self, why: String, retry: Duration) {
        self.with(|s| {
            s.state = format!("restarting in {} s", retry.as_secs());
            s.restarts += 1;
            s.last_error = Some(why);
        });
    }

    /// What the stream's splitter refused and skipped since the source started.
    pub(super) fn stream(&self, refused: u64, skipped: u64) {
        self.with(|s| {
            s.refused_in_stream = refused;
            s.skipped_bytes = skipped;
        });
    }

    /// The camera's status now.
    pub fn status(&self) -> CameraStatus {
        let mut s = crate::locks::lock(&self.status, "camera status").clone();
        s.frames_read = self.slot.read.load(Ordering::Relaxed);
        s.frames_dropped = self.slot.dropped.load(Ordering::Relaxed);
        s
    }

    pub fn name(&self) -> String {
        crate::locks::lock(&self.status, "camera status")
            .name
            .clone()
    }

    /// The newest analysed frame and the cards outlined in it.
    pub fn latest(&self) -> Option<Analysed> {
        crate::locks::lock(&self.latest, "camera frame").clone()
    }
}

/// Which frames are analysed: at most one per interval in the long run. A frame up to a quarter of the
/// interval early is on time: a camera's frames come with jitter, and with a strict "a full interval
/// since the last one" a camera sending exactly `camera_fps` had every other frame skipped.
#[derive(Debug, Default)]
struct Pace {
    /// When the last analysed frame was due (advances by whole intervals).
    due: Option<Instant>,
}

impl Pace {
    /// Whether a frame arriving `now` is analysed, at one frame per `interval`.
    fn take(&mut self, now: Instant, interval: Duration) -> bool {
        let slack = interval / 4;
        if let Some(due) = self.due
            && now + slack < due + interval
        {
            return false;
        }
        let earliest = now.checked_sub(slack).unwrap_or(now);
        self.due = Some(self.due.map_or(now, |d| (d + interval).max(earliest)));
        true
    }
}

/// What the analysis needs besides its frames.
#[derive(Clone)]
pub struct Counter {
    pub service: Service,
    pub recorder: Option<Arc<Recorder>>,
    pub fps: u32,
    pub stillness: tracker::Stillness,
}

/// A running camera: its reader task (on the daemon's task set) and its analysis thread.
pub struct Camera {
    pub state: Arc<CameraState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Camera {
    /// Starts the camera's reader on `tasks` and its analysis thread.
    pub fn start(
        spec: CameraSpec,
        counter: Counter,
        stop: tokio::sync::watch::Receiver<bool>,
        tasks: &mut tokio::task::JoinSet<()>,
        span: &tracing::Span,
    ) -> std::io::Result<Camera> {
        use tracing::Instrument as _;
        let slot = Arc::new(Slot::default());
        let state = CameraState::new(&spec, slot.clone());
        let reader = source::run(
            spec.source.clone(),
            counter.fps,
            slot.clone(),
            state.clone(),
            stop,
        );
        let cam_span = tracing::info_span!(parent: span, "camera", camera = %spec.name);
        tasks.spawn(reader.instrument(cam_span.clone()));
        let thread = {
            let state = state.clone();
            let name = spec.name.clone();
            std::thread::Builder::new()
                .name(format!("deckhand-cam-{}", spec.name))
                .spawn(move || {
                    let _g = cam_span.enter();
                    Analysis::new(name, counter, state).run(&slot);
                })?
        };
        Ok(Camera {
            state,
            thread: Some(thread),
        })
    }

    /// Ends the analysis thread (the reader ends with the daemon's stop).
    pub fn stop(mut self) {
        self.state.slot.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The analysis of one camera's frames.
struct Analysis {
    name: String,
    counter: Counter,
    state: Arc<CameraState>,
    finder: finder::Finder,
    tracker: tracker::Tracker,
}

impl Analysis {
    fn new(name: String, counter: Counter, state: Arc<CameraState>) -> Self {
        let stillness = counter.stillness;
        Analysis {
            name,
            counter,
            state,
            finder: finder::Finder::new(),
            tracker: tracker::Tracker::new(stillness),
        }
    }

    fn run(mut self, slot: &Slot) {
        let busy_interval = Duration::from_secs_f64(1.0 / f64::from(self.counter.fps.max(1)));
        let mut interval = busy_interval;
        let mut pace = Pace::default();
        loop {
            let frame = match slot.take(Duration::from_millis(250)) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(()) => return,
            };
            // At most the camera's rate, and slower while the counter is idle: frames between are
            // skipped undecoded.
            if !pace.take(Instant::now(), interval) {
                slot.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let image = match frame.decode() {
                Ok(i) => i,
                Err(e) => {
                    self.state.with(|s| {
                        s.frames_refused += 1;
                        s.last_error = Some(format!("a frame does not decode: {e}"));
                    });
                    continue;
                }
            };
            // The finder always runs: it is the motion gate, and the cards when the live release has
            // no detector.
            let found = self.finder.find(&image);
            if found.foreground == 0 {
                self.tracker.clear_memory();
            }
            let (cards, by) = self.cards(&image, &found);
            let ready = self.tracker.update(&cards);
            interval = if found.foreground == 0 && !self.tracker.busy() {
                IDLE_INTERVAL.max(busy_interval)
            } else {
                busy_interval
            };
            self.state.with(|s| {
                s.frames_analysed += 1;
                s.cards_in_view = cards.len() as u32;
                if s.finder != by {
                    s.finder = by.to_owned();
                }
            });
            *crate::locks::lock(&self.state.latest, "camera frame") = Some(Analysed {
                frame: Arc::new(frame),
                width: image.width(),
                height: image.height(),
                cards,
            });
            for r in ready {
                if !self.recognise(&image, r.quad) {
                    self.tracker.retry(r.track);
                }
            }
        }
    }

    /// The cards in a frame, and what found them: the live release's detector when it has one, else
    /// the classical finder's. The detector runs only while something differs from the learnt counter:
    /// an idle counter costs the finder's millisecond, not a detector pass.
    fn cards(&self, image: &image::RgbImage, found: &finder::Finding) -> (Vec<Quad>, &'static str) {
        let live = self.counter.service.active();
        let Some(release) = live.filter(|r| r.has_detector()) else {
            return (found.cards.clone(), "classical");
        };
        if found.foreground == 0 {
            return (Vec::new(), "detector");
        }
        match release.detect(image) {
            Some(Ok(d)) => (d.into_iter().map(|d| d.quad).collect(), "detector"),
            Some(Err(e)) => {
                self.state
                    .with(|s| s.last_error = Some(format!("the detector failed: {e}")));
                (Vec::new(), "detector")
            }
            None => (found.cards.clone(), "classical"),
        }
    }

    /// Recognises the card at `quad` (both ways up) and records the better answer. `false` when it
    /// could not be recognised now (not sharp, the recognizer busy or without a release).
    fn recognise(&self, image: &image::RgbImage, quad: Quad) -> bool {
        let readings = [quad, geometry::rotate_half(quad)];
        let crops: Vec<_> = readings
            .iter()
            .filter_map(|q| geometry::warp(image, q, CROP_W, CROP_H))
            .collect();
        if crops.len() != 2 || geometry::sharpness(&crops[0]) < MIN_SHARPNESS {
            return false;
        }
        let started = Instant::now();
        let answers: Vec<_> = crops
            .into_iter()
            .map(|c| {
                self.counter
                    .service
                    .recognize_image_blocking(c, Via::Camera)
            })
            .collect();
        let best = answers
            .into_iter()
            .zip(readings)
            .filter_map(|(a, q)| a.ok().map(|a| (a, q)))
            .max_by(|a, b| a.0.score.total_cmp(&b.0.score));
        let Some((mut answer, corners)) = best else {
            self.state.with(|s| {
                s.last_error = Some("the recognizer did not answer (busy, or no release)".into())
            });
            return false;
        };
        answer.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let metrics = self.counter.service.metrics();
        metrics.recognition(answer.card_id.is_some(), started.elapsed().as_secs_f64());
        metrics.remember(&answer, &self.name);
        if let Some(r) = &self.counter.recorder {
            r.record(&answer, &self.name, Some(corners));
        }
        tracing::info!(card = ?answer.card_id, score = answer.score, "card recognised on the counter");
        self.state.with(|s| {
            s.placements += 1;
            s.last_card = answer.card_id.clone();
        });
        true
    }
}

/// Every camera's status.
pub fn statuses(cameras: &[Arc<CameraState>]) -> Vec<CameraStatus> {
    cameras.iter().map(|c| c.status()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_at_the_camera_rate_are_all_analysed_and_faster_ones_are_paced() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let interval = Duration::from_millis(100);
        // 10 a second with +-20 ms of jitter: every one.
        let mut pace = Pace::default();
        let jitter = [0, 20, -20, 15, -10, 0, 20, -20, 5, -5];
        let taken = (0..100)
            .filter(|i| {
                pace.take(
                    at((1000 + i * 100 + jitter[(*i % 10) as usize]) as u64),
                    interval,
                )
            })
            .count();
        assert_eq!(taken, 100);
        // 30 a second: 10 of them a second, not more.
        let mut pace = Pace::default();
        let taken = (0..300)
            .filter(|i| pace.take(at(i * 1000 / 30), interval))
            .count();
        assert!((99..=101).contains(&taken), "{taken} of 300 frames in 10 s");
        // After a pause no burst: never two frames closer than three quarters of the interval, and
        // the second after the pause holds 10 a second too.
        let mut pace = Pace::default();
        assert!(pace.take(at(0), interval));
        let taken: Vec<u64> = (0..30)
            .map(|i| 5000 + i * 1000 / 30)
            .filter(|t| pace.take(at(*t), interval))
            .collect();
        assert!(taken.windows(2).all(|w| w[1] - w[0] >= 66), "{taken:?}");
        assert!(taken.len() <= 11, "{taken:?}");
    }

    #[test]
    fn camera_specs_name_a_topic_safe_camera_and_a_source() {
        let c: CameraSpec = "counter=exec:rpicam-vid -t 0 --codec mjpeg -o -"
            .parse()
            .unwrap();
        assert_eq!(c.name, "counter");
        assert!(matches!(c.source, Source::Exec(_)));
        for bad in [
            "counter",
            "Counter=dir:/x",
            "a/b=dir:/x",
            "http=dir:/x",
            "c=ftp://x",
        ] {
            assert!(bad.parse::<CameraSpec>().is_err(), "{bad}");
        }
    }
}
