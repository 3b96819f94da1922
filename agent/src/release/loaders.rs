//! Release loaders: read and check each kind of file a release is made of. One implementation, used by
//! the operator's `deckhand publish` (to refuse a broken release before upload) and by the agent's
//! recognizer (to load a release from the store).
//!
//! Accepted forms follow the seeds: `index.json` as an array or an object of row -> card id;
//! `metadata.json` as an object keyed by card id or an array of objects with an id field; `embeddings.npy`
//! as float32 [N, D]; the HEF's big-endian header (magic 0x01484546, version, sizes, MD5 for version 0).

use deckhand_protocol::manifest::{ChannelLayout, Metric};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// Why a release file was refused. `what` names the role, `file` the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{what} {file}: cannot read: {source}")]
    Read {
        what: &'static str,
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {file}: {why}")]
    Invalid {
        what: &'static str,
        file: String,
        why: String,
    },
    #[error("{what} {file}: {source}")]
    Format {
        what: &'static str,
        file: String,
        #[source]
        source: FormatError,
    },
}

/// What is wrong with a file's format, by kind of file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(transparent)]
    Hef(#[from] HefError),
    #[error(transparent)]
    Npy(#[from] NpyError),
    #[error(transparent)]
    Image(#[from] ImageFileError),
    #[error(transparent)]
    Index(#[from] IndexHeaderError),
    #[error(transparent)]
    Json(#[from] JsonFormError),
}

/// Why a usearch header describes an index deckhand does not serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexHeaderError {
    #[error("metric {0} is not supported (cos, ip or l2sq)")]
    Metric(String),
    #[error("scalar kind {0} is not supported")]
    Scalar(String),
    #[error("header claims {0} dimensions")]
    Dimensions(usize),
}

/// Why bytes are not a HEF HailoRT 4.x would load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HefError {
    #[error("file is shorter than a HEF header")]
    Short,
    #[error("not a HEF: magic is {0:#010x}, expected {HEF_MAGIC:#010x}")]
    Magic(u32),
    #[error("HEF header version {0} is not one HailoRT 4.x reads (0..=3)")]
    Version(u32),
    #[error("file is {len} bytes, shorter than its {header}-byte v{version} header")]
    ShortHeader {
        len: usize,
        header: usize,
        version: u32,
    },
    #[error("header says the network is {proto} bytes, but {residue} bytes follow the header")]
    ProtoSize { proto: u32, residue: usize },
    #[error("v0 header says {proto} bytes follow, the file has {residue}")]
    V0Size { proto: u32, residue: usize },
    #[error("HEF MD5 in the header does not match its contents (truncated or corrupted)")]
    Md5,
}

/// Why bytes are not a float32 [N, D] `.npy` matrix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NpyError {
    #[error("not a .npy file (no \\x93NUMPY magic)")]
    Magic,
    #[error(".npy format version {0} is not supported")]
    Version(u8),
    #[error(".npy header runs past the end of the file")]
    HeaderPastEnd,
    #[error(".npy header is not text")]
    HeaderText,
    #[error("embeddings must be little-endian float32 ('<f4'); header is {0}")]
    Dtype(String),
    #[error("embeddings must be in C order, not Fortran order")]
    Fortran,
    #[error("no shape in the .npy header")]
    NoShape,
    #[error("shape ({0}) is not a list of integers")]
    ShapeNotIntegers(String),
    #[error("embeddings must be 2-D [N, D], shape is ({0})")]
    NotTwoDimensional(String),
    #[error("shape overflows")]
    Overflow,
    #[error("shape ({rows}, {cols}) needs {need} bytes of data, the file has {have}")]
    DataSize {
        rows: usize,
        cols: usize,
        need: usize,
        have: usize,
    },
}

/// Why bytes are not an accepted image.
#[derive(Debug, thiserror::Error)]
pub enum ImageFileError {
    #[error("not an image (neither JPEG nor PNG)")]
    NotAnImage,
    #[error("image format {0:?} is not accepted (JPEG or PNG)")]
    Format(image::ImageFormat),
    #[error("image does not decode: {0}")]
    Decode(#[from] image::ImageError),
}

impl LoadError {
    /// A file of role `what` at `file` whose format is wrong.
    pub fn format(what: &'static str, file: &Path, source: impl Into<FormatError>) -> Self {
        LoadError::Format {
            what,
            file: file.display().to_string(),
            source: source.into(),
        }
    }

    pub fn invalid(what: &'static str, file: &Path, why: impl Into<String>) -> Self {
        LoadError::Invalid {
            what,
            file: file.display().to_string(),
            why: why.into(),
        }
    }
}

/// Reads a file that must exist and not be empty.
pub fn read_nonempty(what: &'static str, path: &Path) -> Result<Vec<u8>, LoadError> {
    let data = std::fs::read(path).map_err(|source| LoadError::Read {
        what,
        file: path.display().to_string(),
        source,
    })?;
    if data.is_empty() {
        return Err(LoadError::invalid(what, path, "file is empty"));
    }
    Ok(data)
}

// ---------------------------------------------------------------- HEF

/// The HEF magic, "FEH\x01" read as a big-endian u32.
pub const HEF_MAGIC: u32 = 0x0148_4546;

/// A HEF's outer header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HefHeader {
    pub version: u32,
    pub proto_size: u32,
    pub header_size: usize,
    /// Whether a checksum in the header was verified (version 0 carries an MD5 of the body).
    pub checksum_verified: bool,
}

/// Checks that bytes look like a HEF: magic, known version, sizes that agree with the file, and for
/// version 0 the MD5 of everything after the header. (HailoRT runs the same checks when it loads a HEF.)
pub fn check_hef(data: &[u8]) -> Result<HefHeader, HefError> {
    let be = |at: usize| -> Option<u32> {
        data.get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let magic = be(0).ok_or(HefError::Short)?;
    if magic != HEF_MAGIC {
        return Err(HefError::Magic(magic));
    }
    let version = be(4).ok_or(HefError::Short)?;
    let proto_size = be(8).ok_or(HefError::Short)?;
    let header_size = match version {
        0 | 1 => 32,
        2 => 40,
        3 => 56,
        v => return Err(HefError::Version(v)),
    };
    if data.len() < header_size {
        return Err(HefError::ShortHeader {
            len: data.len(),
            header: header_size,
            version,
        });
    }
    let residue = data.len() - header_size;
    if proto_size == 0 || proto_size as usize > residue {
        return Err(HefError::ProtoSize {
            proto: proto_size,
            residue,
        });
    }
    let mut checksum_verified = false;
    if version == 0 {
        if residue != proto_size as usize {
            return Err(HefError::V0Size {
                proto: proto_size,
                residue,
            });
        }
        use md5::Digest as _;
        let actual = md5::Md5::digest(&data[header_size..]);
        if actual.as_slice() != &data[16..32] {
            return Err(HefError::Md5);
        }
        checksum_verified = true;
    }
    Ok(HefHeader {
        version,
        proto_size,
        header_size,
        checksum_verified,
    })
}

// ---------------------------------------------------------------- ONNX

/// What the release needs to know about an ONNX model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnnxInfo {
    /// Input dimensions, `None` where symbolic (a batch dimension).
    pub input_shape: Vec<Option<usize>>,
    pub layout: ChannelLayout,
    pub width: u32,
    pub height: u32,
    /// The size of the last output dimension: the embedding dimension.
    pub output_dim: usize,
}

/// Loads an ONNX model with tract and reads its input size, channel layout and output dimension.
pub fn inspect_onnx(path: &Path) -> Result<OnnxInfo, LoadError> {
    let bad = |why: String| LoadError::invalid("onnx", path, why);
    let (dims, output) = onnx_shapes("onnx", path)?;
    let (layout, height, width) = match dims.as_slice() {
        [_, Some(3), Some(h), Some(w)] => (ChannelLayout::Nchw, *h, *w),
        [_, Some(h), Some(w), Some(3)] => (ChannelLayout::Nhwc, *h, *w),
        other => {
            return Err(bad(format!(
                "input shape {other:?} is not [N,3,H,W] or [N,H,W,3]"
            )));
        }
    };
    let output_dim = output
        .last()
        .copied()
        .flatten()
        .filter(|d| *d > 0)
        .ok_or_else(|| {
            bad(format!(
                "output shape {output:?} has no fixed embedding dimension"
            ))
        })?;
    Ok(OnnxInfo {
        input_shape: dims,
        layout,
        width: width as u32,
        height: height as u32,
        output_dim,
    })
}

/// What a detector's ONNX model says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetectorInfo {
    pub width: u32,
    pub height: u32,
    /// The output's dimensions, `None` where symbolic.
    pub output_shape: Vec<Option<usize>>,
}

