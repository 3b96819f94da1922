//! The inference loop and the atomic swap.
//!
//! Requests wait in a bounded queue ([`QUEUE`]); one inference thread takes up to [`MAX_BATCH`] of them
//! at a time and runs them as one batch. A full queue is refused at once (HTTP 503), never buffered.
//!
//! Swap ordering: the live recognizer is an `ArcSwapOption`. The inference thread loads one snapshot per
//! batch and uses only that snapshot (model, index, labels, metadata, version) for every answer in the
//! batch. [`Service::activate`] loads and checks a candidate off the serving path (dimensions at load,
//! then every canary), then stores it in one atomic step. A batch that already took the old snapshot
//! finishes on the old release, which is dropped when its last batch is done; the next batch sees the new
//! one. No answer can mix two releases, and no request fails because of a swap.

use super::preprocess::{self, ImageError};
use super::{BackendError, MAX_BATCH, Recognition, Recognizer};
use crate::metrics::{Metrics, Via};
use arc_swap::ArcSwapOption;
use deckhand_protocol::probation::{Health, Tally};
use image::RgbImage;
use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The most requests waiting for the inference thread.
pub const QUEUE: usize = 64;

/// Why a request got no recognition.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecognizeError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("the recognition queue is full ({QUEUE} waiting); try again shortly")]
    Busy,
    #[error("no release is active yet")]
    NoRelease,
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the recognizer is shutting down")]
    Stopped,
}

/// Why a release was not activated.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SwapError {
    #[error(
        "canary {index} should be card {expected:?} but was recognised as {got} (score {score:.3})"
    )]
    Canary {
        index: usize,
        expected: String,
        got: String,
        score: f32,
    },
    #[error("canary {index} cannot be checked: {why}")]
    CanaryUnusable { index: usize, why: String },
}

/// Told of every answer the inference thread makes (the event log records them). Called on the
/// inference thread before the answer is sent: it must return at once (queue, never wait).
pub trait Listener: Send + Sync {
    fn answered(&self, answer: &Recognition, via: Via);
}

/// A release that was refused, for status.
pub use deckhand_protocol::status::Refusal;

struct Job {
    image: RgbImage,
    started: Instant,
    via: Via,
    reply: tokio::sync::oneshot::Sender<Result<Recognition, RecognizeError>>,
}

/// The recognition service: queue, inference thread, live recognizer. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    live: Arc<ArcSwapOption<Recognizer>>,
    tx: Arc<Mutex<Option<SyncSender<Job>>>>,
    metrics: Arc<Metrics>,
    refused: Arc<Mutex<Option<Refusal>>>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// The cores the inference thread runs one image on: a release is prepared for them before it
    /// goes live.
    threads: usize,
    /// Since when the inference thread has been inside a batch (`busy.since`), or idle.
    busy: Arc<Busy>,
    /// Bytes of decoded images held at once by HTTP requests ([`DECODE_BUDGET`]).
    decoding: Arc<tokio::sync::Semaphore>,
    /// Told of every answer, once set ([`Service::listen`]).
    listener: Arc<std::sync::OnceLock<Arc<dyn Listener>>>,
    /// Keeps answered inputs for shadow evaluations, once set ([`Service::keep_samples`]).
    samples: Arc<std::sync::OnceLock<Arc<super::shadow::Samples>>>,
    /// What the latest releases served while live ([`Service::health`]).
    tallies: Arc<Tallies>,
}

/// How many releases' tallies are kept: the live one, the one before (probation compares them), and
/// the one before that (a rollback's).
const TALLIES: usize = 3;

/// What the latest releases served while they were live, by version.
#[derive(Default)]
struct Tallies(Mutex<VecDeque<(u64, Tally)>>);

impl Tallies {
    /// `version` goes live: its tally starts again.
    fn start(&self, version: u64) {
        let mut t = crate::locks::lock(&self.0, "tallies");
        t.retain(|(v, _)| *v != version);
        t.push_back((version, Tally::default()));
        while t.len() > TALLIES {
            t.pop_front();
        }
    }

    /// Counts what `version` served (one batch).
    fn record(&self, version: u64, f: impl FnOnce(&mut Tally)) {
        let mut t = crate::locks::lock(&self.0, "tallies");
        if let Some((_, tally)) = t.iter_mut().find(|(v, _)| *v == version) {
            f(tally);
        }
    }

