//! The agent's side of shadow evaluation ([`deckhand_protocol::shadow`]): the sample of inputs it
//! recently recognised, with the live release's answers, and the evaluation of a candidate release on
//! them.
//!
//! The sample lives in memory: the newest `capacity` inputs (camera crops and photos, at the live
//! model's input size, JPEG-encoded on the sampler's own thread so the inference thread only copies a
//! small image), never written to disk nor sent off the Pi. A restart starts it again. Only samples the
//! active release answered count: after a swap the sample refills with the new release's answers.
//!
//! An evaluation runs the candidate on its own thread at the lowest CPU priority (nice 19), one sample
//! at a time, so live answers go first; the active release is not run again (its answers were kept).

use super::{Recognition, Recognizer, preprocess};
use deckhand_protocol::shadow::{Figures, Pair};
use image::RgbImage;
use std::collections::VecDeque;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Inputs waiting to be encoded; more are dropped (the sample is a sample).
const OFFERS: usize = 8;
/// JPEG quality of a kept input: close to the original, a few kB at a model's input size.
const QUALITY: u8 = 92;

/// One recognised input and what the live release answered.
#[derive(Clone)]
struct Sample {
    jpeg: Vec<u8>,
    version: u64,
    card_id: Option<String>,
    score: f32,
    latency_ms: f64,
}

struct Offer {
    image: RgbImage,
    version: u64,
    card_id: Option<String>,
    score: f32,
    latency_ms: f64,
}

/// The newest recognised inputs, bounded. Cheap to share.
pub struct Samples {
    kept: Arc<Mutex<VecDeque<Sample>>>,
    tx: Mutex<Option<SyncSender<Offer>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Samples {
    /// Starts the sampler's thread, keeping the newest `capacity` inputs.
    pub fn start(capacity: usize) -> std::io::Result<Arc<Self>> {
        let kept: Arc<Mutex<VecDeque<Sample>>> =
            Arc::new(Mutex::new(VecDeque::with_capacity(capacity.min(1024))));
        let (tx, rx) = sync_channel::<Offer>(OFFERS);
        let thread = {
            let kept = kept.clone();
            std::thread::Builder::new()
                .name("deckhand-samples".into())
                .spawn(move || {
                    while let Ok(o) = rx.recv() {
                        let mut jpeg = Vec::new();
                        let encoded =
                            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, QUALITY)
                                .encode_image(&o.image);
                        if let Err(e) = encoded {
                            tracing::debug!(cause = %e, "a sample could not be encoded; skipped");
                            continue;
                        }
                        let mut k = crate::locks::lock(&kept, "samples");
                        if k.len() >= capacity {
                            k.pop_front();
                        }
                        k.push_back(Sample {
                            jpeg,
                            version: o.version,
                            card_id: o.card_id,
                            score: o.score,
                            latency_ms: o.latency_ms,
                        });
                    }
                })?
        };
        Ok(Arc::new(Self {
            kept,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Offers an input the live release answered (from the inference thread): copied and handed to
    /// the sampler, or dropped at once when it is behind.
    pub fn offer(&self, image: &RgbImage, answer: &Recognition) {
        let tx = crate::locks::lock(&self.tx, "samples").clone();
        let Some(tx) = tx else { return };
        // Full (the sampler is behind) or stopped: the offer is dropped.
        let _ = tx.try_send(Offer {
            image: image.clone(),
            version: answer.manifest_version,
            card_id: answer.card_id.clone(),
            score: answer.score,
            latency_ms: answer.latency_ms,
        });
    }

    /// How many kept inputs `version` answered.
    pub fn answered_by(&self, version: u64) -> u32 {
        let k = crate::locks::lock(&self.kept, "samples");
        u32::try_from(k.iter().filter(|s| s.version == version).count()).unwrap_or(u32::MAX)
    }

    fn of(&self, version: u64) -> Vec<Sample> {
        let k = crate::locks::lock(&self.kept, "samples");
        k.iter().filter(|s| s.version == version).cloned().collect()
    }

    /// Stops the sampler's thread (the inputs kept are dropped with `self`).
    pub fn stop(&self) {
        crate::locks::lock(&self.tx, "samples").take();
        if let Some(t) = crate::locks::lock(&self.thread, "samples").take() {
            let _ = t.join();
        }
    }
}

/// Runs `candidate` on the inputs `active` (a version) answered, on a thread of the lowest priority,
/// and measures the two answers side by side. Returns the candidate back with the figures.
pub async fn evaluate(
    samples: Arc<Samples>,
    active: u64,
    candidate: Recognizer,
) -> Result<(Recognizer, Figures), String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("deckhand-shadow".into())
        .spawn(move || {
            lowest_priority();
            let figures = measure(&candidate, &samples.of(active));
            let _ = tx.send((candidate, figures));
        })
        .map_err(|e| format!("the shadow evaluation thread did not start: {e}"))?;
    rx.await
        .map_err(|_| "the shadow evaluation thread ended without an answer".to_owned())
}

fn measure(candidate: &Recognizer, samples: &[Sample]) -> Figures {
    let mut answers: Vec<(usize, Recognition)> = Vec::with_capacity(samples.len());
    for (i, s) in samples.iter().enumerate() {
        // A sample that no longer decodes or that the candidate fails on is left out (and logged):
        // the figures count what was compared.
        let img = match preprocess::decode(&s.jpeg) {
            Ok(img) => img,
            Err(e) => {
                tracing::warn!(cause = %e, "a shadow sample did not decode");
                continue;
            }
        };
        match candidate.recognize(&[img], &[Instant::now()]) {
            Ok(mut r) => {
                if let Some(r) = r.pop() {
                    answers.push((i, r));
                }
            }
            Err(e) => {
                tracing::warn!(cause = %e, version = candidate.version, "the candidate failed on a shadow sample")
            }
        }
    }
    let pairs: Vec<Pair<'_>> = answers
        .iter()
        .map(|(i, r)| {
            let s = &samples[*i];
            Pair {
                active: s.card_id.as_deref(),
                active_score: s.score,
                active_ms: s.latency_ms,
                candidate: r.card_id.as_deref(),
                candidate_score: r.score,
                candidate_ms: r.latency_ms,
            }
        })
        .collect();
    Figures::measure(&pairs)
}

/// This thread yields the CPU to every other: the evaluation never slows live answers.
fn lowest_priority() {
    // SAFETY: setpriority on the calling thread (PRIO_PROCESS with who 0 names the calling thread on
    // Linux, where nice is per thread); it touches no memory.
    #[cfg(target_os = "linux")]
    unsafe {
        if libc::setpriority(libc::PRIO_PROCESS, 0, 19) != 0 {
            tracing::debug!("could not lower the shadow evaluation's priority");
        }
    }
}
