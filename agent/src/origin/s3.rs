//! The S3 backend (aws-sdk-s3), read side, and the one place an S3 client is built: credentials,
//! endpoint, path-style addressing, timeouts and retries.

use super::{Fetched, MIN_PROGRESS, Origin, OriginConfig, OriginError, OriginUrl, timed};
use aws_sdk_s3::error::SdkError;
use bytes::Bytes;
use deckhand_protocol::layout::Layout;
use std::ops::Range;
use std::time::Duration;

/// An S3 bucket and prefix.
#[derive(Clone, Debug)]
pub struct S3Origin {
    url: OriginUrl,
    layout: Layout,
    client: aws_sdk_s3::Client,
    bucket: String,
    operation_timeout: Duration,
    /// Reads of a whole object whose body is cut off are tried this many times in all.
    attempts: u32,
    /// See [`OriginConfig::progress_window`].
    progress_window: Duration,
}

/// Idle connections the S3 client keeps: one carries the next poll; the others a sync opened are closed
/// as they come back (keeping them cost an idle agent about 2 MB of read buffers).
const IDLE_CONNECTIONS: usize = 1;

/// Builds an S3 client. Unset fields of `cfg` come from the standard AWS chain (environment,
/// profile, ...); a custom endpoint is addressed path-style. No request is sent.
pub async fn client(cfg: &OriginConfig) -> aws_sdk_s3::Client {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(cfg.connect_timeout)
        .operation_attempt_timeout(cfg.attempt_timeout)
        .operation_timeout(cfg.operation_timeout)
        .build();
    use aws_smithy_http_client::tls;
    // The SDK's own client (rustls on aws-lc, the system's roots), keeping fewer idle connections: each
    // keeps its read buffer (a few hundred KiB after a sync), and an idle agent needs one, for its poll.
    let http = aws_smithy_http_client::Builder::new()
        .pool_max_idle_per_host(IDLE_CONNECTIONS)
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .build_https();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .timeout_config(timeouts)
        .retry_config(
            aws_config::retry::RetryConfig::standard().with_max_attempts(cfg.max_attempts.max(1)),
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
    if cfg.endpoint_url.is_some() || shared.endpoint_url().is_some() {
        b = b.force_path_style(true);
    }
    b = b.retry_classifier(SkewedDenial);
    aws_sdk_s3::Client::from_conf(b.build())
}

/// How far this machine's clock may be from S3's before a refused request is put down to it (the SDK's
/// own threshold; S3 refuses signatures more than 15 minutes off).
const SKEW_SUSPECTED: Duration = Duration::from_secs(4 * 60);

/// Retries a 403 whose `Date` is far from this machine's clock: the signature was refused for the
/// clock, not the credentials. The SDK corrects the clock skew it measured on that response when it
/// signs the retry, and for every later call, but recognises such a refusal only by its error code, and
/// the answer to a HEAD has no body to carry one: a Pi that booted at 1970, or an operator's laptop a
/// month off, would otherwise see "check the credentials" for the first HEAD after its clock moved.
#[derive(Debug)]
struct SkewedDenial;

impl aws_sdk_s3::config::retry::ClassifyRetry for SkewedDenial {
    fn classify_retry(
        &self,
        ctx: &aws_sdk_s3::config::interceptors::InterceptorContext,
    ) -> aws_sdk_s3::config::retry::RetryAction {
        use aws_sdk_s3::config::retry::RetryAction;
        let Some(response) = ctx.response() else {
            return RetryAction::NoActionIndicated;
        };
        if response.status().as_u16() != 403 {
            return RetryAction::NoActionIndicated;
        }
        let server = response
            .headers()
            .get("date")
            .and_then(|d| {
                aws_sdk_s3::primitives::DateTime::from_str(
                    d,
                    aws_sdk_s3::primitives::DateTimeFormat::HttpDate,
                )
                .ok()
            })
            .and_then(|d| std::time::SystemTime::try_from(d).ok());
        let Some(server) = server else {
            return RetryAction::NoActionIndicated;
        };
        let now = std::time::SystemTime::now();
        let skew = server
            .duration_since(now)
            .or_else(|_| now.duration_since(server))
            .unwrap_or_default();
        if skew > SKEW_SUSPECTED {
            tracing::debug!(
                skew_secs = skew.as_secs(),
                "a 403 from a server whose clock is far from ours: retried"
            );
            RetryAction::server_error()
        } else {
            RetryAction::NoActionIndicated
        }
    }

    fn name(&self) -> &'static str {
        "deckhand: a 403 from clock skew"
    }
}

