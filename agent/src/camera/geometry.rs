//! Plane geometry for the counter: convex hulls, the smallest rotated rectangle around a shape, a
//! card's corners in order, and the perspective warp of a quadrilateral to an upright card-shaped crop.

use image::RgbImage;

/// A point in frame pixels.
pub type Point = [f32; 2];
/// A card's corners in the frame, clockwise from the card's top left (y grows downwards).
pub type Quad = [Point; 4];

/// A card's height over its width (88 x 63 mm).
pub const CARD_ASPECT: f32 = 88.0 / 63.0;

fn cross(o: Point, a: Point, b: Point) -> f32 {
    (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
}

/// The convex hull of `points` (Andrew's monotone chain), counter-clockwise in y-up terms; empty for
/// fewer than 3 distinct points.
pub fn convex_hull(points: &[Point]) -> Vec<Point> {
    let mut p: Vec<Point> = points.to_vec();
    p.sort_by(|a, b| a[0].total_cmp(&b[0]).then(a[1].total_cmp(&b[1])));
    p.dedup();
    if p.len() < 3 {
        return Vec::new();
    }
    let mut hull: Vec<Point> = Vec::with_capacity(p.len() * 2);
    for &pt in p.iter().chain(p.iter().rev().skip(1)) {
        // Lower hull on the way up, upper hull on the way back.
        while hull.len() >= 2 && cross(hull[hull.len() - 2], hull[hull.len() - 1], pt) <= 0.0 {
            hull.pop();
        }
        hull.push(pt);
    }
    hull.pop();
    if hull.len() < 3 { Vec::new() } else { hull }
}

/// The smallest-area rectangle around a convex hull: its four corners (in no particular order yet)
/// and its area. One of its sides lies along a hull edge (Freeman and Shapira), so every edge's
/// direction is tried.
pub fn min_area_rect(hull: &[Point]) -> Option<([Point; 4], f32)> {
    if hull.len() < 3 {
        return None;
    }
    let mut best: Option<([Point; 4], f32)> = None;
    for i in 0..hull.len() {
        let a = hull[i];
        let b = hull[(i + 1) % hull.len()];
        let (dx, dy) = (b[0] - a[0], b[1] - a[1]);
        let len = (dx * dx + dy * dy).sqrt();
        if len < 1e-6 {
            continue;
        }
        let (ux, uy) = (dx / len, dy / len);
        let (vx, vy) = (-uy, ux);
        let (mut min_u, mut max_u, mut min_v, mut max_v) = (f32::MAX, f32::MIN, f32::MAX, f32::MIN);
        for p in hull {
            let u = p[0] * ux + p[1] * uy;
            let v = p[0] * vx + p[1] * vy;
            min_u = min_u.min(u);
            max_u = max_u.max(u);
            min_v = min_v.min(v);
            max_v = max_v.max(v);
        }
        let area = (max_u - min_u) * (max_v - min_v);
        if best.as_ref().is_none_or(|(_, a)| area < *a) {
            let corner = |u: f32, v: f32| [u * ux + v * vx, u * uy + v * vy];
            best = Some((
                [
                    corner(min_u, min_v),
                    corner(max_u, min_v),
                    corner(max_u, max_v),
                    corner(min_u, max_v),
                ],
                area,
            ));
        }
    }
    best
}

fn dist(a: Point, b: Point) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt()
}

/// A rectangle's corners ordered as a card's: clockwise on screen, the first edge a short one (the
/// card's top), starting from the corner nearest the frame's top left of the two short-edge starts.
/// Which short edge is the card's top cannot be known from the shape: the other reading is
/// [`rotate_half`].
pub fn card_order(corners: [Point; 4]) -> Quad {
    let mut c = corners;
    // Clockwise on screen (y down) means a positive shoelace sum.
    let shoelace: f32 = (0..4)
        .map(|i| {
            let (a, b) = (c[i], c[(i + 1) % 4]);
            a[0] * b[1] - b[0] * a[1]
        })
        .sum();
    if shoelace < 0.0 {
        c.reverse();
    }
    // Make edge 0-1 a short one.
    if dist(c[0], c[1]) > dist(c[1], c[2]) {
        c.rotate_left(1);
    }
    // Of the two readings (start at c0 or at c2), the one starting nearer the frame's top left.
    let key = |p: Point| p[0] + p[1];
    if key(c[2]) < key(c[0]) {
        c.rotate_left(2);
    }
    c
}