    fn health(&self, version: u64) -> Option<Health> {
        crate::locks::lock(&self.0, "tallies")
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, t)| t.health())
    }
}

/// Memory that images being decoded may take at once, over every HTTP request
/// ([`preprocess::Probe::decode_bytes`] each, until the image is shrunk to the model's input): one
/// 24-megapixel image beside a few camera frames. A request that does not fit is answered 503 at once;
/// a flood of large images cannot take the Pi's memory, whatever their count. (The inbox decodes one
/// image at a time.)
pub const DECODE_BUDGET: u32 = 192 * 1024 * 1024;

/// When the inference thread started the batch it is in: milliseconds after `epoch`, 0 when idle.
struct Busy {
    epoch: Instant,
    since_ms: std::sync::atomic::AtomicU64,
}

impl Busy {
    fn enter(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.since_ms
            .store(ms.max(1), std::sync::atomic::Ordering::Relaxed);
    }
    fn leave(&self) {
        self.since_ms.store(0, std::sync::atomic::Ordering::Relaxed);
    }
    fn busy_for(&self) -> Option<std::time::Duration> {
        match self.since_ms.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(std::time::Duration::from_millis(ms)),
            ),
        }
    }
}

impl Service {
    /// Starts the inference thread, which runs the CPU backend's models on `cores`. No release is
    /// active until [`Service::activate`].
    pub fn start(metrics: Arc<Metrics>, cores: super::cpu::Cores) -> std::io::Result<Self> {
        let live: Arc<ArcSwapOption<Recognizer>> = Arc::new(ArcSwapOption::empty());
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        let busy = Arc::new(Busy {
            epoch: Instant::now(),
            since_ms: std::sync::atomic::AtomicU64::new(0),
        });
        let listener: Arc<std::sync::OnceLock<Arc<dyn Listener>>> = Arc::default();
        let samples: Arc<std::sync::OnceLock<Arc<super::shadow::Samples>>> = Arc::default();
        let tallies = Arc::new(Tallies::default());
        let threads = cores.threads();
        let thread = {
            let (live, metrics, busy) = (live.clone(), metrics.clone(), busy.clone());
            let (listener, samples, tallies) = (listener.clone(), samples.clone(), tallies.clone());
            std::thread::Builder::new()
                .name("deckhand-inference".into())
                .spawn(move || {
                    cores.run(|| {
                        inference_loop(rx, &live, &metrics, &busy, &listener, &samples, &tallies)
                    })
                })?
        };
        Ok(Self {
            live,
            tx: Arc::new(Mutex::new(Some(tx))),
            metrics,
            refused: Arc::new(Mutex::new(None)),
            thread: Arc::new(Mutex::new(Some(thread))),
            threads,
            busy,
            decoding: Arc::new(tokio::sync::Semaphore::new(DECODE_BUDGET as usize)),
            listener,
            samples,
            tallies,
        })
    }

    /// What release `version` served while it was live (answers, failures, answers without a card,
    /// latency), if it was one of the latest.
    pub fn health(&self, version: u64) -> Option<Health> {
        self.tallies.health(version)
    }

    /// Tells `listener` of every answer from now on. Only the first listener set is kept (the daemon
    /// sets its event log once); `false` when one was already set.
    pub fn listen(&self, listener: Arc<dyn Listener>) -> bool {
        self.listener.set(listener).is_ok()
    }

    /// Keeps every answered input in `samples` from now on (the first set is kept).
    pub fn keep_samples(&self, samples: Arc<super::shadow::Samples>) -> bool {
        self.samples.set(samples).is_ok()
    }