/// The HTTP status of a failed S3 call, when the server answered.
pub fn status<E>(err: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// Maps a failed S3 call to an [`OriginError`]: 404 is `NotFound`, 412 `AlreadyExists`, 401 and 403
/// `Denied` (credentials or permissions), anything else `Service`.
pub fn error<E: std::error::Error + 'static>(
    op: &'static str,
    key: &str,
    err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> OriginError {
    let key = key.to_owned();
    match status(&err) {
        Some(404) => OriginError::NotFound { op, key },
        Some(412) => OriginError::AlreadyExists { op, key },
        Some(code @ (401 | 403)) => OriginError::Denied {
            op,
            key,
            status: code,
            message: aws_sdk_s3::error::DisplayErrorContext(&err).to_string(),
        },
        _ => OriginError::Service {
            op,
            key,
            message: aws_sdk_s3::error::DisplayErrorContext(&err).to_string(),
        },
    }
}

/// A body that broke off while it was read.
pub fn body_error(op: &'static str, key: &str, e: impl std::fmt::Display) -> OriginError {
    OriginError::Service {
        op,
        key: key.to_owned(),
        message: format!("{BODY_ERROR} {e}"),
    }
}

impl S3Origin {
    /// Builds the client for `bucket` and `prefix`; no request is sent.
    pub async fn connect(
        bucket: &str,
        prefix: &str,
        cfg: &OriginConfig,
    ) -> Result<Self, OriginError> {
        Ok(Self {
            url: OriginUrl::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            },
            layout: Layout::new(prefix)?,
            client: client(cfg).await,
            bucket: bucket.to_owned(),
            operation_timeout: cfg.operation_timeout,
            attempts: cfg.max_attempts.max(1),
            progress_window: cfg.progress_window,
        })
    }

    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The limit on one whole call, retries included.
    pub fn operation_timeout(&self) -> Duration {
        self.operation_timeout
    }

    /// One conditional GET of a whole object, its body read up to `limit`.
    async fn get_once(
        &self,
        key: &str,
        etag: Option<&str>,
        limit: u64,
    ) -> Result<Fetched, OriginError> {
        let mut req = self.client.get_object().bucket(&self.bucket).key(key);
        if let Some(e) = etag {
            req = req.if_none_match(e);
        }
        let out = match req.send().await {
            Ok(out) => out,
            Err(e) if status(&e) == Some(304) => return Ok(Fetched::NotModified),
            Err(e) => match error("get", key, e) {
                OriginError::NotFound { .. } => return Ok(Fetched::Missing),
                other => return Err(other),
            },
        };
        let new_etag = out.e_tag().map(str::to_owned);
        if etag.is_some() && new_etag.as_deref() == etag {
            // Servers that ignore If-None-Match still tell us it did not change.
            return Ok(Fetched::NotModified);
        }
        let too_large = |size: u64| OriginError::TooLarge {
            op: "get",
            key: key.to_owned(),
            size,
            limit,
        };
        if let Some(size) = out.content_length().and_then(|l| u64::try_from(l).ok())
            && size > limit
        {
            return Err(too_large(size));
        }
        // The declared length is not trusted: the body is read only up to the limit (the length only
        // tells the no-progress rule how much is left).
        let declared = out
            .content_length()
            .and_then(|l| u64::try_from(l).ok())
            .unwrap_or(0);
        let body = read_body(
            out.body,
            "get",
            key,
            Window::new(self.progress_window),
            declared,
            |size| (size > limit).then(|| too_large(size)),
        )
        .await?;
        Ok(Fetched::Changed {
            body: Bytes::from(body),
            etag: new_etag,
        })
    }
}

