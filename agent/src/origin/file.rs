//! The directory backend: `file:///dir` holds objects as files under the same key layout as a bucket
//! (a USB stick written by `deckhand bundle export`, a test fixture). Entity tags are the blake3 of the
//! content.

use super::{Fetched, Origin, OriginError, OriginUrl, io_err, task_err};
use bytes::Bytes;
use deckhand_protocol::layout::Layout;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A directory origin.
#[derive(Clone, Debug)]
pub struct FileOrigin {
    url: OriginUrl,
    layout: Layout,
    root: PathBuf,
}

impl FileOrigin {
    pub fn new(root: &Path) -> Result<Self, OriginError> {
        Ok(Self {
            url: OriginUrl::File {
                root: root.to_owned(),
            },
            layout: Layout::new("")?,
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file holding `key`.
    pub fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

#[async_trait::async_trait]
impl Origin for FileOrigin {
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
        use tokio::io::AsyncReadExt as _;
        let path = self.path(key);
        let read = async {
            let file = tokio::fs::File::open(&path).await?;
            let size = file.metadata().await?.len();
            let mut data = Vec::new();
            if size <= limit {
                // A file that grows meanwhile is still read only to the limit.
                file.take(limit.saturating_add(1))
                    .read_to_end(&mut data)
                    .await?;
            }
            Ok::<_, std::io::Error>((size.max(data.len() as u64), data))
        };
        match read.await {
            Ok((size, _)) if size > limit => Err(OriginError::TooLarge {
                op: "get",
                key: key.to_owned(),
                size,
                limit,
            }),
            Ok((_, data)) => {
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

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, OriginError> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let want = range.end - range.start;
        let path = self.path(key);
        let key_owned = key.to_owned();
        let body = tokio::task::spawn_blocking(move || -> Result<Bytes, OriginError> {
            use std::os::unix::fs::FileExt as _;
            let f = std::fs::File::open(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => OriginError::NotFound {
                    op: "get range",
                    key: key_owned,
                },
                _ => io_err("open", &path)(e),
            })?;
            let len = f.metadata().map_err(io_err("stat", &path))?.len();
            // Read what exists of the range; a short file is reported by the length check.
            let end = range.end.min(len).max(range.start);
            let mut buf = vec![0u8; (end - range.start) as usize];
            f.read_exact_at(&mut buf, range.start)
                .map_err(io_err("read", &path))?;
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(task_err("get range", key))??;
        super::check_len(key, want, body)
    }
}
