//! The origin: where releases live. S3 (through aws-sdk-s3) or a local directory with the same key layout
//! (`file:///dir`: a USB stick, a bundle, a test fixture).
//!
//! Every call has a timeout; S3 calls are retried by the SDK's standard retry mode (bounded attempts,
//! exponential backoff with jitter). Keys are never built here: callers get them from [`Origin::layout`].

use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use deckhand_protocol::layout::{Layout, LayoutError};
use futures::{StreamExt as _, TryStreamExt as _};
use std::fmt;
use std::io::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;

/// Objects at least this large are uploaded in parts.
pub const MULTIPART_THRESHOLD: u64 = 16 * 1024 * 1024;
/// The size of each uploaded part.
pub const PART_SIZE: u64 = 8 * 1024 * 1024;
/// How many parts are uploaded at once.
pub const PART_CONCURRENCY: usize = 4;

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
    /// Per-attempt timeout of a request, body included.
    pub attempt_timeout: Duration,
    /// Total time for a call, retries included.
    pub operation_timeout: Duration,
    pub connect_timeout: Duration,
    /// Attempts per call (1 = no retry).
    pub max_attempts: u32,
}

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
    #[error("{op} {key}: the object already exists (another publisher wrote it first)")]
    AlreadyExists { op: &'static str, key: String },
    #[error("{op} {key}: timed out after {secs} s")]
    Timeout {
        op: &'static str,
        key: String,
        secs: u64,
    },
    #[error("{op} {key}: {message}")]
    Service {
        op: &'static str,
        key: String,
        message: String,
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
    /// True when the origin could not be reached at all (as opposed to answering "no").
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            OriginError::Timeout { .. } | OriginError::Service { .. }
        )
    }
}

/// An object's size and entity tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
}

/// The outcome of a conditional read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetched {
    NotModified,
    Missing,
    Changed { body: Bytes, etag: Option<String> },
}

#[derive(Clone, Debug)]
enum Backend {
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
    },
    File {
        root: PathBuf,
    },
}

/// A connected origin.
#[derive(Clone, Debug)]
pub struct Origin {
    url: OriginUrl,
    layout: Layout,
    backend: Backend,
    operation_timeout: Duration,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> OriginError + 'a {
    move |source| OriginError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn status<E>(err: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

fn service<E: std::error::Error + 'static>(
    op: &'static str,
    key: &str,
    err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> OriginError {
    match status(&err) {
        Some(404) => OriginError::NotFound {
            op,
            key: key.to_owned(),
        },
        Some(412) => OriginError::AlreadyExists {
            op,
            key: key.to_owned(),
        },
        _ => OriginError::Service {
            op,
            key: key.to_owned(),
            message: aws_sdk_s3::error::DisplayErrorContext(&err).to_string(),
        },
    }
}

impl Origin {
    /// Connects to an origin. For S3 this builds a client; no request is sent.
    pub async fn connect(url: &OriginUrl, cfg: &OriginConfig) -> Result<Self, OriginError> {
        let (backend, prefix) = match url {
            OriginUrl::S3 { bucket, prefix } => {
                let timeouts = aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(cfg.connect_timeout)
                    .operation_attempt_timeout(cfg.attempt_timeout)
                    .operation_timeout(cfg.operation_timeout)
                    .build();
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .timeout_config(timeouts)
                    .retry_config(
                        aws_config::retry::RetryConfig::standard()
                            .with_max_attempts(cfg.max_attempts.max(1)),
                    );
                if let Some(endpoint) = &cfg.endpoint_url {
                    loader = loader.endpoint_url(endpoint);
                }
                if let Some(region) = &cfg.region {
                    loader = loader.region(aws_config::Region::new(region.clone()));
                }
                if let Some((ak, sk)) = &cfg.credentials {
                    loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                        ak.clone(),
                        sk.clone(),
                        None,
                        None,
                        "deckhand-static",
                    ));
                }
                let shared = loader.load().await;
                let mut b = aws_sdk_s3::config::Builder::from(&shared);
                if shared.region().is_none() {
                    b = b.region(aws_config::Region::new("us-east-1"));
                }
                let custom_endpoint = cfg.endpoint_url.is_some() || shared.endpoint_url().is_some();
                if custom_endpoint {
                    b = b.force_path_style(true);
                }
                let client = aws_sdk_s3::Client::from_conf(b.build());
                (
                    Backend::S3 {
                        client,
                        bucket: bucket.clone(),
                    },
                    prefix.as_str(),
                )
            }
            OriginUrl::File { root } => (Backend::File { root: root.clone() }, ""),
        };
        Ok(Self {
            url: url.clone(),
            layout: Layout::new(prefix)?,
            backend,
            operation_timeout: cfg.operation_timeout,
        })
    }

