//! The card detector, for releases that carry one: a YOLO-OBB style model finds rotated card boxes in
//! a frame. The frame is letterboxed into the model's input ([`input`]); the output, per anchor a box
//! (centre, width, height, rotation) and a score per class, is decoded ([`decode`]): boxes below the
//! release's score go, the rest are mapped back to the frame as card quads, and of boxes overlapping
//! more than the release's IoU (rotated boxes, exact polygon intersection) only the best-scored stays.
//! The quads are then warped and recognised as the classical finder's are.
//!
//! [`CpuDetector`] runs the model with tract, as the CPU backend runs the embedder.

use super::geometry::{self, Point, Quad};
use crate::recognizer::BackendError;
use deckhand_protocol::manifest::DetectorSettings;
use image::RgbImage;
use std::path::Path;

/// The most cards kept from one frame.
pub const MAX_DETECTIONS: usize = 32;
/// The most boxes, best scores first, that reach the overlap check (it is quadratic in them).
const MAX_CANDIDATES: usize = 512;
/// The letterbox's border, as YOLO models are trained with it.
const PAD: f32 = 114.0 / 255.0;

/// Where a frame sits in the detector's input: scaled by `scale`, offset by the padding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Letterbox {
    pub scale: f32,
    pub pad_x: f32,
    pub pad_y: f32,
    /// The scaled frame's size in the input.
    pub width: u32,
    pub height: u32,
}

impl Letterbox {
    /// The frame scaled to fit the input, aspect kept, centred.
    pub fn of(frame_w: u32, frame_h: u32, s: &DetectorSettings) -> Letterbox {
        let scale = (s.input_width as f32 / frame_w.max(1) as f32)
            .min(s.input_height as f32 / frame_h.max(1) as f32);
        let width = ((frame_w as f32 * scale).round() as u32).clamp(1, s.input_width);
        let height = ((frame_h as f32 * scale).round() as u32).clamp(1, s.input_height);
        Letterbox {
            scale,
            pad_x: ((s.input_width - width) / 2) as f32,
            pad_y: ((s.input_height - height) / 2) as f32,
            width,
            height,
        }
    }

    /// A point of the input in frame pixels.
    pub fn to_frame(&self, p: Point) -> Point {
        [
            (p[0] - self.pad_x) / self.scale,
            (p[1] - self.pad_y) / self.scale,
        ]
    }

    /// A point of the frame in input pixels.
    pub fn to_input(&self, p: Point) -> Point {
        [
            p[0] * self.scale + self.pad_x,
            p[1] * self.scale + self.pad_y,
        ]
    }
}

/// The detector's input for `frame` (channels first, 0..1), written to `out`; where the frame sits.
pub fn input(frame: &RgbImage, s: &DetectorSettings, out: &mut Vec<f32>) -> Letterbox {
    let lb = Letterbox::of(frame.width(), frame.height(), s);
    let scaled = image::imageops::resize(
        frame,
        lb.width,
        lb.height,
        image::imageops::FilterType::Triangle,
    );
    let (w, h) = (s.input_width as usize, s.input_height as usize);
    out.clear();
    out.resize(3 * w * h, PAD);
    let (x0, y0) = (lb.pad_x as usize, lb.pad_y as usize);
    for (x, y, p) in scaled.enumerate_pixels() {
        let i = (y0 + y as usize) * w + x0 + x as usize;
        for c in 0..3 {
            out[c * w * h + i] = f32::from(p[c]) / 255.0;
        }
    }
    lb
}

/// A card found by the detector: its quad in frame pixels (in card order) and its score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Detection {
    pub quad: Quad,
    pub score: f32,
}

/// Why a detector's output could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "the detector's output has shape {shape:?}; expected [1, {channels}, anchors] or [1, anchors, {channels}] (4 box values, {classes} class scores, 1 angle)"
    )]
    Shape {
        shape: Vec<usize>,
        channels: usize,
        classes: u32,
    },
}

/// The corners of a rotated box: centre, width, height, rotation (radians, y down).
pub fn obb_corners(cx: f32, cy: f32, w: f32, h: f32, angle: f32) -> [Point; 4] {
    let (sin, cos) = angle.sin_cos();
    let (ux, uy) = (w / 2.0 * cos, w / 2.0 * sin);
    let (vx, vy) = (-h / 2.0 * sin, h / 2.0 * cos);
    [
        [cx - ux - vx, cy - uy - vy],
        [cx + ux - vx, cy + uy - vy],
        [cx + ux + vx, cy + uy + vy],
        [cx - ux + vx, cy - uy + vy],
    ]
}

