//! The recognizer: a release turned into card recognitions. An image is embedded by the release's model
//! (Hailo HEF or ONNX on the CPU), the embedding searched in the usearch index, rows mapped to card ids by
//! index.json, candidates ranked by card (several rows may share a card), and the best card's details
//! taken from metadata.json.

pub mod cpu;
#[cfg(feature = "hailo")]
pub mod hailo;
#[cfg(feature = "daemon")]
pub mod inbox;
pub mod preprocess;
pub mod service;
pub mod shadow;
pub mod xnnpack;

use crate::release::loaders::{self, LoadError};
use deckhand_protocol::BlobId;
pub use deckhand_protocol::event::Candidate;
use deckhand_protocol::manifest::{Metric, RecognizerSettings};
use image::RgbImage;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// The most images embedded in one pass.
pub const MAX_BATCH: usize = 4;
/// Index rows considered per query before ranking by card.
pub const CANDIDATES: usize = 32;

/// What a backend can get wrong.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("backend failed to load: {0}")]
    Load(String),
    #[error("inference failed: {0}")]
    Run(String),
    #[error("no Hailo device answered: {0}")]
    NoDevice(String),
    #[error("no room on the Hailo device: {0}")]
    DeviceFull(String),
}

/// A model that turns preprocessed images into embeddings. Called from one thread at a time.
pub trait Embedder: Send {
    /// Embeds `batch` inputs laid out back to back; returns `batch * dim` values.
    fn embed(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, BackendError>;
    fn dim(&self) -> usize;
    fn name(&self) -> &'static str;
    /// What runs the model within the backend (the CPU backend's "xnnpack" or "tract").
    fn engine(&self) -> &'static str {
        self.name()
    }
    /// Gets ready to embed on a thread with `threads` cores for one image, so that the first embed
    /// there does no planning.
    fn prepare(&mut self, _threads: usize) -> Result<(), BackendError> {
        Ok(())
    }
}

/// Which backend to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Hailo when built with it and a device answers, else CPU.
    Auto,
    /// The CPU backend: XNNPACK where it can run the model, else tract.
    Cpu,
    /// The CPU backend on tract alone.
    Tract,
    Hailo,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "tract" => Ok(Self::Tract),
            "hailo" => Ok(Self::Hailo),
            other => Err(format!("{other:?} is not auto, cpu, tract or hailo")),
        }
    }
}

/// Where a release's files are (blob files in the store).
#[derive(Clone, Debug)]
pub struct ReleasePaths {
    pub hef: PathBuf,
    pub onnx: PathBuf,
    pub index: PathBuf,
    pub labels: PathBuf,
    pub metadata: PathBuf,
}

/// Why a release could not become a recognizer.
#[derive(Debug, thiserror::Error)]
pub enum RecognizerError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Mismatch(String),
}

/// The answer to one image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recognition {
    /// The recognised card, or `None` ("no card") with `reason`.
    pub card_id: Option<String>,
    pub score: f32,
    /// Score of the best card minus the score of the next-best distinct card.
    pub margin: Option<f32>,
    pub metadata: Option<serde_json::Value>,
    /// The best cards, best first (at most [`deckhand_protocol::event::CANDIDATES`]).
    pub candidates: Vec<Candidate>,
    pub reason: Option<String>,
    pub manifest_version: u64,
    pub manifest_id: String,
    pub backend: &'static str,
    pub latency_ms: f64,
}

/// How long one pass of [`Recognizer::recognize_timed`] spent in each stage (for a whole batch).
/// Decoding happens before, in the caller.
#[derive(Clone, Copy, Debug, Default)]
pub struct StageTimes {
    /// Resize, scale, normalise and lay out every image.
    pub preprocess: std::time::Duration,
    /// Run the model.
    pub embed: std::time::Duration,
    /// Search the index and rank candidates by card.
    pub search: std::time::Duration,
}

/// A loaded, checked release.
pub struct Recognizer {
    embedder: Mutex<Box<dyn Embedder>>,
    /// The release's card detector, when it has one (the counter finds cards with it).
    detector: Option<Mutex<Box<dyn crate::camera::detector::Detect>>>,
    detector_backend: Option<&'static str>,
    index: usearch::Index,
    labels: Vec<String>,
    metadata: HashMap<String, serde_json::Value>,
    settings: RecognizerSettings,
    backend: &'static str,
    /// What runs the model within the backend (fixed at load).
    engine: &'static str,
    pub version: u64,
    pub manifest_id: BlobId,
    /// When it went live (set once, at the swap).
    activated_at: std::sync::OnceLock<jiff::Timestamp>,
}

