//! deckhand-agent's library: everything the agent daemon does, and the pieces the operator's CLI reuses.
//!
//! `tools` depends on this crate for the S3 origin client and the release loaders; this crate never
//! depends on `tools`.

pub mod activation;
pub mod bundle;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod fixtures;
pub mod fleet;
pub mod http;
pub mod inbox;
pub mod journal;
pub mod loaders;
pub mod maintenance;
pub mod metrics;
pub mod origin;
pub mod peer;
pub mod recognizer;
pub mod release;
pub mod sync;
pub mod telemetry;
