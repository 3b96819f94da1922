//! Writes, copies, listings, deletes and streaming reads on S3, with the agent's client.

use super::{Bucket, CopyOptions, MULTIPART_THRESHOLD, ObjectInfo, PART_CONCURRENCY, PART_SIZE};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use deckhand_agent::origin::s3::{body_error, error};
use deckhand_agent::origin::{OriginError, S3Origin, io_err, task_err, timed};
use futures::{StreamExt as _, TryStreamExt as _};
use std::path::Path;
use tokio::io::AsyncWriteExt as _;

/// An object's body, to stream; `op` names the call in errors.
async fn body(o: &S3Origin, key: &str, op: &'static str) -> Result<ByteStream, OriginError> {
    let out = o
        .client()
        .get_object()
        .bucket(o.bucket())
        .key(key)
        .send()
        .await
        .map_err(|e| error(op, key, e))?;
    Ok(out.body)
}

/// The next piece of a streamed body, or `None` at its end.
async fn next_chunk(
    body: &mut ByteStream,
    op: &'static str,
    key: &str,
) -> Result<Option<Bytes>, OriginError> {
    body.try_next().await.map_err(|e| body_error(op, key, e))
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

/// When a put may replace what is there.
enum Condition<'a> {
    Always,
    /// Only if nothing is there (`If-None-Match: *`).
    Absent,
    /// Only if what is there still has this entity tag (`If-Match`).
    Unchanged(&'a str),
}

async fn put_inner(
    o: &S3Origin,
    key: &str,
    body: Bytes,
    when: Condition<'_>,
) -> Result<(), OriginError> {
    timed(o.operation_timeout(), "put", key, async {
        let mut req = o
            .client()
            .put_object()
            .bucket(o.bucket())
            .key(key)
            .body(ByteStream::from(body));
        match when {
            Condition::Always => {}
            Condition::Absent => req = req.if_none_match("*"),
            Condition::Unchanged(etag) => req = req.if_match(etag),
        }
        let conditional = matches!(when, Condition::Unchanged(_));
        req.send().await.map_err(|e| match error("put", key, e) {
            // 412 to an If-Match: somebody replaced the object since it was read.
            OriginError::AlreadyExists { op, key } if conditional => {
                OriginError::Changed { op, key }
            }
            other => other,
        })?;
        Ok(())
    })
    .await
}

/// A multipart upload to `key` of `parts` parts: created, each part made by `part(index, upload id)`
/// with `concurrency` in flight, then completed; aborted if anything fails. Returns the entity tag.
async fn multipart<F, Fut>(
    o: &S3Origin,
    key: &str,
    parts: u64,
    concurrency: usize,
    part: F,
) -> Result<Option<String>, OriginError>
where
    F: Fn(u64, String) -> Fut,
    Fut: Future<Output = Result<CompletedPart, OriginError>>,
{
    let (client, bucket) = (o.client(), o.bucket());
    let created = timed(
        o.operation_timeout(),
        "create multipart upload",
        key,
        async {
            client
                .create_multipart_upload()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| error("create multipart upload", key, e))
        },
    )
    .await?;
    let upload_id = created.upload_id().unwrap_or_default().to_owned();
    let result: Result<Vec<CompletedPart>, OriginError> = futures::stream::iter(0..parts)
        .map(|i| part(i, upload_id.clone()))
        .buffered(concurrency.max(1))
        .try_collect()
        .await;
    let completed = match result {
        Ok(parts) => {
            timed(
                o.operation_timeout(),
                "complete multipart upload",
                key,
                async {
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
                        .map_err(|e| error("complete multipart upload", key, e))
                },
            )
            .await
        }
        Err(e) => Err(e),
    };
    match completed {
        Ok(out) => Ok(out.e_tag().map(str::to_owned)),
        Err(e) => {
            // Best effort: an abandoned upload only costs storage until the bucket's lifecycle rule
            // runs.
            if let Err(abort) = client
                .abort_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await
            {
                tracing::warn!(key, cause = %error("abort multipart upload", key, abort), "multipart upload left behind");
            }
            Err(e)
        }
    }
}

async fn put_multipart(
    o: &S3Origin,
    key: &str,
    path: &Path,
    size: u64,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(), OriginError> {
    let parts = size.div_ceil(PART_SIZE);
    multipart(o, key, parts, PART_CONCURRENCY, |i, upload_id| async move {
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
        .map_err(task_err("upload part", key))??;
        let number = (i + 1) as i32;
        let out = timed(o.operation_timeout(), "upload part", key, async {
            o.client()
                .upload_part()
                .bucket(o.bucket())
                .key(key)
                .upload_id(&upload_id)
                .part_number(number)
                .body(ByteStream::from(data))
                .send()
                .await
                .map_err(|e| error("upload part", key, e))
        })
        .await?;
        progress(len);
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag().map(str::to_owned))
            .build())
    })
    .await
    .map(|_| ())
}

