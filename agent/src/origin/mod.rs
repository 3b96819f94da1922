//! The origin: where releases live, as the agent reads it. One interface, [`Origin`], with one file per
//! backend: S3 through aws-sdk-s3 (`s3.rs`) and a local directory with the same key layout (`file.rs`:
//! `file:///dir`, a USB stick, a bundle, a test fixture). A new backend is one new file implementing
//! [`Origin`] and one arm in [`connect`].
//!
//! The agent only reads (`get_if_changed`, `get_range`, `get`). The operator's writes, copies, listings,
//! deletes and hashes live in the tools crate, on top of the same backends and the same S3 client
//! construction ([`s3::client`]).
//!
//! Every call has a timeout; S3 calls are retried by the SDK's standard retry mode (bounded attempts,
//! exponential backoff with jitter). Keys are never built here: callers get them from [`Origin::layout`].

pub mod file;
pub mod s3;

use bytes::Bytes;
use deckhand_protocol::layout::{Layout, LayoutError};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub use file::FileOrigin;
pub use s3::S3Origin;

/// Where an origin is: `s3://bucket/prefix` or `file:///absolute/dir`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OriginUrl {
    S3 { bucket: String, prefix: String },
    File { root: PathBuf },
}

impl FromStr for OriginUrl {
    type Err = OriginError;

    fn from_str(s: &str) -> Result<Self, OriginError> {
        let bad = |why: &str| OriginError::BadUrl {
            url: s.to_owned(),
            why: why.to_owned(),
        };
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let ok = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !ok {
                return Err(bad(
                    "the bucket name must be 3-63 lowercase letters, digits, '-' or '.'",
                ));
            }
            Layout::new(prefix).map_err(OriginError::Layout)?;
            return Ok(OriginUrl::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_end_matches('/').to_owned(),
            });
        }
        if let Some(path) = s.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("a file origin needs an absolute path: file:///dir"));
            }
            return Ok(OriginUrl::File {
                root: PathBuf::from(path),
            });
        }
        Err(bad("expected s3://bucket/prefix or file:///dir"))
    }
}

impl fmt::Display for OriginUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OriginUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            OriginUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            OriginUrl::File { root } => write!(f, "file://{}", root.display()),
        }
    }
}

/// How to reach S3. Unset fields come from the standard AWS chain (environment, profile, ...).
#[derive(Clone, Debug)]
pub struct OriginConfig {
    /// An S3-compatible endpoint (`--endpoint-url`, else `AWS_ENDPOINT_URL`); path-style addressing is
    /// used whenever one is set.
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    /// Static credentials (access key, secret key); otherwise the standard credential chain.
    pub credentials: Option<(String, String)>,
    /// Per-attempt timeout of a request until its answer begins (a body has [`Self::progress_window`]).
    pub attempt_timeout: Duration,
    /// Total time for a call, retries included.
    pub operation_timeout: Duration,
    pub connect_timeout: Duration,
    /// Attempts per call (1 = no retry).
    pub max_attempts: u32,
    /// A body must deliver [`MIN_PROGRESS`] bytes (or all that is left) in every window this long, or it
    /// is abandoned as stalled: a source that drips is given up on and fetched again, not waited for
    /// until the operation times out.
    pub progress_window: Duration,
}

/// What a body must deliver in each [`OriginConfig::progress_window`]: 64 KiB (3.2 KiB/s over the
/// default 20 s window, a small share of the slowest shop uplink).
pub const MIN_PROGRESS: u64 = 64 * 1024;

impl Default for OriginConfig {
    fn default() -> Self {
        Self {
            endpoint_url: None,
            region: None,
            credentials: None,
            attempt_timeout: Duration::from_secs(60),
            operation_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
            max_attempts: 4,
            progress_window: Duration::from_secs(20),
        }
    }
}

/// Why an origin call failed. Every message names the operation and the key.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("origin {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("origin prefix is invalid: {0}")]
    Layout(#[from] LayoutError),
    #[error("{op} {key}: no such object")]
    NotFound { op: &'static str, key: String },
    #[error(
        "{op} {key}: the object is {size} bytes, over the limit of {limit} for what it holds; not read"
    )]
    TooLarge {
        op: &'static str,
        key: String,
        size: u64,
        limit: u64,
    },
    #[error("{op} {key}: the object already exists (another publisher wrote it first)")]
    AlreadyExists { op: &'static str, key: String },
    #[error("{op} {key}: the object changed since it was read (another publisher wrote it)")]
    Changed { op: &'static str, key: String },
    #[error(
        "{op} {key}: {bytes} bytes arrived in the last {secs} s, under the {min} a download must make in that time; abandoned as stalled"
    )]
    Stalled {
        op: &'static str,
        key: String,
        bytes: u64,
        secs: u64,
        min: u64,
    },
    #[error(
        "get range {key}: asked for {want} bytes, got {got}: the object is not the one the release names"
    )]
    Short { key: String, want: u64, got: u64 },
    #[error("{op} {key}: timed out after {secs} s")]
    Timeout {
        op: &'static str,
        key: String,
        secs: u64,
    },
    #[error(
        "{op} {key}: refused ({status}): check the credentials and the bucket policy ({message})"
    )]
    Denied {
        op: &'static str,
        key: String,
        status: u16,
        message: String,
    },
    #[error("{op} {key}: {message}")]
    Service {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("{op} {key}: the background task failed: {source}")]
    Task {
        op: &'static str,
        key: String,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl OriginError {
    /// True when the origin refused the credentials or permissions (401, 403).
    pub fn is_denied(&self) -> bool {
        matches!(self, OriginError::Denied { .. })
    }

    /// True when the origin could not be reached at all (as opposed to answering "no"). A refusal of the
    /// credentials or permissions ([`OriginError::Denied`]) is not: the origin answered, and a Pi with
    /// wrong credentials must say so instead of looking offline.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            OriginError::Timeout { .. } | OriginError::Service { .. }
        )
    }
}

