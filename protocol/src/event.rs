//! Recognition events: what an agent tells the shop's systems (Server-Sent Events at `GET /v1/events`,
//! MQTT, webhooks) each time it answers an image. One typed form, serde-derived, that the agent writes
//! and the CLI, the demo and the tests read; README.md documents it for the shop's own code.
//!
//! An event's id is `<log>-<seq>`: `log` names the agent's event log (random, chosen when the log file
//! was made) and `seq` counts up in it without reuse. A consumer that saw an id has seen every earlier
//! event of that log (delivery is in order); a redelivery carries the same id.

use serde::{Deserialize, Serialize};

/// What the recognition decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// A card, with a score at or above the release's minimum and a margin at or above the agent's.
    Card,
    /// A best card, but below the minimum score or margin: `candidates` holds the best few.
    Uncertain,
    /// Nothing to rank (an empty index).
    None,
}

/// One of the best cards for an image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub card_id: String,
    pub score: f32,
}

/// One recognition, as delivered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `<log>-<seq>`, unique to this event; the same on every delivery of it.
    pub id: String,
    pub agent: String,
    pub deployment: String,
    /// Where the image came from: `http`, `inbox`, or a camera's name.
    pub source: String,
    /// When the answer was made (RFC 3339).
    pub at: String,
    pub outcome: Outcome,
    /// The card, when `outcome` is `card`.
    pub card_id: Option<String>,
    /// The best card's score (whatever the outcome).
    pub score: f32,
    /// The best card's score minus the next-best distinct card's.
    pub margin: Option<f32>,
    /// The card's details from the release's metadata.json, when `outcome` is `card`.
    pub metadata: Option<serde_json::Value>,
    /// The best cards, best first (at most [`CANDIDATES`]).
    pub candidates: Vec<Candidate>,
    /// Why the outcome is not `card`.
    pub reason: Option<String>,
    pub release_version: u64,
    pub manifest_id: String,
    /// The card's corners in the frame, in pixels, clockwise from the top left of the card; absent
    /// when the whole image was recognised (HTTP, inbox).
    pub corners: Option<[[f32; 2]; 4]>,
    pub latency_ms: f64,
}

/// The most candidates an event lists.
pub const CANDIDATES: usize = 3;

/// Why an event id does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventIdError {
    #[error("event id {0:?} is not <log>-<sequence>")]
    Shape(String),
}

/// An event id's parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventId {
    pub log: String,
    pub seq: u64,
}

impl EventId {
    pub fn new(log: &str, seq: u64) -> Self {
        EventId {
            log: log.to_owned(),
            seq,
        }
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.log, self.seq)
    }
}

impl std::str::FromStr for EventId {
    type Err = EventIdError;
    fn from_str(s: &str) -> Result<Self, EventIdError> {
        let bad = || EventIdError::Shape(s.chars().take(80).collect());
        let (log, seq) = s.trim().rsplit_once('-').ok_or_else(bad)?;
        let valid_log = !log.is_empty()
            && log.len() <= 32
            && log
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if !valid_log || seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let seq = seq.parse().map_err(|_| bad())?;
        Ok(EventId {
            log: log.to_owned(),
            seq,
        })
    }
}

/// Whether `name` may name an event source (a camera): it becomes an MQTT topic level and a label.
pub fn valid_source(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The MQTT topic an agent's recognitions from `source` go to.
pub fn recognitions_topic(deployment: &str, agent: &str, source: &str) -> String {
    format!("deckhand/{deployment}/{agent}/{source}/recognitions")
}

/// The MQTT topic of an agent's retained `online` / `offline`.
pub fn status_topic(deployment: &str, agent: &str) -> String {
    format!("deckhand/{deployment}/{agent}/status")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_refuse_what_is_not_an_id() {
        let id = EventId::new("0f3a9c1b2d4e", 42);
        assert_eq!(id.to_string(), "0f3a9c1b2d4e-42");
        assert_eq!("0f3a9c1b2d4e-42".parse::<EventId>(), Ok(id));
        for bad in [
            "",
            "42",
            "-42",
            "abc-",
            "abc-x1",
            "ABC-1",
            "zz-1",
            "abc-99999999999999999999999",
            "abc--1",
        ] {
            assert!(bad.parse::<EventId>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn source_names_are_topic_safe() {
        for ok in ["counter", "http", "till-2", "back_room"] {
            assert!(valid_source(ok), "{ok}");
        }
        for bad in ["", "Counter", "a/b", "a+b", "#", "a b", &"x".repeat(33)] {
            assert!(!valid_source(bad), "{bad}");
        }
    }
}