async fn copy_multipart(
    o: &S3Origin,
    source: &str,
    from: &str,
    to: &str,
    size: u64,
    opts: &CopyOptions,
) -> Result<Option<String>, OriginError> {
    let part_size = opts.part_size.max(1);
    let parts = size.div_ceil(part_size);
    multipart(o, to, parts, opts.concurrency, |i, upload_id| async move {
        let start = i * part_size;
        let end = (start + part_size).min(size) - 1;
        let number = (i + 1) as i32;
        let out = timed(o.operation_timeout(), "copy part", from, async {
            o.client()
                .upload_part_copy()
                .bucket(o.bucket())
                .key(to)
                .upload_id(&upload_id)
                .part_number(number)
                .copy_source(source)
                .copy_source_range(format!("bytes={start}-{end}"))
                .send()
                .await
                .map_err(|e| error("copy part", from, e))
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
    })
    .await
}

#[async_trait::async_trait]
impl Bucket for S3Origin {
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, OriginError> {
        timed(self.operation_timeout(), "head", key, async {
            match self
                .client()
                .head_object()
                .bucket(self.bucket())
                .key(key)
                .send()
                .await
            {
                Ok(out) => Ok(Some(ObjectInfo {
                    key: key.to_owned(),
                    size: out.content_length().unwrap_or(0).max(0) as u64,
                    etag: out.e_tag().map(str::to_owned),
                })),
                Err(e) => match error("head", key, e) {
                    OriginError::NotFound { .. } => Ok(None),
                    other => Err(other),
                },
            }
        })
        .await
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<(), OriginError> {
        put_inner(self, key, body, Condition::Always).await
    }

    async fn put_new(&self, key: &str, body: Bytes) -> Result<(), OriginError> {
        put_inner(self, key, body, Condition::Absent).await
    }

    async fn put_if_match(&self, key: &str, body: Bytes, etag: &str) -> Result<(), OriginError> {
        put_inner(self, key, body, Condition::Unchanged(etag)).await
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), OriginError> {
        let size = tokio::fs::metadata(path)
            .await
            .map_err(io_err("stat", path))?
            .len();
        if size >= MULTIPART_THRESHOLD {
            return put_multipart(self, key, path, size, progress).await;
        }
        let data = tokio::fs::read(path).await.map_err(io_err("read", path))?;
        self.put(key, Bytes::from(data)).await?;
        progress(size);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, OriginError> {
        timed(self.operation_timeout(), "list", prefix, async {
            let mut out = Vec::new();
            let mut pages = self
                .client()
                .list_objects_v2()
                .bucket(self.bucket())
                .prefix(prefix)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| error("list", prefix, e))?;
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
        })
        .await
    }

    async fn copy(
        &self,
        from: &str,
        to: &str,
        size: u64,
        opts: &CopyOptions,
    ) -> Result<Option<String>, OriginError> {
        let source = copy_source(self.bucket(), from);
        if size > opts.part_threshold {
            return copy_multipart(self, &source, from, to, size, opts).await;
        }
        let out = timed(self.operation_timeout(), "copy", from, async {
            self.client()
                .copy_object()
                .bucket(self.bucket())
                .key(to)
                .copy_source(&source)
                .send()
                .await
                .map_err(|e| error("copy", from, e))
        })
        .await?;
        Ok(out
            .copy_object_result()
            .and_then(|r| r.e_tag())
            .map(str::to_owned))
    }

    async fn hash(&self, key: &str) -> Result<(u64, blake3::Hash), OriginError> {
        timed(self.operation_timeout(), "read", key, async {
            let mut body = body(self, key, "read").await?;
            let mut hasher = blake3::Hasher::new();
            let mut n = 0u64;
            while let Some(chunk) = next_chunk(&mut body, "read", key).await? {
                n += chunk.len() as u64;
                hasher.update(&chunk);
            }
            Ok((n, hasher.finalize()))
        })
        .await
    }

    async fn download(&self, key: &str, dest: &Path) -> Result<u64, OriginError> {
        timed(self.operation_timeout(), "download", key, async {
            let mut body = body(self, key, "download").await?;
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
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), OriginError> {
        timed(self.operation_timeout(), "delete", key, async {
            self.client()
                .delete_object()
                .bucket(self.bucket())
                .key(key)
                .send()
                .await
                .map_err(|e| error("delete", key, e))?;
            Ok(())
        })
        .await
    }
}
