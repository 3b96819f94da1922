//! A frame as a camera delivers it: JPEG (MJPEG cameras: the Pi camera through rpicam-vid, IP cameras,
//! USB cameras that compress, recorded days) or packed YUYV 4:2:2 (USB cameras that do not compress).
//!
//! A frame is decoded to RGB only when the analysis takes it (frames it skips cost nothing), and a YUYV
//! frame becomes a JPEG only when the page asks for it.

use crate::recognizer::preprocess::{self, ImageError};
use image::RgbImage;

/// Why a frame gives no image.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(
        "a YUYV frame of {got} bytes is short of {width}x{height} pixels at {stride} bytes a row"
    )]
    ShortYuyv {
        got: usize,
        width: u32,
        height: u32,
        stride: u32,
    },
    #[error("a YUYV frame of {width}x{height} pixels: {why}")]
    BadYuyv {
        width: u32,
        height: u32,
        why: &'static str,
    },
    #[error("encoding the frame as JPEG: {0}")]
    Encode(String),
}

/// One frame from a camera.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Jpeg(Vec<u8>),
    /// Packed 4:2:2, two pixels in four bytes (Y0 U Y1 V), `stride` bytes a row, BT.601 limited range
    /// (what UVC cameras send).
    Yuyv {
        width: u32,
        height: u32,
        stride: u32,
        data: Vec<u8>,
    },
}

impl Frame {
    /// The frame in RGB.
    pub fn decode(&self) -> Result<RgbImage, FrameError> {
        match self {
            Frame::Jpeg(bytes) => Ok(preprocess::decode(bytes)?),
            Frame::Yuyv {
                width,
                height,
                stride,
                data,
            } => yuyv_to_rgb(*width, *height, *stride, data),
        }
    }

    /// The frame as a JPEG: as the camera sent it, or encoded now (quality 85) from YUYV.
    pub fn jpeg(&self) -> Result<Vec<u8>, FrameError> {
        match self {
            Frame::Jpeg(bytes) => Ok(bytes.clone()),
            Frame::Yuyv { .. } => {
                let rgb = self.decode()?;
                let mut out = Vec::with_capacity(rgb.as_raw().len() / 8);
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
                    .encode_image(&rgb)
                    .map_err(|e| FrameError::Encode(e.to_string()))?;
                Ok(out)
            }
        }
    }
}

/// Converts packed YUYV (BT.601, limited range: Y in 16..=235, U and V in 16..=240) to RGB.
pub fn yuyv_to_rgb(
    width: u32,
    height: u32,
    stride: u32,
    data: &[u8],
) -> Result<RgbImage, FrameError> {
    let bad = |why| FrameError::BadYuyv { width, height, why };
    if width == 0 || height == 0 {
        return Err(bad("no pixels"));
    }
    if !width.is_multiple_of(2) {
        return Err(bad("an odd width (YUYV carries pixels in pairs)"));
    }
    if u64::from(width) * u64::from(height) > preprocess::MAX_PIXELS {
        return Err(bad("over the largest image accepted"));
    }
    let row = width as usize * 2;
    if (stride as usize) < row {
        return Err(bad("rows shorter than two bytes a pixel"));
    }
    let need = stride as usize * (height as usize - 1) + row;
    if data.len() < need {
        return Err(FrameError::ShortYuyv {
            got: data.len(),
            width,
            height,
            stride,
        });
    }
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    for (y, out) in rgb.chunks_exact_mut(width as usize * 3).enumerate() {
        let line = &data[y * stride as usize..y * stride as usize + row];
        for (quad, px) in line.chunks_exact(4).zip(out.chunks_exact_mut(6)) {
            let (u, v) = (i32::from(quad[1]) - 128, i32::from(quad[3]) - 128);
            let (r, g, b) = (409 * v, -100 * u - 208 * v, 516 * u);
            for (k, luma) in [quad[0], quad[2]].into_iter().enumerate() {
                let c = 298 * (i32::from(luma) - 16) + 128;
                px[k * 3] = clamp((c + r) >> 8);
                px[k * 3 + 1] = clamp((c + g) >> 8);
                px[k * 3 + 2] = clamp((c + b) >> 8);
            }
        }
    }
    RgbImage::from_raw(width, height, rgb).ok_or_else(|| bad("does not fit an image"))
}

fn clamp(x: i32) -> u8 {
    x.clamp(0, 255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One pair of pixels, both with luma `y`, as YUYV.
    fn pair(y: u8, u: u8, v: u8) -> [u8; 4] {
        [y, u, y, v]
    }

    #[test]
    fn yuyv_converts_as_bt601_limited_range() {
        // BT.601's own reference colours (Y, Cb, Cr), two pixels each, then a row padded to 12 bytes.
        let colours: [([u8; 3], [u8; 3]); 5] = [
            ([16, 128, 128], [0, 0, 0]),
            ([235, 128, 128], [255, 255, 255]),
            ([81, 90, 240], [255, 0, 0]),
            ([145, 54, 34], [0, 255, 0]),
            ([41, 240, 110], [0, 0, 255]),
        ];
        for ([y, u, v], want) in colours {
            let mut data = pair(y, u, v).to_vec();
            data.extend(pair(y, u, v));
            data.extend([0xAA; 4]);
            let img = yuyv_to_rgb(4, 1, 12, &data).unwrap();
            for p in img.pixels() {
                for (got, want) in p.0.iter().zip(want) {
                    assert!(
                        got.abs_diff(want) <= 2,
                        "YUV {y},{u},{v} gave {:?}, not {want:?}",
                        p.0
                    );
                }
            }
        }
        // Each pixel keeps its own luma; the pair shares its colour.
        let img = yuyv_to_rgb(2, 1, 4, &[16, 128, 235, 128]).unwrap();
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(1, 0).0, [255, 255, 255]);
    }

    #[test]
    fn a_short_or_malformed_yuyv_frame_is_refused_with_its_size() {
        let err = yuyv_to_rgb(4, 2, 8, &[0; 15]).unwrap_err().to_string();
        assert_eq!(
            err,
            "a YUYV frame of 15 bytes is short of 4x2 pixels at 8 bytes a row"
        );
        // The last row needs no padding after it.
        assert!(yuyv_to_rgb(4, 2, 12, &[0; 20]).is_ok());
        assert!(yuyv_to_rgb(3, 2, 8, &[0; 16]).is_err(), "odd width");
        assert!(yuyv_to_rgb(4, 2, 6, &[0; 16]).is_err(), "stride");
        assert!(yuyv_to_rgb(0, 2, 8, &[]).is_err());
        let huge = yuyv_to_rgb(100_000, 100_000, 200_000, &[]).unwrap_err();
        assert!(huge.to_string().contains("largest"), "{huge}");
    }

    #[test]
    fn a_yuyv_frame_becomes_a_jpeg_of_its_size_for_the_page() {
        let (w, h) = (64u32, 48u32);
        let data: Vec<u8> = (0..w * h / 2).flat_map(|_| pair(126, 128, 128)).collect();
        let frame = Frame::Yuyv {
            width: w,
            height: h,
            stride: w * 2,
            data,
        };
        let jpeg = frame.jpeg().unwrap();
        let back = Frame::Jpeg(jpeg).decode().unwrap();
        assert_eq!(back.dimensions(), (w, h));
        let grey = back.get_pixel(10, 10).0;
        assert!(grey.iter().all(|c| c.abs_diff(128) <= 3), "{grey:?}");
    }
}
