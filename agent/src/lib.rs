//! deckhand-agent: the daemon on each Pi. It follows a deployment (sync), keeps the store, talks to its
//! fleet peers over QUIC (peer), serves recognitions (recognizer, http) and stays up with no network.
//!
//! The operator's CLI (`deckhand-tools`) uses the read side of this crate without the daemon: the origin
//! client (`origin`), the release loaders and checks (`release`) and the recognizer (`recognizer`), with
//! `default-features = false`. Everything only the daemon runs (QUIC, TLS, mDNS, the HTTP server, file
//! watching) sits behind the `daemon` feature, so the operator's CLI does not link it.

pub mod camera;
pub mod http;
pub mod locks;
pub mod metrics;
pub mod origin;
pub mod recognizer;
pub mod release;
pub mod telemetry;

#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod events;
#[cfg(feature = "daemon")]
pub mod ledger;
#[cfg(feature = "daemon")]
pub mod maintenance;
#[cfg(feature = "daemon")]
pub mod peer;
#[cfg(feature = "daemon")]
pub mod report;
#[cfg(feature = "daemon")]
pub mod sync;
#[cfg(feature = "daemon")]
pub mod systemd;
