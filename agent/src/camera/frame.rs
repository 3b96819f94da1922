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
            Frame::Jpeg(bytes) => Ok(preprocess::decode(&with_huffman_tables(bytes))?),
            Frame::Yuyv {
                width,
                height,
                stride,
                data,
            } => yuyv_to_rgb(*width, *height, *stride, data),
        }
    }

    /// The frame as a JPEG: as the camera sent it (with the standard Huffman tables if it had none),
    /// or encoded now (quality 85) from YUYV.
    pub fn jpeg(&self) -> Result<Vec<u8>, FrameError> {
        match self {
            Frame::Jpeg(bytes) => Ok(with_huffman_tables(bytes).into_owned()),
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

/// JPEG's standard Huffman tables (ITU T.81 Annex K.3: K.3 to K.6), as (class and id, code counts by
/// length 1 to 16, symbols).
const STANDARD_TABLES: [(u8, [u8; 16], &[u8]); 4] = [
    (
        0x00,
        [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        &DC_SYMBOLS,
    ),
    (
        0x10,
        [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D],
        &AC_LUMA,
    ),
    (
        0x01,
        [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        &DC_SYMBOLS,
    ),
    (
        0x11,
        [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77],
        &AC_CHROMA,
    ),
];
const DC_SYMBOLS: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
const AC_LUMA: [u8; 162] = [
    0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07,
    0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xA1, 0x08, 0x23, 0x42, 0xB1, 0xC1, 0x15, 0x52, 0xD1, 0xF0,
    0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0A, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x25, 0x26, 0x27, 0x28,
    0x29, 0x2A, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49,
    0x4A, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69,
    0x6A, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89,
    0x8A, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7,
    0xA8, 0xA9, 0xAA, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xC2, 0xC3, 0xC4, 0xC5,
    0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA, 0xE1, 0xE2,
    0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8,
    0xF9, 0xFA,
];
const AC_CHROMA: [u8; 162] = [
    0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61, 0x71,
    0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xA1, 0xB1, 0xC1, 0x09, 0x23, 0x33, 0x52, 0xF0,
    0x15, 0x62, 0x72, 0xD1, 0x0A, 0x16, 0x24, 0x34, 0xE1, 0x25, 0xF1, 0x17, 0x18, 0x19, 0x1A, 0x26,
    0x27, 0x28, 0x29, 0x2A, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48,
    0x49, 0x4A, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6A, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87,
    0x88, 0x89, 0x8A, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0xA2, 0xA3, 0xA4, 0xA5,
    0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xC2, 0xC3,
    0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA,
    0xE2, 0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8,
    0xF9, 0xFA,
];

/// The JPEG with the standard Huffman tables put before its scan when it has none there (MJPEG as
/// many USB cameras send it: the OpenDML format omits them); any other JPEG, and anything that is not
/// one, as it is (the decoder says what is wrong with it).
pub fn with_huffman_tables(jpeg: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    use std::borrow::Cow;
    if !jpeg.starts_with(&[0xFF, 0xD8]) {
        return Cow::Borrowed(jpeg);
    }
    let mut at = 2;
    while at + 4 <= jpeg.len() && jpeg[at] == 0xFF {
        match jpeg[at + 1] {
            0xFF => at += 1,
            0xC4 => return Cow::Borrowed(jpeg),
            0xDA => {
                let len = 2 + STANDARD_TABLES
                    .iter()
                    .map(|(_, _, symbols)| 17 + symbols.len())
                    .sum::<usize>();
                let mut out = Vec::with_capacity(jpeg.len() + len + 2);
                out.extend_from_slice(&jpeg[..at]);
                out.extend_from_slice(&[0xFF, 0xC4]);
                out.extend_from_slice(&(len as u16).to_be_bytes());
                for (class, counts, symbols) in &STANDARD_TABLES {
                    out.push(*class);
                    out.extend_from_slice(counts);
                    out.extend_from_slice(symbols);
                }
                out.extend_from_slice(&jpeg[at..]);
                return Cow::Owned(out);
            }
            0x01 | 0xD0..=0xD7 => at += 2,
            _ => at += 2 + usize::from(u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]])),
        }
    }
    Cow::Borrowed(jpeg)
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