    pub fn url(&self) -> &OriginUrl {
        &self.url
    }

    /// The key layout under this origin's prefix.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn file_path(root: &Path, key: &str) -> PathBuf {
        root.join(key)
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        key: &str,
        fut: impl Future<Output = Result<T, OriginError>>,
    ) -> Result<T, OriginError> {
        match tokio::time::timeout(self.operation_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(OriginError::Timeout {
                op,
                key: key.to_owned(),
                secs: self.operation_timeout.as_secs(),
            }),
        }
    }

    /// Reads a whole object.
    pub async fn get(&self, key: &str) -> Result<Bytes, OriginError> {
        match self.get_if_changed(key, None).await? {
            Fetched::Changed { body, .. } => Ok(body),
            Fetched::Missing | Fetched::NotModified => Err(OriginError::NotFound {
                op: "get",
                key: key.to_owned(),
            }),
        }
    }

    /// Reads a whole object, or `None` if it does not exist.
    pub async fn get_opt(&self, key: &str) -> Result<Option<Bytes>, OriginError> {
        match self.get_if_changed(key, None).await? {
            Fetched::Changed { body, .. } => Ok(Some(body)),
            _ => Ok(None),
        }
    }

    /// Reads an object unless its entity tag is still `etag`.
    pub async fn get_if_changed(
        &self,
        key: &str,
        etag: Option<&str>,
    ) -> Result<Fetched, OriginError> {
        self.timed("get", key, async {
            match &self.backend {
                Backend::S3 { client, bucket } => {
                    let mut req = client.get_object().bucket(bucket).key(key);
                    if let Some(e) = etag {
                        req = req.if_none_match(e);
                    }
                    let out = match req.send().await {
                        Ok(out) => out,
                        Err(e) if status(&e) == Some(304) => return Ok(Fetched::NotModified),
                        Err(e) => match service("get", key, e) {
                            OriginError::NotFound { .. } => return Ok(Fetched::Missing),
                            other => return Err(other),
                        },
                    };
                    let new_etag = out.e_tag().map(str::to_owned);
                    if etag.is_some() && new_etag.as_deref() == etag {
                        // Servers that ignore If-None-Match still tell us it did not change.
                        return Ok(Fetched::NotModified);
                    }
                    let body = out.body.collect().await.map_err(|e| OriginError::Service {
                        op: "get",
                        key: key.to_owned(),
                        message: format!("reading the body: {e}"),
                    })?;
                    Ok(Fetched::Changed {
                        body: body.into_bytes(),
                        etag: new_etag,
                    })
                }
                Backend::File { root } => {
                    let path = Self::file_path(root, key);
                    match tokio::fs::read(&path).await {
                        Ok(data) => {
                            let tag = format!("\"{}\"", blake3::hash(&data).to_hex());
                            if etag == Some(tag.as_str()) {
                                return Ok(Fetched::NotModified);
                            }
                            Ok(Fetched::Changed {
                                body: Bytes::from(data),
                                etag: Some(tag),
                            })
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Fetched::Missing),
                        Err(e) => Err(io_err("read", &path)(e)),
                    }
                }
            }
        })
        .await
    }

    /// Reads a byte range of an object.
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, OriginError> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let want = (range.end - range.start) as usize;
        let body = self
            .timed("get range", key, async {
                match &self.backend {
                    Backend::S3 { client, bucket } => {
                        let out = client
                            .get_object()
                            .bucket(bucket)
                            .key(key)
                            .range(format!("bytes={}-{}", range.start, range.end - 1))
                            .send()
                            .await
                            .map_err(|e| service("get range", key, e))?;
                        let body = out.body.collect().await.map_err(|e| OriginError::Service {
                            op: "get range",
                            key: key.to_owned(),
                            message: format!("reading the body: {e}"),
                        })?;
                        Ok(body.into_bytes())
                    }
                    Backend::File { root } => {
                        let path = Self::file_path(root, key);
                        let r = range.clone();
                        tokio::task::spawn_blocking(move || -> Result<Bytes, OriginError> {
                            use std::os::unix::fs::FileExt as _;
                            let f = std::fs::File::open(&path).map_err(|e| match e.kind() {
                                std::io::ErrorKind::NotFound => OriginError::NotFound {
                                    op: "get range",
                                    key: path.display().to_string(),
                                },
                                _ => io_err("open", &path)(e),
                            })?;
                            let mut buf = vec![0u8; (r.end - r.start) as usize];
                            f.read_exact_at(&mut buf, r.start)
                                .map_err(io_err("read", &path))?;
                            Ok(Bytes::from(buf))
                        })
                        .await
                        .map_err(|e| OriginError::Service {
                            op: "get range",
                            key: key.to_owned(),
                            message: e.to_string(),
                        })?
                    }
                }
            })
            .await?;
        if body.len() != want {
            return Err(OriginError::Service {
                op: "get range",
                key: key.to_owned(),
                message: format!("asked for {want} bytes, got {}", body.len()),
            });
        }
        Ok(body)
    }

    /// Streams a whole object into a local file.
    pub async fn download(&self, key: &str, dest: &Path) -> Result<u64, OriginError> {
        self.timed("download", key, async {
            match &self.backend {
                Backend::S3 { client, bucket } => {
                    let mut body = s3_body(client, bucket, key, "download").await?;
                    let mut file = tokio::fs::File::create(dest)
                        .await
                        .map_err(io_err("create", dest))?;
                    let mut n = 0u64;
                    while let Some(chunk) = next_chunk(&mut body, "download", key).await? {
                        n += chunk.len() as u64;
                        file.write_all(&chunk)
                            .await
                            .map_err(io_err("write", dest))?;
                    }
                    file.flush().await.map_err(io_err("write", dest))?;
                    Ok(n)
                }
                Backend::File { root } => {
                    let src = Self::file_path(root, key);
                    tokio::fs::copy(&src, dest)
                        .await
                        .map_err(|e| match e.kind() {
                            std::io::ErrorKind::NotFound => OriginError::NotFound {
                                op: "download",
                                key: key.to_owned(),
                            },
                            _ => io_err("copy", &src)(e),
                        })
                }
            }
        })
        .await
    }

    /// An object's size and entity tag, or `None` if it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, OriginError> {
        self.timed("head", key, async {
            match &self.backend {
                Backend::S3 { client, bucket } => {
                    match client.head_object().bucket(bucket).key(key).send().await {
                        Ok(out) => Ok(Some(ObjectInfo {
                            key: key.to_owned(),
                            size: out.content_length().unwrap_or(0).max(0) as u64,
                            etag: out.e_tag().map(str::to_owned),
                        })),
                        Err(e) => match service("head", key, e) {
                            OriginError::NotFound { .. } => Ok(None),
                            other => Err(other),
                        },
                    }
                }
                Backend::File { root } => {
                    let path = Self::file_path(root, key);
                    match tokio::fs::metadata(&path).await {
                        Ok(m) if m.is_file() => Ok(Some(ObjectInfo {
                            key: key.to_owned(),
                            size: m.len(),
                            etag: None,
                        })),
                        Ok(_) => Ok(None),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                        Err(e) => Err(io_err("stat", &path)(e)),
                    }
                }
            }
        })
        .await
    }

    /// Writes an object, replacing any existing one.
    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), OriginError> {
        self.put_inner(key, body, false).await
    }

    /// Writes an object only if no object has that key (`If-None-Match: *`). Of two writers racing for the
    /// same key, exactly one succeeds; the other gets [`OriginError::AlreadyExists`].
    pub async fn put_new(&self, key: &str, body: Bytes) -> Result<(), OriginError> {
        self.put_inner(key, body, true).await
    }

    async fn put_inner(&self, key: &str, body: Bytes, only_new: bool) -> Result<(), OriginError> {
        self.timed("put", key, async {
            match &self.backend {
                Backend::S3 { client, bucket } => {
                    let mut req = client
                        .put_object()
                        .bucket(bucket)
                        .key(key)
                        .body(ByteStream::from(body));
                    if only_new {
                        req = req.if_none_match("*");
                    }
                    req.send().await.map_err(|e| service("put", key, e))?;
                    Ok(())
                }
                Backend::File { root } => {
                    let dest = Self::file_path(root, key);
                    let key = key.to_owned();
                    tokio::task::spawn_blocking(move || file_put(&dest, &key, &body, only_new))
                        .await
                        .map_err(|e| OriginError::Service {
                            op: "put",
                            key: "?".into(),
                            message: e.to_string(),
                        })?
                }
            }
        })
        .await
    }

    /// Uploads a local file, in parts of [`PART_SIZE`] with [`PART_CONCURRENCY`] in flight when it is at
    /// least [`MULTIPART_THRESHOLD`] bytes. `progress` is called with each uploaded byte count.
    pub async fn put_file(
        &self,
        key: &str,
        path: &Path,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), OriginError> {
        let size = tokio::fs::metadata(path)
            .await
            .map_err(io_err("stat", path))?
            .len();
        match &self.backend {
            Backend::File { root } => {
                let dest = Self::file_path(root, key);
                let (src, key_owned) = (path.to_owned(), key.to_owned());
                tokio::task::spawn_blocking(move || {
                    let data = std::fs::read(&src).map_err(io_err("read", &src))?;
                    file_put(&dest, &key_owned, &data, false)
                })
                .await
                .map_err(|e| OriginError::Service {
                    op: "put",
                    key: key.to_owned(),
                    message: e.to_string(),
                })??;
                progress(size);
                Ok(())
            }
            Backend::S3 { .. } if size < MULTIPART_THRESHOLD => {
                let data = tokio::fs::read(path).await.map_err(io_err("read", path))?;
                self.put(key, Bytes::from(data)).await?;
                progress(size);
                Ok(())
            }
            Backend::S3 { client, bucket } => {
                self.put_multipart(client, bucket, key, path, size, progress)
                    .await
            }
        }
    }

    async fn put_multipart(
        &self,
        client: &aws_sdk_s3::Client,
        bucket: &str,
        key: &str,
        path: &Path,
        size: u64,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), OriginError> {
        let parts = size.div_ceil(PART_SIZE);
        self.multipart(
            client,
            bucket,
            key,
            parts,
            PART_CONCURRENCY,
            |i, upload_id| async move {
                let start = i * PART_SIZE;
                let len = PART_SIZE.min(size - start);
                let p = path.to_owned();
                let data = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, OriginError> {
                    use std::os::unix::fs::FileExt as _;
                    let f = std::fs::File::open(&p).map_err(io_err("open", &p))?;
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact_at(&mut buf, start)
                        .map_err(io_err("read", &p))?;
                    Ok(buf)
                })
                .await
                .map_err(|e| OriginError::Service {
                    op: "upload part",
                    key: key.to_owned(),
                    message: e.to_string(),
                })??;
                let number = (i + 1) as i32;
                let out = self
                    .timed("upload part", key, async {
                        client
                            .upload_part()
                            .bucket(bucket)
                            .key(key)
                            .upload_id(&upload_id)
                            .part_number(number)
                            .body(ByteStream::from(data))
                            .send()
                            .await
                            .map_err(|e| service("upload part", key, e))
                    })
                    .await?;
                progress(len);
                Ok(CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_owned))
                    .build())
            },
        )
        .await
        .map(|_| ())
    }

    /// A multipart upload to `key` of `parts` parts: created, each part made by `part(index, upload id)`
    /// with `concurrency` in flight, then completed; aborted if anything fails. Returns the entity tag.
    #[allow(clippy::too_many_arguments)]
    async fn multipart<F, Fut>(
        &self,
        client: &aws_sdk_s3::Client,
        bucket: &str,
        key: &str,
        parts: u64,
        concurrency: usize,
        part: F,
    ) -> Result<Option<String>, OriginError>
    where
        F: Fn(u64, String) -> Fut,
        Fut: Future<Output = Result<CompletedPart, OriginError>>,
    {
        let created = self
            .timed("create multipart upload", key, async {
                client
                    .create_multipart_upload()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| service("create multipart upload", key, e))
            })
            .await?;
        let upload_id = created.upload_id().unwrap_or_default().to_owned();
        let result: Result<Vec<CompletedPart>, OriginError> = futures::stream::iter(0..parts)
            .map(|i| part(i, upload_id.clone()))
            .buffered(concurrency.max(1))
            .try_collect()
            .await;
        let completed = match result {
            Ok(parts) => {
                self.timed("complete multipart upload", key, async {
                    client
                        .complete_multipart_upload()
                        .bucket(bucket)
                        .key(key)
                        .upload_id(&upload_id)
                        .multipart_upload(
                            CompletedMultipartUpload::builder()
                                .set_parts(Some(parts))
                                .build(),
                        )
                        .send()
                        .await
                        .map_err(|e| service("complete multipart upload", key, e))
                })
                .await
            }
            Err(e) => Err(e),
        };
        match completed {
            Ok(out) => Ok(out.e_tag().map(str::to_owned)),
            Err(e) => {
                // Best effort: an abandoned upload only costs storage until the bucket's lifecycle rule
                // runs.
                let _ = client
                    .abort_multipart_upload()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                Err(e)
            }
        }
    }

    /// Every object under `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, OriginError> {
        self.timed("list", prefix, async {
            match &self.backend {
                Backend::S3 { client, bucket } => {
                    let mut out = Vec::new();
                    let mut pages = client
                        .list_objects_v2()
                        .bucket(bucket)
                        .prefix(prefix)
                        .into_paginator()
                        .send();
                    while let Some(page) = pages.next().await {
                        let page = page.map_err(|e| service("list", prefix, e))?;
                        for o in page.contents() {
                            out.push(ObjectInfo {
                                key: o.key().unwrap_or_default().to_owned(),
                                size: o.size().unwrap_or(0).max(0) as u64,
                                etag: o.e_tag().map(str::to_owned),
                            });
                        }
                    }
                    out.sort_by(|a, b| a.key.cmp(&b.key));
                    Ok(out)
                }
                Backend::File { root } => {
                    let (root, prefix) = (root.clone(), prefix.to_owned());
                    tokio::task::spawn_blocking(move || file_list(&root, &prefix))
                        .await
                        .map_err(|e| OriginError::Service {
                            op: "list",
                            key: "?".into(),
                            message: e.to_string(),
                        })?
                }
            }
        })
        .await
    }

    /// Copies an object inside the origin, server-side (S3 CopyObject; in parts with UploadPartCopy above
    /// `opts.part_threshold`, which must be at most 5 GiB, S3's limit for one copy). `size` is the
    /// source's size as listed. Returns the new object's entity tag.
    pub async fn copy(
        &self,
        from: &str,
        to: &str,
        size: u64,
        opts: &CopyOptions,
    ) -> Result<Option<String>, OriginError> {
        match &self.backend {
            Backend::S3 { client, bucket } => {
                let source = copy_source(bucket, from);
                if size <= opts.part_threshold {
                    let out = self
                        .timed("copy", from, async {
                            client
                                .copy_object()
                                .bucket(bucket)
                                .key(to)
                                .copy_source(&source)
                                .send()
                                .await
                                .map_err(|e| service("copy", from, e))
                        })
                        .await?;
                    Ok(out
                        .copy_object_result()
                        .and_then(|r| r.e_tag())
                        .map(str::to_owned))
                } else {
                    self.copy_multipart(client, bucket, &source, from, to, size, opts)
                        .await
                }
            }
            Backend::File { root } => {
                let (src, dest) = (Self::file_path(root, from), Self::file_path(root, to));
                let (from_key, to_key) = (from.to_owned(), to.to_owned());
                tokio::task::spawn_blocking(move || {
                    let data = std::fs::read(&src).map_err(|e| match e.kind() {
                        std::io::ErrorKind::NotFound => OriginError::NotFound {
                            op: "copy",
                            key: from_key.clone(),
                        },
                        _ => io_err("read", &src)(e),
                    })?;
                    file_put(&dest, &to_key, &data, false)
                })
                .await
                .map_err(|e| OriginError::Service {
                    op: "copy",
                    key: from.to_owned(),
                    message: e.to_string(),
                })??;
                Ok(None)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn copy_multipart(
        &self,
        client: &aws_sdk_s3::Client,
        bucket: &str,
        source: &str,
        from: &str,
        to: &str,
        size: u64,
        opts: &CopyOptions,
    ) -> Result<Option<String>, OriginError> {
        let part_size = opts.part_size.max(1);
        let parts = size.div_ceil(part_size);
        self.multipart(
            client,
            bucket,
            to,
            parts,
            opts.concurrency,
            |i, upload_id| async move {
                let start = i * part_size;
                let end = (start + part_size).min(size) - 1;
                let number = (i + 1) as i32;
                let out = self
                    .timed("copy part", from, async {
                        client
                            .upload_part_copy()
                            .bucket(bucket)
                            .key(to)
                            .upload_id(&upload_id)
                            .part_number(number)
                            .copy_source(source)
                            .copy_source_range(format!("bytes={start}-{end}"))
                            .send()
                            .await
                            .map_err(|e| service("copy part", from, e))
                    })
                    .await?;
                Ok(CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(
                        out.copy_part_result()
                            .and_then(|r| r.e_tag())
                            .map(str::to_owned),
                    )
                    .build())
            },
        )
        .await
    }

    /// Reads an object through once and returns its size and blake3 hash (nothing is kept).
    pub async fn hash(&self, key: &str) -> Result<(u64, blake3::Hash), OriginError> {
        self.timed("read", key, async {
            match &self.backend {
                Backend::S3 { client, bucket } => {
                    let mut body = s3_body(client, bucket, key, "read").await?;
                    let mut hasher = blake3::Hasher::new();
                    let mut n = 0u64;
                    while let Some(chunk) = next_chunk(&mut body, "read", key).await? {
                        n += chunk.len() as u64;
                        hasher.update(&chunk);
                    }
                    Ok((n, hasher.finalize()))
                }
                Backend::File { root } => {
                    let path = Self::file_path(root, key);
                    let key = key.to_owned();
                    tokio::task::spawn_blocking(move || {
                        let mut hasher = blake3::Hasher::new();
                        match hasher.update_mmap(&path) {
                            Ok(_) => Ok((hasher.count(), hasher.finalize())),
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                                Err(OriginError::NotFound { op: "read", key })
                            }
                            Err(e) => Err(io_err("read", &path)(e)),
                        }
                    })
                    .await
                    .map_err(|e| OriginError::Service {
                        op: "read",
                        key: "?".into(),
                        message: e.to_string(),
                    })?
                }
            }
        })
        .await
    }

    /// Deletes an object (no error if it is already gone).
    pub async fn delete(&self, key: &str) -> Result<(), OriginError> {
        self.timed("delete", key, async {
            match &self.backend {
                Backend::S3 { client, bucket } => {
                    client
                        .delete_object()
                        .bucket(bucket)
                        .key(key)
                        .send()
                        .await
                        .map_err(|e| service("delete", key, e))?;
                    Ok(())
                }
                Backend::File { root } => {
                    let path = Self::file_path(root, key);
                    match tokio::fs::remove_file(&path).await {
                        Ok(()) => Ok(()),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                        Err(e) => Err(io_err("remove", &path)(e)),
                    }
                }
            }
        })
        .await
    }
}

/// An S3 object's body, to stream; `op` names the call in errors.
async fn s3_body(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    op: &'static str,
) -> Result<ByteStream, OriginError> {
    let out = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| service(op, key, e))?;
    Ok(out.body)
}