impl DetectorInfo {
    /// The classes a YOLO-OBB output of this shape has (`[1, 4 + classes + 1, anchors]`, or anchors
    /// first): the smaller of its two last dimensions less five, when both are fixed.
    pub fn classes(&self) -> Option<u32> {
        match self.output_shape.as_slice() {
            [_, Some(a), Some(b)] => u32::try_from((*a).min(*b))
                .ok()?
                .checked_sub(5)
                .filter(|c| *c > 0),
            _ => None,
        }
    }
}

/// Loads a detector's ONNX model with tract: one image input `[N,3,H,W]` of fixed size, one output.
pub fn inspect_detector(path: &Path) -> Result<DetectorInfo, LoadError> {
    let bad = |why: String| LoadError::invalid("detector", path, why);
    let (dims, output_shape) = onnx_shapes("detector", path)?;
    let [_, Some(3), Some(h), Some(w)] = dims.as_slice() else {
        return Err(bad(format!("input shape {dims:?} is not [N,3,H,W]")));
    };
    Ok(DetectorInfo {
        width: u32::try_from(*w).map_err(|_| bad(format!("input width {w} is too large")))?,
        height: u32::try_from(*h).map_err(|_| bad(format!("input height {h} is too large")))?,
        output_shape,
    })
}

/// A tensor's dimensions, `None` where symbolic.
type Shape = Vec<Option<usize>>;

