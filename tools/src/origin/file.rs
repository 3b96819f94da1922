//! Writes, copies, listings and deletes on a directory origin. Writes are atomic: a temporary file in
//! the same directory, synced, then renamed (or hard-linked, for a write that must not replace).

use super::{Bucket, CopyOptions, ObjectInfo};
use bytes::Bytes;
use deckhand_agent::origin::{FileOrigin, OriginError, io_err, task_err};
use std::io::Write as _;
use std::path::Path;

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

/// Reads a file-origin object, naming it by key when it does not exist.
fn read_object(path: &Path, op: &'static str, key: &str) -> Result<Vec<u8>, OriginError> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => OriginError::NotFound {
            op,
            key: key.to_owned(),
        },
        _ => io_err("read", path)(e),
    })
}

#[async_trait::async_trait]
impl Bucket for FileOrigin {
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, OriginError> {
        let path = self.path(key);
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

    async fn put(&self, key: &str, body: Bytes) -> Result<(), OriginError> {
        let (dest, k) = (self.path(key), key.to_owned());
        tokio::task::spawn_blocking(move || file_put(&dest, &k, &body, false))
            .await
            .map_err(task_err("put", key))?
    }

    async fn put_new(&self, key: &str, body: Bytes) -> Result<(), OriginError> {
        let (dest, k) = (self.path(key), key.to_owned());
        tokio::task::spawn_blocking(move || file_put(&dest, &k, &body, true))
            .await
            .map_err(task_err("put", key))?
    }

    async fn put_if_match(&self, key: &str, body: Bytes, etag: &str) -> Result<(), OriginError> {
        let (dest, k, etag) = (self.path(key), key.to_owned(), etag.to_owned());
        tokio::task::spawn_blocking(move || {
            // The directory's lock makes compare-and-replace one step for writers on this host.
            let dir = dest.parent().unwrap_or(Path::new("/"));
            let lock = std::fs::File::open(dir).map_err(io_err("open", dir))?;
            lock.lock().map_err(io_err("lock", dir))?;
            let current = match std::fs::read(&dest) {
                Ok(data) => Some(format!("\"{}\"", blake3::hash(&data).to_hex())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err("read", &dest)(e)),
            };
            if current.as_deref() != Some(etag.as_str()) {
                return Err(OriginError::Changed { op: "put", key: k });
            }
            file_put(&dest, &k, &body, false)
        })
        .await
        .map_err(task_err("put", key))?
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), OriginError> {
        let (dest, src, k) = (self.path(key), path.to_owned(), key.to_owned());
        let size = tokio::task::spawn_blocking(move || {
            let data = std::fs::read(&src).map_err(io_err("read", &src))?;
            file_put(&dest, &k, &data, false)?;
            Ok::<u64, OriginError>(data.len() as u64)
        })
        .await
        .map_err(task_err("put", key))??;
        progress(size);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, OriginError> {
        let (root, p) = (self.root().to_owned(), prefix.to_owned());
        tokio::task::spawn_blocking(move || file_list(&root, &p))
            .await
            .map_err(task_err("list", prefix))?
    }

    async fn copy(
        &self,
        from: &str,
        to: &str,
        _size: u64,
        _opts: &CopyOptions,
    ) -> Result<Option<String>, OriginError> {
        let (src, dest) = (self.path(from), self.path(to));
        let (from_key, to_key) = (from.to_owned(), to.to_owned());
        tokio::task::spawn_blocking(move || {
            let data = read_object(&src, "copy", &from_key)?;
            file_put(&dest, &to_key, &data, false)
        })
        .await
        .map_err(task_err("copy", from))??;
        Ok(None)
    }

    async fn hash(&self, key: &str) -> Result<(u64, blake3::Hash), OriginError> {
        let (path, k) = (self.path(key), key.to_owned());
        tokio::task::spawn_blocking(move || {
            let mut hasher = blake3::Hasher::new();
            match hasher.update_mmap(&path) {
                Ok(_) => Ok((hasher.count(), hasher.finalize())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(OriginError::NotFound { op: "read", key: k })
                }
                Err(e) => Err(io_err("read", &path)(e)),
            }
        })
        .await
        .map_err(task_err("read", key))?
    }

    async fn download(&self, key: &str, dest: &Path) -> Result<u64, OriginError> {
        let src = self.path(key);
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

    async fn delete(&self, key: &str) -> Result<(), OriginError> {
        let path = self.path(key);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deckhand_agent::origin::{OriginConfig, OriginUrl};

    #[tokio::test]
    async fn file_origin_reads_writes_lists_and_refuses_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let url = OriginUrl::File {
            root: dir.path().to_owned(),
        };
        let o = crate::origin::connect(&url, &OriginConfig::default())
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
        assert!(o.get_range("a/b/one", 3..9).await.is_err());
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
        let deckhand_agent::origin::Fetched::Changed { etag, .. } =
            o.get_if_changed("a/c", None, 1).await.unwrap()
        else {
            panic!()
        };
        assert_eq!(
            o.get_if_changed("a/c", etag.as_deref(), 1).await.unwrap(),
            deckhand_agent::origin::Fetched::NotModified
        );
        // Over the limit: refused, naming the size, and nothing is read.
        assert!(matches!(
            o.get_if_changed("a/c", None, 0).await,
            Err(deckhand_agent::origin::OriginError::TooLarge {
                size: 1,
                limit: 0,
                ..
            })
        ));
        o.delete("a/c").await.unwrap();
        o.delete("a/c").await.unwrap();
        assert_eq!(o.head("a/c").await.unwrap(), None);
    }
}
