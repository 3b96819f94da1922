//! The shop page: `GET /` on every agent, one self-contained HTML file (no external assets, so it works
//! with the shop offline) that polls `/v1/status` and `/v1/fleet` and posts "try a card" images to
//! `/v1/recognize`. The fleet view's progress of each Pi comes from its own status document
//! (`peer::statuses`).

/// The page, kept in the binary.
pub const PAGE: &str = include_str!("shop.html");
