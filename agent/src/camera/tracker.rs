//! Placements: a card found in successive frames is one track; a track whose corners stayed put for
//! `still_frames` analysed frames is ready to be recognised, once. It is recognised again only after the
//! card left (or moved away and lay still again). A card hidden for a moment (a hand reaching over it)
//! and found again where it lay is the same placement, not a new one.
//!
//! Pure: frames in, decisions out.

use super::geometry::{Quad, centre, corner_error, rotate_half, short_side};

/// Frames a track may go unseen before the card counts as gone.
const GONE_AFTER: u32 = 3;
/// How many recognised poses are remembered (for a card hidden and found again).
const REMEMBERED: usize = 16;

/// How still is still.
#[derive(Clone, Copy, Debug)]
pub struct Stillness {
    /// Analysed frames a card must keep its place.
    pub frames: u32,
    /// The most a corner may move between frames and still be "in place", as a share of the card's
    /// width.
    pub tolerance: f32,
}

impl Default for Stillness {
    fn default() -> Self {
        Stillness {
            frames: 5,
            tolerance: 0.06,
        }
    }
}

#[derive(Debug, Clone)]
struct Track {
    id: u64,
    quad: Quad,
    still: u32,
    unseen: u32,
    recognised: bool,
}

/// A track ready to be recognised: its id and where the card lies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ready {
    pub track: u64,
    pub quad: Quad,
}

/// The tracks on one camera.
#[derive(Debug, Default)]
pub struct Tracker {
    tracks: Vec<Track>,
    next_id: u64,
    /// Where recognised cards lay, newest last.
    recognised_at: Vec<Quad>,
    pub stillness: Stillness,
}

/// The smaller corner distance between two quads, either reading of the second.
fn pose_distance(a: &Quad, b: &Quad) -> f32 {
    corner_error(a, b).min(corner_error(a, &rotate_half(*b)))
}

impl Tracker {
    pub fn new(stillness: Stillness) -> Self {
        Tracker {
            stillness,
            ..Self::default()
        }
    }

    /// Whether any card is being followed (the loop analyses every frame while one is).
    pub fn busy(&self) -> bool {
        !self.tracks.is_empty()
    }

    /// Takes the cards found in one analysed frame; returns those now ready to be recognised.
    pub fn update(&mut self, found: &[Quad]) -> Vec<Ready> {
        let mut taken = vec![false; found.len()];
        for t in &mut self.tracks {
            let reach = short_side(&t.quad) * 0.5;
            let c = centre(&t.quad);
            let nearest = found
                .iter()
                .enumerate()
                .filter(|(i, _)| !taken[*i])
                .map(|(i, q)| {
                    let d = centre(q);
                    (i, ((d[0] - c[0]).powi(2) + (d[1] - c[1]).powi(2)).sqrt())
                })
                .filter(|(_, d)| *d < reach)
                .min_by(|a, b| a.1.total_cmp(&b.1));
            match nearest {
                Some((i, _)) => {
                    taken[i] = true;
                    let q = found[i];
                    let moved = pose_distance(&t.quad, &q);
                    let tol = self.stillness.tolerance * short_side(&q);
                    if moved <= tol {
                        t.still += 1;
                    } else {
                        t.still = 0;
                        if t.recognised {
                            // Moved off the place it was recognised at: a new placement.
                            t.recognised = false;
                        }
                    }
                    t.quad = q;
                    t.unseen = 0;
                }
                None => t.unseen += 1,
            }
        }
        self.tracks.retain(|t| t.unseen <= GONE_AFTER);
        for (i, q) in found.iter().enumerate() {
            if taken[i] {
                continue;
            }
            // Found again where a recognised card lay: the same placement.
            let tol = self.stillness.tolerance * short_side(q);
            let seen_before = self
                .recognised_at
                .iter()
                .any(|r| pose_distance(r, q) <= tol * 2.0);
            self.next_id += 1;
            self.tracks.push(Track {
                id: self.next_id,
                quad: *q,
                still: 0,
                unseen: 0,
                recognised: seen_before,
            });
        }
        let frames = self.stillness.frames;
        let mut ready = Vec::new();
        for t in &mut self.tracks {
            if !t.recognised && t.unseen == 0 && t.still + 1 >= frames {
                t.recognised = true;
                ready.push(Ready {
                    track: t.id,
                    quad: t.quad,
                });
            }
        }
        for r in &ready {
            self.recognised_at.push(r.quad);
        }
        if self.recognised_at.len() > REMEMBERED {
            let drop = self.recognised_at.len() - REMEMBERED;
            self.recognised_at.drain(..drop);
        }
        ready
    }

    /// A track whose recognition did not happen (the recognizer was busy or failed): try it again
    /// when it is next still.
    pub fn retry(&mut self, track: u64) {
        if let Some(t) = self.tracks.iter_mut().find(|t| t.id == track) {
            t.recognised = false;
            t.still = 0;
            let q = t.quad;
            self.recognised_at.retain(|r| pose_distance(r, &q) > 0.5);
        }
    }

    /// Forgets where recognised cards lay: the loop calls it when nothing on the counter differs from
    /// the background (every card gone, no hand), so a card put back where one lay is a new placement.
    pub fn clear_memory(&mut self) {
        if self.tracks.is_empty() {
            self.recognised_at.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(x: f32, y: f32) -> Quad {
        [[x, y], [x + 63.0, y], [x + 63.0, y + 88.0], [x, y + 88.0]]
    }

    #[test]
    fn a_card_is_recognised_once_when_still_and_again_only_after_it_moves_or_leaves() {
        let mut t = Tracker::new(Stillness::default());
        // A hand moves it in.
        for x in [0.0, 20.0, 40.0, 60.0] {
            assert!(t.update(&[card(x, 100.0)]).is_empty());
        }
        // It lies still: ready on the fifth still frame, once.
        let mut ready = Vec::new();
        for _ in 0..12 {
            ready.extend(t.update(&[card(61.0, 100.5)]));
        }
        assert_eq!(ready.len(), 1);
        // Hidden by a hand for two frames, found again where it lay: not again.
        assert!(t.update(&[]).is_empty());
        assert!(t.update(&[]).is_empty());
        for _ in 0..10 {
            assert!(t.update(&[card(61.0, 100.0)]).is_empty());
        }
        // Moved to another place: a new placement, recognised when still there.
        let mut again = Vec::new();
        for x in [80.0, 120.0, 160.0, 160.0, 160.0, 160.0, 160.0, 160.0, 160.0] {
            again.extend(t.update(&[card(x, 100.0)]));
        }
        assert_eq!(again.len(), 1);
        // Gone, and the same card put back in the same place later: recognised again.
        for _ in 0..10 {
            t.update(&[]);
        }
        t.clear_memory();
        let mut back = Vec::new();
        for _ in 0..8 {
            back.extend(t.update(&[card(160.0, 100.0)]));
        }
        assert_eq!(back.len(), 1);
    }

    #[test]
    fn two_cards_are_two_placements() {
        let mut t = Tracker::new(Stillness::default());
        let mut ready = Vec::new();
        for _ in 0..8 {
            ready.extend(t.update(&[card(0.0, 0.0), card(300.0, 0.0)]));
        }
        assert_eq!(ready.len(), 2);
        assert_ne!(ready[0].track, ready[1].track);
    }
}
