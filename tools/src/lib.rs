//! deckhand-tools: the operator's CLI as a library (the `deckhand` binary parses flags and calls in here;
//! tests and benchmarks call in directly).
//!
//! The operator's work: `publish`, `releases` (versions, verify, bundles), `keygen`, `fleet_ca`, `layout`
//! (the bucket layout migration and its journal), and `origin` (writes to an origin). `shop` is the demo
//! and test world: deterministic fixtures, an S3 server in-process, and a shop of real agent processes.
//! `bench` prints the benchmarks' figures.

pub mod bench;
pub mod check;
pub mod error;
pub mod fleet_ca;
pub mod keygen;
pub mod layout;
pub mod origin;
pub mod publish;
pub mod releases;
pub mod shop;
pub mod trust_root;

pub use error::ToolError;