/// The outcome of a conditional read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetched {
    NotModified,
    Missing,
    Changed { body: Bytes, etag: Option<String> },
}

/// A connected origin, read side.
#[async_trait::async_trait]
pub trait Origin: Send + Sync + fmt::Debug {
    fn url(&self) -> &OriginUrl;

    /// The key layout under this origin's prefix.
    fn layout(&self) -> &Layout;

    /// Reads an object of at most `limit` bytes unless its entity tag is still `etag`. A larger object
    /// is refused ([`OriginError::TooLarge`]) without its body being read past the limit.
    async fn get_if_changed(
        &self,
        key: &str,
        etag: Option<&str>,
        limit: u64,
    ) -> Result<Fetched, OriginError>;

    /// Reads a byte range of an object; a short answer is an error.
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, OriginError>;

    /// Reads a whole object of at most `limit` bytes.
    async fn get_capped(&self, key: &str, limit: u64) -> Result<Bytes, OriginError> {
        match self.get_if_changed(key, None, limit).await? {
            Fetched::Changed { body, .. } => Ok(body),
            Fetched::Missing | Fetched::NotModified => Err(OriginError::NotFound {
                op: "get",
                key: key.to_owned(),
            }),
        }
    }

    /// Reads a whole object, whatever its size: for the operator's reads of its own bucket. The agent
    /// reads what it does not trust with a limit ([`Origin::get_capped`]).
    async fn get(&self, key: &str) -> Result<Bytes, OriginError> {
        self.get_capped(key, u64::MAX).await
    }

    /// Reads a whole object, whatever its size, or `None` if it does not exist (the operator's reads).
    async fn get_opt(&self, key: &str) -> Result<Option<Bytes>, OriginError> {
        match self.get_if_changed(key, None, u64::MAX).await? {
            Fetched::Changed { body, .. } => Ok(Some(body)),
            _ => Ok(None),
        }
    }
}

/// Connects to an origin. For S3 this builds a client; no request is sent.
pub async fn connect(url: &OriginUrl, cfg: &OriginConfig) -> Result<Arc<dyn Origin>, OriginError> {
    Ok(match url {
        OriginUrl::S3 { bucket, prefix } => Arc::new(S3Origin::connect(bucket, prefix, cfg).await?),
        OriginUrl::File { root } => Arc::new(FileOrigin::new(root)?),
    })
}

/// Runs `fut` within `limit`, or fails with [`OriginError::Timeout`] naming `op` and `key`.
pub async fn timed<T>(
    limit: Duration,
    op: &'static str,
    key: &str,
    fut: impl Future<Output = Result<T, OriginError>>,
) -> Result<T, OriginError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(OriginError::Timeout {
            op,
            key: key.to_owned(),
            secs: limit.as_secs(),
        }),
    }
}

/// Maps an I/O error on `path` to an [`OriginError`] naming the operation.
pub fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> OriginError + 'a {
    move |source| OriginError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Maps a failed blocking task (it panicked or was cancelled) to an [`OriginError`].
pub fn task_err(op: &'static str, key: &str) -> impl FnOnce(tokio::task::JoinError) -> OriginError {
    let key = key.to_owned();
    move |source| OriginError::Task { op, key, source }
}

/// A range read must return exactly what was asked for.
fn check_len(key: &str, want: u64, body: Bytes) -> Result<Bytes, OriginError> {
    if body.len() as u64 == want {
        Ok(body)
    } else {
        Err(OriginError::Short {
            key: key.to_owned(),
            want,
            got: body.len() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_urls_parse_or_say_why_not() {
        assert_eq!(
            "s3://bucket-1/a/b".parse::<OriginUrl>().unwrap(),
            OriginUrl::S3 {
                bucket: "bucket-1".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            "s3://bucket-1".parse::<OriginUrl>().unwrap(),
            OriginUrl::S3 {
                bucket: "bucket-1".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            "file:///srv/x".parse::<OriginUrl>().unwrap(),
            OriginUrl::File {
                root: "/srv/x".into()
            }
        );
        for bad in [
            "http://x",
            "s3://UPPER/x",
            "s3://b",
            "file://relative",
            "s3://bucket//x",
            "s3://bucket/a b",
        ] {
            let err = bad.parse::<OriginUrl>().unwrap_err().to_string();
            assert!(!err.is_empty(), "{bad}");
        }
        assert!(
            "s3://bucket/a b"
                .parse::<OriginUrl>()
                .unwrap_err()
                .to_string()
                .contains("' '")
        );
    }
}
