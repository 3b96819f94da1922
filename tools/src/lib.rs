//! deckhand-tools: the operator's CLI as a library (the `deckhand` binary parses flags and calls in here;
//! tests and benchmarks call in directly).

pub mod bench;
pub mod bench_fleet;
pub mod bench_recognizer;
pub mod demo;
pub mod error;
pub mod keygen;
pub mod layout;
pub mod locals3;
pub mod publish;
pub mod releases;
pub mod sim;

pub use error::ToolError;
