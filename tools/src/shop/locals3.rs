//! A real S3 server on 127.0.0.1 (s3s-fs over a local directory), for tests, benchmarks and the demo.
//!
//! aws-sdk-s3 talks to it over HTTP exactly as it talks to AWS. A counting layer records every object
//! written and every byte served, so tests can assert "uploaded only what changed" and benchmarks can
//! report origin bytes. `set_down(true)` makes the origin unreachable (connections are dropped), and
//! `set_faults` makes it flaky: error answers, stalls, bodies cut off and bodies that drip, at random.

use crate::origin::{OriginConfig, OriginUrl};
use hyper_util::rt::{TokioExecutor, TokioIo};
use s3s::dto::*;
use s3s::{S3, S3Request, S3Response, S3Result};
use std::future::Future as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const ACCESS_KEY: &str = "deckhand-local";
pub const SECRET_KEY: &str = "deckhand-local-secret";

/// What the server saw.
#[derive(Debug, Default)]
pub struct Stats {
    puts: Mutex<Vec<String>>,
    bytes_sent: AtomicU64,
    /// Bytes whose GET answers were sent, counted once the uplink carried them (for rates).
    bytes_carried: AtomicU64,
    gets: AtomicU64,
    down: AtomicBool,
    /// Connections dropped and requests refused while down.
    refused: AtomicU64,
    /// Every object byte range GetObject served: (key, range).
    ranges: Mutex<Vec<(String, std::ops::Range<u64>)>>,
    part_delay_ms: AtomicU64,
    copy_delay_ms: AtomicU64,
    copies: AtomicU64,
    damage_copies: AtomicBool,
    /// The simulated uplink: bytes per second (0: unlimited), and when it is next free.
    uplink: AtomicU64,
    uplink_free_at: Mutex<Option<std::time::Instant>>,
    /// Another writer's object, written over `key` just before the next PUT of that key is served.
    race: Mutex<Option<(String, Vec<u8>)>>,
    /// Every request that reached the server (answered, faulted or refused).
    requests: AtomicU64,
    /// GetObject requests with a Range header.
    range_requests: AtomicU64,
    /// The faults to inject, and the generator deciding them.
    faults: Mutex<Option<(Faults, deckhand_protocol::testdata::SplitMix)>>,
    injected: [AtomicU64; 5],
}

/// Faults the server injects, each a share of the requests it decides at random (a seeded generator,
/// one draw per request).
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Answered with an error at once: half 500 InternalError, half 503 SlowDown.
    pub errors: f64,
    /// Held for [`Faults::stall`] (past the client's attempt timeout), then answered 503.
    pub stalls: f64,
    pub stall: Duration,
    /// GetObject bodies that break off half way (the connection is dropped).
    pub cuts: f64,
    /// GetObject bodies sent at 1 KiB/s.
    pub drips: f64,
    /// The first ranged GetObject after the faults are set drips, whatever the draw: the test always
    /// meets one.
    pub drip_first_range: bool,
    pub seed: u64,
}

/// A fault the server injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Error500 = 0,
    SlowDown503 = 1,
    Stall = 2,
    Cut = 3,
    Drip = 4,
}

/// How fast a dripping body is sent: 1 KiB a second.
const DRIP: usize = 1024;

