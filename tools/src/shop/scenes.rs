//! Counter scenes: a camera's view of a shop counter, generated. A textured counter; cards (the
//! fixtures' card images) brought in by a hand at a random place and angle, left lying still, then taken
//! away; several placements one after another. Deterministic from a seed, with the truth of every
//! frame (which card lies where, corners clockwise from the card's top left), so tests can hold the
//! agent's counter to it. `deckhand scenes` writes them as MJPEG to stdout: the tests and the demo read
//! it through the same `exec:` camera source a Pi reads rpicam-vid through.

use super::fixtures::{CARD_H, CARD_W, card_id, card_image, encode_jpeg};
use deckhand_protocol::testdata::SplitMix;
use image::{Rgb, RgbImage};

pub const FRAME_W: u32 = 1280;
pub const FRAME_H: u32 = 960;

/// A card's corners in the frame, clockwise from the card's top left.
pub type Quad = [[f32; 2]; 4];

/// One card put on the counter.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    /// The card's number (its id is [`card_id`]).
    pub card: usize,
    pub centre: [f32; 2],
    /// The card's width in the frame, pixels.
    pub width: f32,
    /// Degrees, clockwise.
    pub angle: f32,
}

impl Placement {
    pub fn card_id(&self) -> String {
        card_id(self.card)
    }

    /// Where the card's corners are when it lies at its place.
    pub fn quad(&self) -> Quad {
        quad_at(self.centre, self.width, self.angle)
    }
}

fn quad_at(c: [f32; 2], width: f32, angle: f32) -> Quad {
    let h = width * CARD_H as f32 / CARD_W as f32;
    let (s, co) = angle.to_radians().sin_cos();
    let p = |dx: f32, dy: f32| [c[0] + dx * co - dy * s, c[1] + dx * s + dy * co];
    [
        p(-width / 2.0, -h / 2.0),
        p(width / 2.0, -h / 2.0),
        p(width / 2.0, h / 2.0),
        p(-width / 2.0, h / 2.0),
    ]
}

/// What one frame shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Truth {
    /// The placement (index into the script) whose card lies alone and still, if any.
    pub still: Option<usize>,
    /// A hand is in the frame.
    pub hand: bool,
}

/// Frames of one placement, in order: empty, carried in, hand lifting off, lying still, hand over it,
/// carried out.
const EMPTY: usize = 3;
const CARRY: usize = 5;
const LIFT: usize = 2;
/// Frames the card lies alone: 1.5 s at 10 frames a second.
pub const STILL: usize = 15;
const TAKE: usize = 4;
pub const FRAMES_PER_PLACEMENT: usize = EMPTY + CARRY + LIFT + STILL + TAKE;

/// For frame `i` of a script: which frame of its placement's still run it is (0 for the first frame in
/// which the card lies alone and still), if the card lies still in it.
pub fn still_step(i: usize) -> Option<usize> {
    (i % FRAMES_PER_PLACEMENT)
        .checked_sub(EMPTY + CARRY + LIFT)
        .filter(|j| *j < STILL)
}

/// A scripted counter.
pub struct Script {
    pub placements: Vec<Placement>,
    counter: RgbImage,
}

impl Script {
    /// `n` placements of cards among the first `cards`, from `seed`.
    pub fn new(seed: u64, n: usize, cards: usize) -> Script {
        let mut rng = SplitMix(0x5ce7_e000 ^ seed);
        let placements = (0..n)
            .map(|_| {
                let width = 170.0 + rng.unit() * 60.0;
                let margin = width * 1.0;
                Placement {
                    card: rng.range(0, cards.max(1) as u64) as usize,
                    centre: [
                        margin + rng.unit() * (FRAME_W as f32 - 2.0 * margin),
                        margin + rng.unit() * (FRAME_H as f32 - 2.0 * margin),
                    ],
                    width,
                    angle: rng.unit() * 360.0,
                }
            })
            .collect();
        Script {
            placements,
            counter: counter(seed),
        }
    }

    /// The empty counter.
    pub fn empty(&self) -> RgbImage {
        self.counter.clone()
    }

    /// How many frames the script has.
    pub fn len(&self) -> usize {
        self.placements.len() * FRAMES_PER_PLACEMENT
    }

    pub fn is_empty(&self) -> bool {
        self.placements.is_empty()
    }