/// The input and first output shapes of a model with one input.
fn onnx_shapes(what: &'static str, path: &Path) -> Result<(Shape, Shape), LoadError> {
    use tract_onnx::prelude::*;
    let bad = |why: String| LoadError::invalid(what, path, why);
    let model = tract_onnx::onnx()
        .model_for_path(path)
        .map_err(|e| bad(format!("does not load as ONNX: {e}")))?;
    let model = model
        .into_typed()
        .map_err(|e| bad(format!("cannot type the model: {e}")))?;
    if model.inputs.len() != 1 || model.outputs.is_empty() {
        return Err(bad(format!(
            "expected one image input and an output, found {} inputs and {} outputs",
            model.inputs.len(),
            model.outputs.len()
        )));
    }
    let dims = |shape: &ShapeFact| -> Shape {
        shape
            .iter()
            .map(|d| d.to_i64().ok().and_then(|v| usize::try_from(v).ok()))
            .collect()
    };
    let input = model.input_fact(0).map_err(|e| bad(e.to_string()))?;
    let output = model.output_fact(0).map_err(|e| bad(e.to_string()))?;
    Ok((dims(&input.shape), dims(&output.shape)))
}

// ---------------------------------------------------------------- usearch

/// A usearch index header, read with `Index::metadata` before anything is loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexHeader {
    pub dimensions: usize,
    pub metric: Metric,
    pub scalar: String,
    pub count: u64,
    pub multi: bool,
}