impl std::fmt::Debug for Recognizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recognizer")
            .field("version", &self.version)
            .field("backend", &self.backend)
            .field("rows", &self.labels.len())
            .finish_non_exhaustive()
    }
}

fn usearch_metric(m: Metric) -> usearch::MetricKind {
    match m {
        Metric::Cos => usearch::MetricKind::Cos,
        Metric::Ip => usearch::MetricKind::IP,
        Metric::L2sq => usearch::MetricKind::L2sq,
    }
}

/// A similarity from a usearch distance: `1 - d` for cos and ip (higher is closer), `-d` for l2sq.
pub fn score(metric: Metric, distance: f32) -> f32 {
    match metric {
        Metric::Cos | Metric::Ip => 1.0 - distance,
        Metric::L2sq => -distance,
    }
}

fn view_index(path: &Path, s: &RecognizerSettings) -> Result<usearch::Index, RecognizerError> {
    let bad = |why: String| RecognizerError::Load(LoadError::invalid("index", path, why));
    // Check the header against the manifest before anything is loaded: view() accepts wrong options.
    let header = loaders::inspect_index(path)?;
    if header.dimensions != s.embedding_dim as usize || header.metric != s.metric {
        return Err(bad(format!(
            "header says {} dimensions, {:?}; the manifest says {} dimensions, {:?}",
            header.dimensions, header.metric, s.embedding_dim, s.metric
        )));
    }
    let p = path
        .to_str()
        .ok_or_else(|| bad("path is not UTF-8".into()))?;
    let meta = usearch::Index::metadata(p).map_err(|e| bad(e.to_string()))?;
    let mut opts: usearch::IndexOptions = meta.into();
    opts.metric = usearch_metric(s.metric);
    let index = usearch::Index::new(&opts).map_err(|e| bad(e.to_string()))?;
    index
        .view(p)
        .map_err(|e| bad(format!("does not load: {e}")))?;
    index.change_expansion_search(64);
    Ok(index)
}

impl Recognizer {
    /// Loads a release: index (memory-mapped, header checked first), labels, metadata, and the model on
    /// the chosen backend. Every file is checked against the manifest's settings.
    pub fn load(
        paths: &ReleasePaths,
        settings: &RecognizerSettings,
        version: u64,
        manifest_id: BlobId,
        backend: BackendChoice,
    ) -> Result<Self, RecognizerError> {
        let index = view_index(&paths.index, settings)?;
        let labels_bytes = loaders::read_nonempty("labels", &paths.labels)?;
        let labels = loaders::parse_labels(&labels_bytes)
            .map_err(|e| LoadError::format("labels", &paths.labels, e))?;
        let meta_bytes = loaders::read_nonempty("metadata", &paths.metadata)?;
        let metadata = loaders::parse_metadata(&meta_bytes)
            .map_err(|e| LoadError::format("metadata", &paths.metadata, e))?;
        if labels.len() != index.size() {
            return Err(RecognizerError::Mismatch(format!(
                "labels have {} rows but the index holds {} vectors",
                labels.len(),
                index.size()
            )));
        }
        crate::release::check_card_ids(&labels, &metadata, &paths.labels, &paths.metadata)
            .map_err(|e| RecognizerError::Mismatch(e.to_string()))?;
        let embedder = load_embedder(paths, settings, backend)?;
        if embedder.dim() != settings.embedding_dim as usize {
            return Err(RecognizerError::Mismatch(format!(
                "the {} model produces {}-dimension embeddings, the release says {}",
                embedder.name(),
                embedder.dim(),
                settings.embedding_dim
            )));
        }
        Ok(Self {
            backend: embedder.name(),
            engine: embedder.engine(),
            embedder: Mutex::new(embedder),
            detector: None,
            detector_backend: None,
            index,
            labels,
            metadata,
            settings: settings.clone(),
            version,
            manifest_id,
            activated_at: std::sync::OnceLock::new(),
        })
    }