impl Stats {
    /// Keys written by PutObject and CompleteMultipartUpload, in order.
    pub fn puts(&self) -> Vec<String> {
        self.puts.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Body bytes served by GetObject (whole objects and ranges).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::SeqCst)
    }

    /// Bytes of GET answers the uplink has carried (what a rate over time is measured from).
    pub fn bytes_carried(&self) -> u64 {
        self.bytes_carried.load(Ordering::SeqCst)
    }

    pub fn gets(&self) -> u64 {
        self.gets.load(Ordering::SeqCst)
    }

    /// The byte ranges GetObject served since the last reset, by key (a whole object is `0..size`).
    pub fn ranges(&self) -> Vec<(String, std::ops::Range<u64>)> {
        self.ranges.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Connections dropped and requests refused while the server was down: proof that a client tried.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    pub fn reset(&self) {
        if let Ok(mut p) = self.puts.lock() {
            p.clear();
        }
        self.bytes_sent.store(0, Ordering::SeqCst);
        self.bytes_carried.store(0, Ordering::SeqCst);
        self.gets.store(0, Ordering::SeqCst);
        self.refused.store(0, Ordering::SeqCst);
        self.requests.store(0, Ordering::SeqCst);
        self.range_requests.store(0, Ordering::SeqCst);
        for i in &self.injected {
            i.store(0, Ordering::SeqCst);
        }
        if let Ok(mut r) = self.ranges.lock() {
            r.clear();
        }
    }

    /// Every request that reached the server since the last reset, faulted and refused ones included.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Ranged GetObject requests since the last reset.
    pub fn range_requests(&self) -> u64 {
        self.range_requests.load(Ordering::SeqCst)
    }

    /// Faults injected of `kind` since the last reset.
    pub fn injected(&self, kind: Fault) -> u64 {
        self.injected[kind as usize].load(Ordering::SeqCst)
    }

    /// Makes the server flaky (`Some`) or well again (`None`).
    pub fn set_faults(&self, faults: Option<Faults>) {
        if let Ok(mut f) = self.faults.lock() {
            *f = faults.map(|f| (f, deckhand_protocol::testdata::SplitMix(f.seed)));
        }
    }

    /// The fault, if any, for one request (`get`: a GetObject, whose body can be cut or drip).
    fn draw(&self, get: bool, ranged: bool) -> Option<Fault> {
        let mut guard = self.faults.lock().ok()?;
        let (faults, rng) = guard.as_mut()?;
        let fault = if get && ranged && faults.drip_first_range {
            faults.drip_first_range = false;
            Some(Fault::Drip)
        } else {
            let r = f64::from(rng.unit());
            let coin = rng.next_u64() % 2 == 0;
            let shares = [
                (faults.errors, true),
                (faults.stalls, true),
                (faults.cuts, get),
                (faults.drips, get),
            ];
            let mut edge = 0.0;
            let mut pick = None;
            for (i, (share, applies)) in shares.into_iter().enumerate() {
                edge += share;
                if r < edge {
                    pick = applies.then_some(i);
                    break;
                }
            }
            pick.map(|i| match i {
                0 if coin => Fault::Error500,
                0 => Fault::SlowDown503,
                1 => Fault::Stall,
                2 => Fault::Cut,
                _ => Fault::Drip,
            })
        };
        if let Some(f) = fault {
            self.injected[f as usize].fetch_add(1, Ordering::SeqCst);
        }
        fault
    }

    /// Counts a request and answers it with an error if the faults say so (stalling first if they
    /// say that). Cut and dripping bodies are returned for the caller to apply.
    async fn admit(&self, get: bool, ranged: bool) -> S3Result<Option<Fault>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.check_up()?;
        match self.draw(get, ranged) {
            Some(Fault::Error500) => Err(s3s::s3_error!(InternalError, "injected fault")),
            Some(Fault::SlowDown503) => Err(s3s::s3_error!(SlowDown, "injected fault")),
            Some(Fault::Stall) => {
                let stall = self
                    .faults
                    .lock()
                    .ok()
                    .and_then(|f| f.as_ref().map(|(f, _)| f.stall))
                    .unwrap_or_default();
                tokio::time::sleep(stall).await;
                Err(s3s::s3_error!(SlowDown, "injected fault, after a stall"))
            }
            body => Ok(body),
        }
    }

    /// Slows every uploaded part by `delay` (to interrupt a multipart upload deterministically).
    pub fn set_part_delay(&self, delay: Duration) {
        self.part_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Slows every CopyObject by `delay` (to interrupt a layout migration deterministically).
    pub fn set_copy_delay(&self, delay: Duration) {
        self.copy_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Server-side copies done (CopyObject and UploadPartCopy parts).
    pub fn copies(&self) -> u64 {
        self.copies.load(Ordering::SeqCst)
    }

    /// Just before the next PutObject of `key` is served, `body` is written there as another writer
    /// would have (with a new entity tag): the interleaving of two publishers between one's read and
    /// its write, made to happen.
    pub fn write_before_next_put(&self, key: &str, body: Vec<u8>) {
        if let Ok(mut r) = self.race.lock() {
            *r = Some((key.to_owned(), body));
        }
    }

    /// Makes every CopyObject write a copy one byte short (a faulty server), to test that copies are
    /// verified.
    pub fn set_damage_copies(&self, damage: bool) {
        self.damage_copies.store(damage, Ordering::SeqCst);
    }

    /// Shares one uplink of `bytes_per_sec` among every GET (0: unlimited): each response is held back
    /// until the uplink would have carried it, first come first served, as a shop's slow line would.
    pub fn set_uplink(&self, bytes_per_sec: u64) {
        self.uplink.store(bytes_per_sec, Ordering::SeqCst);
    }

    async fn carry(&self, len: u64) {
        let rate = self.uplink.load(Ordering::SeqCst);
        if rate == 0 {
            return;
        }
        let done = {
            let Ok(mut free) = self.uplink_free_at.lock() else {
                return;
            };
            let now = std::time::Instant::now();
            let start = free.map_or(now, |f| f.max(now));
            let done = start + Duration::from_secs_f64(len as f64 / rate as f64);
            *free = Some(done);
            done
        };
        tokio::time::sleep_until(done.into()).await;
    }

    fn record_put(&self, key: &str) {
        if let Ok(mut p) = self.puts.lock() {
            p.push(key.to_owned());
        }
    }

    fn check_up(&self) -> S3Result<()> {
        if self.down.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(s3s::s3_error!(
                ServiceUnavailable,
                "the local S3 server is set down"
            ));
        }
        Ok(())
    }
}

