//! File-system steps the store's crash story depends on: durable renames, positioned I/O, preallocation.

use crate::StoreError;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

pub(crate) fn io<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Makes a directory entry change (create, rename, unlink) in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", dir))
}

/// Renames `from` to `to` and makes the new name durable: after this returns, a power cut leaves `to`.
/// Creates `dir` and any missing ancestors, and syncs the directory holding each one created: a new
/// directory's name is on the disk only once its parent was synced (without it, a power cut soon after
/// the first start could take the whole store with it).
pub(crate) fn create_dir_durable(dir: &Path) -> Result<(), StoreError> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    std::fs::create_dir_all(dir).map_err(io("create directory", dir))?;
    for d in missing.iter().rev() {
        if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

pub(crate) fn durable_rename(from: &Path, to: &Path) -> Result<(), StoreError> {
    std::fs::rename(from, to).map_err(io("rename", from))?;
    if let Some(dir) = to.parent() {
        sync_dir(dir)?;
    }
    if let Some(dir) = from.parent().filter(|d| Some(*d) != to.parent()) {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Writes `data` to a new file at `path` and syncs it (the caller renames it into place).
pub(crate) fn write_synced(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io("create", path))?;
    f.write_all_at(data, 0).map_err(io("write", path))?;
    f.sync_all().map_err(io("sync", path))
}

/// Bytes available to an unprivileged writer on the file system holding `path` (`statvfs`).
pub(crate) fn free_bytes(path: &Path) -> Result<u64, StoreError> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| StoreError::Io {
        op: "statvfs",
        path: path.to_owned(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the right type.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(StoreError::Io {
            op: "statvfs",
            path: path.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // fsblkcnt_t and c_ulong are u64 on the 64-bit targets built today, narrower on 32-bit ones.
    #[allow(clippy::useless_conversion)]
    let (blocks, size) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    Ok(blocks.saturating_mul(size))
}

/// Reserves `len` bytes for `file` so that a full disk is reported now, not halfway through a download.
pub(crate) fn preallocate(file: &File, len: u64, path: &Path) -> Result<(), StoreError> {
    use std::os::fd::AsRawFd;
    file.set_len(len).map_err(io("size", path))?;
    if len == 0 {
        return Ok(());
    }
    let Ok(len) = libc::off_t::try_from(len) else {
        return Err(StoreError::Io {
            op: "preallocate",
            path: path.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::FileTooLarge),
        });
    };
    // SAFETY: the descriptor is open for writing for the whole call; posix_fallocate reads no memory.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    // Some file systems (tmpfs on old kernels, some FUSE) cannot preallocate; the sparse file still works.
    if rc != 0 && rc != libc::EOPNOTSUPP && rc != libc::EINVAL {
        return Err(StoreError::Io {
            op: "preallocate",
            path: path.to_owned(),
            source: std::io::Error::from_raw_os_error(rc),
        });
    }
    Ok(())
}

/// Hashes a whole file through a memory map, using every core for large files.
pub(crate) fn hash_file(path: &Path) -> Result<(blake3::Hash, u64), StoreError> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path).map_err(io("hash", path))?;
    Ok((hasher.finalize(), hasher.count()))
}

/// Hashes a whole file 1 MiB ([`PACED_STEP`]) at a time, calling `pace` with the bytes of each step (it
/// sleeps there to keep to an I/O budget); `None` when `pace` asks to stop before the end. A step is
/// read in 64 KiB pieces: the buffer stays allocated through `pace`'s sleeps, which fill most of a
/// scrub's life.
pub(crate) fn hash_file_paced(
    path: &Path,
    pace: &mut dyn FnMut(u64) -> bool,
) -> Result<Option<(blake3::Hash, u64)>, StoreError> {
    let file = File::open(path).map_err(io("open", path))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; PACED_READ];
    loop {
        let mut step = 0u64;
        while step < PACED_STEP {
            let n = file
                .read_at(&mut buf, hasher.count())
                .map_err(io("read", path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            step += n as u64;
        }
        if step == 0 {
            return Ok(Some((hasher.finalize(), hasher.count())));
        }
        if !pace(step) {
            return Ok(None);
        }
    }
}

/// The bytes [`hash_file_paced`] reads between two calls of its `pace`.
pub(crate) const PACED_STEP: u64 = 1 << 20;
/// The buffer [`hash_file_paced`] reads a step with.
const PACED_READ: usize = 64 * 1024;

/// Reads exactly `len` bytes at `offset`.
pub(crate) fn read_at(
    file: &File,
    offset: u64,
    len: u32,
    path: &Path,
) -> Result<Vec<u8>, StoreError> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)
        .map_err(io("read", path))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_hash_reads_a_step_between_paces_and_stops_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        // Two and a half steps, not a multiple of the read buffer either.
        let data: Vec<u8> = (0..(5 * PACED_STEP / 2 + 7))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let mut steps = Vec::new();
        let (hash, len) = hash_file_paced(&path, &mut |n| {
            steps.push(n);
            true
        })
        .unwrap()
        .unwrap();
        assert_eq!(hash, blake3::hash(&data));
        assert_eq!(len, data.len() as u64);
        assert_eq!(steps, [PACED_STEP, PACED_STEP, PACED_STEP / 2 + 7]);
        // Told to stop after the first step, it reads no further.
        let mut paces = 0;
        let stopped = hash_file_paced(&path, &mut |_| {
            paces += 1;
            false
        })
        .unwrap();
        assert!(stopped.is_none());
        assert_eq!(paces, 1);
        // An empty file hashes without a pace.
        std::fs::write(&path, b"").unwrap();
        let (hash, len) = hash_file_paced(&path, &mut |_| panic!("paced an empty file"))
            .unwrap()
            .unwrap();
        assert_eq!((hash, len), (blake3::hash(b""), 0));
    }
}
