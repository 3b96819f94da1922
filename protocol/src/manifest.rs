//! The release manifest, schema `deckhand.manifest/v1`: which blobs make up a release, and how to run it.
//!
//! A manifest is only ever parsed from payload bytes whose signatures were already checked
//! (see [`crate::envelope`]); [`Manifest::from_payload`] enforces the size and shape limits here.

use crate::id::BlobId;
use crate::layout;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// The schema string every v1 manifest carries.
pub const SCHEMA: &str = "deckhand.manifest/v1";
/// The largest manifest payload accepted, in bytes.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The most artifacts one manifest may list.
pub const MAX_ARTIFACTS: usize = 16;
/// The most canary images one manifest may list.
pub const MAX_CANARIES: usize = 64;
/// The longest media type or card id accepted.
pub const MAX_TEXT: usize = 256;

/// What an artifact is for. The first five are required in every release; the detector's two come
/// together or not at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The Hailo-8 model.
    Hef,
    /// The same model as ONNX, for CPU-only machines.
    Onnx,
    /// The usearch index of the reference embeddings.
    Index,
    /// index.json: row -> card id.
    Labels,
    /// metadata.json: card id -> details.
    Metadata,
    /// embeddings.npy: the raw reference embeddings (optional).
    Embeddings,
    /// The card detector as ONNX (optional; with [`Role::DetectorHef`] and [`Manifest::detector`]).
    Detector,
    /// The same detector compiled for the Hailo-8.
    #[serde(rename = "detector_hef")]
    DetectorHef,
}

impl Role {
    pub const REQUIRED: [Role; 5] = [
        Role::Hef,
        Role::Onnx,
        Role::Index,
        Role::Labels,
        Role::Metadata,
    ];
    pub const ALL: [Role; 8] = [
        Role::Hef,
        Role::Onnx,
        Role::Index,
        Role::Labels,
        Role::Metadata,
        Role::Embeddings,
        Role::Detector,
        Role::DetectorHef,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Hef => "hef",
            Role::Onnx => "onnx",
            Role::Index => "index",
            Role::Labels => "labels",
            Role::Metadata => "metadata",
            Role::Embeddings => "embeddings",
            Role::Detector => "detector",
            Role::DetectorHef => "detector_hef",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One blob of a release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub role: Role,
    pub blob: BlobId,
    pub size: u64,
    pub chunk_map: BlobId,
    pub media_type: String,
}

/// An image the recognizer must recognise as `card_id` before a release may go live.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    pub image: BlobId,
    pub size: u64,
    pub chunk_map: BlobId,
    pub media_type: String,
    pub card_id: String,
}

/// Memory order of the model input tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelLayout {
    Nchw,
    Nhwc,
}

/// The distance the index was built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Cos,
    Ip,
    L2sq,
}

/// How to turn an image into a model input, and when a match counts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecognizerSettings {
    pub input_width: u32,
    pub input_height: u32,
    pub layout: ChannelLayout,
    /// Per-channel mean, RGB, applied after scaling pixels to 0..1.
    pub mean: [f32; 3],
    /// Per-channel standard deviation, RGB.
    pub std: [f32; 3],
    pub embedding_dim: u32,
    pub metric: Metric,
    /// Below this similarity the answer is "no card".
    pub min_score: f32,
}

/// How to run a release's card detector: an ONNX model (and its HEF) with a YOLO-OBB style output,
/// `[1, 4 + classes + 1, anchors]` (or anchors first): per anchor the box's centre, width and height in
/// input pixels, a score per class, and the box's rotation in radians. Frames are letterboxed into the
/// input (aspect kept, grey 114 around), RGB scaled to 0..1, channels first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorSettings {
    pub input_width: u32,
    pub input_height: u32,
    /// Class scores per anchor.
    pub classes: u32,
    /// The class that is a trading card.
    pub card_class: u32,
    /// Below this score a box is not a card.
    pub min_score: f32,
    /// Of two boxes overlapping more than this (intersection over union), the lower-scored goes.
    pub iou: f32,
}

