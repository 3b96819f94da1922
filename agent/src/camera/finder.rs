//! The classical card finder, for releases without a detector: the counter seen from a fixed camera is
//! learnt as a background, and whatever differs from it is cut into connected regions; a region whose
//! smallest enclosing rotated rectangle it fills, with a card's proportions (88 x 63 mm) and a card's
//! size range, is a card. A card with a hand on it is not (the region is not card-shaped), so a card is
//! found once it lies alone.
//!
//! Work is done on the frame shrunk by [`SCALE`] (1280 x 960 becomes 320 x 240), where a frame costs
//! about a millisecond; corners are mapped back to the frame. The background follows slow changes
//! (light) everywhere nothing is found, and never learns a region that differs from it, so a card that
//! lies still for an hour is still a card.

use super::geometry::{self, CARD_ASPECT, Point, Quad};
use image::RgbImage;

/// How much the frame is shrunk for finding (each side).
pub const SCALE: u32 = 4;
/// A pixel differs from the background by more than this (largest channel difference, 0-255).
const THRESHOLD: u8 = 28;
/// How fast the background follows where nothing differs (per analysed frame).
const LEARN: f32 = 0.05;
/// A region must fill this much of its rotated rectangle.
const MIN_FILL: f32 = 0.82;
/// Its long side over its short side, within this of a card's.
const ASPECT_TOLERANCE: f32 = 0.15;
/// A card's short side, as a share of the frame's short side.
const MIN_SIDE: f32 = 0.08;
const MAX_SIDE: f32 = 0.8;

/// What differs from the background in one frame.
#[derive(Debug, Clone, Default)]
pub struct Finding {
    /// Card-shaped regions, as card quads in frame pixels.
    pub cards: Vec<Quad>,
    /// Pixels (at the finder's scale) that differ from the background, cards included.
    pub foreground: usize,
    /// Pixels that changed since the previous analysed frame (motion).
    pub moving: usize,
}

/// The finder's state: the learnt background and the previous frame.
#[derive(Debug, Default)]
pub struct Finder {
    w: usize,
    h: usize,
    background: Vec<[f32; 3]>,
    previous: Vec<[u8; 3]>,
}

/// Shrinks a frame by [`SCALE`], averaging each block.
pub fn shrink(frame: &RgbImage) -> (usize, usize, Vec<[u8; 3]>) {
    let s = SCALE as usize;
    let (fw, fh) = (frame.width() as usize, frame.height() as usize);
    let (w, h) = (fw / s, fh / s);
    let raw = frame.as_raw();
    let mut out = vec![[0u8; 3]; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut acc = [0u32; 3];
            for dy in 0..s {
                let row = (y * s + dy) * fw;
                for dx in 0..s {
                    let i = (row + x * s + dx) * 3;
                    acc[0] += u32::from(raw[i]);
                    acc[1] += u32::from(raw[i + 1]);
                    acc[2] += u32::from(raw[i + 2]);
                }
            }
            let n = (s * s) as u32;
            out[y * w + x] = [(acc[0] / n) as u8, (acc[1] / n) as u8, (acc[2] / n) as u8];
        }
    }
    (w, h, out)
}

fn differs(a: [u8; 3], b: [f32; 3]) -> bool {
    (0..3).any(|c| (f32::from(a[c]) - b[c]).abs() > f32::from(THRESHOLD))
}

impl Finder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Finds the cards in `frame` and learns the background where nothing differs.
    pub fn find(&mut self, frame: &RgbImage) -> Finding {
        let (w, h, small) = shrink(frame);
        if w < 8 || h < 8 {
            return Finding::default();
        }
        if (w, h) != (self.w, self.h) {
            // The first frame (or a new resolution) is the background.
            self.w = w;
            self.h = h;
            self.background = small
                .iter()
                .map(|p| [f32::from(p[0]), f32::from(p[1]), f32::from(p[2])])
                .collect();
            self.previous = small;
            return Finding::default();
        }
        let moving = small
            .iter()
            .zip(&self.previous)
            .filter(|(a, b)| (0..3).any(|c| a[c].abs_diff(b[c]) > THRESHOLD))
            .count();
        let raw: Vec<bool> = small
            .iter()
            .zip(&self.background)
            .map(|(p, b)| differs(*p, *b))
            .collect();
        let mask = open(&raw, w, h);
        // Learn the background where nothing differs.
        for ((b, p), m) in self.background.iter_mut().zip(&small).zip(&raw) {
            if !m {
                for c in 0..3 {
                    b[c] += (f32::from(p[c]) - b[c]) * LEARN;
                }
            }
        }
        self.previous = small;
        let foreground = mask.iter().filter(|m| **m).count();
        let cards = regions(&mask, w, h)
            .iter()
            .filter_map(|r| card_of(r, w, h))
            .collect();
        Finding {
            cards,
            foreground,
            moving,
        }
    }
}

/// A morphological opening (3x3 erosion, then dilation): specks and one-pixel bridges go.
fn open(mask: &[bool], w: usize, h: usize) -> Vec<bool> {
    let pass = |src: &[bool], keep_if_all: bool| {
        let mut out = vec![false; src.len()];
        for y in 0..h {
            for x in 0..w {
                let mut all = true;
                let mut any = false;
                for dy in -1i32..=1 {
                    for dx in -1i32..=1 {
                        let (nx, ny) = (x as i32 + dx, y as i32 + dy);
                        let v = nx >= 0
                            && ny >= 0
                            && (nx as usize) < w
                            && (ny as usize) < h
                            && src[ny as usize * w + nx as usize];
                        all &= v;
                        any |= v;
                    }
                }
                out[y * w + x] = if keep_if_all { all } else { any };
            }
        }
        out
    };
    let eroded = pass(mask, true);
    pass(&eroded, false)
}

