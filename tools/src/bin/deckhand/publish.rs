//! `deckhand publish`: validate a release, upload what the origin lacks, publish the signed manifest as
//! the next version.

use crate::output::emit;
use crate::settle::{
    OriginArgs, parse_duration, parse_input, parse_triple, read_secret_key, target, usage, work_dir,
};
use clap::Args;
use deckhand_agent::release::{DetectorOverrides, SettingsOverrides};
use deckhand_protocol::layout::Name;
use deckhand_protocol::manifest::{ChannelLayout, Metric};
use deckhand_tools::ToolError;
use deckhand_tools::publish::{self, Inputs, PublishOptions};
use std::path::PathBuf;

// The flags of `deckhand publish` (its help is the variant's doc comment in main.rs).
#[derive(Args)]
pub struct PublishArgs {
    #[command(flatten)]
    origin: OriginArgs,
    /// The signing key (NAME.key from `deckhand keygen`).
    #[arg(long)]
    key: PathBuf,
    /// The Hailo model (a local path or s3://bucket/key).
    #[arg(long)]
    hef: String,
    /// The same model as ONNX.
    #[arg(long)]
    onnx: String,
    /// The usearch index of reference embeddings.
    #[arg(long)]
    index: String,
    /// index.json: row -> card id.
    #[arg(long)]
    labels: String,
    /// metadata.json: card id -> details.
    #[arg(long)]
    metadata: String,
    /// embeddings.npy (optional).
    #[arg(long)]
    embeddings: Option<String>,
    /// A card detector for the counter (optional): an ONNX model with a YOLO-OBB style output,
    /// [1, 4 + classes + 1, anchors]. Agents then find cards in camera frames with it instead of the
    /// classical finder.
    #[arg(long, requires = "detector_hef")]
    detector: Option<String>,
    /// The same detector compiled for the Hailo (with --detector).
    #[arg(long, requires = "detector")]
    detector_hef: Option<String>,
    /// The detector's classes (default: read from its output shape).
    #[arg(long, requires = "detector")]
    detector_classes: Option<u32>,
    /// The detector's class that is a trading card (default 0).
    #[arg(long, requires = "detector")]
    detector_card_class: Option<u32>,
    /// Below this score a detector's box is not a card (default 0.5).
    #[arg(long, requires = "detector")]
    detector_min_score: Option<f32>,
    /// Of two boxes overlapping more than this (intersection over union), the lower-scored goes
    /// (default 0.5).
    #[arg(long, requires = "detector")]
    detector_iou: Option<f32>,
    /// How long the manifest stays valid (e.g. 30d, 12h, 90m).
    #[arg(long, default_value = "30d")]
    expires_in: String,
    /// IMAGE=CARD_ID: an image the release must recognise as CARD_ID before agents activate it (repeatable).
    #[arg(long)]
    canary: Vec<String>,
    /// Model input size, WxH or N (default: read from the ONNX input).
    #[arg(long)]
    input_size: Option<String>,
    /// Input channel layout, nchw or nhwc (default: read from the ONNX input).
    #[arg(long)]
    layout: Option<String>,
    /// Per-channel mean, R,G,B, for pixels scaled to 0..1 (default: ImageNet's).
    #[arg(long)]
    mean: Option<String>,
    /// Per-channel standard deviation, R,G,B (default: ImageNet's).
    #[arg(long)]
    std: Option<String>,
    /// Index metric, cos, ip or l2sq (default: from the index header).
    #[arg(long)]
    metric: Option<String>,
    /// Minimum similarity for a match (default 0.5).
    #[arg(long)]
    min_score: Option<f32>,
    /// How agents switch to the release once they hold it: at-once, or together (each waits until every
    /// live agent of the shop is ready, or its deadline passes). Default: each agent's own setting.
    #[arg(long)]
    activate: Option<deckhand_protocol::switch::Mode>,
    /// No agent switches before this time (RFC 3339, e.g. 2026-12-03T03:00:00Z).
    #[arg(long)]
    not_before: Option<String>,
    /// Agents switch to it as soon as it is verified, without waiting for their maintenance windows
    /// (activate_window, activate_when_idle).
    #[arg(long)]
    urgent: bool,
    /// Each agent runs the release on the shop's own recent recognitions beside the active release
    /// before it may go live, and holds it below this policy:
    /// min-agreement=0..1,min-samples=N,too-few=wait|canaries (e.g. min-agreement=0.95,min-samples=200).
    /// Default: each agent's own `shadow` setting.
    #[arg(long, value_name = "POLICY")]
    shadow: Option<deckhand_protocol::shadow::Policy>,
    /// After it goes live each agent keeps it on probation, and rolls back to the release before by
    /// itself if it serves worse (fails, answers without a card, or answers slower than it):
    /// probation=DURATION,answers=N,p99=RATIO,errors=0..1,uncertain=0..1 (e.g. probation=10m,answers=100,
    /// p99=3,errors=0.05,uncertain=0.2; probation=0 for none). Default: each agent's own `rollout`
    /// setting.
    #[arg(long, value_name = "POLICY")]
    rollout: Option<deckhand_protocol::probation::Rollout>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    #[arg(long)]
    json: bool,
}

