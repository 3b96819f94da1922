//! deckhand's protocol: everything two parties must agree on, as pure code.
//!
//! Content ids, chunk maps, manifests, signed envelopes, the S3 key layout and the peer wire frames all
//! live here. Nothing in this crate touches a file, a socket or a clock: callers pass bytes and `now`,
//! and get values or errors back. That keeps every rule testable without I/O (see ARCHITECTURE.md).

pub mod budget;
pub mod chunk;
pub mod clock;
pub mod daily;
pub mod delta;
pub mod envelope;
pub mod event;
pub mod fetch;
pub mod floors;
pub mod id;
pub mod keys;
pub mod layout;
pub mod manifest;
pub mod migration;
pub mod pack;
pub mod pairs;
pub mod probation;
pub mod root;
pub mod shadow;
pub mod sim;
pub mod status;
pub mod switch;
pub mod sync;
#[cfg(any(test, feature = "testdata"))]
pub mod testdata;
pub mod wire;

pub use chunk::{CHUNK_PARAMS, Chunk, ChunkMap, ChunkMapError, ChunkParams};
pub use envelope::{Envelope, TrustPolicy, VerifiedManifest, VerifyError};
pub use id::{BlobId, IdError};
pub use keys::{KeyError, KeyId, PublicKey, SecretKey};
pub use manifest::{Artifact, Canary, Manifest, ManifestError, RecognizerSettings, Role};