    /// The release with its card detector.
    pub fn with_detector(mut self, detector: Box<dyn crate::camera::detector::Detect>) -> Self {
        self.detector_backend = Some(detector.name());
        self.detector = Some(Mutex::new(detector));
        self
    }

    pub fn has_detector(&self) -> bool {
        self.detector.is_some()
    }

    /// Where the release's detector runs (`cpu`, `hailo`), when it has one.
    pub fn detector_backend(&self) -> Option<&'static str> {
        self.detector_backend
    }

    /// The cards the release's detector finds in `frame`, best first; `None` when it has no detector.
    pub fn detect(
        &self,
        frame: &RgbImage,
    ) -> Option<Result<Vec<crate::camera::detector::Detection>, BackendError>> {
        let d = self.detector.as_ref()?;
        Some(match d.lock() {
            Ok(mut d) => d.detect(frame),
            Err(_) => Err(BackendError::Run("the detector panicked earlier".into())),
        })
    }

    /// When this release went live, if it did.
    pub fn activated_at(&self) -> Option<jiff::Timestamp> {
        self.activated_at.get().copied()
    }

    /// Assembles a recognizer from parts already checked (tests use it to drive the service with their
    /// own embedder).
    pub fn from_parts(
        embedder: Box<dyn Embedder>,
        index: usearch::Index,
        labels: Vec<String>,
        metadata: HashMap<String, serde_json::Value>,
        settings: RecognizerSettings,
        version: u64,
        manifest_id: BlobId,
    ) -> Self {
        Self {
            backend: embedder.name(),
            engine: embedder.engine(),
            embedder: Mutex::new(embedder),
            detector: None,
            detector_backend: None,
            index,
            labels,
            metadata,
            settings,
            version,
            manifest_id,
            activated_at: std::sync::OnceLock::new(),
        }
    }

    pub fn settings(&self) -> &RecognizerSettings {
        &self.settings
    }

    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// What runs the model within the backend: "xnnpack" or "tract" on the CPU, "hailo".
    pub fn engine(&self) -> &'static str {
        self.engine
    }

    /// Gets the embedder ready for a thread with `threads` cores for one image (the inference
    /// thread's), before the release goes live there.
    pub fn prepare(&self, threads: usize) -> Result<(), BackendError> {
        self.embedder
            .lock()
            .map_err(|_| BackendError::Run("the backend panicked earlier".into()))?
            .prepare(threads)
    }

    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// Recognises a batch of decoded images. All answers come from this one release.
    pub fn recognize(
        &self,
        images: &[RgbImage],
        started: &[Instant],
    ) -> Result<Vec<Recognition>, BackendError> {
        self.recognize_timed(images, started).map(|(r, _)| r)
    }

    /// [`Recognizer::recognize`], also returning how long each stage took.
    pub fn recognize_timed(
        &self,
        images: &[RgbImage],
        started: &[Instant],
    ) -> Result<(Vec<Recognition>, StageTimes), BackendError> {
        let t = Instant::now();
        let mut input = Vec::with_capacity(
            images.len() * 3 * (self.settings.input_width * self.settings.input_height) as usize,
        );
        for img in images {
            preprocess::to_tensor(img, &self.settings, &mut input);
        }
        let preprocess = t.elapsed();
        let t = Instant::now();
        let embeddings = {
            let mut e = self
                .embedder
                .lock()
                .map_err(|_| BackendError::Run("the backend panicked earlier".into()))?;
            e.embed(&input, images.len())?
        };
        let embed = t.elapsed();
        let t = Instant::now();
        let dim = self.settings.embedding_dim as usize;
        let answers = embeddings
            .chunks(dim)
            .zip(started)
            .map(|(emb, t)| self.rank(emb, *t))
            .collect::<Result<Vec<_>, _>>()?;
        let times = StageTimes {
            preprocess,
            embed,
            search: t.elapsed(),
        };
        Ok((answers, times))
    }

    /// Searches one embedding and ranks the candidates by card.
    fn rank(&self, embedding: &[f32], started: Instant) -> Result<Recognition, BackendError> {
        let k = CANDIDATES.min(self.labels.len()).max(1);
        let matches = self
            .index
            .search(embedding, k)
            .map_err(|e| BackendError::Run(format!("index search failed: {e}")))?;
        // Best score per card.
        let mut best: Vec<(&str, f32)> = Vec::new();
        for (key, dist) in matches.keys.iter().zip(&matches.distances) {
            let Some(card) = self.labels.get(*key as usize) else {
                continue;
            };
            let s = score(self.settings.metric, *dist);
            match best.iter_mut().find(|(c, _)| *c == card.as_str()) {
                Some(entry) => entry.1 = entry.1.max(s),
                None => best.push((card, s)),
            }
        }
        best.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut r = Recognition {
            card_id: None,
            score: f32::NAN,
            margin: None,
            metadata: None,
            candidates: best
                .iter()
                .take(deckhand_protocol::event::CANDIDATES)
                .map(|&(card, score)| Candidate {
                    card_id: card.to_owned(),
                    score,
                })
                .collect(),
            reason: None,
            manifest_version: self.version,
            manifest_id: self.manifest_id.to_string(),
            backend: self.backend,
            latency_ms: 0.0,
        };
        match best.first() {
            None => r.reason = Some("the index returned no candidates".into()),
            Some(&(card, s)) => {
                r.score = s;
                r.margin = best.get(1).map(|(_, next)| s - next);
                if s < self.settings.min_score {
                    r.reason = Some(format!(
                        "best match {card} scored {s:.3}, below the release's minimum score {:.3}",
                        self.settings.min_score
                    ));
                } else {
                    r.card_id = Some(card.to_owned());
                    r.metadata = self.metadata.get(card).cloned();
                }
            }
        }
        if r.score.is_nan() {
            r.score = 0.0;
        }
        r.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        Ok(r)
    }
}