/// The no-progress rule of a body: [`MIN_PROGRESS`] bytes (or the rest of the body) in every window.
struct Window {
    len: Duration,
    ends: tokio::time::Instant,
    bytes: u64,
}

impl Window {
    fn new(len: Duration) -> Self {
        Self {
            len,
            ends: tokio::time::Instant::now() + len,
            bytes: 0,
        }
    }

    /// At the end of a window: an error if it delivered too little, else the next window begins.
    fn close(&mut self, op: &'static str, key: &str, left: u64) -> Result<(), OriginError> {
        if self.bytes < MIN_PROGRESS.min(left.max(1)) {
            return Err(OriginError::Stalled {
                op,
                key: key.to_owned(),
                bytes: self.bytes,
                secs: self.len.as_secs(),
                min: MIN_PROGRESS,
            });
        }
        self.ends = tokio::time::Instant::now() + self.len;
        self.bytes = 0;
        Ok(())
    }
}

/// Reads a body piece by piece, with `over(size)` deciding when it has grown past what may be read, and
/// `window` giving up on a body that makes too little progress. `expect` is the length expected (0:
/// unknown), so that the last window of a body is not asked for more than is left.
async fn read_body(
    mut stream: aws_sdk_s3::primitives::ByteStream,
    op: &'static str,
    key: &str,
    mut window: Window,
    expect: u64,
    over: impl Fn(u64) -> Option<OriginError>,
) -> Result<Vec<u8>, OriginError> {
    let mut body = Vec::with_capacity(usize::try_from(expect).unwrap_or(0).min(16 << 20));
    let left = |got: usize| {
        if expect == 0 {
            MIN_PROGRESS
        } else {
            expect.saturating_sub(got as u64)
        }
    };
    loop {
        let piece = match tokio::time::timeout_at(window.ends, stream.try_next()).await {
            Err(_) => {
                window.close(op, key, left(body.len()) + window.bytes)?;
                continue;
            }
            Ok(piece) => piece.map_err(|e| body_error(op, key, e))?,
        };
        let Some(piece) = piece else {
            return Ok(body);
        };
        let size = (body.len() + piece.len()) as u64;
        if let Some(e) = over(size) {
            return Err(e);
        }
        body.extend_from_slice(&piece);
        window.bytes += piece.len() as u64;
        if tokio::time::Instant::now() >= window.ends {
            window.close(op, key, left(body.len()) + window.bytes)?;
        }
    }
}

/// Whether a read failed while its body streamed (the answer had begun: worth reading again), or
/// stalled.
fn is_body_error(e: &OriginError) -> bool {
    matches!(e, OriginError::Stalled { .. })
        || matches!(e, OriginError::Service { message, .. } if message.starts_with(BODY_ERROR))
}

const BODY_ERROR: &str = "reading the body:";

#[async_trait::async_trait]
impl Origin for S3Origin {
    fn url(&self) -> &OriginUrl {
        &self.url
    }

    fn layout(&self) -> &Layout {
        &self.layout
    }

