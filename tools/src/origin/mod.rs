//! The operator's side of an origin: writes (conditional and multipart), server-side copies, listings,
//! deletes and streaming hashes, for the same backends the agent reads (`deckhand_agent::origin`), one
//! file each. The agent never writes to an origin.

mod file;
mod s3;

use bytes::Bytes;
use deckhand_agent::origin::{FileOrigin, S3Origin};
use std::path::Path;
use std::sync::Arc;

pub use deckhand_agent::origin::{Fetched, Origin, OriginConfig, OriginError, OriginUrl};

/// Objects at least this large are uploaded in parts.
pub const MULTIPART_THRESHOLD: u64 = 16 * 1024 * 1024;
/// The size of each uploaded part.
pub const PART_SIZE: u64 = 8 * 1024 * 1024;
/// How many parts are uploaded at once.
pub const PART_CONCURRENCY: usize = 4;

/// An object's size and entity tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
}

/// How [`Bucket::copy`] splits large objects.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// Objects larger than this are copied in parts (S3 copies at most 5 GiB in one request).
    pub part_threshold: u64,
    /// The size of each copied part (S3: at least 5 MiB, except the last).
    pub part_size: u64,
    /// Parts copied at once.
    pub concurrency: usize,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            part_threshold: 5 * 1024 * 1024 * 1024,
            part_size: 512 * 1024 * 1024,
            concurrency: 4,
        }
    }
}

/// An origin the operator writes to: everything [`Origin`] reads, and the writes.
#[async_trait::async_trait]
pub trait Bucket: Origin {
    /// An object's size and entity tag, or `None` if it does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, OriginError>;

    /// Writes an object, replacing any existing one.
    async fn put(&self, key: &str, body: Bytes) -> Result<(), OriginError>;

    /// Writes an object only if no object has that key (`If-None-Match: *`). Of two writers racing for
    /// the same key, exactly one succeeds; the other gets [`OriginError::AlreadyExists`].
    async fn put_new(&self, key: &str, body: Bytes) -> Result<(), OriginError>;

    /// Replaces an object only if its entity tag is still `etag` (`If-Match`), as read with
    /// [`Origin::get_if_changed`]. Of two writers that read the same version, exactly one succeeds; the
    /// other gets [`OriginError::Changed`] and reads again.
    async fn put_if_match(&self, key: &str, body: Bytes, etag: &str) -> Result<(), OriginError>;

    /// Uploads a local file, in parts of [`PART_SIZE`] with [`PART_CONCURRENCY`] in flight when it is at
    /// least [`MULTIPART_THRESHOLD`] bytes. `progress` is called with each uploaded byte count.
    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), OriginError>;

    /// Every object under `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, OriginError>;

    /// Copies an object inside the origin, server-side (S3 CopyObject; in parts with UploadPartCopy
    /// above `opts.part_threshold`, which must be at most 5 GiB, S3's limit for one copy). `size` is the
    /// source's size as listed. Returns the new object's entity tag.
    async fn copy(
        &self,
        from: &str,
        to: &str,
        size: u64,
        opts: &CopyOptions,
    ) -> Result<Option<String>, OriginError>;

    /// Reads an object through once and returns its size and blake3 hash (nothing is kept).
    async fn hash(&self, key: &str) -> Result<(u64, blake3::Hash), OriginError>;

    /// Streams a whole object into a local file.
    async fn download(&self, key: &str, dest: &Path) -> Result<u64, OriginError>;

    /// Deletes an object (no error if it is already gone).
    async fn delete(&self, key: &str) -> Result<(), OriginError>;
}

/// Connects to an origin to write to it. For S3 this builds the client (`deckhand_agent::origin::s3`,
/// the one S3 client construction); no request is sent.
pub async fn connect(url: &OriginUrl, cfg: &OriginConfig) -> Result<Arc<dyn Bucket>, OriginError> {
    Ok(match url {
        OriginUrl::S3 { bucket, prefix } => Arc::new(S3Origin::connect(bucket, prefix, cfg).await?),
        OriginUrl::File { root } => Arc::new(FileOrigin::new(root)?),
    })
}