/// The same quadrilateral read from the opposite short edge (the card turned half a turn).
pub fn rotate_half(q: Quad) -> Quad {
    [q[2], q[3], q[0], q[1]]
}

/// The largest distance between corresponding corners of two quadrilaterals.
pub fn corner_error(a: &Quad, b: &Quad) -> f32 {
    (0..4).map(|i| dist(a[i], b[i])).fold(0.0, f32::max)
}

/// The centre of a quadrilateral.
pub fn centre(q: &Quad) -> Point {
    [
        q.iter().map(|p| p[0]).sum::<f32>() / 4.0,
        q.iter().map(|p| p[1]).sum::<f32>() / 4.0,
    ]
}

/// The length of a quadrilateral's shorter pair of sides (its width, for a card).
pub fn short_side(q: &Quad) -> f32 {
    ((dist(q[0], q[1]) + dist(q[2], q[3])) / 2.0).min((dist(q[1], q[2]) + dist(q[3], q[0])) / 2.0)
}

/// The homography taking `from[i]` to `to[i]` (row-major 3x3, `h[8]` = 1), or `None` when the points
/// are degenerate.
pub fn homography(from: &Quad, to: &Quad) -> Option<[f64; 9]> {
    // Eight equations in the eight unknowns h0..h7, solved by Gaussian elimination with pivoting.
    let mut m = [[0f64; 9]; 8];
    for i in 0..4 {
        let (x, y) = (f64::from(from[i][0]), f64::from(from[i][1]));
        let (u, v) = (f64::from(to[i][0]), f64::from(to[i][1]));
        m[2 * i] = [x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y, u];
        m[2 * i + 1] = [0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y, v];
    }
    for col in 0..8 {
        let pivot = (col..8).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
        if m[pivot][col].abs() < 1e-9 {
            return None;
        }
        m.swap(col, pivot);
        let p = m[col];
        for (r, row) in m.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / p[col];
                for (x, pk) in row[col..].iter_mut().zip(&p[col..]) {
                    *x -= f * pk;
                }
            }
        }
    }
    let mut h = [0f64; 9];
    for i in 0..8 {
        h[i] = m[i][8] / m[i][i];
    }
    h[8] = 1.0;
    Some(h)
}