/// Reads the header of a usearch index file, then views (memory-maps) the index to prove it loads and
/// holds as many vectors as the header says.
pub fn inspect_index(path: &Path) -> Result<IndexHeader, LoadError> {
    let bad = |why: String| LoadError::invalid("index", path, why);
    let p = path
        .to_str()
        .ok_or_else(|| bad("path is not UTF-8".into()))?;
    let meta = usearch::Index::metadata(p).map_err(|e| bad(format!("not a usearch index: {e}")))?;
    let header = header_from(&meta).map_err(|e| LoadError::format("index", path, e))?;
    let index = usearch::Index::new(&meta.into())
        .map_err(|e| bad(format!("cannot create an index for it: {e}")))?;
    index
        .view(p)
        .map_err(|e| bad(format!("does not load: {e}")))?;
    if index.size() as u64 != header.count || index.dimensions() != header.dimensions {
        return Err(bad(format!(
            "header says {} vectors of {} dimensions, the loaded index has {} of {}",
            header.count,
            header.dimensions,
            index.size(),
            index.dimensions()
        )));
    }
    Ok(header)
}

fn header_from(meta: &usearch::IndexMetadata) -> Result<IndexHeader, IndexHeaderError> {
    use usearch::{MetricKind, ScalarKind};
    let metric = match meta.metric {
        MetricKind::Cos => Metric::Cos,
        MetricKind::IP => Metric::Ip,
        MetricKind::L2sq => Metric::L2sq,
        other => return Err(IndexHeaderError::Metric(format!("{other:?}"))),
    };
    let scalar = match meta.quantization {
        ScalarKind::F32 => "f32",
        ScalarKind::F16 => "f16",
        ScalarKind::BF16 => "bf16",
        ScalarKind::F64 => "f64",
        ScalarKind::I8 => "i8",
        other => return Err(IndexHeaderError::Scalar(format!("{other:?}"))),
    };
    if !(1..=65536).contains(&meta.dimensions) {
        return Err(IndexHeaderError::Dimensions(meta.dimensions as usize));
    }
    Ok(IndexHeader {
        dimensions: meta.dimensions as usize,
        metric,
        scalar: scalar.to_owned(),
        count: meta.count_present,
        multi: meta.multi,
    })
}

// ---------------------------------------------------------------- labels and metadata

fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    }
}

/// Why index.json or metadata.json is not in one of the seeds' forms.
#[derive(Debug, thiserror::Error)]
pub enum JsonFormError {
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("row {row}: card id {item} is not a string or integer")]
    CardId { row: usize, item: Value },
    #[error("key {0:?} is not a row number")]
    RowKey(String),
    #[error("row {row} is out of range for {rows} labels (rows must be 0..{rows})")]
    RowRange { row: usize, rows: usize },
    #[error("row {0} has no card id")]
    NoCardId(usize),
    #[error("expected an array or an object of row -> card id, found {0}")]
    LabelsShape(&'static str),
    #[error("entry {0} has no \"id\" or \"card_id\" field")]
    NoId(usize),
    #[error("card id {0:?} appears more than once")]
    Duplicate(String),
    #[error("expected an object keyed by card id or an array of cards, found {0}")]
    MetadataShape(&'static str),
}

/// Parses index.json into row -> card id. An array is taken in order; an object must map every row
/// `0..N` exactly once (keys are decimal row numbers).
pub fn parse_labels(data: &[u8]) -> Result<Vec<String>, JsonFormError> {
    let v: Value = serde_json::from_slice(data)?;
    match v {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(row, item)| {
                id_text(item).ok_or_else(|| JsonFormError::CardId {
                    row,
                    item: item.clone(),
                })
            })
            .collect(),
        Value::Object(map) => {
            let mut rows: Vec<Option<String>> = vec![None; map.len()];
            let n = map.len();
            for (k, item) in &map {
                let row: usize = k.parse().map_err(|_| JsonFormError::RowKey(k.clone()))?;
                let slot = rows
                    .get_mut(row)
                    .ok_or(JsonFormError::RowRange { row, rows: n })?;
                *slot = Some(id_text(item).ok_or_else(|| JsonFormError::CardId {
                    row,
                    item: item.clone(),
                })?);
            }
            rows.into_iter()
                .enumerate()
                .map(|(row, id)| id.ok_or(JsonFormError::NoCardId(row)))
                .collect()
        }
        other => Err(JsonFormError::LabelsShape(kind(&other))),
    }
}