/// Decodes a detector's output (`shape` as the model gave it) for a frame placed by `lb`: the cards,
/// best first, overlapping boxes reduced to the best of each.
pub fn decode(
    output: &[f32],
    shape: &[usize],
    s: &DetectorSettings,
    lb: &Letterbox,
) -> Result<Vec<Detection>, DecodeError> {
    let channels = 4 + s.classes as usize + 1;
    let bad = || DecodeError::Shape {
        shape: shape.to_vec(),
        channels,
        classes: s.classes,
    };
    // [1, C, A] or [1, A, C] (a batch of one may also be left out).
    let dims: Vec<usize> = match shape {
        [1, a, b] | [a, b] => vec![*a, *b],
        _ => return Err(bad()),
    };
    let (anchors, at): (usize, Box<dyn Fn(usize, usize) -> f32>) = if dims[0] == channels {
        let a = dims[1];
        (a, Box::new(move |k, c| output[c * a + k]))
    } else if dims[1] == channels {
        (dims[0], Box::new(move |k, c| output[k * channels + c]))
    } else {
        return Err(bad());
    };
    if output.len() != anchors * channels {
        return Err(bad());
    }
    let score_channel = 4 + s.card_class as usize;
    let mut candidates: Vec<Detection> = (0..anchors)
        .filter_map(|k| {
            let score = at(k, score_channel);
            if !(score.is_finite() && score >= s.min_score) {
                return None;
            }
            let [cx, cy, w, h, angle] = [0, 1, 2, 3, channels - 1].map(|c| at(k, c));
            if ![cx, cy, w, h, angle].iter().all(|v| v.is_finite()) || w <= 1.0 || h <= 1.0 {
                return None;
            }
            let corners = obb_corners(cx, cy, w, h, angle).map(|p| lb.to_frame(p));
            Some(Detection {
                quad: geometry::card_order(corners),
                score,
            })
        })
        .collect();
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    candidates.truncate(MAX_CANDIDATES);
    let mut kept: Vec<Detection> = Vec::new();
    for c in candidates {
        if kept.iter().all(|k| iou(&k.quad, &c.quad) <= s.iou) {
            kept.push(c);
            if kept.len() == MAX_DETECTIONS {
                break;
            }
        }
    }
    Ok(kept)
}