/// The next piece of a streamed body, or `None` at its end.
async fn next_chunk(
    body: &mut ByteStream,
    op: &'static str,
    key: &str,
) -> Result<Option<Bytes>, OriginError> {
    body.try_next().await.map_err(|e| OriginError::Service {
        op,
        key: key.to_owned(),
        message: e.to_string(),
    })
}

/// How [`Origin::copy`] splits large objects.
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

/// The `x-amz-copy-source` value: the bucket and the percent-encoded key.
fn copy_source(bucket: &str, key: &str) -> String {
    // Everything but unreserved characters and '/' is encoded (RFC 3986).
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b'/');
    format!(
        "{bucket}/{}",
        percent_encoding::utf8_percent_encode(key, KEEP)
    )
}

/// Writes a file-origin object atomically: a temporary file in the same directory, then a rename (or,
/// for `only_new`, a hard link, which fails if the name exists).
fn file_put(dest: &Path, key: &str, data: &[u8], only_new: bool) -> Result<(), OriginError> {
    let dir = dest.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(io_err("create temporary file in", dir))?;
    tmp.write_all(data).map_err(io_err("write", dest))?;
    tmp.as_file().sync_all().map_err(io_err("sync", dest))?;
    if only_new {
        match std::fs::hard_link(tmp.path(), dest) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(OriginError::AlreadyExists {
                    op: "put",
                    key: key.to_owned(),
                })
            }
            Err(e) => Err(io_err("link", dest)(e)),
        }
    } else {
        tmp.persist(dest)
            .map_err(|e| io_err("rename", dest)(e.error))?;
        Ok(())
    }
}

