//! Whole-release checks: every file of a release loads, and the files agree with each other.
//!
//! `deckhand publish` runs these before a single byte is uploaded; the recognizer relies on the same rules
//! when it loads a release from the store.

pub mod loaders;

use crate::release::loaders::{IndexHeader, LoadError, OnnxInfo};
use deckhand_protocol::manifest::{ChannelLayout, DetectorSettings, Metric, RecognizerSettings};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The ImageNet mean and standard deviation, for RGB scaled to 0..1.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// The default minimum similarity for a match.
pub const DEFAULT_MIN_SCORE: f32 = 0.5;
/// The default score below which a detector's box is not a card.
pub const DEFAULT_DETECTOR_MIN_SCORE: f32 = 0.5;
/// The default overlap above which the lower-scored of two boxes goes.
pub const DEFAULT_DETECTOR_IOU: f32 = 0.5;

/// A release's card detector: the model as ONNX and compiled for the Hailo.
#[derive(Clone, Debug)]
pub struct DetectorFiles {
    pub onnx: PathBuf,
    pub hef: PathBuf,
}

/// The files of a release, on local disk.
#[derive(Clone, Debug)]
pub struct ReleaseFiles {
    pub hef: PathBuf,
    pub onnx: PathBuf,
    pub index: PathBuf,
    pub labels: PathBuf,
    pub metadata: PathBuf,
    pub embeddings: Option<PathBuf>,
    pub detector: Option<DetectorFiles>,
    /// Canary image and the card id it must be recognised as.
    pub canaries: Vec<(PathBuf, String)>,
}

impl ReleaseFiles {
    /// Every file of the release: the artifacts, then the canary images.
    pub fn paths(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = vec![
            &self.hef,
            &self.onnx,
            &self.index,
            &self.labels,
            &self.metadata,
        ];
        out.extend(self.embeddings.as_deref());
        if let Some(d) = &self.detector {
            out.extend([d.onnx.as_path(), d.hef.as_path()]);
        }
        out.extend(self.canaries.iter().map(|(p, _)| p.as_path()));
        out
    }
}

/// Recognizer settings the operator gave explicitly; the rest are read from the files.
#[derive(Clone, Debug, Default)]
pub struct SettingsOverrides {
    pub input_size: Option<(u32, u32)>,
    pub layout: Option<ChannelLayout>,
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
    pub metric: Option<Metric>,
    pub min_score: Option<f32>,
    pub detector: DetectorOverrides,
}

/// Detector settings the operator gave explicitly; the input size is read from the model, the classes
/// from its output shape.
#[derive(Clone, Debug, Default)]
pub struct DetectorOverrides {
    pub classes: Option<u32>,
    pub card_class: Option<u32>,
    pub min_score: Option<f32>,
    pub iou: Option<f32>,
}

/// What the checks established.
#[derive(Clone, Debug)]
pub struct CheckedRelease {
    pub settings: RecognizerSettings,
    pub onnx: OnnxInfo,
    pub index: IndexHeader,
    pub rows: usize,
    pub cards: usize,
    /// How to run the detector, when the release has one.
    pub detector: Option<DetectorSettings>,
    /// The media type of each canary image, in order.
    pub canary_media_types: Vec<&'static str>,
    /// With embeddings.npy beside an f32 index: how many of the index's stored vectors sit at their own
    /// row's place in the file ([`vectors_in_row_order`]).
    pub index_rows_in_place: Option<usize>,
}

/// Why a release was refused. Each message names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{0}")]
    Mismatch(String),
}

fn nonempty(what: &'static str, path: &Path) -> Result<(), LoadError> {
    let meta = std::fs::metadata(path).map_err(|source| LoadError::Read {
        what,
        file: path.display().to_string(),
        source,
    })?;
    if !meta.is_file() {
        return Err(LoadError::invalid(what, path, "is not a regular file"));
    }
    if meta.len() == 0 {
        return Err(LoadError::invalid(what, path, "file is empty"));
    }
    Ok(())
}