    /// The inputs kept for shadow evaluations, if the agent keeps any.
    pub fn samples(&self) -> Option<Arc<super::shadow::Samples>> {
        self.samples.get().cloned()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The live recognizer, if any.
    pub fn active(&self) -> Option<Arc<Recognizer>> {
        self.live.load_full()
    }

    /// Whether the inference thread is alive: running, and not inside one batch for longer than `limit`
    /// (a wedged accelerator or driver). `Err` says what is wrong, for the watchdog.
    pub fn inference_alive(&self, limit: std::time::Duration) -> Result<(), String> {
        let finished = crate::locks::lock(&self.thread, "inference thread")
            .as_ref()
            .is_none_or(|h| h.is_finished());
        if finished {
            return Err("the inference thread is not running".into());
        }
        match self.busy.busy_for() {
            Some(d) if d > limit => Err(format!(
                "the inference thread has been inside one batch for {:.1} s",
                d.as_secs_f64()
            )),
            _ => Ok(()),
        }
    }

    /// The last release refused at activation, if any.
    pub fn last_refusal(&self) -> Option<Refusal> {
        crate::locks::lock(&self.refused, "refused").clone()
    }

    /// Queues a decoded image. Fails at once when the queue is full.
    fn submit(
        &self,
        image: RgbImage,
        started: Instant,
        via: Via,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<Recognition, RecognizeError>>, RecognizeError>
    {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let tx = self
            .tx
            .lock()
            .map_err(|_| RecognizeError::Stopped)?
            .clone()
            .ok_or(RecognizeError::Stopped)?;
        match tx.try_send(Job {
            image,
            started,
            via,
            reply,
        }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => {
                self.metrics.queue_full();
                Err(RecognizeError::Busy)
            }
            Err(TrySendError::Disconnected(_)) => Err(RecognizeError::Stopped),
        }
    }

    fn decode(&self, bytes: &[u8]) -> Result<RgbImage, RecognizeError> {
        preprocess::decode(bytes)
            .map(|img| self.fit(img))
            .map_err(|e| self.bad_input(e))
    }

    /// The image at the live release's input size, resized on the caller's thread: the inference
    /// thread, which answers every request in turn, never spends its time shrinking a large photo.
    /// (A swap in between is harmless: the inference thread resizes what does not fit.)
    fn fit(&self, img: RgbImage) -> RgbImage {
        match self.live.load_full() {
            Some(r) => preprocess::fit(img, r.settings()),
            None => img,
        }
    }

    fn bad_input(&self, e: preprocess::ImageError) -> RecognizeError {
        self.metrics.rejected_input();
        RecognizeError::Image(e)
    }

    /// Recognises JPEG or PNG bytes (decoding on a blocking thread), within the decoding budget: an
    /// image whose decoding does not fit beside those being decoded or waiting is answered Busy.
    pub async fn recognize(&self, bytes: bytes::Bytes) -> Result<Recognition, RecognizeError> {
        let started = Instant::now();
        if self.live.load().is_none() {
            return Err(RecognizeError::NoRelease);
        }
        let probe = preprocess::probe(&bytes).map_err(|e| self.bad_input(e))?;
        let cost = u32::try_from(probe.decode_bytes()).unwrap_or(u32::MAX);
        let budget = self
            .decoding
            .clone()
            .try_acquire_many_owned(cost)
            .map_err(|_| {
                self.metrics.queue_full();
                RecognizeError::Busy
            })?;
        let me = self.clone();
        let image = tokio::task::spawn_blocking(move || {
            preprocess::decode_probed(&bytes, probe)
                .map(|img| me.fit(img))
                .map_err(|e| me.bad_input(e))
        })
        .await
        .map_err(|_| RecognizeError::Stopped)??;
        // Decoded and shrunk to the model's input: what waits in the queue is small.
        drop(budget);
        self.submit(image, started, Via::Http)?
            .await
            .map_err(|_| RecognizeError::Stopped)?
    }

    /// Recognises JPEG or PNG bytes from a plain thread (the inbox watcher).
    pub fn recognize_blocking(&self, bytes: &[u8]) -> Result<Recognition, RecognizeError> {
        let started = Instant::now();
        if self.live.load().is_none() {
            return Err(RecognizeError::NoRelease);
        }
        let image = self.decode(bytes)?;
        self.submit(image, started, Via::Inbox)?
            .blocking_recv()
            .map_err(|_| RecognizeError::Stopped)?
    }

    /// Recognises a decoded image (a card cropped from a camera frame) from a plain thread.
    pub fn recognize_image_blocking(
        &self,
        image: RgbImage,
        via: Via,
    ) -> Result<Recognition, RecognizeError> {
        let started = Instant::now();
        if self.live.load().is_none() {
            return Err(RecognizeError::NoRelease);
        }
        let image = self.fit(image);
        self.submit(image, started, via)?
            .blocking_recv()
            .map_err(|_| RecognizeError::Stopped)?
    }

    /// Checks a loaded candidate (every canary must be recognised as its card) and, if it passes, makes it
    /// the live recognizer in one atomic step. A refused candidate is recorded in status; the live
    /// recognizer keeps serving either way.
    pub fn activate(
        &self,
        candidate: Recognizer,
        canaries: &[(Vec<u8>, String)],
    ) -> Result<(), SwapError> {
        if let Err(e) = check_canaries(&candidate, canaries) {
            self.refuse(
                candidate.version,
                &candidate.manifest_id.to_string(),
                &e.to_string(),
            );
            return Err(e);
        }
        self.swap(candidate);
        Ok(())
    }

    /// Makes a recognizer whose canaries were already checked ([`check_canaries`]) the live one.
    pub fn swap(&self, candidate: Recognizer) {
        let version = candidate.version;
        // Planned here for the inference thread's cores, so its first request there plans nothing.
        // If that cannot be done it keeps the plan it has (its canaries ran on it).
        if let Err(e) = candidate.prepare(self.threads) {
            tracing::warn!(version, threads = self.threads, error = %e, "release not prepared for the inference thread's cores");
        }
        let engine = candidate.engine();
        let _ = candidate.activated_at.set(jiff::Timestamp::now());
        self.tallies.start(version);
        // The swap: one atomic store. In-flight batches keep their own Arc of the old recognizer.
        self.live.store(Some(Arc::new(candidate)));
        self.metrics.swap();
        tracing::info!(version, engine = engine, "release activated");
    }

    /// Records a release refused before it could be checked here (it did not load).
    pub fn refuse(&self, version: u64, manifest_id: &str, reason: &str) {
        self.metrics.refused_release();
        tracing::warn!(
            version,
            reason,
            "release refused; the active release keeps serving"
        );
        {
            let mut r = crate::locks::lock(&self.refused, "refused");
            *r = Some(Refusal {
                version,
                manifest_id: manifest_id.to_owned(),
                reason: reason.to_owned(),
                at: jiff::Timestamp::now().to_string(),
            });
        }
    }

    /// Stops taking requests and waits for the inference thread to finish those queued.
    pub fn shutdown(&self) {
        {
            let mut tx = crate::locks::lock(&self.tx, "tx");
            tx.take();
        }
        let thread = crate::locks::lock(&self.thread, "inference thread").take();
        if let Some(handle) = thread {
            let _ = handle.join();
        }
        if let Some(s) = self.samples.get() {
            s.stop();
        }
    }
}

/// Every canary image must be recognised as its card by `candidate`.
pub fn check_canaries(
    candidate: &Recognizer,
    canaries: &[(Vec<u8>, String)],
) -> Result<(), SwapError> {
    for (index, (bytes, expected)) in canaries.iter().enumerate() {
        let unusable = |why: String| SwapError::CanaryUnusable { index, why };
        let img = preprocess::decode(bytes).map_err(|e| unusable(e.to_string()))?;
        let r = candidate
            .recognize(&[img], &[Instant::now()])
            .map_err(|e| unusable(e.to_string()))?
            .pop()
            .ok_or_else(|| unusable("no answer".into()))?;
        if r.card_id.as_deref() != Some(expected.as_str()) {
            return Err(SwapError::Canary {
                index,
                expected: expected.clone(),
                got: r
                    .card_id
                    .map_or_else(|| "no card".to_owned(), |c| format!("{c:?}")),
                score: r.score,
            });
        }
    }
    Ok(())
}

fn inference_loop(
    rx: Receiver<Job>,
    live: &ArcSwapOption<Recognizer>,
    metrics: &Metrics,
    busy: &Busy,
    listener: &std::sync::OnceLock<Arc<dyn Listener>>,
    samples: &std::sync::OnceLock<Arc<super::shadow::Samples>>,
    tallies: &Tallies,
) {
    while let Ok(first) = rx.recv() {
        busy.enter();
        #[cfg(feature = "fault-injection")]
        injected_wedge();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // One snapshot for the whole batch: every answer in it comes from this release.
        let Some(recognizer) = live.load_full() else {
            for job in batch {
                let _ = job.reply.send(Err(RecognizeError::NoRelease));
            }
            busy.leave();
            continue;
        };
        let (images, rest): (Vec<RgbImage>, Vec<_>) = batch
            .into_iter()
            .map(|j| (j.image, (j.started, j.reply, j.via)))
            .unzip();
        let starts: Vec<Instant> = rest.iter().map(|(s, _, _)| *s).collect();
        match recognizer.recognize(&images, &starts) {
            Ok(results) => {
                tallies.record(recognizer.version, |t| {
                    for (r, (started, _, _)) in results.iter().zip(&rest) {
                        t.answer(
                            r.card_id.is_none(),
                            started.elapsed().as_secs_f64() * 1000.0,
                        );
                    }
                });
                if let Some(s) = samples.get() {
                    for (image, r) in images.iter().zip(&results) {
                        s.offer(image, r);
                    }
                }
                for (r, (started, reply, via)) in results.into_iter().zip(rest) {
                    if via != Via::Camera {
                        metrics.recognition(r.card_id.is_some(), started.elapsed().as_secs_f64());
                        metrics.remember(&r, if via == Via::Inbox { "inbox" } else { "http" });
                        if let Some(l) = listener.get() {
                            l.answered(&r, via);
                        }
                    }
                    let _ = reply.send(Ok(r));
                }
            }
            Err(e) => {
                tracing::error!(cause = %e, version = recognizer.version, "inference failed");
                tallies.record(recognizer.version, |t| {
                    rest.iter().for_each(|_| t.failure())
                });
                for (_, reply, _) in rest {
                    metrics.failure();
                    let _ = reply.send(Err(RecognizeError::Backend(e.clone())));
                }
            }
        }
        busy.leave();
    }
}

/// Test-only (feature `fault-injection`): while the file named by `DECKHAND_FAULT_WEDGE_INFERENCE`
/// exists, the inference thread hangs inside its batch, as it would on a wedged accelerator.
#[cfg(feature = "fault-injection")]
fn injected_wedge() {
    if let Some(flag) = std::env::var_os("DECKHAND_FAULT_WEDGE_INFERENCE") {
        while std::path::Path::new(&flag).exists() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recognizer::Embedder;
    use deckhand_protocol::manifest::RecognizerSettings;
    use std::time::Duration;

    /// An embedder that takes its time, so the queue fills.
    struct Slow;

    impl Embedder for Slow {
        fn embed(&mut self, _input: &[f32], batch: usize) -> Result<Vec<f32>, BackendError> {
            std::thread::sleep(Duration::from_millis(100));
            Ok(vec![1.0; batch * 4])
        }
        fn dim(&self) -> usize {
            4
        }
        fn name(&self) -> &'static str {
            "slow"
        }
    }

    #[test]
    fn a_full_queue_refuses_at_once_instead_of_growing() {
        let opts = usearch::IndexOptions {
            dimensions: 4,
            metric: usearch::MetricKind::Cos,
            quantization: usearch::ScalarKind::F32,
            connectivity: 16,
            expansion_add: 64,
            expansion_search: 32,
            multi: false,
        };
        let index = usearch::Index::new(&opts).unwrap();
        index.reserve(1).unwrap();
        index.add(0, &[1.0f32, 1.0, 1.0, 1.0]).unwrap();
        let settings = RecognizerSettings {
            input_width: 2,
            input_height: 2,
            layout: deckhand_protocol::manifest::ChannelLayout::Nchw,
            mean: crate::release::IMAGENET_MEAN,
            std: crate::release::IMAGENET_STD,
            embedding_dim: 4,
            metric: deckhand_protocol::manifest::Metric::Cos,
            min_score: 0.5,
        };
        let rec = Recognizer::from_parts(
            Box::new(Slow),
            index,
            vec!["card".into()],
            [("card".to_owned(), serde_json::json!({}))].into(),
            settings,
            1,
            deckhand_protocol::BlobId::of(b"1"),
        );
        let service = Service::start(
            Arc::new(Metrics::default()),
            crate::recognizer::cpu::Cores::one(),
        )
        .unwrap();
        service.activate(rec, &[]).unwrap();
        let img = RgbImage::new(2, 2);
        let mut waiting = Vec::new();
        let mut busy = 0;
        for _ in 0..(QUEUE + MAX_BATCH + 40) {
            match service.submit(img.clone(), Instant::now(), Via::Http) {
                Ok(rx) => waiting.push(rx),
                Err(RecognizeError::Busy) => busy += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(busy >= 40, "only {busy} refused: the queue is not bounded");
        assert!(waiting.len() <= QUEUE + MAX_BATCH);
        // Everything that was accepted is answered.
        for rx in waiting {
            assert_eq!(
                rx.blocking_recv().unwrap().unwrap().card_id.as_deref(),
                Some("card")
            );
        }
        assert!(service.metrics().render(None).contains(&format!(
            "deckhand_recognitions_total{{outcome=\"queue_full\"}} {busy}"
        )));
        service.shutdown();
    }
}