/// The 4-connected regions of a mask, each as its pixels.
fn regions(mask: &[bool], w: usize, h: usize) -> Vec<Vec<(u32, u32)>> {
    let mut seen = vec![false; mask.len()];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        let mut region = Vec::new();
        seen[start] = true;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            region.push((x as u32, y as u32));
            let mut visit = |j: usize| {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        out.push(region);
    }
    out
}

/// A region's card quad in frame pixels, if the region is card-shaped.
fn card_of(region: &[(u32, u32)], w: usize, h: usize) -> Option<Quad> {
    let short = w.min(h) as f32;
    let min_side = MIN_SIDE * short;
    if (region.len() as f32) < min_side * min_side * CARD_ASPECT * MIN_FILL {
        return None;
    }
    // Each pixel's four corners, so the hull is the region's outline, not its pixel centres.
    let mut corners: Vec<Point> = Vec::with_capacity(region.len() * 4);
    let mut rows: std::collections::HashMap<u32, (u32, u32)> = std::collections::HashMap::new();
    for &(x, y) in region {
        let e = rows.entry(y).or_insert((x, x));
        e.0 = e.0.min(x);
        e.1 = e.1.max(x);
    }
    for (y, (x0, x1)) in rows {
        let (y, x0, x1) = (y as f32, x0 as f32, x1 as f32 + 1.0);
        corners.extend([[x0, y], [x1, y], [x0, y + 1.0], [x1, y + 1.0]]);
    }
    let hull = geometry::convex_hull(&corners);
    let (rect, area) = geometry::min_area_rect(&hull)?;
    if area <= 0.0 || (region.len() as f32) / area < MIN_FILL {
        return None;
    }
    let quad = geometry::card_order(rect);
    let side = geometry::short_side(&quad);
    let long = area / side;
    if (long / side - CARD_ASPECT).abs() > ASPECT_TOLERANCE * CARD_ASPECT
        || side < min_side
        || side > MAX_SIDE * short
    {
        return None;
    }
    let s = SCALE as f32;
    Some(quad.map(|p| [p[0] * s, p[1] * s]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A textured counter, the same every call.
    fn counter(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let n =
                (x.wrapping_mul(7919) ^ y.wrapping_mul(104_729)).wrapping_mul(2_654_435_761) >> 27;
            let v = 120 + n as u8 % 10;
            image::Rgb([v, v - 30, v - 60])
        })
    }

    /// Draws a solid card (and a darker inner panel) at `q` on `img`.
    fn draw(img: &mut RgbImage, q: &Quad) {
        let h = geometry::homography(q, &[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]).unwrap();
        for (x, y, px) in img.enumerate_pixels_mut() {
            let (xf, yf) = (f64::from(x) + 0.5, f64::from(y) + 0.5);
            let d = h[6] * xf + h[7] * yf + h[8];
            let u = (h[0] * xf + h[1] * yf + h[2]) / d;
            let v = (h[3] * xf + h[4] * yf + h[5]) / d;
            if (0.0..=1.0).contains(&u) && (0.0..=1.0).contains(&v) {
                *px = if (0.1..0.9).contains(&u) && (0.1..0.5).contains(&v) {
                    image::Rgb([20, 60, 200])
                } else {
                    image::Rgb([230, 220, 40])
                };
            }
        }
    }

    fn card_at(cx: f32, cy: f32, width: f32, deg: f32) -> Quad {
        let (s, c) = deg.to_radians().sin_cos();
        let (w, h) = (width, width * CARD_ASPECT);
        let p = |dx: f32, dy: f32| [cx + dx * c - dy * s, cy + dx * s + dy * c];
        geometry::card_order([
            p(-w / 2.0, -h / 2.0),
            p(w / 2.0, -h / 2.0),
            p(w / 2.0, h / 2.0),
            p(-w / 2.0, h / 2.0),
        ])
    }

    #[test]
    fn cards_on_the_counter_are_found_with_their_corners_and_nothing_else_is() {
        let mut f = Finder::new();
        let empty = counter(640, 480);
        assert!(f.find(&empty).cards.is_empty());
        assert!(
            f.find(&empty).cards.is_empty(),
            "an empty counter has no card"
        );
        let a = card_at(200.0, 220.0, 120.0, 23.0);
        let b = card_at(470.0, 250.0, 110.0, -71.0);
        let mut scene = empty.clone();
        draw(&mut scene, &a);
        draw(&mut scene, &b);
        let found = f.find(&scene).cards;
        assert_eq!(found.len(), 2, "{found:?}");
        for want in [a, b] {
            let got = found
                .iter()
                .map(|q| {
                    geometry::corner_error(q, &want)
                        .min(geometry::corner_error(&geometry::rotate_half(*q), &want))
                })
                .fold(f32::MAX, f32::min);
            assert!(got < 8.0, "corner error {got} px");
        }
        // A square is not a card.
        let mut square = empty.clone();
        let s = [
            [300.0, 200.0],
            [400.0, 200.0],
            [400.0, 300.0],
            [300.0, 300.0],
        ];
        draw(&mut square, &s);
        let mut f = Finder::new();
        f.find(&empty);
        assert!(f.find(&square).cards.is_empty());
    }
}