struct Counting {
    fs: s3s_fs::FileSystem,
    stats: Arc<Stats>,
    /// The directory s3s-fs serves (buckets are its subdirectories).
    root: PathBuf,
    /// s3s-fs checks If-None-Match and If-Match, then writes: two racing PUTs can both pass the check.
    /// S3 decides each PUT atomically, so PUTs are served one at a time here.
    puts: tokio::sync::Mutex<()>,
}

#[async_trait::async_trait]
impl S3 for Counting {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        self.stats.admit(false, false).await?;
        self.fs.create_bucket(req).await
    }
    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.stats.admit(false, false).await?;
        self.fs.head_bucket(req).await
    }
    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let ranged = req.input.range.is_some();
        if ranged {
            self.stats.range_requests.fetch_add(1, Ordering::SeqCst);
        }
        let fault = self.stats.admit(true, ranged).await?;
        let key = req.input.key.clone();
        let mut out = self.fs.get_object(req).await?;
        if let Some(fault) = fault
            && let Some(body) = out.output.body.take()
        {
            let len = out.output.content_length.unwrap_or(0).max(0) as u64;
            out.output.body = Some(StreamingBlob::wrap(FaultyBody::new(body, fault, len)));
        }
        self.stats.gets.fetch_add(1, Ordering::SeqCst);
        let len = out.output.content_length.unwrap_or(0).max(0) as u64;
        // "bytes START-END/SIZE" for a range; the whole object otherwise.
        let start = out
            .output
            .content_range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes "))
            .and_then(|r| r.split('-').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        if let Ok(mut r) = self.stats.ranges.lock() {
            r.push((key, start..start + len));
        }
        self.stats.bytes_sent.fetch_add(len, Ordering::SeqCst);
        self.stats.carry(len).await;
        self.stats.bytes_carried.fetch_add(len, Ordering::SeqCst);
        Ok(out)
    }
    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        self.stats.admit(false, false).await?;
        self.fs.head_object(req).await
    }
    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        self.stats.admit(false, false).await?;
        let key = req.input.key.clone();
        let _one_at_a_time = self.puts.lock().await;
        let racing = self
            .stats
            .race
            .lock()
            .ok()
            .and_then(|mut r| r.take_if(|(k, _)| *k == key));
        if let Some((_, body)) = racing {
            // s3s-fs keeps an object's entity tag in a file beside it; without it, it computes a new one.
            use base64::Engine as _;
            let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            let bucket = &req.input.bucket;
            let _ = std::fs::remove_file(self.root.join(format!(
                ".bucket-{}.object-{}.internal.json",
                b64(bucket),
                b64(&key)
            )));
            std::fs::write(self.root.join(bucket).join(&key), body)
                .map_err(|e| s3s::s3_error!(InternalError, "racing write: {e}"))?;
        }
        let out = self.fs.put_object(req).await?;
        self.stats.record_put(&key);
        Ok(out)
    }
    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.stats.admit(false, false).await?;
        self.fs.list_objects_v2(req).await
    }
    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.stats.admit(false, false).await?;
        self.fs.create_multipart_upload(req).await
    }
    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        self.stats.admit(false, false).await?;
        let delay = self.stats.part_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.fs.upload_part(req).await
    }
    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        self.stats.admit(false, false).await?;
        let out = self.fs.upload_part_copy(req).await?;
        self.stats.copies.fetch_add(1, Ordering::SeqCst);
        Ok(out)
    }
    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        self.stats.admit(false, false).await?;
        self.fs.list_parts(req).await
    }
    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.stats.admit(false, false).await?;
        let key = req.input.key.clone();
        let out = self.fs.complete_multipart_upload(req).await?;
        self.stats.record_put(&key);
        Ok(out)
    }
    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.stats.admit(false, false).await?;
        self.fs.abort_multipart_upload(req).await
    }
    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        self.stats.admit(false, false).await?;
        let delay = self.stats.copy_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        let out = self.fs.copy_object(req).await?;
        self.stats.record_put(&key);
        self.stats.copies.fetch_add(1, Ordering::SeqCst);
        if self.stats.damage_copies.load(Ordering::SeqCst) {
            let path = self.root.join(&bucket).join(&key);
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) {
                let _ = f.set_len(len.saturating_sub(1));
            }
        }
        Ok(out)
    }
    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.stats.admit(false, false).await?;
        self.fs.delete_object(req).await
    }
    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        self.stats.admit(false, false).await?;
        self.fs.delete_objects(req).await
    }
}