fn file_list(root: &Path, prefix: &str) -> Result<Vec<ObjectInfo>, OriginError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("list", &dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("list", &dir))?;
            let path = entry.path();
            let meta = entry.metadata().map_err(io_err("stat", &path))?;
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            let Some(key) = path.strip_prefix(root).ok().and_then(|p| p.to_str()) else {
                continue;
            };
            // Temporary files of an interrupted write are not objects.
            if key
                .rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with(".tmp"))
            {
                continue;
            }
            if key.starts_with(prefix) {
                out.push(ObjectInfo {
                    key: key.to_owned(),
                    size: meta.len(),
                    etag: None,
                });
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
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

    #[tokio::test]
    async fn file_origin_reads_writes_lists_and_refuses_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let url = OriginUrl::File {
            root: dir.path().to_owned(),
        };
        let o = Origin::connect(&url, &OriginConfig::default())
            .await
            .unwrap();
        o.put("a/b/one", Bytes::from_static(b"hello"))
            .await
            .unwrap();
        assert_eq!(
            o.get("a/b/one").await.unwrap(),
            Bytes::from_static(b"hello")
        );
        assert_eq!(
            o.get_range("a/b/one", 1..4).await.unwrap(),
            Bytes::from_static(b"ell")
        );
        assert_eq!(o.get_opt("a/b/none").await.unwrap(), None);
        assert!(matches!(
            o.get("a/b/none").await,
            Err(OriginError::NotFound { .. })
        ));
        o.put_new("a/c", Bytes::from_static(b"1")).await.unwrap();
        assert!(matches!(
            o.put_new("a/c", Bytes::from_static(b"2")).await,
            Err(OriginError::AlreadyExists { .. })
        ));
        assert_eq!(o.get("a/c").await.unwrap(), Bytes::from_static(b"1"));
        let keys: Vec<String> = o
            .list("a/")
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.key)
            .collect();
        assert_eq!(keys, vec!["a/b/one", "a/c"]);
        assert_eq!(o.head("a/c").await.unwrap().unwrap().size, 1);
        let Fetched::Changed { etag, .. } = o.get_if_changed("a/c", None).await.unwrap() else {
            panic!()
        };
        assert_eq!(
            o.get_if_changed("a/c", etag.as_deref()).await.unwrap(),
            Fetched::NotModified
        );
        o.delete("a/c").await.unwrap();
        o.delete("a/c").await.unwrap();
        assert_eq!(o.head("a/c").await.unwrap(), None);
    }
}
