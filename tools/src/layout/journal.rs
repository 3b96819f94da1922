//! Layout migration journals in the origin (`migration/{journal}/`): creating or resuming one, appending
//! batches of records, reading them back, and finding an object that a migration moved.
//!
//! The rules and records are pure code in `deckhand_protocol::migration`; this module only moves their
//! bytes. Batches are written with `If-None-Match: *`, so two runs writing the same journal cannot both
//! append the same batch: the second stops with a clear error instead of interleaving.

use crate::origin::{Bucket, OriginError};
use deckhand_protocol::layout::{Key, LayoutError, Name};
use deckhand_protocol::migration::{self, Batch, JournalState, MigrationError, Plan, Record};
use std::collections::BTreeSet;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("journal {journal}: {source}")]
    Migration {
        journal: String,
        #[source]
        source: MigrationError,
    },
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("journal {journal} does not exist under {origin} (no {key})")]
    Missing {
        journal: String,
        origin: String,
        key: String,
    },
    #[error(
        "journal {journal} already holds a different plan ({key}); plans are never overwritten"
    )]
    PlanMismatch { journal: String, key: String },
    #[error(
        "journal {journal}: batch {seq} was written by another run at the same time; run the command again once that one has finished"
    )]
    Concurrent { journal: String, seq: u64 },
}

/// A journal read back: its plan and the state its records add up to.
#[derive(Clone, Debug)]
pub struct Journal {
    pub id: Name,
    pub plan: Plan,
    pub state: JournalState,
}

impl Journal {
    /// Writes the plan as a new journal, or resumes the journal already holding exactly this plan.
    pub async fn create_or_resume(origin: &dyn Bucket, plan: &Plan) -> Result<Self, JournalError> {
        let id = plan.journal_id()?;
        let key = origin.layout().journal_plan(&id);
        let bytes = plan.encode();
        match origin.put_new(&key, bytes.clone().into()).await {
            Ok(()) => Ok(Self {
                id,
                plan: plan.clone(),
                state: JournalState::default(),
            }),
            Err(OriginError::AlreadyExists { .. }) => {
                let journal = Self::load(origin, &id).await?;
                if journal.plan != *plan {
                    return Err(JournalError::PlanMismatch {
                        journal: id.to_string(),
                        key,
                    });
                }
                Ok(journal)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads a journal's plan and every batch.
    pub async fn load(origin: &dyn Bucket, id: &Name) -> Result<Self, JournalError> {
        let layout = origin.layout();
        let key = layout.journal_plan(id);
        let wrap = |source| JournalError::Migration {
            journal: id.to_string(),
            source,
        };
        let Some(bytes) = origin.get_opt(&key).await? else {
            return Err(JournalError::Missing {
                journal: id.to_string(),
                origin: origin.url().to_string(),
                key,
            });
        };
        let plan = Plan::decode(&bytes).map_err(wrap)?;
        let mut batches = Vec::new();
        for obj in origin.list(&layout.journal_dir(id)).await? {
            if migration::batch_seq(layout, id, &obj.key).is_none() {
                continue;
            }
            let bytes = origin.get(&obj.key).await?;
            batches.push(Batch::decode(&bytes, id).map_err(wrap)?);
        }
        Ok(Self {
            id: id.clone(),
            plan,
            state: JournalState::replay(batches),
        })
    }

    /// Records `records` as the next batch (nothing is written for none).
    pub async fn append(
        &mut self,
        origin: &dyn Bucket,
        records: Vec<Record>,
    ) -> Result<(), JournalError> {
        if records.is_empty() {
            return Ok(());
        }
        let seq = self.state.next_seq;
        let batch = Batch::new(&self.id, seq, records);
        let key = origin.layout().journal_batch(&self.id, seq);
        match origin.put_new(&key, batch.encode().into()).await {
            Ok(()) => {}
            Err(OriginError::AlreadyExists { .. }) => {
                return Err(JournalError::Concurrent {
                    journal: self.id.to_string(),
                    seq,
                });
            }
            Err(e) => return Err(e.into()),
        }
        self.state.next_seq = seq + 1;
        for r in batch.records {
            self.state.apply(r);
        }
        Ok(())
    }
}

/// The ids of every journal in the origin.
pub async fn journal_ids(origin: &dyn Bucket) -> Result<Vec<Name>, JournalError> {
    let layout = origin.layout();
    let mut ids = BTreeSet::new();
    for obj in origin.list(&layout.migration_dir()).await? {
        if let Ok(Key::Migration { journal, path }) = layout.classify(&obj.key)
            && path.as_str() == "plan.json"
        {
            ids.insert(journal);
        }
    }
    Ok(ids.into_iter().collect())
}

/// Every journal in the origin, read back.
pub async fn journals(origin: &dyn Bucket) -> Result<Vec<Journal>, JournalError> {
    let mut out = Vec::new();
    for id in journal_ids(origin).await? {
        out.push(Journal::load(origin, &id).await?);
    }
    Ok(out)
}

/// Where `key` is now: the key itself if it exists; failing that, where a migration moved it (its new key
/// for an old one, its old key for a new one, R4.3 and R5.5). `None` if it is nowhere.
pub async fn locate(origin: &dyn Bucket, key: &str) -> Result<Option<String>, JournalError> {
    if origin.head(key).await?.is_some() {
        return Ok(Some(key.to_owned()));
    }
    // Credentials that may read objects but not list the bucket still get a plain "not found".
    let journals = match journals(origin).await {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!(key, cause = %e, "cannot read the migration journals; the object is looked for only at its own key");
            return Ok(None);
        }
    };
    for journal in journals {
        if let Some(alt) = migration::alternate(&journal.plan, key)
            && origin.head(alt).await?.is_some()
        {
            tracing::info!(key, found = alt, journal = %journal.id, "found a moved object through the migration journal");
            return Ok(Some(alt.to_owned()));
        }
    }
    Ok(None)
}
