//! Checking a published blob against its manifest entry: present, the right size, hashing to its id,
//! and its chunk map present, hashing to its name and agreeing with it. Used by `deckhand verify`, `bundle
//! push` and `layout audit`; what is wrong is a problem in the caller's list, what stops the check an
//! error.

use crate::origin::{Bucket, OriginError};
use deckhand_protocol::manifest::{BlobRef, Manifest};
use deckhand_protocol::{BlobId, ChunkMap};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How a problem names a blob: by its role in the manifest, or as a canary image.
pub fn describe(m: &Manifest, blob: &BlobId) -> String {
    if let Some(a) = m.artifacts.iter().find(|a| a.blob == *blob) {
        return format!("{} blob {blob}", a.role);
    }
    match m.canaries.iter().find(|c| c.image == *blob) {
        Some(c) => format!("canary image for {} {blob}", c.card_id),
        None => format!("blob {blob}"),
    }
}

/// Checks one blob a manifest names: present, of the right size, hashing to its id, and its chunk map
/// present, hashing to its name and agreeing with the blob chunk by chunk. Problems are pushed to
/// `problems` naming `what`; returns the bytes read.
pub async fn check_blob(
    origin: &dyn Bucket,
    b: &BlobRef,
    what: &str,
    work: &Path,
    problems: &mut Vec<String>,
) -> Result<u64, CheckError> {
    let BlobRef {
        blob,
        size,
        chunk_map,
    } = *b;
    let layout = origin.layout();
    let blob_key = layout.blob(&blob);
    match origin.head(&blob_key).await? {
        None => {
            problems.push(format!("{what} is missing ({blob_key})"));
            return Ok(0);
        }
        Some(info) if info.size != size => {
            problems.push(format!(
                "{what} is {} bytes, the manifest says {size} ({blob_key})",
                info.size
            ));
            return Ok(0);
        }
        Some(_) => {}
    }
    let local = work.join(blob.to_hex());
    origin.download(&blob_key, &local).await?;
    let data = std::fs::read(&local).map_err(|source| CheckError::Read {
        path: local.clone(),
        source,
    })?;
    let _ = std::fs::remove_file(&local);
    let read = data.len() as u64;
    let actual = BlobId::of(&data);
    if actual != blob {
        problems.push(format!("{what} content hashes to {actual} ({blob_key})"));
        return Ok(read);
    }
    let map_key = layout.blob(&chunk_map);
    let Some(map_bytes) = origin.get_opt(&map_key).await? else {
        problems.push(format!(
            "chunk map {chunk_map} of {what} is missing ({map_key})"
        ));
        return Ok(read);
    };
    if BlobId::of(&map_bytes) != chunk_map {
        problems.push(format!(
            "chunk map {chunk_map} of {what} does not hash to its name ({map_key})"
        ));
        return Ok(read);
    }
    match ChunkMap::decode(&map_bytes) {
        Err(e) => problems.push(format!("chunk map {chunk_map} of {what}: {e}")),
        Ok(map) if map.blob() != blob || map.size() != size => problems.push(format!(
            "chunk map {chunk_map} describes blob {} of {} bytes, not {what}",
            map.blob(),
            map.size()
        )),
        Ok(map) => {
            for c in map.chunks() {
                let r = c.offset as usize..(c.offset + u64::from(c.len)) as usize;
                if BlobId::of(&data[r]) != c.id {
                    problems.push(format!(
                        "chunk map {chunk_map}: chunk at {} does not match {what}",
                        c.offset
                    ));
                    break;
                }
            }
        }
    }
    Ok(read)
}