impl DetectorSettings {
    pub fn validate(&self) -> Result<(), ManifestError> {
        let field = |what: &str, why| {
            Err(ManifestError::Field {
                what: format!("detector.{what}"),
                why,
            })
        };
        if !(32..=4096).contains(&self.input_width) {
            return field("input_width", "must be 32..=4096");
        }
        if !(32..=4096).contains(&self.input_height) {
            return field("input_height", "must be 32..=4096");
        }
        if !(1..=1000).contains(&self.classes) {
            return field("classes", "must be 1..=1000");
        }
        if self.card_class >= self.classes {
            return field("card_class", "must be below classes");
        }
        if !(self.min_score.is_finite() && (0.0..1.0).contains(&self.min_score)) {
            return field("min_score", "must be at least 0 and below 1");
        }
        if !(self.iou.is_finite() && self.iou > 0.0 && self.iou <= 1.0) {
            return field("iou", "must be above 0 and at most 1");
        }
        Ok(())
    }
}

/// A release: schema `deckhand.manifest/v1`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema: String,
    pub deployment: String,
    /// Strictly increasing per deployment; agents never accept a version at or below one they accepted.
    pub version: u64,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub artifacts: Vec<Artifact>,
    pub recognizer: RecognizerSettings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub canaries: Vec<Canary>,
    /// How the release goes live once ready ([`crate::switch`]): at once, or together with the shop.
    /// Absent: the agent's own `activate` setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activate: Option<crate::switch::Mode>,
    /// No agent switches to the release before this time (the operator's "switch at 03:00").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Timestamp>,
    /// The operator marked the release urgent: agents do not hold it for their maintenance windows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub urgent: bool,
    /// How to run the release's card detector: present exactly when the release carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detector: Option<DetectorSettings>,
    /// What a shadow evaluation on each agent's own recent inputs must show before the release goes
    /// live there ([`crate::shadow`]). Absent: the agent's own `shadow` setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<crate::shadow::Policy>,
    /// How the release is watched after it goes live on each agent, and rolled back if it serves worse
    /// than the one before ([`crate::probation`]). Absent: the agent's own `rollout` setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::probation::Rollout>,
}

/// A blob a release needs, whatever its role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobRef {
    pub blob: BlobId,
    pub size: u64,
    pub chunk_map: BlobId,
}