/// Parses metadata.json into card id -> details. An object is keyed by card id; an array holds objects
/// with an `id` (or `card_id`) field. A card id may appear only once.
pub fn parse_metadata(data: &[u8]) -> Result<HashMap<String, Value>, JsonFormError> {
    let v: Value = serde_json::from_slice(data)?;
    match v {
        Value::Object(map) => Ok(map.into_iter().collect()),
        Value::Array(items) => {
            let mut out = HashMap::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                let id = item
                    .get("id")
                    .or_else(|| item.get("card_id"))
                    .and_then(id_text)
                    .ok_or(JsonFormError::NoId(i))?;
                if out.insert(id.clone(), item).is_some() {
                    return Err(JsonFormError::Duplicate(id));
                }
            }
            Ok(out)
        }
        other => Err(JsonFormError::MetadataShape(kind(&other))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------- embeddings.npy

/// Reads the header of a float32 `.npy` matrix: (rows, columns, offset of the data).
pub fn npy_header(data: &[u8]) -> Result<(usize, usize, usize), NpyError> {
    if data.len() < 10 || &data[..6] != b"\x93NUMPY" {
        return Err(NpyError::Magic);
    }
    let (header_len, start) = match data[6] {
        1 => (u16::from_le_bytes([data[8], data[9]]) as usize, 10usize),
        2 | 3 if data.len() >= 12 => (
            u32::from_le_bytes([data[8], data[9], data[10], data[11]]) as usize,
            12,
        ),
        v => return Err(NpyError::Version(v)),
    };
    let end = start
        .checked_add(header_len)
        .filter(|e| *e <= data.len())
        .ok_or(NpyError::HeaderPastEnd)?;
    let header = std::str::from_utf8(&data[start..end]).map_err(|_| NpyError::HeaderText)?;
    if !header.contains("'descr': '<f4'") {
        return Err(NpyError::Dtype(header.trim().to_owned()));
    }
    if header.contains("'fortran_order': True") {
        return Err(NpyError::Fortran);
    }
    let shape = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(')').next())
        .ok_or(NpyError::NoShape)?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| NpyError::ShapeNotIntegers(shape.to_owned()))
        })
        .collect::<Result<_, _>>()?;
    let [rows, cols] = dims[..] else {
        return Err(NpyError::NotTwoDimensional(shape.to_owned()));
    };
    let need = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(4))
        .ok_or(NpyError::Overflow)?;
    if data.len() - end != need {
        return Err(NpyError::DataSize {
            rows,
            cols,
            need,
            have: data.len() - end,
        });
    }
    Ok((rows, cols, end))
}

// ---------------------------------------------------------------- images

/// Checks that bytes are a decodable JPEG or PNG: returns (width, height, format name).
pub fn check_image(data: &[u8]) -> Result<(u32, u32, &'static str), ImageFileError> {
    let format = image::guess_format(data).map_err(|_| ImageFileError::NotAnImage)?;
    let name = match format {
        image::ImageFormat::Jpeg => "jpeg",
        image::ImageFormat::Png => "png",
        other => return Err(ImageFileError::Format(other)),
    };
    let img = image::load_from_memory_with_format(data, format)?;
    Ok((img.width(), img.height(), name))
}

/// The media type of an accepted image format name.
pub fn image_media_type(format: &str) -> &'static str {
    if format == "png" {
        "image/png"
    } else {
        "image/jpeg"
    }
}
