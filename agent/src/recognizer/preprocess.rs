//! From image bytes to a model input: decode (JPEG or PNG, with size limits checked from the header
//! before any pixel is decoded), resize, scale to 0..1, normalise per channel, lay out as NCHW or NHWC.

use deckhand_protocol::manifest::{ChannelLayout, RecognizerSettings};
use image::RgbImage;

/// The largest image accepted: 24 megapixels (a Pi HQ camera frame is 12.3).
pub const MAX_PIXELS: u64 = 24_000_000;
/// The largest request body accepted, in bytes.
pub const MAX_BODY: usize = 32 * 1024 * 1024;

/// Why an image was refused. All are the client's fault (4xx).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("the image is empty (no bytes)")]
    Empty,
    #[error("not an image: expected JPEG or PNG")]
    NotAnImage,
    #[error("image format {0} is not accepted (JPEG or PNG)")]
    Format(String),
    #[error("image is {width}x{height} ({} megapixels), over the limit of {} megapixels", *width as u64 * *height as u64 / 1_000_000, MAX_PIXELS / 1_000_000)]
    TooLarge { width: u32, height: u32 },
    #[error("image does not decode: {0}")]
    Decode(String),
}

/// What an image's header says, read before any pixel is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    format: image::ImageFormat,
    pub width: u32,
    pub height: u32,
}

impl Probe {
    /// The most memory decoding it takes: the decoded pixels (up to 4 bytes each, RGBA) and their RGB
    /// copy when they are not RGB already.
    pub fn decode_bytes(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height) * 7
    }
}

/// Decodes JPEG or PNG bytes into RGB, refusing anything over [`MAX_PIXELS`] before decoding it.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    let probe = probe(bytes)?;
    decode_probed(bytes, probe)
}

/// Reads an image's format and size from its header, refusing what is not a JPEG or PNG, a JPEG cut
/// short and anything over [`MAX_PIXELS`].
pub fn probe(bytes: &[u8]) -> Result<Probe, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let format = image::guess_format(bytes).map_err(|_| ImageError::NotAnImage)?;
    if !matches!(format, image::ImageFormat::Jpeg | image::ImageFormat::Png) {
        return Err(ImageError::Format(format!("{format:?}")));
    }
    if format == image::ImageFormat::Jpeg {
        // The JPEG decoder fills a truncated scan with grey rather than failing; a complete JPEG ends with
        // the end-of-image marker (some cameras pad after it with zeros).
        let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        if end < 2 || bytes[end - 2..end] != [0xFF, 0xD9] {
            return Err(ImageError::Decode(
                "JPEG is truncated: no end-of-image marker".into(),
            ));
        }
    }
    let reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(ImageError::TooLarge { width, height });
    }
    Ok(Probe {
        format,
        width,
        height,
    })
}

/// Decodes an image [`probe`] read the header of.
pub fn decode_probed(bytes: &[u8], probe: Probe) -> Result<RgbImage, ImageError> {
    let Probe {
        format,
        width,
        height,
    } = probe;
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    limits.max_alloc = Some(MAX_PIXELS * 4 + (64 << 20));
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    Ok(img.into_rgb8())
}

/// The image at the model's input size (resized only when it is not already).
pub fn fit(img: RgbImage, s: &RecognizerSettings) -> RgbImage {
    let (w, h) = (s.input_width, s.input_height);
    if img.dimensions() == (w, h) {
        img
    } else {
        image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle)
    }
}

/// Resizes and normalises an image into the model's input layout, appending to `out`.
pub fn to_tensor(img: &RgbImage, s: &RecognizerSettings, out: &mut Vec<f32>) {
    let (w, h) = (s.input_width, s.input_height);
    let resized;
    let img = if img.dimensions() == (w, h) {
        img
    } else {
        resized = image::imageops::resize(img, w, h, image::imageops::FilterType::Triangle);
        &resized
    };
    let plane = (w * h) as usize;
    let start = out.len();
    out.resize(start + plane * 3, 0.0);
    let dst = &mut out[start..];
    let scale = [
        1.0 / (255.0 * s.std[0]),
        1.0 / (255.0 * s.std[1]),
        1.0 / (255.0 * s.std[2]),
    ];
    let shift = [
        s.mean[0] / s.std[0],
        s.mean[1] / s.std[1],
        s.mean[2] / s.std[2],
    ];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            let v = f32::from(p.0[c]) * scale[c] - shift[c];
            match s.layout {
                ChannelLayout::Nchw => dst[c * plane + i] = v,
                ChannelLayout::Nhwc => dst[i * 3 + c] = v,
            }
        }
    }
}
