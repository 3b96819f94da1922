//! The counter: cameras watching the counter, each card placed there found, held still, recognised
//! once, and its event recorded with the card's corners in the frame.
//!
//! Per camera, a task reads frames from its source ([`source`]) into a one-frame slot, and a thread
//! analyses them ([`Analysis`]): it decodes at most `camera_fps` frames a second (2 while nothing on the
//! counter differs from the background: an idle counter is cheap), finds card-shaped regions
//! ([`finder`]), follows them ([`tracker`]) and, for each card that lay still, warps the card to an
//! upright card-shaped crop ([`geometry::warp`]), read both ways up (which short edge is the card's top
//! cannot be seen from the shape), has both recognised by the live release and keeps the better answer.
//! A camera that fails is shown in status and retried; it never stops the agent.

pub mod detector;
pub mod finder;
mod frame;
pub mod geometry;
pub mod mjpeg;
pub mod tracker;

pub use frame::{Frame, FrameError, with_huffman_tables, yuyv_to_rgb};

// The cameras at work (sources, reader tasks, analysis threads) are the daemon's; the geometry, the
// finder and the tracker above are pure and also serve the operator's benchmarks.
#[cfg(feature = "daemon")]
mod run;
#[cfg(feature = "daemon")]
pub mod source;
#[cfg(feature = "daemon")]
pub mod v4l2;
#[cfg(feature = "daemon")]
pub use run::*;

/// The upright crop a card is warped to (a card's proportions; the model's input is made from it as
/// from any photo).
pub const CROP_W: u32 = 252;
pub const CROP_H: u32 = 352;
