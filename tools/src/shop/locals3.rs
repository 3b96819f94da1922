//! A real S3 server on 127.0.0.1 (s3s-fs over a local directory), for tests, benchmarks and the demo.
//!
//! aws-sdk-s3 talks to it over HTTP exactly as it talks to AWS. A counting layer records every object
//! written and every byte served, so tests can assert "uploaded only what changed" and benchmarks can
//! report origin bytes. `set_down(true)` makes the origin unreachable (connections are dropped).

use crate::origin::{OriginConfig, OriginUrl};
use hyper_util::rt::{TokioExecutor, TokioIo};
use s3s::dto::*;
use s3s::{S3, S3Request, S3Response, S3Result};
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
}

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
        if let Ok(mut r) = self.ranges.lock() {
            r.clear();
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
        self.stats.check_up()?;
        self.fs.create_bucket(req).await
    }
    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.stats.check_up()?;
        self.fs.head_bucket(req).await
    }
    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        self.stats.check_up()?;
        let key = req.input.key.clone();
        let out = self.fs.get_object(req).await?;
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
        self.stats.check_up()?;
        self.fs.head_object(req).await
    }
    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        self.stats.check_up()?;
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
        self.stats.check_up()?;
        self.fs.list_objects_v2(req).await
    }
    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.stats.check_up()?;
        self.fs.create_multipart_upload(req).await
    }
    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        self.stats.check_up()?;
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
        self.stats.check_up()?;
        let out = self.fs.upload_part_copy(req).await?;
        self.stats.copies.fetch_add(1, Ordering::SeqCst);
        Ok(out)
    }
    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        self.stats.check_up()?;
        self.fs.list_parts(req).await
    }
    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.stats.check_up()?;
        let key = req.input.key.clone();
        let out = self.fs.complete_multipart_upload(req).await?;
        self.stats.record_put(&key);
        Ok(out)
    }
    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.stats.check_up()?;
        self.fs.abort_multipart_upload(req).await
    }
    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        self.stats.check_up()?;
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
        self.stats.check_up()?;
        self.fs.delete_object(req).await
    }
    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        self.stats.check_up()?;
        self.fs.delete_objects(req).await
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