    async fn get_if_changed(
        &self,
        key: &str,
        etag: Option<&str>,
        limit: u64,
    ) -> Result<Fetched, OriginError> {
        timed(self.operation_timeout, "get", key, async {
            // The SDK retries a request that fails; a body cut off part way is retried here, a bounded
            // number of times with backoff.
            let mut attempt = 1;
            loop {
                match self.get_once(key, etag, limit).await {
                    Err(e) if is_body_error(&e) && attempt < self.attempts => {
                        tracing::debug!(key, attempt, cause = %e, "object body cut off; reading it again");
                        tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
                        attempt += 1;
                    }
                    other => return other,
                }
            }
        })
        .await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, OriginError> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let want = range.end - range.start;
        let body = timed(self.operation_timeout, "get range", key, async {
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .range(format!("bytes={}-{}", range.start, range.end - 1))
                .send()
                .await
                .map_err(|e| error("get range", key, e))?;
            // Read no more than was asked for: a server that keeps sending is cut off, not buffered.
            let body = read_body(
                out.body,
                "get range",
                key,
                Window::new(self.progress_window),
                want,
                |size| {
                    (size > want).then(|| OriginError::Service {
                        op: "get range",
                        key: key.to_owned(),
                        message: format!(
                            "answered more than the {want} bytes asked for; not read further"
                        ),
                    })
                },
            )
            .await?;
            Ok(Bytes::from(body))
        })
        .await?;
        super::check_len(key, want, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A local HTTP server for one answer per connection: it reads the request, then `answer` writes
    /// to the connection, given the request's number (from 0). Returns its address and the count of
    /// requests seen.
    async fn server<F, Fut>(answer: F) -> (String, Arc<AtomicU64>)
    where
        F: Fn(tokio::net::TcpStream, u64) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let mut buf = vec![0u8; 16 * 1024];
                let _ = sock.read(&mut buf).await;
                tokio::spawn(answer(sock, n));
            }
        });
        (format!("http://{addr}"), seen)
    }

    /// A server that answers every request with a 206 whose body never ends (chunked, 64 KiB pieces),
    /// until the client hangs up; returns its address and a count of the bytes it managed to send.
    async fn endless_server() -> (String, Arc<AtomicU64>) {
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let (addr, _) = server(move |mut sock, _| {
            let counter = counter.clone();
            async move {
                let head = "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-99/100\r\n\
                            Transfer-Encoding: chunked\r\nETag: \"x\"\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let piece = vec![b'a'; 64 * 1024];
                let chunk = [
                    format!("{:x}\r\n", piece.len()).into_bytes(),
                    piece,
                    b"\r\n".to_vec(),
                ]
                .concat();
                while sock.write_all(&chunk).await.is_ok() {
                    counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }
        })
        .await;
        (addr, sent)
    }

    #[tokio::test]
    async fn a_range_answered_with_endless_data_is_cut_off_at_the_size_asked_for() {
        let (endpoint, sent) = endless_server().await;
        let origin = S3Origin::connect("bucket", "p", &local(endpoint, 1))
            .await
            .unwrap();
        let err = origin.get_range("p/blob", 0..100).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("answered more than the 100 bytes asked for"),
            "{err}"
        );
        // Cut off after the first piece or so, not after the whole stream (or the timeout).
        let sent = sent.load(Ordering::Relaxed);
        assert!(sent < 16 << 20, "the client read {sent} bytes");
        // A capped whole-object read of the same endless answer is refused at its limit too.
        let err = origin
            .get_if_changed("p/current.json", None, 1000)
            .await
            .unwrap_err();
        assert!(matches!(err, OriginError::TooLarge { .. }), "{err}");
    }

    /// Answers GETs with a 100-byte object, cutting the body off after 50 bytes for the first `cuts`
    /// requests; returns its address and a count of the requests it saw.
    async fn cutting_server(cuts: u64) -> (String, Arc<AtomicU64>) {
        server(move |mut sock, n| async move {
            let head = "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nETag: \"e\"\r\n\
                        Connection: close\r\n\r\n";
            let body = [b'b'; 100];
            let len = if n < cuts { 50 } else { 100 };
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(&body[..len]).await;
            let _ = sock.shutdown().await;
        })
        .await
    }

    fn local(endpoint: String, max_attempts: u32) -> OriginConfig {
        OriginConfig {
            endpoint_url: Some(endpoint),
            region: Some("us-east-1".into()),
            credentials: Some(("k".into(), "s".into())),
            attempt_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(2),
            max_attempts,
            progress_window: Duration::from_secs(20),
        }
    }

    #[tokio::test]
    async fn a_body_cut_off_part_way_is_read_again_a_bounded_number_of_times() {
        // Cut twice, whole the third time: read, with three attempts.
        let (endpoint, seen) = cutting_server(2).await;
        let origin = S3Origin::connect("bucket", "p", &local(endpoint, 3))
            .await
            .unwrap();
        let body = origin.get_capped("p/current.json", 1000).await.unwrap();
        assert_eq!(body.len(), 100);
        assert_eq!(seen.load(Ordering::SeqCst), 3);
        // Cut every time: an error naming the body after exactly the allowed attempts, no hot loop.
        let (endpoint, seen) = cutting_server(u64::MAX).await;
        let origin = S3Origin::connect("bucket", "p", &local(endpoint, 3))
            .await
            .unwrap();
        let err = origin.get_capped("p/current.json", 1000).await.unwrap_err();
        assert!(err.to_string().contains("reading the body"), "{err}");
        assert_eq!(seen.load(Ordering::SeqCst), 3);
    }

    /// Answers every GET with a `size`-byte body of which it sends 1 KiB a second (the first `drips`
    /// requests; whole at once after that); returns its address and a count of the requests.
    async fn dripping_server(size: usize, drips: u64) -> (String, Arc<AtomicU64>) {
        server(move |mut sock, n| async move {
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-{}/{size}\r\n\
                 Content-Length: {size}\r\nETag: \"d\"\r\nConnection: close\r\n\r\n",
                size - 1
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let body = vec![b'd'; size];
            if n >= drips {
                let _ = sock.write_all(&body).await;
                return;
            }
            for piece in body.chunks(1024) {
                if sock.write_all(piece).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
        .await
    }

    #[tokio::test]
    async fn a_dripping_body_is_abandoned_after_a_window_without_progress() {
        // 1 KiB/s against a 2 s window: abandoned after about 2 s, long before the operation timeout,
        // with the error saying how little came.
        let (endpoint, seen) = dripping_server(256 * 1024, u64::MAX).await;
        let cfg = OriginConfig {
            progress_window: Duration::from_secs(2),
            ..local(endpoint, 1)
        };
        let origin = S3Origin::connect("bucket", "p", &cfg).await.unwrap();
        let started = std::time::Instant::now();
        let err = origin.get_range("p/blob", 0..256 * 1024).await.unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, OriginError::Stalled { .. }), "{err}");
        assert!(err.to_string().contains("abandoned as stalled"), "{err}");
        assert!(took < Duration::from_secs(10), "gave up after {took:?}");
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        assert!(
            !err.is_unreachable(),
            "a slow origin is not an unreachable one"
        );

        // A whole-object read that stalls is read again, a bounded number of times: dripping twice,
        // then whole.
        let (endpoint, seen) = dripping_server(128 * 1024, 2).await;
        let cfg = OriginConfig {
            progress_window: Duration::from_secs(2),
            ..local(endpoint, 3)
        };
        let origin = S3Origin::connect("bucket", "p", &cfg).await.unwrap();
        let body = origin.get_capped("p/chunks", 1 << 20).await.unwrap();
        assert_eq!(body.len(), 128 * 1024);
        assert_eq!(seen.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_slow_body_that_keeps_making_progress_is_read_whole() {
        // 1 KiB/s for 3 KiB against a 5 s window: under 64 KiB, but all that was left came in time.
        let (endpoint, _) = dripping_server(3 * 1024, u64::MAX).await;
        let cfg = OriginConfig {
            progress_window: Duration::from_secs(5),
            ..local(endpoint, 1)
        };
        let origin = S3Origin::connect("bucket", "p", &cfg).await.unwrap();
        let body = origin.get_range("p/blob", 0..3 * 1024).await.unwrap();
        assert_eq!(body.len(), 3 * 1024);
    }
}