fn cross(o: Point, a: Point, b: Point) -> f32 {
    (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
}

fn area(poly: &[Point]) -> f32 {
    let n = poly.len();
    (0..n)
        .map(|i| {
            let (a, b) = (poly[i], poly[(i + 1) % n]);
            a[0] * b[1] - b[0] * a[1]
        })
        .sum::<f32>()
        / 2.0
}

/// The quad with a positive shoelace area (the orientation the clipping below expects).
fn oriented(q: &Quad) -> Vec<Point> {
    let mut v = q.to_vec();
    if area(&v) < 0.0 {
        v.reverse();
    }
    v
}

/// Intersection over union of two convex quads (Sutherland-Hodgman clipping of one by the other).
pub fn iou(a: &Quad, b: &Quad) -> f32 {
    let (pa, pb) = (oriented(a), oriented(b));
    let mut poly = pa.clone();
    for i in 0..pb.len() {
        if poly.is_empty() {
            break;
        }
        let (p, q) = (pb[i], pb[(i + 1) % pb.len()]);
        let inside = |x: Point| cross(p, q, x) >= 0.0;
        let mut next = Vec::with_capacity(poly.len() + 2);
        for j in 0..poly.len() {
            let (cur, prev) = (poly[j], poly[(j + poly.len() - 1) % poly.len()]);
            let crossing = |a: Point, b: Point| {
                let (da, db) = (cross(p, q, a), cross(p, q, b));
                let t = da / (da - db);
                [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t]
            };
            match (inside(prev), inside(cur)) {
                (true, true) => next.push(cur),
                (true, false) => next.push(crossing(prev, cur)),
                (false, true) => {
                    next.push(crossing(prev, cur));
                    next.push(cur);
                }
                (false, false) => {}
            }
        }
        poly = next;
    }
    let inter = if poly.len() >= 3 {
        area(&poly).abs()
    } else {
        0.0
    };
    let union = area(&pa).abs() + area(&pb).abs() - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// A release's detector on a backend: the CPU ([`CpuDetector`]) or the Hailo
/// (`recognizer::hailo::HailoDetector`). Called from one thread at a time.
pub trait Detect: Send {
    /// The cards in `frame`, best first.
    fn detect(&mut self, frame: &RgbImage) -> Result<Vec<Detection>, BackendError>;
    fn name(&self) -> &'static str;
}

/// The output shape a model with `s` and `values` output values has: `[1, 4 + classes + 1, anchors]`.
pub fn output_shape(s: &DetectorSettings, values: usize) -> Result<[usize; 3], BackendError> {
    let channels = 4 + s.classes as usize + 1;
    if values == 0 || !values.is_multiple_of(channels) {
        return Err(BackendError::Load(format!(
            "the detector's output has {values} values, not a whole number of anchors of {channels} \
             (4 + {} classes + 1)",
            s.classes
        )));
    }
    Ok([1, channels, values / channels])
}

/// A release's detector on the CPU (tract), planned for one frame at the release's input size.
pub struct CpuDetector {
    plan: crate::recognizer::cpu::Plan,
    settings: DetectorSettings,
    input: Vec<f32>,
}

impl CpuDetector {
    /// Loads and plans the model, and runs it once on a blank frame: a model whose output does not
    /// have the settings' shape is refused here, not on the counter.
    pub fn load(path: &Path, s: &DetectorSettings) -> Result<Self, BackendError> {
        use crate::recognizer::cpu::{DepthwiseLayout, plan_model};
        let shape = [1, 3, s.input_height as usize, s.input_width as usize];
        let (plan, _) = plan_model(path, "detector", &shape, DepthwiseLayout::Chosen)?;
        let mut me = CpuDetector {
            plan,
            settings: s.clone(),
            input: Vec::new(),
        };
        let blank = RgbImage::new(s.input_width, s.input_height);
        me.detect(&blank)
            .map_err(|e| BackendError::Load(format!("detector {}: {e}", path.display())))?;
        Ok(me)
    }

    /// The cards in `frame`, best first.
    pub fn detect(&mut self, frame: &RgbImage) -> Result<Vec<Detection>, BackendError> {
        let s = &self.settings;
        let lb = input(frame, s, &mut self.input);
        let shape = [1, 3, s.input_height as usize, s.input_width as usize];
        let (values, out_shape) =
            crate::recognizer::cpu::run_plan(&self.plan, &shape, &self.input)?;
        decode(&values, &out_shape, s, &lb).map_err(|e| BackendError::Run(e.to_string()))
    }

    pub fn settings(&self) -> &DetectorSettings {
        &self.settings
    }
}

impl Detect for CpuDetector {
    fn detect(&mut self, frame: &RgbImage) -> Result<Vec<Detection>, BackendError> {
        CpuDetector::detect(self, frame)
    }

    fn name(&self) -> &'static str {
        "cpu"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DetectorSettings {
        DetectorSettings {
            input_width: 640,
            input_height: 640,
            classes: 2,
            card_class: 1,
            min_score: 0.4,
            iou: 0.5,
        }
    }

    /// One anchor's values: cx, cy, w, h, class 0, class 1 (card), angle.
    fn anchor(cx: f32, cy: f32, w: f32, h: f32, card: f32, angle: f32) -> [f32; 7] {
        [cx, cy, w, h, 0.9 - card, card, angle]
    }

    /// Anchors as the model writes them, channels first.
    fn channels_first(anchors: &[[f32; 7]]) -> Vec<f32> {
        (0..7)
            .flat_map(|c| anchors.iter().map(move |a| a[c]))
            .collect()
    }

    #[test]
    fn rotated_overlap_is_exact_for_squares_and_symmetric() {
        let sq =
            |x: f32, y: f32| -> Quad { [[x, y], [x + 2.0, y], [x + 2.0, y + 2.0], [x, y + 2.0]] };
        assert!((iou(&sq(0.0, 0.0), &sq(0.0, 0.0)) - 1.0).abs() < 1e-6);
        assert_eq!(iou(&sq(0.0, 0.0), &sq(5.0, 0.0)), 0.0);
        // Half over: 2 / (4 + 4 - 2).
        assert!((iou(&sq(0.0, 0.0), &sq(1.0, 0.0)) - 1.0 / 3.0).abs() < 1e-6);
        // A square turned 45 degrees about the same centre: the octagon, 4 * (2 - sqrt 2) ... of 4.
        let turned = obb_corners(1.0, 1.0, 2.0, 2.0, std::f32::consts::FRAC_PI_4);
        let a = iou(&sq(0.0, 0.0), &turned);
        let octagon = 8.0 * (2.0f32.sqrt() - 1.0);
        assert!((a - octagon / (8.0 - octagon)).abs() < 1e-4, "{a}");
        assert!((a - iou(&turned, &sq(0.0, 0.0))).abs() < 1e-6);
        // Either winding.
        let mut reversed = turned;
        reversed.reverse();
        assert!((iou(&sq(0.0, 0.0), &reversed) - a).abs() < 1e-6);
    }

    #[test]
    fn boxes_are_scored_suppressed_and_mapped_back_to_the_frame() {
        let s = settings();
        // A 1280 x 960 frame in a 640 x 640 input: scale 0.5, 80 pixels of padding above and below.
        let lb = Letterbox::of(1280, 960, &s);
        assert_eq!((lb.scale, lb.pad_x, lb.pad_y), (0.5, 0.0, 80.0));
        let anchors = [
            // A card at frame (400, 300), 200 x 280, turned 30 degrees: input (200, 230), 100 x 140.
            anchor(
                200.0,
                230.0,
                100.0,
                140.0,
                0.92,
                std::f32::consts::FRAC_PI_6,
            ),
            // The same card seen by a neighbouring anchor, a little off and less sure: suppressed.
            anchor(203.0, 228.0, 98.0, 141.0, 0.80, 0.52),
            // A second card, elsewhere.
            anchor(480.0, 400.0, 90.0, 126.0, 0.70, 0.0),
            // Below the score: gone.
            anchor(300.0, 300.0, 100.0, 140.0, 0.30, 0.0),
            // Nonsense (NaN, zero size): gone, not a panic.
            anchor(f32::NAN, 10.0, 100.0, 140.0, 0.99, 0.0),
            anchor(10.0, 10.0, 0.0, 140.0, 0.99, 0.0),
        ];
        let found = decode(&channels_first(&anchors), &[1, 7, anchors.len()], &s, &lb).unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].score, 0.92);
        assert_eq!(found[1].score, 0.70);
        let truth = geometry::card_order(obb_corners(
            400.0,
            300.0,
            200.0,
            280.0,
            std::f32::consts::FRAC_PI_6,
        ));
        let err = geometry::corner_error(&found[0].quad, &truth).min(geometry::corner_error(
            &found[0].quad,
            &geometry::rotate_half(truth),
        ));
        assert!(err < 0.1, "{err} {:?} {truth:?}", found[0].quad);
        // The same output with anchors first decodes the same.
        let rows: Vec<f32> = anchors.iter().flatten().copied().collect();
        assert_eq!(
            decode(&rows, &[1, anchors.len(), 7], &s, &lb).unwrap(),
            found
        );
        // A wrong shape names itself.
        let err = decode(&rows, &[1, anchors.len(), 6], &s, &lb).unwrap_err();
        assert!(err.to_string().contains("[1, 6, 6]"), "{err}");
        assert!(decode(&rows[1..], &[1, 7, anchors.len()], &s, &lb).is_err());
    }

    #[test]
    fn the_input_is_the_frame_letterboxed() {
        let s = DetectorSettings {
            input_width: 64,
            input_height: 64,
            ..settings()
        };
        let frame = RgbImage::from_pixel(128, 64, image::Rgb([255, 0, 51]));
        let mut out = Vec::new();
        let lb = input(&frame, &s, &mut out);
        assert_eq!((lb.width, lb.height, lb.pad_y), (64, 32, 16.0));
        assert_eq!(out.len(), 3 * 64 * 64);
        let at = |c: usize, x: usize, y: usize| out[c * 64 * 64 + y * 64 + x];
        assert_eq!(at(0, 10, 5), PAD);
        assert_eq!(
            (at(0, 10, 30), at(1, 10, 30), at(2, 10, 30)),
            (1.0, 0.0, 0.2)
        );
        assert_eq!(lb.to_frame(lb.to_input([100.0, 50.0])), [100.0, 50.0]);
    }
}