/// Checks a release as a whole, and settles its recognizer settings.
pub fn check_release(
    files: &ReleaseFiles,
    o: &SettingsOverrides,
) -> Result<CheckedRelease, ReleaseError> {
    let hef = loaders::read_nonempty("hef", &files.hef)?;
    loaders::check_hef(&hef).map_err(|e| LoadError::format("hef", &files.hef, e))?;
    drop(hef);

    nonempty("onnx", &files.onnx)?;
    let onnx = loaders::inspect_onnx(&files.onnx)?;
    nonempty("index", &files.index)?;
    let index = loaders::inspect_index(&files.index)?;
    let labels_bytes = loaders::read_nonempty("labels", &files.labels)?;
    let labels = loaders::parse_labels(&labels_bytes)
        .map_err(|e| LoadError::format("labels", &files.labels, e))?;
    let metadata_bytes = loaders::read_nonempty("metadata", &files.metadata)?;
    let metadata = loaders::parse_metadata(&metadata_bytes)
        .map_err(|e| LoadError::format("metadata", &files.metadata, e))?;

    let mismatch = |s: String| Err(ReleaseError::Mismatch(s));
    if onnx.output_dim != index.dimensions {
        return mismatch(format!(
            "onnx {} outputs {}-dimension embeddings but index {} holds {}-dimension vectors",
            files.onnx.display(),
            onnx.output_dim,
            files.index.display(),
            index.dimensions
        ));
    }
    if labels.len() as u64 != index.count {
        return mismatch(format!(
            "labels {} has {} rows but index {} holds {} vectors",
            files.labels.display(),
            labels.len(),
            files.index.display(),
            index.count
        ));
    }
    check_card_ids(&labels, &metadata, &files.labels, &files.metadata)?;

    let mut index_rows_in_place = None;
    if let Some(path) = &files.embeddings {
        let data = loaders::read_nonempty("embeddings", path)?;
        let (rows, cols, start) =
            loaders::npy_header(&data).map_err(|e| LoadError::format("embeddings", path, e))?;
        if rows as u64 != index.count || cols != index.dimensions {
            return mismatch(format!(
                "embeddings {} is [{rows}, {cols}] but index {} holds {} vectors of {} dimensions",
                path.display(),
                files.index.display(),
                index.count,
                index.dimensions
            ));
        }
        if index.scalar == "f32" {
            index_rows_in_place = vectors_in_row_order(&files.index, &data[start..], rows, cols)?;
        }
    }

    let mut canary_media_types = Vec::with_capacity(files.canaries.len());
    for (path, card) in &files.canaries {
        let data = loaders::read_nonempty("canary image", path)?;
        let (_, _, format) =
            loaders::check_image(&data).map_err(|e| LoadError::format("canary image", path, e))?;
        if !metadata.contains_key(card) {
            return mismatch(format!(
                "canary image {} expects card {card:?}, which metadata {} does not have",
                path.display(),
                files.metadata.display()
            ));
        }
        canary_media_types.push(loaders::image_media_type(format));
    }

    let detector = match &files.detector {
        Some(d) => Some(check_detector(d, &o.detector)?),
        None => None,
    };
    let settings = settle_settings(&onnx, &index, o)?;
    Ok(CheckedRelease {
        settings,
        detector,
        rows: labels.len(),
        cards: metadata.len(),
        onnx,
        index,
        canary_media_types,
        index_rows_in_place,
    })
}

/// How many rows of `embeddings` (`rows` x `cols` little-endian f32) a usearch index file stores at
/// their own row's place: usearch writes the vectors first, as a matrix (rows u32, bytes per row u32, then
/// each vector in the order it was added). An index built on one thread from the rows in order holds
/// every row in place, and its next rebuild changes only the new rows and the graph; one built on
/// several threads holds them in the order the threads added them, and every rebuild rewrites the
/// whole file (`deckhand bench delta` measures both). `None` when the file does not start with that
/// matrix.
pub fn vectors_in_row_order(
    index: &Path,
    embeddings: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Option<usize>, LoadError> {
    use std::io::Read as _;
    let read = |source| LoadError::Read {
        what: "index",
        file: index.display().to_string(),
        source,
    };
    let file = std::fs::File::open(index).map_err(read)?;
    let mut file = std::io::BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; 8];
    file.read_exact(&mut header).map_err(read)?;
    let matrix = (
        u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize,
        u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize,
    );
    let row_len = cols * 4;
    if matrix != (rows, row_len) || embeddings.len() != rows * row_len {
        return Ok(None);
    }
    let mut stored = vec![0u8; row_len];
    let mut in_place = 0;
    for row in embeddings.chunks_exact(row_len) {
        file.read_exact(&mut stored).map_err(read)?;
        if stored == row {
            in_place += 1;
        }
    }
    Ok(Some(in_place))
}

