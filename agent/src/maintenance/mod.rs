//! Store maintenance run by hand on a Pi: list what the store holds, re-verify it, collect garbage, and
//! export its releases as a bundle (`export`, which may run beside the agent); and the agent's own
//! background scrub of its live releases (`scrub`).

pub mod export;
pub mod scrub;

use deckhand_store::{BlobInfo, GcReport, Options, Store, StoreError, VerifyReport};
use serde::Serialize;
use std::path::Path;

/// A store listing, for people and for `--json`.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub blobs: Vec<BlobLine>,
    pub complete_bytes: u64,
    pub partial_bytes: u64,
    pub budget: Option<u64>,
    pub pins: Vec<(String, Vec<String>)>,
}

#[derive(Debug, Serialize)]
pub struct BlobLine {
    pub id: String,
    pub size: u64,
    pub complete: bool,
    pub have_bytes: u64,
    pub chunk_map: Option<String>,
}

impl From<BlobInfo> for BlobLine {
    fn from(b: BlobInfo) -> Self {
        Self {
            id: b.id.to_string(),
            size: b.size,
            complete: b.complete,
            have_bytes: b.have_bytes,
            chunk_map: b.chunk_map.map(|m| m.to_string()),
        }
    }
}

/// The pin names the agent uses.
pub const PIN_NAMES: [&str; 3] = ["active", "previous", "pending"];

pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
    Store::open(data_dir.join("store"), Options::default())
}

pub fn list(store: &Store) -> Result<Listing, StoreError> {
    let usage = store.usage()?;
    let pins = PIN_NAMES
        .iter()
        .map(|n| {
            Ok((
                (*n).to_owned(),
                store.pins(n)?.iter().map(ToString::to_string).collect(),
            ))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Listing {
        blobs: store.list()?.into_iter().map(BlobLine::from).collect(),
        complete_bytes: usage.complete_bytes,
        partial_bytes: usage.partial_bytes,
        budget: usage.budget,
        pins,
    })
}

pub fn verify(store: &Store) -> Result<VerifyReport, StoreError> {
    store.verify()
}

pub fn gc(store: &Store) -> Result<GcReport, StoreError> {
    store.gc()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_verify_and_gc_a_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        let a = store.import_bytes(&vec![3u8; 200_000]).unwrap();
        store.import_bytes(&vec![4u8; 100_000]).unwrap();
        store.set_pin("active", &[a.blob]).unwrap();
        let listing = list(&store).unwrap();
        assert_eq!(listing.blobs.len(), 4);
        assert_eq!(
            listing.pins[0],
            ("active".to_owned(), vec![a.blob.to_string()])
        );
        assert!(verify(&store).unwrap().corrupt.is_empty());
        assert_eq!(gc(&store).unwrap().blobs_removed, 2);
    }
}
