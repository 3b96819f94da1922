//! The counter: cameras watching the counter, each card placed there found, held still, recognised
//! once, and its event recorded with the card's corners in the frame.
//!
//! Per camera, a task reads frames from its source ([`source`]) into a one-frame slot, and a thread
//! analyses them ([`Analysis`]): it decodes at most `camera_fps` frames a second (2 while nothing on the
//! counter differs from the background: an idle counter is cheap), finds card-shaped regions
//! ([`finder`]), follows them ([`tracker`]) and, for each card that lay still, warps the card to an
//! upright card-shaped crop ([`geometry::warp`]), read both ways up (which short edge is the card's top
//! cannot be seen from the shape), has both recognised by the live release and keeps the better answer.
//! A camera that fails is shown in status and retried; it never stops the agent.

pub mod finder;
pub mod geometry;
pub mod mjpeg;
pub mod source;
pub mod tracker;

use crate::events::Recorder;
use crate::metrics::Via;
use crate::recognizer::service::Service;
use deckhand_protocol::status::CameraStatus;
use geometry::Quad;
use source::Source;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The upright crop a card is warped to (a card's proportions; the model's input is made from it as
/// from any photo).
pub const CROP_W: u32 = 252;
pub const CROP_H: u32 = 352;
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
    frame: Mutex<(Option<Vec<u8>>, bool)>,
    ready: Condvar,
    /// Frames replaced before they were analysed.
    dropped: AtomicU64,
    /// Frames read.
    read: AtomicU64,
}

impl Slot {
    pub fn put(&self, frame: Vec<u8>) {
        self.read.fetch_add(1, Ordering::Relaxed);
        let mut f = crate::locks::lock(&self.frame, "camera frame");
        if f.0.replace(frame).is_some() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.ready.notify_one();
    }

    /// Waits (at most `limit`) for a frame; `Err` once closed.
    fn take(&self, limit: Duration) -> Result<Option<Vec<u8>>, ()> {
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

/// A frame as analysed: the JPEG the camera sent and the cards found in it.
#[derive(Clone, Debug)]
pub struct Analysed {
    pub jpeg: Arc<Vec<u8>>,
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

    fn running(&self) {
        self.with(|s| s.state = "running".into());
    }

    fn ended(&self) {
        self.with(|s| s.state = "ended".into());
    }

    fn failed(&self, why: String, retry: Duration) {
        self.with(|s| {
            s.state = format!("restarting in {} s", retry.as_secs());
            s.restarts += 1;
            s.last_error = Some(why);
        });
    }

    /// What the stream's splitter refused and skipped since the source started.
    fn stream(&self, refused: u64, skipped: u64) {
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
        let mut last = Instant::now() - interval;
        loop {
            let frame = match slot.take(Duration::from_millis(250)) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(()) => return,
            };
            // At most the camera's rate, and slower while the counter is idle: frames between are
            // skipped undecoded.
            if last.elapsed() < interval {
                slot.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            last = Instant::now();
            let image = match crate::recognizer::preprocess::decode(&frame) {
                Ok(i) => i,
                Err(e) => {
                    self.state.with(|s| {
                        s.frames_refused += 1;
                        s.last_error = Some(format!("a frame does not decode: {e}"));
                    });
                    continue;
                }
            };
            let found = self.finder.find(&image);
            if found.foreground == 0 {
                self.tracker.clear_memory();
            }
            let ready = self.tracker.update(&found.cards);
            interval = if found.foreground == 0 && !self.tracker.busy() {
                IDLE_INTERVAL.max(busy_interval)
            } else {
                busy_interval
            };
            self.state.with(|s| {
                s.frames_analysed += 1;
                s.cards_in_view = found.cards.len() as u32;
            });
            *crate::locks::lock(&self.state.latest, "camera frame") = Some(Analysed {
                jpeg: Arc::new(frame),
                width: image.width(),
                height: image.height(),
                cards: found.cards.clone(),
            });
            for r in ready {
                if !self.recognise(&image, r.quad) {
                    self.tracker.retry(r.track);
                }
            }
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