/// Loads a release's card detector where its embedder runs: on the Hailo (a second network group on
/// the same vdevice) when the embedder does, else on the CPU. A detector HEF the Hailo refuses (no
/// room, a bad HEF) leaves the detector on the CPU, with a warning: the counter keeps finding cards.
pub fn load_detector(
    onnx: &Path,
    hef: &Path,
    settings: &deckhand_protocol::manifest::DetectorSettings,
    embedder_backend: &str,
) -> Result<Box<dyn crate::camera::detector::Detect>, BackendError> {
    #[cfg(feature = "hailo")]
    if embedder_backend == "hailo" {
        match hailo::HailoDetector::load(hef, settings) {
            Ok(d) => return Ok(Box::new(d)),
            Err(e) => tracing::warn!(cause = %e, "the release's detector runs on the CPU"),
        }
    }
    let _ = (hef, embedder_backend);
    Ok(Box::new(crate::camera::detector::CpuDetector::load(
        onnx, settings,
    )?))
}

fn load_embedder(
    paths: &ReleasePaths,
    settings: &RecognizerSettings,
    backend: BackendChoice,
) -> Result<Box<dyn Embedder>, BackendError> {
    match backend {
        BackendChoice::Cpu => Ok(Box::new(cpu::CpuEmbedder::load(&paths.onnx, settings)?)),
        BackendChoice::Tract => Ok(Box::new(cpu::CpuEmbedder::load_with(
            &paths.onnx,
            settings,
            cpu::EngineChoice::Tract,
        )?)),
        #[cfg(feature = "hailo")]
        BackendChoice::Hailo => Ok(Box::new(hailo::HailoEmbedder::load(&paths.hef, settings)?)),
        #[cfg(not(feature = "hailo"))]
        BackendChoice::Hailo => Err(BackendError::NoDevice(format!(
            "this build has no Hailo support (build with --features hailo); cannot run {}",
            paths.hef.display()
        ))),
        BackendChoice::Auto => {
            #[cfg(feature = "hailo")]
            match hailo::HailoEmbedder::load(&paths.hef, settings) {
                Ok(h) => return Ok(Box::new(h)),
                Err(e @ BackendError::DeviceFull(_)) => {
                    tracing::warn!(cause = %e, "this release runs on the CPU backend")
                }
                Err(e) => {
                    tracing::info!(cause = %e, "no usable Hailo device; using the CPU backend")
                }
            }
            Ok(Box::new(cpu::CpuEmbedder::load(&paths.onnx, settings)?))
        }
    }
}