/// A GetObject body with a fault: cut off half way (an error ends the stream, and the connection is
/// dropped short of its Content-Length), or sent [`DRIP`] bytes a second.
struct FaultyBody {
    inner: StreamingBlob,
    fault: Fault,
    /// Bytes passed on so far, and (for a cut) how many may be.
    sent: u64,
    cut_at: u64,
    /// Bytes read from `inner` not yet passed on (a drip), and the wait before the next piece.
    held: bytes::Bytes,
    wait: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl FaultyBody {
    fn new(inner: StreamingBlob, fault: Fault, len: u64) -> Self {
        Self {
            inner,
            fault,
            sent: 0,
            cut_at: len / 2,
            held: bytes::Bytes::new(),
            wait: None,
        }
    }
}

impl futures::Stream for FaultyBody {
    type Item = Result<bytes::Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.fault == Fault::Cut && this.sent >= this.cut_at {
            return Poll::Ready(Some(Err(std::io::Error::other(
                "injected fault: body cut off",
            ))));
        }
        if let Some(wait) = this.wait.as_mut() {
            std::task::ready!(wait.as_mut().poll(cx));
            this.wait = None;
        }
        if this.held.is_empty() {
            match std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Err(e)) => {
                    return Poll::Ready(Some(Err(std::io::Error::other(e.to_string()))));
                }
                Some(Ok(b)) => this.held = b,
            }
        }
        let n = match this.fault {
            Fault::Drip => {
                this.wait = Some(Box::pin(tokio::time::sleep(Duration::from_secs(1))));
                DRIP
            }
            _ => usize::try_from(this.cut_at - this.sent).unwrap_or(usize::MAX),
        }
        .min(this.held.len());
        let piece = this.held.split_to(n);
        this.sent += piece.len() as u64;
        Poll::Ready(Some(Ok(piece)))
    }
}

/// A running local S3 server. Stops when dropped.
pub struct LocalS3 {
    endpoint: String,
    bucket: String,
    root: PathBuf,
    stats: Arc<Stats>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LocalS3 {
    /// Serves `root` (one sub-directory per bucket) on 127.0.0.1 at a free port, with `bucket` created.
    pub fn start(root: &Path, bucket: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(root.join(bucket))?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr: SocketAddr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let fs =
            s3s_fs::FileSystem::new(root).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let service = {
            let mut b = s3s::service::S3ServiceBuilder::new(Counting {
                fs,
                stats: stats.clone(),
                root: root.to_owned(),
                puts: tokio::sync::Mutex::new(()),
            });
            b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            b.build()
        };
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let stats_for_loop = stats.clone();
        let thread = std::thread::Builder::new().name("local-s3".into()).spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
                let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                loop {
                    let socket = tokio::select! {
                        r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                        _ = stop_rx.changed() => break,
                    };
                    if stats_for_loop.down.load(Ordering::SeqCst) {
                        // Unreachable: drop the connection without a word.
                        stats_for_loop.refused.fetch_add(1, Ordering::SeqCst);
                        drop(socket);
                        continue;
                    }
                    let conn = http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
            });
            rt.shutdown_timeout(Duration::from_secs(2));
        })?;
        Ok(Self {
            endpoint: format!("http://{addr}"),
            bucket: bucket.to_owned(),
            root: root.to_owned(),
            stats,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The directory holding the bucket's objects, one file per key.
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.join(&self.bucket)
    }

    pub fn origin_url(&self, prefix: &str) -> OriginUrl {
        OriginUrl::S3 {
            bucket: self.bucket.clone(),
            prefix: prefix.to_owned(),
        }
    }

    /// The `--origin` argument for this server's bucket.
    pub fn origin_arg(&self, prefix: &str) -> String {
        self.origin_url(prefix).to_string()
    }

    /// Client settings that reach this server (short timeouts: it is local).
    pub fn origin_config(&self) -> OriginConfig {
        OriginConfig {
            endpoint_url: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            credentials: Some((ACCESS_KEY.into(), SECRET_KEY.into())),
            attempt_timeout: Duration::from_secs(20),
            operation_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(2),
            max_attempts: 3,
            progress_window: Duration::from_secs(20),
        }
    }

    /// The environment a child process needs to reach this server through the standard AWS chain.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Makes the origin unreachable (`true`) or reachable again.
    pub fn set_down(&self, down: bool) {
        self.stats.down.store(down, Ordering::SeqCst);
    }
}

impl Drop for LocalS3 {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