    /// Frame `i` and its truth.
    pub fn frame(&self, i: usize) -> (RgbImage, Truth) {
        let (k, step) = (i / FRAMES_PER_PLACEMENT, i % FRAMES_PER_PLACEMENT);
        let mut img = self.counter.clone();
        let Some(p) = self.placements.get(k) else {
            return (
                img,
                Truth {
                    still: None,
                    hand: false,
                },
            );
        };
        let card = card_image(p.card, 0);
        // Where the hand brings the card from: below the frame.
        let start = [
            p.centre[0] * 0.7 + FRAME_W as f32 * 0.15,
            FRAME_H as f32 + p.width,
        ];
        let lerp = |t: f32| {
            [
                start[0] + (p.centre[0] - start[0]) * t,
                start[1] + (p.centre[1] - start[1]) * t,
            ]
        };
        let (centre, angle, hand, still) = if step < EMPTY {
            return (
                img,
                Truth {
                    still: None,
                    hand: false,
                },
            );
        } else if step < EMPTY + CARRY {
            let t = (step - EMPTY + 1) as f32 / CARRY as f32;
            (lerp(t), p.angle - 25.0 * (1.0 - t), true, false)
        } else if step < EMPTY + CARRY + LIFT {
            (p.centre, p.angle, true, false)
        } else if step < EMPTY + CARRY + LIFT + STILL {
            (p.centre, p.angle, false, true)
        } else {
            let t = (step - (EMPTY + CARRY + LIFT + STILL)) as f32 / TAKE as f32;
            (lerp(1.0 - t), p.angle + 20.0 * t, true, false)
        };
        draw_card(&mut img, &card, centre, p.width, angle);
        if hand {
            draw_hand(&mut img, centre, p.width);
        }
        (
            img,
            Truth {
                still: still.then_some(k),
                hand,
            },
        )
    }

    /// The counter with `cards` lying on it, no hand (several cards in one frame, touching or not).
    pub fn still_life(&self, cards: &[Placement]) -> RgbImage {
        let mut img = self.counter.clone();
        for p in cards {
            draw_card(&mut img, &card_image(p.card, 0), p.centre, p.width, p.angle);
        }
        img
    }

    /// Frame `i` as JPEG, as a camera would send it.
    pub fn jpeg(&self, i: usize) -> Vec<u8> {
        encode_jpeg(&self.frame(i).0, 85)
    }
}

/// A wooden counter: grain along x, a few knots' worth of slow variation, fine noise.
fn counter(seed: u64) -> RgbImage {
    let mut rng = SplitMix(0xc0_7e7e ^ seed);
    let phase = rng.unit() * std::f32::consts::TAU;
    RgbImage::from_fn(FRAME_W, FRAME_H, |x, y| {
        let (xf, yf) = (x as f32, y as f32);
        let grain = ((yf * 0.11 + (xf * 0.013 + phase).sin() * 6.0).sin() * 14.0)
            + ((xf * 0.004 + yf * 0.007).sin() * 10.0);
        let n = (x.wrapping_mul(0x9E37_79B1) ^ y.wrapping_mul(0x85EB_CA77))
            .wrapping_mul(0xC2B2_AE3D)
            >> 28;
        let v = 140.0 + grain + n as f32 - 8.0;
        Rgb([
            v.clamp(0.0, 255.0) as u8,
            (v * 0.72).clamp(0.0, 255.0) as u8,
            (v * 0.45).clamp(0.0, 255.0) as u8,
        ])
    })
}

/// Draws `card` centred at `c`, `width` pixels wide, turned `angle` degrees clockwise (each frame pixel
/// samples the card image it falls on).
fn draw_card(img: &mut RgbImage, card: &RgbImage, c: [f32; 2], width: f32, angle: f32) {
    let scale = CARD_W as f32 / width;
    let (s, co) = angle.to_radians().sin_cos();
    let q = quad_at(c, width, angle);
    let (x0, x1) = q
        .iter()
        .fold((f32::MAX, f32::MIN), |a, p| (a.0.min(p[0]), a.1.max(p[0])));
    let (y0, y1) = q
        .iter()
        .fold((f32::MAX, f32::MIN), |a, p| (a.0.min(p[1]), a.1.max(p[1])));
    let (w, h) = (img.width() as i64, img.height() as i64);
    for y in (y0.floor() as i64).max(0)..(y1.ceil() as i64).min(h) {
        for x in (x0.floor() as i64).max(0)..(x1.ceil() as i64).min(w) {
            let (dx, dy) = (x as f32 + 0.5 - c[0], y as f32 + 0.5 - c[1]);
            // Into the card's frame: undo the turn, then the scale.
            let u = (dx * co + dy * s) * scale + CARD_W as f32 / 2.0;
            let v = (-dx * s + dy * co) * scale + CARD_H as f32 / 2.0;
            if u >= 0.0 && v >= 0.0 && u < CARD_W as f32 && v < CARD_H as f32 {
                img.put_pixel(x as u32, y as u32, *card.get_pixel(u as u32, v as u32));
            }
        }
    }
}

/// A hand holding the card's lower edge, and its arm down to the frame's bottom.
fn draw_hand(img: &mut RgbImage, c: [f32; 2], width: f32) {
    let skin = Rgb([214, 160, 128]);
    let (hx, hy) = (c[0] + width * 0.1, c[1] + width * 0.55);
    let (rx, ry) = (width * 0.45, width * 0.38);
    let (w, h) = (img.width() as i64, img.height() as i64);
    for y in ((hy - ry) as i64).max(0)..h {
        for x in ((hx - rx) as i64).max(0)..((hx + rx) as i64).min(w) {
            let (dx, dy) = ((x as f32 - hx) / rx, (y as f32 - hy) / ry);
            let in_hand = dx * dx + dy * dy <= 1.0;
            let in_arm = y as f32 >= hy && (x as f32 - hx).abs() <= rx * 0.7;
            if in_hand || in_arm {
                img.put_pixel(x as u32, y as u32, skin);
            }
        }
    }
}