pub async fn run(a: &PublishArgs) -> Result<(), ToolError> {
    let key = read_secret_key(&a.key)?;
    let deployment = Name::deployment(&a.origin.deployment)
        .map_err(|e| usage("deployment", &a.origin.deployment, e))?;
    let opts = options(a, deployment)?;
    let t = target(&a.origin).await?;
    let work = work_dir()?;
    let (prepared, published) =
        publish::publish(&*t.origin, &t.config, &key, &opts, work.path()).await?;
    let report = serde_json::json!({
        "version": published.version,
        "manifest_id": published.id.to_string(),
        "manifest_key": published.manifest_key,
        "uploaded": prepared.uploaded.len(),
        "already_present": prepared.skipped.len(),
        "bytes_uploaded": prepared.bytes_uploaded,
        "current_updated": published.current_updated,
        "warnings": prepared.warnings,
    });
    emit(a.json, &report, |_| {
        println!(
            "published version {} manifest {}",
            published.version, published.id
        );
        eprintln!(
            "uploaded {} blobs and chunk maps ({} bytes with their packs); {} already present",
            prepared.uploaded.len(),
            prepared.bytes_uploaded,
            prepared.skipped.len()
        );
        if !published.current_updated {
            eprintln!("note: current.json already names a newer version and was left as it is");
        }
        for w in &prepared.warnings {
            eprintln!("warning: {w}");
        }
    })
}

/// The publish flags settled into the library's options.
fn options(a: &PublishArgs, deployment: Name) -> Result<PublishOptions, ToolError> {
    let input_size = match &a.input_size {
        None => None,
        Some(s) => {
            let parse = |p: &str| p.parse::<u32>().ok().filter(|v| (1..=4096).contains(v));
            let (w, h) = match s.split_once('x') {
                Some((w, h)) => (parse(w), parse(h)),
                None => (parse(s), parse(s)),
            };
            match (w, h) {
                (Some(w), Some(h)) => Some((w, h)),
                _ => return Err(usage("input-size", s, "expected WxH or N, each 1..=4096")),
            }
        }
    };
    let layout = match a.layout.as_deref() {
        None => None,
        Some("nchw") => Some(ChannelLayout::Nchw),
        Some("nhwc") => Some(ChannelLayout::Nhwc),
        Some(other) => return Err(usage("layout", other, "expected nchw or nhwc")),
    };
    let metric = match a.metric.as_deref() {
        None => None,
        Some("cos") => Some(Metric::Cos),
        Some("ip") => Some(Metric::Ip),
        Some("l2sq") => Some(Metric::L2sq),
        Some(other) => return Err(usage("metric", other, "expected cos, ip or l2sq")),
    };
    if let Some(m) = a.min_score
        && !m.is_finite()
    {
        return Err(usage(
            "min-score",
            &m.to_string(),
            "must be a finite number",
        ));
    }
    let mut canaries = Vec::new();
    for c in &a.canary {
        let (img, card) = c
            .rsplit_once('=')
            .filter(|(i, c)| !i.is_empty() && !c.is_empty())
            .ok_or_else(|| usage("canary", c, "expected IMAGE=CARD_ID"))?;
        canaries.push((parse_input("canary", img)?, card.to_owned()));
    }
    Ok(PublishOptions {
        deployment,
        inputs: Inputs {
            hef: parse_input("hef", &a.hef)?,
            onnx: parse_input("onnx", &a.onnx)?,
            index: parse_input("index", &a.index)?,
            labels: parse_input("labels", &a.labels)?,
            metadata: parse_input("metadata", &a.metadata)?,
            embeddings: a
                .embeddings
                .as_deref()
                .map(|e| parse_input("embeddings", e))
                .transpose()?,
            detector: match (&a.detector, &a.detector_hef) {
                (Some(onnx), Some(hef)) => Some((
                    parse_input("detector", onnx)?,
                    parse_input("detector-hef", hef)?,
                )),
                _ => None,
            },
            canaries,
        },
        expires_in: parse_duration("expires-in", &a.expires_in)?,
        overrides: SettingsOverrides {
            input_size,
            layout,
            mean: a
                .mean
                .as_deref()
                .map(|m| parse_triple("mean", m))
                .transpose()?,
            std: a
                .std
                .as_deref()
                .map(|s| parse_triple("std", s))
                .transpose()?,
            metric,
            min_score: a.min_score,
            detector: DetectorOverrides {
                classes: a.detector_classes,
                card_class: a.detector_card_class,
                min_score: a.detector_min_score,
                iou: a.detector_iou,
            },
        },
        activate: a.activate,
        not_before: a
            .not_before
            .as_deref()
            .map(|t| {
                t.parse::<jiff::Timestamp>()
                    .map_err(|e| usage("not-before", t, format!("not an RFC 3339 time: {e}")))
            })
            .transpose()?,
        urgent: a.urgent,
        shadow: a.shadow,
        rollout: a.rollout,
        progress: !a.no_progress,
    })
}