/// Every card id the labels name must have metadata. Several rows may share a card.
pub fn check_card_ids(
    labels: &[String],
    metadata: &HashMap<String, serde_json::Value>,
    labels_path: &Path,
    metadata_path: &Path,
) -> Result<(), ReleaseError> {
    let missing: Vec<(usize, &String)> = labels
        .iter()
        .enumerate()
        .filter(|(_, id)| !metadata.contains_key(*id))
        .collect();
    if let Some((row, id)) = missing.first() {
        return Err(ReleaseError::Mismatch(format!(
            "labels {} row {row} names card {id:?}, which metadata {} does not have ({} rows name missing cards)",
            labels_path.display(),
            metadata_path.display(),
            missing.len()
        )));
    }
    Ok(())
}

/// Checks a detector's HEF header and ONNX model, settles its settings, and runs the model once on a
/// blank frame: a model whose output does not have the settings' shape is refused before publishing.
pub fn check_detector(
    files: &DetectorFiles,
    o: &DetectorOverrides,
) -> Result<DetectorSettings, ReleaseError> {
    let hef = loaders::read_nonempty("detector_hef", &files.hef)?;
    loaders::check_hef(&hef).map_err(|e| LoadError::format("detector_hef", &files.hef, e))?;
    drop(hef);
    nonempty("detector", &files.onnx)?;
    let info = loaders::inspect_detector(&files.onnx)?;
    let classes = o.classes.or_else(|| info.classes()).ok_or_else(|| {
        ReleaseError::Mismatch(format!(
            "detector {}: output shape {:?} does not say how many classes it has; give --detector-classes",
            files.onnx.display(),
            info.output_shape
        ))
    })?;
    let settings = DetectorSettings {
        input_width: info.width,
        input_height: info.height,
        classes,
        card_class: o.card_class.unwrap_or(0),
        min_score: o.min_score.unwrap_or(DEFAULT_DETECTOR_MIN_SCORE),
        iou: o.iou.unwrap_or(DEFAULT_DETECTOR_IOU),
    };
    settings
        .validate()
        .map_err(|e| ReleaseError::Mismatch(format!("detector {}: {e}", files.onnx.display())))?;
    crate::camera::detector::CpuDetector::load(&files.onnx, &settings)
        .map_err(|e| ReleaseError::Mismatch(e.to_string()))?;
    Ok(settings)
}

fn settle_settings(
    onnx: &OnnxInfo,
    index: &IndexHeader,
    o: &SettingsOverrides,
) -> Result<RecognizerSettings, ReleaseError> {
    if let Some((w, h)) = o.input_size
        && (w, h) != (onnx.width, onnx.height)
    {
        return Err(ReleaseError::Mismatch(format!(
            "--input-size {w}x{h} disagrees with the ONNX input, which is fixed at {}x{}",
            onnx.width, onnx.height
        )));
    }
    if let Some(layout) = o.layout
        && layout != onnx.layout
    {
        return Err(ReleaseError::Mismatch(format!(
            "--layout {layout:?} disagrees with the ONNX input, which is {:?} ({:?})",
            onnx.layout, onnx.input_shape
        )));
    }
    if let Some(metric) = o.metric
        && metric != index.metric
    {
        return Err(ReleaseError::Mismatch(format!(
            "--metric {metric:?} disagrees with the index header, which says {:?}",
            index.metric
        )));
    }
    let std = o.std.unwrap_or(IMAGENET_STD);
    if std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
        return Err(ReleaseError::Mismatch(format!(
            "--std {std:?} must be finite and above 0"
        )));
    }
    Ok(RecognizerSettings {
        input_width: onnx.width,
        input_height: onnx.height,
        layout: onnx.layout,
        mean: o.mean.unwrap_or(IMAGENET_MEAN),
        std,
        embedding_dim: index.dimensions as u32,
        metric: index.metric,
        min_score: o.min_score.unwrap_or(DEFAULT_MIN_SCORE),
    })
}