/// Why a manifest payload was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest payload is {len} bytes, over the limit of {MAX_PAYLOAD}")]
    Oversized { len: usize },
    #[error("manifest schema {0:?} is not supported (expected {SCHEMA:?})")]
    UnknownSchema(String),
    #[error("manifest is not valid JSON for {SCHEMA}: {0}")]
    Json(String),
    #[error("manifest lists {0} artifacts, over the limit of {MAX_ARTIFACTS}")]
    TooManyArtifacts(usize),
    #[error("manifest lists {0} canaries, over the limit of {MAX_CANARIES}")]
    TooManyCanaries(usize),
    #[error("manifest names role {0} more than once")]
    DuplicateRole(Role),
    #[error("manifest has no {0} artifact")]
    MissingRole(Role),
    #[error("manifest has a {has} artifact but no {missing}")]
    Incomplete {
        has: &'static str,
        missing: &'static str,
    },
    #[error("manifest deployment name is invalid: {0}")]
    Deployment(#[from] layout::LayoutError),
    #[error("manifest version must be at least 1")]
    ZeroVersion,
    #[error("manifest expires ({expires_at}) before it was created ({created_at})")]
    ExpiresBeforeCreated {
        created_at: Timestamp,
        expires_at: Timestamp,
    },
    #[error("manifest may not go live ({not_before}) before it expires ({expires_at})")]
    NotBeforeAfterExpiry {
        not_before: Timestamp,
        expires_at: Timestamp,
    },
    #[error("{what} is empty (size 0)")]
    EmptyBlob { what: String },
    #[error("{what} is invalid: {why}")]
    Field { what: String, why: &'static str },
}

fn check_text(what: impl Fn() -> String, s: &str) -> Result<(), ManifestError> {
    let why = if s.is_empty() {
        "empty"
    } else if s.len() > MAX_TEXT {
        "longer than 256 bytes"
    } else if s.chars().any(char::is_control) {
        "contains control characters"
    } else {
        return Ok(());
    };
    Err(ManifestError::Field { what: what(), why })
}

impl RecognizerSettings {
    fn validate(&self) -> Result<(), ManifestError> {
        let field = |what: &str, why| {
            Err(ManifestError::Field {
                what: format!("recognizer.{what}"),
                why,
            })
        };
        if !(1..=4096).contains(&self.input_width) {
            return field("input_width", "must be 1..=4096");
        }
        if !(1..=4096).contains(&self.input_height) {
            return field("input_height", "must be 1..=4096");
        }
        if !(1..=65536).contains(&self.embedding_dim) {
            return field("embedding_dim", "must be 1..=65536");
        }
        if !self.mean.iter().all(|m| m.is_finite()) {
            return field("mean", "must be finite");
        }
        if !self.std.iter().all(|s| s.is_finite() && *s > 0.0) {
            return field("std", "must be finite and above 0");
        }
        if !self.min_score.is_finite() {
            return field("min_score", "must be finite");
        }
        Ok(())
    }
}

impl Manifest {
    /// Parses and checks a payload: size, schema, then shape. Use on verified payload bytes only.
    pub fn from_payload(payload: &[u8]) -> Result<Self, ManifestError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(ManifestError::Oversized { len: payload.len() });
        }
        // Read the schema first, so a future schema gets a clear error rather than a field error.
        #[derive(Deserialize)]
        struct Probe {
            schema: Option<String>,
        }
        let probe: Probe =
            serde_json::from_slice(payload).map_err(|e| ManifestError::Json(e.to_string()))?;
        match probe.schema.as_deref() {
            Some(SCHEMA) => {}
            Some(other) => return Err(ManifestError::UnknownSchema(other.to_owned())),
            None => return Err(ManifestError::UnknownSchema(String::new())),
        }
        let manifest: Manifest =
            serde_json::from_slice(payload).map_err(|e| ManifestError::Json(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// The payload bytes to sign.
    pub fn to_payload(&self) -> Vec<u8> {
        // Serialising plain structs of strings and numbers cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Checks everything but signatures and expiry.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.schema != SCHEMA {
            return Err(ManifestError::UnknownSchema(self.schema.clone()));
        }
        layout::Name::deployment(&self.deployment)?;
        if self.version == 0 {
            return Err(ManifestError::ZeroVersion);
        }
        if self.expires_at <= self.created_at {
            return Err(ManifestError::ExpiresBeforeCreated {
                created_at: self.created_at,
                expires_at: self.expires_at,
            });
        }
        if let Some(not_before) = self.not_before
            && not_before >= self.expires_at
        {
            return Err(ManifestError::NotBeforeAfterExpiry {
                not_before,
                expires_at: self.expires_at,
            });
        }
        if self.artifacts.len() > MAX_ARTIFACTS {
            return Err(ManifestError::TooManyArtifacts(self.artifacts.len()));
        }
        if self.canaries.len() > MAX_CANARIES {
            return Err(ManifestError::TooManyCanaries(self.canaries.len()));
        }
        let mut seen = BTreeSet::new();
        for a in &self.artifacts {
            if !seen.insert(a.role) {
                return Err(ManifestError::DuplicateRole(a.role));
            }
            if a.size == 0 {
                return Err(ManifestError::EmptyBlob {
                    what: format!("artifact {}", a.role),
                });
            }
            check_text(|| format!("artifact {} media_type", a.role), &a.media_type)?;
        }
        if let Some(missing) = Role::REQUIRED.into_iter().find(|r| !seen.contains(r)) {
            return Err(ManifestError::MissingRole(missing));
        }
        let incomplete = |has, missing| Err(ManifestError::Incomplete { has, missing });
        match (
            seen.contains(&Role::Detector),
            seen.contains(&Role::DetectorHef),
            &self.detector,
        ) {
            (true, true, Some(d)) => d.validate()?,
            (false, false, None) => {}
            (true, false, _) => return incomplete("detector", "detector_hef"),
            (false, true, _) => return incomplete("detector_hef", "detector"),
            (true, true, None) => return incomplete("detector", "detector settings"),
            (false, false, Some(_)) => return incomplete("detector settings", "detector"),
        }
        if let Some(p) = &self.shadow {
            p.validate().map_err(|e| ManifestError::Field {
                what: "shadow policy".into(),
                why: match e {
                    crate::shadow::PolicyError::Value { why, .. } => why,
                    crate::shadow::PolicyError::Unknown(_) => "unknown",
                },
            })?;
        }
        if let Some(r) = &self.rollout {
            r.validate().map_err(|e| ManifestError::Field {
                what: "rollout policy".into(),
                why: match e {
                    crate::probation::RolloutError::Value { why, .. } => why,
                    crate::probation::RolloutError::Unknown(_) => "unknown",
                },
            })?;
        }
        for (i, c) in self.canaries.iter().enumerate() {
            if c.size == 0 {
                return Err(ManifestError::EmptyBlob {
                    what: format!("canary {i}"),
                });
            }
            check_text(|| format!("canary {i} card_id"), &c.card_id)?;
            check_text(|| format!("canary {i} media_type"), &c.media_type)?;
        }
        self.recognizer.validate()
    }

    pub fn artifact(&self, role: Role) -> Option<&Artifact> {
        self.artifacts.iter().find(|a| a.role == role)
    }

    /// Every blob the release needs (artifacts and canary images), without duplicates, in a stable order.
    pub fn blobs(&self) -> Vec<BlobRef> {
        let artifacts = self.artifacts.iter().map(|a| BlobRef {
            blob: a.blob,
            size: a.size,
            chunk_map: a.chunk_map,
        });
        let canaries = self.canaries.iter().map(|c| BlobRef {
            blob: c.image,
            size: c.size,
            chunk_map: c.chunk_map,
        });
        let set: BTreeSet<BlobRef> = artifacts.chain(canaries).collect();
        set.into_iter().collect()
    }

    /// Total bytes of the release's blobs (each distinct blob once).
    pub fn total_bytes(&self) -> u64 {
        self.blobs().iter().map(|b| b.size).sum()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(version: u64) -> Manifest {
        let artifact = |role: Role, n: u8| Artifact {
            role,
            blob: BlobId::of(&[n]),
            size: 1000 + u64::from(n),
            chunk_map: BlobId::of(&[n, n]),
            media_type: "application/octet-stream".into(),
        };
        Manifest {
            schema: SCHEMA.into(),
            deployment: "shop-1".into(),
            version,
            created_at: "2026-11-01T00:00:00Z".parse().unwrap(),
            expires_at: "2026-12-01T00:00:00Z".parse().unwrap(),
            artifacts: Role::ALL
                .iter()
                .enumerate()
                .map(|(i, r)| artifact(*r, i as u8))
                .collect(),
            recognizer: RecognizerSettings {
                input_width: 224,
                input_height: 224,
                layout: ChannelLayout::Nchw,
                mean: [0.485, 0.456, 0.406],
                std: [0.229, 0.224, 0.225],
                embedding_dim: 768,
                metric: Metric::Cos,
                min_score: 0.5,
            },
            canaries: vec![Canary {
                image: BlobId::of(b"canary"),
                size: 10,
                chunk_map: BlobId::of(b"canary map"),
                media_type: "image/png".into(),
                card_id: "base1-4".into(),
            }],
            activate: None,
            not_before: None,
            urgent: false,
            shadow: None,
            rollout: None,
            detector: Some(DetectorSettings {
                input_width: 640,
                input_height: 640,
                classes: 1,
                card_class: 0,
                min_score: 0.5,
                iou: 0.45,
            }),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// A valid manifest payload, damaged: parsing never panics, and whatever still parses is a valid
        /// manifest that encodes and parses back to itself.
        #[test]
        fn damaged_payloads_never_panic_and_what_parses_is_valid(
            version in 1u64..1000,
            edits in proptest::collection::vec(
                (proptest::prelude::any::<u32>(), proptest::prelude::any::<u8>(), 0u8..3),
                1..6,
            ),
        ) {
            let mut payload = sample(version).to_payload();
            crate::testdata::mutate(&mut payload, &edits);
            if let Ok(m) = Manifest::from_payload(&payload) {
                proptest::prop_assert!(m.validate().is_ok());
                proptest::prop_assert_eq!(Manifest::from_payload(&m.to_payload()).ok(), Some(m));
            }
        }
    }

    #[test]
    fn payload_round_trips() {
        let m = sample(3);
        assert_eq!(Manifest::from_payload(&m.to_payload()).unwrap(), m);
        assert_eq!(m.blobs().len(), 9);
        // The switch fields are absent unless set, and round-trip when set.
        let text = String::from_utf8(m.to_payload()).unwrap();
        assert!(!text.contains("activate") && !text.contains("not_before"));
        let mut m = sample(4);
        m.activate = Some(crate::switch::Mode::Together);
        m.not_before = Some(m.created_at);
        let text = String::from_utf8(m.to_payload()).unwrap();
        assert!(text.contains("\"activate\": \"together\""), "{text}");
        assert_eq!(Manifest::from_payload(&m.to_payload()).unwrap(), m);
    }

    #[test]
    fn a_detector_comes_whole_and_older_agents_refuse_it() {
        let m = sample(1);
        let text = String::from_utf8(m.to_payload()).unwrap();
        assert!(text.contains("\"role\": \"detector_hef\""), "{text}");
        assert_eq!(Manifest::from_payload(&m.to_payload()).unwrap(), m);
        let without = |roles: &[Role], settings: bool| {
            let mut m = sample(1);
            m.artifacts.retain(|a| !roles.contains(&a.role));
            if !settings {
                m.detector = None;
            }
            Manifest::from_payload(&m.to_payload())
        };
        // Neither is a release without a detector; any part alone is refused, naming what is missing.
        assert!(without(&[Role::Detector, Role::DetectorHef], false).is_ok());
        let incomplete = |has, missing| Err(ManifestError::Incomplete { has, missing });
        assert_eq!(
            without(&[Role::DetectorHef], true),
            incomplete("detector", "detector_hef")
        );
        assert_eq!(
            without(&[Role::Detector], true),
            incomplete("detector_hef", "detector")
        );
        assert_eq!(
            without(&[], false),
            incomplete("detector", "detector settings")
        );
        assert_eq!(
            without(&[Role::Detector, Role::DetectorHef], true),
            incomplete("detector settings", "detector")
        );
        let mut bad = sample(1);
        if let Some(d) = &mut bad.detector {
            d.card_class = 1;
        }
        assert_eq!(
            Manifest::from_payload(&bad.to_payload())
                .unwrap_err()
                .to_string(),
            "detector.card_class is invalid: must be below classes"
        );
        // An agent from before detectors knows neither the role nor the field: it refuses the manifest
        // rather than running the release without its detector.
        let old = text.replace("\"detector_hef\"", "\"hef2\"");
        assert!(matches!(
            Manifest::from_payload(old.as_bytes()),
            Err(ManifestError::Json(e)) if e.contains("unknown variant `hef2`")
        ));
    }

    #[test]
    fn limits_and_shape_are_enforced() {
        let big = vec![b' '; MAX_PAYLOAD + 1];
        assert_eq!(
            Manifest::from_payload(&big),
            Err(ManifestError::Oversized {
                len: MAX_PAYLOAD + 1
            })
        );

        let mut m = sample(1);
        m.schema = "deckhand.manifest/v2".into();
        assert_eq!(
            Manifest::from_payload(&m.to_payload()),
            Err(ManifestError::UnknownSchema("deckhand.manifest/v2".into()))
        );
        assert_eq!(
            Manifest::from_payload(b"{\"version\": 1}"),
            Err(ManifestError::UnknownSchema(String::new()))
        );

        let mut m = sample(1);
        let extra = m.artifacts[0].clone();
        m.artifacts
            .extend(std::iter::repeat_n(extra, MAX_ARTIFACTS));
        assert_eq!(
            Manifest::from_payload(&m.to_payload()),
            Err(ManifestError::TooManyArtifacts(MAX_ARTIFACTS + 8))
        );

        let mut m = sample(1);
        m.artifacts.push(m.artifacts[2].clone());
        assert_eq!(
            Manifest::from_payload(&m.to_payload()),
            Err(ManifestError::DuplicateRole(Role::Index))
        );

        let mut m = sample(1);
        m.artifacts.retain(|a| a.role != Role::Labels);
        assert_eq!(
            Manifest::from_payload(&m.to_payload()),
            Err(ManifestError::MissingRole(Role::Labels))
        );

        let mut m = sample(1);
        m.canaries = vec![m.canaries[0].clone(); MAX_CANARIES + 1];
        assert_eq!(
            Manifest::from_payload(&m.to_payload()),
            Err(ManifestError::TooManyCanaries(MAX_CANARIES + 1))
        );

        let mut m = sample(1);
        m.version = 0;
        assert_eq!(
            Manifest::from_payload(&m.to_payload()),
            Err(ManifestError::ZeroVersion)
        );

        let mut m = sample(1);
        m.expires_at = m.created_at;
        assert!(matches!(
            Manifest::from_payload(&m.to_payload()),
            Err(ManifestError::ExpiresBeforeCreated { .. })
        ));

        let mut m = sample(1);
        m.not_before = Some(m.expires_at);
        assert!(matches!(
            Manifest::from_payload(&m.to_payload()),
            Err(ManifestError::NotBeforeAfterExpiry { .. })
        ));

        let mut m = sample(1);
        m.artifacts[1].size = 0;
        assert!(matches!(
            Manifest::from_payload(&m.to_payload()),
            Err(ManifestError::EmptyBlob { .. })
        ));

        let mut m = sample(1);
        m.deployment = "../etc".into();
        assert!(matches!(
            Manifest::from_payload(&m.to_payload()),
            Err(ManifestError::Deployment(_))
        ));

        let mut m = sample(1);
        m.recognizer.std[1] = 0.0;
        let err = Manifest::from_payload(&m.to_payload()).unwrap_err();
        assert!(err.to_string().contains("recognizer.std"), "{err}");

        let mut m = sample(1);
        m.canaries[0].card_id = String::new();
        assert!(matches!(
            Manifest::from_payload(&m.to_payload()),
            Err(ManifestError::Field { .. })
        ));
    }

    #[test]
    fn unknown_fields_and_roles_are_refused() {
        let m = sample(1);
        let mut v: serde_json::Value = serde_json::from_slice(&m.to_payload()).unwrap();
        v["surprise"] = serde_json::json!(1);
        let err = Manifest::from_payload(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(
            matches!(err, ManifestError::Json(ref s) if s.contains("surprise")),
            "{err}"
        );

        let mut v: serde_json::Value = serde_json::from_slice(&m.to_payload()).unwrap();
        v["artifacts"][0]["role"] = serde_json::json!("tflite");
        let err = Manifest::from_payload(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(
            matches!(err, ManifestError::Json(ref s) if s.contains("tflite")),
            "{err}"
        );
    }
}