/// Warps the quadrilateral `quad` of `img` to an upright `w` x `h` image (corner 0 to the top left,
/// clockwise), sampling bilinearly; outside the frame is black.
pub fn warp(img: &RgbImage, quad: &Quad, w: u32, h: u32) -> Option<RgbImage> {
    let dst: Quad = [
        [0.0, 0.0],
        [w as f32 - 1.0, 0.0],
        [w as f32 - 1.0, h as f32 - 1.0],
        [0.0, h as f32 - 1.0],
    ];
    // From the crop back into the frame.
    let m = homography(&dst, quad)?;
    let (iw, ih) = img.dimensions();
    let raw = img.as_raw();
    let mut out = RgbImage::new(w, h);
    for (x, y, px) in out.enumerate_pixels_mut() {
        let (xf, yf) = (f64::from(x), f64::from(y));
        let d = m[6] * xf + m[7] * yf + m[8];
        if d.abs() < 1e-12 {
            continue;
        }
        let sx = (m[0] * xf + m[1] * yf + m[2]) / d;
        let sy = (m[3] * xf + m[4] * yf + m[5]) / d;
        if sx < 0.0 || sy < 0.0 || sx > f64::from(iw - 1) || sy > f64::from(ih - 1) {
            continue;
        }
        let (x0, y0) = (sx.floor() as u32, sy.floor() as u32);
        let (x1, y1) = ((x0 + 1).min(iw - 1), (y0 + 1).min(ih - 1));
        let (fx, fy) = ((sx - f64::from(x0)) as f32, (sy - f64::from(y0)) as f32);
        let at = |x: u32, y: u32, c: usize| f32::from(raw[((y * iw + x) * 3) as usize + c]);
        for c in 0..3 {
            let top = at(x0, y0, c) * (1.0 - fx) + at(x1, y0, c) * fx;
            let bottom = at(x0, y1, c) * (1.0 - fx) + at(x1, y1, c) * fx;
            px.0[c] = (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8;
        }
    }
    Some(out)
}

/// The variance of the Laplacian of an image's luma: low for a blurred or featureless crop.
pub fn sharpness(img: &RgbImage) -> f32 {
    let (w, h) = img.dimensions();
    if w < 3 || h < 3 {
        return 0.0;
    }
    let luma: Vec<f32> = img
        .pixels()
        .map(|p| 0.299 * f32::from(p.0[0]) + 0.587 * f32::from(p.0[1]) + 0.114 * f32::from(p.0[2]))
        .collect();
    let (w, h) = (w as usize, h as usize);
    let (mut sum, mut sq, mut n) = (0f64, 0f64, 0f64);
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let c = luma[y * w + x];
            let l = luma[y * w + x - 1]
                + luma[y * w + x + 1]
                + luma[(y - 1) * w + x]
                + luma[(y + 1) * w + x]
                - 4.0 * c;
            sum += f64::from(l);
            sq += f64::from(l) * f64::from(l);
            n += 1.0;
        }
    }
    let mean = sum / n;
    (sq / n - mean * mean) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotated_rect(cx: f32, cy: f32, w: f32, h: f32, deg: f32) -> Quad {
        let (s, c) = deg.to_radians().sin_cos();
        let p = |dx: f32, dy: f32| [cx + dx * c - dy * s, cy + dx * s + dy * c];
        [
            p(-w / 2.0, -h / 2.0),
            p(w / 2.0, -h / 2.0),
            p(w / 2.0, h / 2.0),
            p(-w / 2.0, h / 2.0),
        ]
    }

    #[test]
    fn the_smallest_rectangle_around_a_rotated_card_is_the_card() {
        for deg in [0.0f32, 13.0, 45.0, 77.0, 90.0, 133.0, 181.0, 300.0] {
            let q = rotated_rect(400.0, 300.0, 180.0, 250.0, deg);
            // Points along the edges and inside.
            let mut pts = Vec::new();
            for i in 0..=20 {
                let t = i as f32 / 20.0;
                for k in 0..4 {
                    let (a, b) = (q[k], q[(k + 1) % 4]);
                    pts.push([a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t]);
                }
            }
            pts.push(centre(&q));
            let (rect, area) = min_area_rect(&convex_hull(&pts)).unwrap();
            assert!((area - 180.0 * 250.0).abs() < 50.0, "{deg}: {area}");
            let ordered = card_order(rect);
            let expected = card_order(q);
            assert!(
                corner_error(&ordered, &expected) < 0.5,
                "{deg}: {ordered:?} vs {expected:?}"
            );
            assert!((short_side(&ordered) - 180.0).abs() < 0.5);
        }
    }

    #[test]
    fn a_warp_undoes_a_rotation() {
        // A frame holding a 60 x 84 card of four coloured quarters, turned 30 degrees.
        let q = rotated_rect(100.0, 100.0, 60.0, 84.0, 30.0);
        let inv = homography(&q, &[[0.0, 0.0], [59.0, 0.0], [59.0, 83.0], [0.0, 83.0]]).unwrap();
        let frame = RgbImage::from_fn(200, 200, |x, y| {
            let (xf, yf) = (f64::from(x), f64::from(y));
            let d = inv[6] * xf + inv[7] * yf + inv[8];
            let u = (inv[0] * xf + inv[1] * yf + inv[2]) / d;
            let v = (inv[3] * xf + inv[4] * yf + inv[5]) / d;
            if !(0.0..=59.0).contains(&u) || !(0.0..=83.0).contains(&v) {
                return image::Rgb([128, 128, 128]);
            }
            match (u < 30.0, v < 42.0) {
                (true, true) => image::Rgb([255, 0, 0]),
                (false, true) => image::Rgb([0, 255, 0]),
                (true, false) => image::Rgb([0, 0, 255]),
                (false, false) => image::Rgb([255, 255, 0]),
            }
        });
        let crop = warp(&frame, &q, 60, 84).unwrap();
        assert_eq!(crop.get_pixel(10, 10).0, [255, 0, 0]);
        assert_eq!(crop.get_pixel(50, 10).0, [0, 255, 0]);
        assert_eq!(crop.get_pixel(10, 70).0, [0, 0, 255]);
        assert_eq!(crop.get_pixel(50, 70).0, [255, 255, 0]);
        assert!(sharpness(&crop) > sharpness(&RgbImage::from_pixel(60, 84, image::Rgb([9, 9, 9]))));
    }
}
