//! The operator's publishing workflow against a real S3 server (s3s-fs, in-process) spoken to over HTTP by
//! aws-sdk-s3, and against a `file://` origin: publish, list, verify, roll back, export; refusals that
//! leave the bucket unchanged; a version race; incremental uploads; and a publish killed mid-upload.

use deckhand_agent::release::ReleaseFiles;
use deckhand_protocol::layout::Name;
use deckhand_protocol::manifest::Metric;
use deckhand_protocol::{SecretKey, TrustPolicy};
use deckhand_tests::fixtures::{self, SampleSpec, SplitMix};
use deckhand_tests::{
    Fleet, deckhand, deckhand_out, ok, publish_args, publish_options, shop as world, stderr, stdout,
};
use deckhand_tools::origin::{Bucket, OriginConfig, OriginUrl};
use deckhand_tools::publish::{self, Input, PublishOptions};
use deckhand_tools::{ToolError, releases};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed(&[seed; 32])
}

fn trust(k: &SecretKey) -> TrustPolicy {
    TrustPolicy::new([k.public().clone()], 1).unwrap()
}

fn shop() -> Name {
    Name::deployment("shop-1").unwrap()
}

fn options(files: &ReleaseFiles) -> PublishOptions {
    PublishOptions {
        expires_in: jiff::SignedDuration::from_hours(24 * 30),
        ..publish_options(files)
    }
}

/// Every object in the origin: key -> (size, sha of content via blake3).
async fn snapshot(origin: &dyn Bucket) -> BTreeMap<String, (u64, String)> {
    let mut out = BTreeMap::new();
    for o in origin.list(origin.layout().prefix()).await.unwrap() {
        let body = origin.get(&o.key).await.unwrap();
        out.insert(o.key, (o.size, blake3::hash(&body).to_hex().to_string()));
    }
    out
}

/// A shop with no agents (S3, an origin, a key), a sample release and a work directory.
struct S3World {
    fleet: Fleet,
    cfg: OriginConfig,
    work: std::path::PathBuf,
    files: ReleaseFiles,
}

async fn s3_world(name: &str) -> S3World {
    let fleet = world(name).start().await.unwrap();
    let cfg = fleet.s3().origin_config();
    let files =
        fixtures::write_sample_release(&fleet.join("release"), &SampleSpec::small(1)).unwrap();
    let work = fleet.join("work");
    std::fs::create_dir_all(&work).unwrap();
    S3World {
        fleet,
        cfg,
        work,
        files,
    }
}

#[tokio::test]
async fn publish_verify_and_roll_back_with_a_file_origin() {
    let dir = world("publish-file").start().await.unwrap();
    let files =
        fixtures::write_sample_release(&dir.join("release"), &SampleSpec::small(2)).unwrap();
    let root = dir.join("origin");
    std::fs::create_dir_all(&root).unwrap();
    let cfg = OriginConfig::default();
    let origin = deckhand_tools::origin::connect(&OriginUrl::File { root }, &cfg)
        .await
        .unwrap();
    let k = key(1);
    let (p1, v1) = publish::publish(&*origin, &cfg, &k, &options(&files), &dir.join("work1"))
        .await
        .unwrap();
    assert_eq!(v1.version, 1);
    assert_eq!(p1.uploaded.len(), 14, "7 blobs and 7 chunk maps");
    let report = releases::verify(&*origin, &shop(), None, &trust(&k), dir.dir())
        .await
        .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.blobs_checked, 7);

    std::fs::write(
        &files.metadata,
        std::fs::read(&files.metadata).unwrap().repeat(1),
    )
    .unwrap();
    let mut changed = files.clone();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.metadata).unwrap()).unwrap();
    let mut meta = meta.as_array().unwrap().clone();
    meta[0]["price_usd"] = serde_json::json!(1234.5);
    changed.metadata = dir.join("metadata-v2.json");
    std::fs::write(&changed.metadata, serde_json::to_vec(&meta).unwrap()).unwrap();
    let (_, v2) = publish::publish(&*origin, &cfg, &k, &options(&changed), &dir.join("work2"))
        .await
        .unwrap();
    assert_eq!(v2.version, 2);

    let (_, v3) = publish::rollback(
        &*origin,
        &shop(),
        1,
        &k,
        &trust(&k),
        jiff::SignedDuration::from_hours(1),
    )
    .await
    .unwrap();
    assert_eq!(v3.version, 3);
    let lines = releases::versions(&*origin, &shop(), Some(&trust(&k)))
        .await
        .unwrap();
    assert_eq!(
        lines.iter().map(|l| l.version).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(lines.iter().all(|l| l.signature == "ok"));
    assert!(lines[2].current && !lines[0].current);
    assert_eq!(
        lines[2].artifacts, lines[0].artifacts,
        "a rollback names the old artifacts"
    );
    assert_ne!(lines[1].artifacts, lines[0].artifacts);
    let report = releases::verify(&*origin, &shop(), None, &trust(&k), dir.dir())
        .await
        .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.version, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_round_trip_keygen_publish_versions_verify_rollback_export() {
    let dir = world("cli-round-trip").start().await.unwrap();
    let s3 = dir.s3();
    let files =
        fixtures::write_sample_release(&dir.join("release"), &SampleSpec::small(3)).unwrap();
    let origin = s3.origin_arg("fleet");
    // The operator's own key, made by the CLI (not the shop's test key).
    std::fs::create_dir_all(dir.join("operator")).unwrap();
    let ops = dir.join("operator/ops");
    let out = deckhand_out(s3, &["keygen", "--out", ops.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).trim().starts_with("ed25519:"));
    let (key, pubkey) = (dir.join("operator/ops.key"), dir.join("operator/ops.pub"));
    let p = |p: &Path| p.to_str().unwrap().to_owned();
    let canary = format!("{}={}", p(&files.canaries[0].0), files.canaries[0].1);
    let publish_args = |metadata: &Path| -> Vec<String> {
        let mut args = publish_args(&origin, "shop-1", &key, &files, metadata);
        args.extend([
            "--embeddings".into(),
            p(files.embeddings.as_ref().unwrap()),
            "--canary".into(),
            canary.clone(),
            "--expires-in".into(),
            "30d".into(),
        ]);
        args
    };
    let args = publish_args(&files.metadata);
    let v1 = ok(&deckhand_out(
        s3,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert_eq!(v1["version"], 1);
    assert!(v1["manifest_id"].as_str().unwrap().starts_with("b3:"));
    assert_eq!(v1["warnings"], serde_json::json!([]), "{v1}");

    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.metadata).unwrap()).unwrap();
    meta[1]["rarity"] = serde_json::json!("Secret Rare");
    let meta2 = dir.join("metadata2.json");
    std::fs::write(&meta2, serde_json::to_vec(&meta).unwrap()).unwrap();
    let args = publish_args(&meta2);
    let v2 = ok(&deckhand_out(
        s3,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert_eq!(v2["version"], 2);
    assert_eq!(
        v2["uploaded"], 2,
        "only metadata.json and its chunk map are new: {v2}"
    );

    let common = ["--origin", &origin, "--deployment", "shop-1"];
    let listed = ok(&deckhand_out(
        s3,
        &[
            &["versions"],
            &common[..],
            &["--trust", &p(&pubkey), "--json"],
        ]
        .concat(),
    ));
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[1]["current"], true);
    assert_eq!(listed[0]["signature"], "ok");

    let out = deckhand_out(
        s3,
        &[&["verify"], &common[..], &["--trust", &p(&pubkey)]].concat(),
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("ok"));

    let rb = ok(&deckhand_out(
        s3,
        &[
            &["rollback"],
            &common[..],
            &["--to", "1", "--key", &p(&key), "--json"],
        ]
        .concat(),
    ));
    assert_eq!(rb["version"], 3);
    let listed = ok(&deckhand_out(
        s3,
        &[&["versions"], &common[..], &["--json"]].concat(),
    ));
    assert_eq!(listed[2]["artifacts"], listed[0]["artifacts"]);
    assert_eq!(listed[2]["current"], true);
    assert_eq!(listed[2]["signature"], "unverified");

    let bundle = dir.join("usb-stick");
    let exported = ok(&deckhand_out(
        s3,
        &[
            &["bundle", "export"],
            &common[..],
            &["--out", &p(&bundle), "--trust", &p(&pubkey), "--json"],
        ]
        .concat(),
    ));
    assert_eq!(exported["version"], 3);
    assert_eq!(exported["blobs"], 14);
    let file_origin = format!("file://{}", p(&bundle));
    let out = deckhand_out(
        s3,
        &[
            "verify",
            "--origin",
            &file_origin,
            "--deployment",
            "shop-1",
            "--trust",
            &p(&pubkey),
        ],
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));

    // Wrong flags are usage errors (exit 2) naming the flag.
    let out = deckhand_out(
        s3,
        &[
            "versions",
            "--origin",
            "http://nope",
            "--deployment",
            "shop-1",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--origin"), "{}", stderr(&out));
    let out = deckhand_out(
        s3,
        &["versions", "--origin", &origin, "--deployment", "shop 1"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--deployment"), "{}", stderr(&out));
    let out = deckhand_out(
        s3,
        &[
            "rollback",
            "--origin",
            &origin,
            "--deployment",
            "shop-1",
            "--to",
            "9",
            "--key",
            &p(&key),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("version 9"), "{}", stderr(&out));

    // A release with a card detector: its ONNX and HEF, settings read from the model and the flags.
    let mut anchors = vec![vec![100.0, 120.0, 60.0, 84.0, 0.9, 0.1]];
    anchors.resize(50, vec![0.0; 6]);
    let det = fixtures::write_known_detector(&dir.join("detector"), 320, 256, &anchors).unwrap();
    let mut args = publish_args(&meta2);
    args.extend([
        "--detector".into(),
        p(&det.onnx),
        "--detector-hef".into(),
        p(&det.hef),
        "--detector-min-score".into(),
        "0.4".into(),
        "--shadow".into(),
        "min-agreement=0.9,min-samples=20".into(),
        "--rollout".into(),
        "canary=1,probation=5m,answers=40".into(),
    ]);
    let v4 = ok(&deckhand_out(
        s3,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert_eq!(v4["version"], 4);
    let listed = ok(&deckhand_out(
        s3,
        &[&["versions"], &common[..], &["--json"]].concat(),
    ));
    let roles: Vec<&str> = listed[3]["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a[0].as_str())
        .collect();
    assert!(
        roles.contains(&"detector") && roles.contains(&"detector_hef"),
        "{}",
        listed[3]
    );
    // The fleet's origin is the same bucket and prefix the CLI published to.
    let envelope = dir
        .origin()
        .get(&dir.origin().layout().manifest(&shop(), 4))
        .await
        .unwrap();
    let manifest = deckhand_protocol::envelope::inspect_unverified(&envelope).unwrap();
    assert_eq!(
        manifest.detector,
        Some(deckhand_protocol::manifest::DetectorSettings {
            input_width: 320,
            input_height: 256,
            classes: 1,
            card_class: 0,
            min_score: 0.4,
            iou: 0.5,
        })
    );
    assert_eq!(
        manifest.shadow,
        Some(deckhand_protocol::shadow::Policy {
            min_agreement: 0.9,
            min_samples: 20,
            too_few: deckhand_protocol::shadow::TooFew::Wait,
        })
    );
    assert_eq!(
        manifest.rollout,
        Some(deckhand_protocol::probation::Rollout {
            canary: 1,
            probation: 300,
            answers: 40,
            ..Default::default()
        })
    );
    // A rollout without a probation for its canaries is a usage error naming the flag.
    let mut args = publish_args(&meta2);
    args.extend(["--rollout".into(), "canary=2,probation=0".into()]);
    let out = deckhand_out(s3, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--rollout") && stderr(&out).contains("needs a probation"),
        "{}",
        stderr(&out)
    );
    // A shadow policy that cannot hold is a usage error naming the flag and the setting.
    let mut args = publish_args(&meta2);
    args.extend(["--shadow".into(), "min-agreement=2".into()]);
    let out = deckhand_out(s3, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--shadow") && stderr(&out).contains("at most 1"),
        "{}",
        stderr(&out)
    );
    // The detector's two files come together.
    let mut args = publish_args(&meta2);
    args.extend(["--detector".into(), p(&det.onnx)]);
    let out = deckhand_out(s3, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--detector-hef"), "{}", stderr(&out));
}

#[tokio::test]
async fn a_version_taken_by_another_publisher_is_an_error_that_overwrites_nothing() {
    let w = s3_world("publish-race").await;
    let (a, b) = (key(1), key(2));
    // Both read the origin and choose version 1 before either writes its manifest.
    let pa = publish::prepare(w.fleet.origin(), &w.cfg, &a, &options(&w.files), &w.work)
        .await
        .unwrap();
    let pb = publish::prepare(w.fleet.origin(), &w.cfg, &b, &options(&w.files), &w.work)
        .await
        .unwrap();
    assert_eq!((pa.manifest.version, pb.manifest.version), (1, 1));
    publish::commit(w.fleet.origin(), &pb).await.unwrap();
    let before = snapshot(w.fleet.origin()).await;
    let err = publish::commit(w.fleet.origin(), &pa).await.unwrap_err();
    assert!(
        matches!(err, ToolError::VersionTaken { version: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("nothing was overwritten"));
    assert_eq!(
        snapshot(w.fleet.origin()).await,
        before,
        "the losing publisher changed the bucket"
    );
    let l = w.fleet.origin().layout();
    assert_eq!(
        w.fleet.origin().get(&l.manifest(&shop(), 1)).await.unwrap(),
        pb.envelope
    );
    assert_eq!(
        w.fleet.origin().get(&l.current(&shop())).await.unwrap(),
        pb.envelope
    );
}

#[tokio::test]
async fn current_json_is_not_moved_back_when_a_newer_release_lands_between_read_and_write() {
    let w = s3_world("publish-current-race").await;
    let (a, b) = (key(1), key(2));
    publish::publish(w.fleet.origin(), &w.cfg, &b, &options(&w.files), &w.work)
        .await
        .unwrap();
    // Publisher A chooses version 2.
    let pa = publish::prepare(w.fleet.origin(), &w.cfg, &a, &options(&w.files), &w.work)
        .await
        .unwrap();
    assert_eq!(pa.manifest.version, 2);
    // Publisher B's version 3 reaches current.json after A read it and before A writes it.
    let mut m3 = pa.manifest.clone();
    m3.version = 3;
    let env3 = deckhand_protocol::Envelope::sign_manifest(&m3, &[&b]).to_bytes();
    let l = w.fleet.origin().layout();
    let current = l.current(&shop());
    w.fleet
        .s3()
        .stats()
        .write_before_next_put(&current, env3.clone());
    let published = publish::commit(w.fleet.origin(), &pa).await.unwrap();
    assert_eq!(published.version, 2);
    assert!(
        !published.current_updated,
        "A says it moved current.json to an older version"
    );
    assert_eq!(
        w.fleet.origin().get(&current).await.unwrap(),
        env3,
        "current.json went back from version 3 to 2"
    );
    // A's manifest is published all the same.
    assert_eq!(
        w.fleet.origin().get(&l.manifest(&shop(), 2)).await.unwrap(),
        pa.envelope
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishers_racing_for_twenty_rounds_never_share_a_version_or_move_current_back() {
    let dir = world("publish-race-cli").start().await.unwrap();
    let s3 = dir.s3();
    let files =
        fixtures::write_sample_release(&dir.join("release"), &SampleSpec::small(4)).unwrap();
    // Two operators with their own keys: their manifests for one version always differ (the same
    // publish run twice would write the same bytes, which is not a race).
    let key_paths: Vec<_> = (1..=2)
        .map(|n| {
            let path = dir.join(format!("ops-{n}.key"));
            std::fs::write(&path, key(n).to_file_text()).unwrap();
            path
        })
        .collect();
    let origin = s3.origin_arg("fleet");
    let args = |key_path: &Path| publish_args(&origin, "shop-1", key_path, &files, &files.metadata);
    let args: Vec<Vec<String>> = key_paths.iter().map(|k| args(k)).collect();
    let origin = dir.origin();
    let current = origin.layout().current(&shop());
    let mut written = std::collections::BTreeSet::new();
    let mut collisions = 0;
    for round in 0..20 {
        let racers: Vec<_> = args
            .iter()
            .map(|a| {
                let refs: Vec<&str> = a.iter().map(String::as_str).collect();
                deckhand(s3, &refs)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut won = Vec::new();
        for r in racers {
            let out = r.wait_with_output().unwrap();
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                won.push(v["version"].as_u64().unwrap());
            } else {
                // The loser is told clearly, and nothing else may go wrong.
                assert!(
                    stderr(&out)
                        .contains("was published by another publisher after this publish chose it"),
                    "round {round}: {}",
                    stderr(&out)
                );
                collisions += 1;
            }
        }
        assert!(!won.is_empty(), "round {round}: nobody won");
        for v in won {
            assert!(written.insert(v), "round {round}: version {v} won twice");
        }
        // current.json names the newest version written, never an older one.
        let env = origin.get(&current).await.unwrap();
        let named = deckhand_protocol::envelope::inspect_unverified(&env)
            .unwrap()
            .version;
        assert_eq!(
            Some(&named),
            written.last(),
            "round {round}: current.json names version {named}, versions written: {written:?}"
        );
    }
    println!(
        "20 rounds: {} versions published, {collisions} publishes lost a race and were told so",
        written.len()
    );
    assert_eq!(written.len() + collisions, 40);
}

#[tokio::test]
async fn republishing_with_one_changed_file_uploads_only_that_file() {
    let w = s3_world("publish-incremental").await;
    let k = key(1);
    publish::publish(w.fleet.origin(), &w.cfg, &k, &options(&w.files), &w.work)
        .await
        .unwrap();
    let mut changed = w.files.clone();
    let mut labels: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&w.files.labels).unwrap()).unwrap();
    labels["3"] = labels["4"].clone();
    changed.labels = w.work.join("index-v2.json");
    std::fs::write(&changed.labels, serde_json::to_vec(&labels).unwrap()).unwrap();
    w.fleet.s3().stats().reset();
    let (p, v) = publish::publish(w.fleet.origin(), &w.cfg, &k, &options(&changed), &w.work)
        .await
        .unwrap();
    let l = w.fleet.origin().layout();
    let labels_artifact = p
        .manifest
        .artifacts
        .iter()
        .find(|a| a.role == deckhand_protocol::Role::Labels)
        .unwrap();
    // The changed file, its pack, its chunk map and its delta pack against version 1's labels.
    let v1_labels = deckhand_protocol::BlobId::of(&std::fs::read(&w.files.labels).unwrap());
    let expected = vec![
        l.blob(&labels_artifact.blob),
        l.pack(&labels_artifact.chunk_map),
        l.blob(&labels_artifact.chunk_map),
        l.delta(&labels_artifact.chunk_map, &v1_labels),
        l.manifest(&shop(), 2),
        l.current(&shop()),
    ];
    assert_eq!(
        w.fleet.s3().stats().puts(),
        expected,
        "PUTs seen by the server"
    );
    assert_eq!(v.version, 2);
    assert_eq!(p.skipped.len(), 12);
}

/// Every validation failure names the file and the problem, and leaves the bucket as it was.
#[tokio::test]
async fn a_broken_release_is_refused_before_anything_is_uploaded() {
    let w = s3_world("publish-refusals").await;
    let k = key(1);
    publish::publish(w.fleet.origin(), &w.cfg, &k, &options(&w.files), &w.work)
        .await
        .unwrap();
    let before = snapshot(w.fleet.origin()).await;
    let bad = w.work.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let write = |name: &str, data: &[u8]| {
        let p = bad.join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    let other_dim = fixtures::write_sample_release(
        &bad.join("dim32"),
        &SampleSpec {
            dim: 32,
            ..SampleSpec::small(9)
        },
    )
    .unwrap();
    let labels: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&w.files.labels).unwrap()).unwrap();
    let mut short_labels = labels.clone();
    short_labels.as_object_mut().unwrap().remove("47");
    let mut unknown_card = labels.clone();
    unknown_card["5"] = serde_json::json!("no-such-card");

    let mut anchors = vec![vec![100.0, 120.0, 60.0, 84.0, 0.9, 0.1]];
    anchors.resize(50, vec![0.0; 6]);
    let det = fixtures::write_known_detector(&bad.join("detector"), 320, 256, &anchors).unwrap();
    let with_detector = move |o: &mut PublishOptions| {
        o.inputs.detector = Some((
            Input::Local(det.onnx.clone()),
            Input::Local(det.hef.clone()),
        ))
    };

    type Mutate = Box<dyn Fn(&mut PublishOptions)>;
    let local = |p: std::path::PathBuf| Input::Local(p);
    let cases: Vec<(&str, Mutate, &[&str])> = vec![
        (
            "missing file",
            Box::new(move |o| o.inputs.hef = local("/nonexistent/model.hef".into())),
            &["hef /nonexistent/model.hef", "cannot read"],
        ),
        (
            "empty file",
            Box::new({
                let p = write("empty.json", b"");
                move |o| o.inputs.labels = local(p.clone())
            }),
            &["labels", "empty"],
        ),
        (
            "onnx does not load",
            Box::new({
                let p = write("bad.onnx", b"not an onnx model at all");
                move |o| o.inputs.onnx = local(p.clone())
            }),
            &["onnx", "does not load"],
        ),
        (
            "onnx dimension differs from the index",
            Box::new({
                let p = other_dim.onnx.clone();
                move |o| o.inputs.onnx = local(p.clone())
            }),
            &["outputs 32-dimension", "holds 64-dimension"],
        ),
        (
            "index does not load",
            Box::new({
                let p = write("bad.index", &[7u8; 4096]);
                move |o| o.inputs.index = local(p.clone())
            }),
            &["index", "bad.index"],
        ),
        (
            "metric flag disagrees with the header",
            Box::new(|o| o.overrides.metric = Some(Metric::L2sq)),
            &["--metric L2sq", "index header"],
        ),
        (
            "input size flag disagrees with the model",
            Box::new(|o| o.overrides.input_size = Some((64, 64))),
            &["--input-size 64x64", "32x32"],
        ),
        (
            "labels count differs",
            Box::new({
                let p = write("short.json", &serde_json::to_vec(&short_labels).unwrap());
                move |o| o.inputs.labels = local(p.clone())
            }),
            &["has 47 rows", "48 vectors"],
        ),
        (
            "a card id is missing from metadata",
            Box::new({
                let p = write("unknown.json", &serde_json::to_vec(&unknown_card).unwrap());
                move |o| o.inputs.labels = local(p.clone())
            }),
            &["row 5", "no-such-card", "does not have"],
        ),
        (
            "hef is not a hef",
            Box::new({
                let p = write("model.hef", b"PK\x03\x04 a zip file, not a HEF model");
                move |o| o.inputs.hef = local(p.clone())
            }),
            &["hef", "not a HEF"],
        ),
        (
            "hef is truncated",
            Box::new({
                let h = std::fs::read(&w.files.hef).unwrap();
                let p = write("cut.hef", &h[..h.len() - 9]);
                move |o| o.inputs.hef = local(p.clone())
            }),
            &["hef", "cut.hef"],
        ),
        (
            "canary is not an image",
            Box::new({
                let p = write("canary.png", b"just text");
                move |o| o.inputs.canaries[0].0 = local(p.clone())
            }),
            &["canary image", "not an image"],
        ),
        (
            "embeddings have the wrong shape",
            Box::new({
                let p = other_dim.embeddings.clone().unwrap();
                move |o| o.inputs.embeddings = Some(local(p.clone()))
            }),
            &["embeddings", "[48, 32]"],
        ),
        (
            "detector does not load",
            Box::new({
                let p = write("detector.onnx", b"not a detector");
                let with_detector = with_detector.clone();
                move |o| {
                    with_detector(o);
                    o.inputs.detector.as_mut().unwrap().0 = local(p.clone())
                }
            }),
            &["detector", "detector.onnx", "does not load"],
        ),
        (
            "detector hef is not a hef",
            Box::new({
                let p = write("detector.hef", b"\x7fELF not a HEF either");
                let with_detector = with_detector.clone();
                move |o| {
                    with_detector(o);
                    o.inputs.detector.as_mut().unwrap().1 = local(p.clone())
                }
            }),
            &["detector_hef", "not a HEF"],
        ),
        (
            "detector output is not the classes given",
            Box::new({
                let with_detector = with_detector.clone();
                move |o| {
                    with_detector(o);
                    o.overrides.detector.classes = Some(3);
                }
            }),
            &["detector", "[1, 6, 50]"],
        ),
        (
            "detector card class beyond its classes",
            Box::new({
                let with_detector = with_detector.clone();
                move |o| {
                    with_detector(o);
                    o.overrides.detector.card_class = Some(1);
                }
            }),
            &["detector.card_class is invalid", "below classes"],
        ),
    ];
    for (name, mutate, phrases) in cases {
        let mut o = options(&w.files);
        mutate(&mut o);
        let err = publish::publish(w.fleet.origin(), &w.cfg, &k, &o, &w.work)
            .await
            .unwrap_err()
            .to_string();
        for phrase in phrases {
            assert!(err.contains(phrase), "{name}: {phrase:?} not in {err:?}");
        }
        assert_eq!(
            snapshot(w.fleet.origin()).await,
            before,
            "{name}: the bucket changed"
        );
    }
}

#[tokio::test]
async fn verify_finds_missing_and_corrupt_blobs_forged_manifests_and_untrusted_keys() {
    let w = s3_world("verify-detects").await;
    let k = key(1);
    let (p, _) = publish::publish(w.fleet.origin(), &w.cfg, &k, &options(&w.files), &w.work)
        .await
        .unwrap();
    let l = w.fleet.origin().layout().clone();
    let check = |trust_key: &SecretKey| {
        let (origin, work, t) = (w.fleet.origin_handle(), w.work.clone(), trust(trust_key));
        async move {
            releases::verify(&*origin, &shop(), None, &t, &work)
                .await
                .unwrap()
                .problems
        }
    };
    assert!(check(&k).await.is_empty());

    // Signed by a key the verifier does not trust.
    let problems = check(&key(2)).await;
    assert!(
        problems[0].contains("0 valid signature(s)")
            && problems[0].contains("1 from untrusted keys"),
        "{problems:?}"
    );

    // A blob deleted.
    let hef = p
        .manifest
        .artifact(deckhand_protocol::Role::Hef)
        .unwrap()
        .clone();
    let hef_bytes = w.fleet.origin().get(&l.blob(&hef.blob)).await.unwrap();
    w.fleet.origin().delete(&l.blob(&hef.blob)).await.unwrap();
    let problems = check(&k).await;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("hef blob") && problems[0].contains("is missing"),
        "{problems:?}"
    );

    // A blob with one flipped byte.
    let mut flipped = hef_bytes.to_vec();
    flipped[100] ^= 0x01;
    w.fleet
        .origin()
        .put(&l.blob(&hef.blob), flipped.into())
        .await
        .unwrap();
    let problems = check(&k).await;
    assert!(
        problems[0].contains("hef blob") && problems[0].contains("content hashes to"),
        "{problems:?}"
    );
    w.fleet
        .origin()
        .put(&l.blob(&hef.blob), hef_bytes)
        .await
        .unwrap();
    assert!(check(&k).await.is_empty());

    // A forged manifest: the payload changed, the signature kept.
    let mut env: deckhand_protocol::Envelope = serde_json::from_slice(&p.envelope).unwrap();
    let mut forged = p.manifest.clone();
    forged.recognizer.min_score = -1.0;
    use base64::Engine as _;
    env.payload = base64::engine::general_purpose::STANDARD.encode(forged.to_payload());
    w.fleet
        .origin()
        .put(&l.current(&shop()), env.to_bytes().into())
        .await
        .unwrap();
    let problems = check(&k).await;
    assert!(
        problems[0].contains("0 valid signature(s)") && problems[0].contains("1 invalid"),
        "{problems:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_killed_mid_upload_resumes_without_uploading_again() {
    let dir = world("publish-killed").start().await.unwrap();
    let s3 = dir.s3();
    let files =
        fixtures::write_sample_release(&dir.join("release"), &SampleSpec::small(4)).unwrap();
    // A large canary photo, so its upload goes in parts and can be interrupted.
    let mut rng = SplitMix(77);
    let photo = image::RgbImage::from_fn(2600, 2600, |_, _| {
        let v = rng.next_u64();
        image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
    });
    let canary = dir.join("big-canary.png");
    std::fs::write(&canary, fixtures::encode_png(&photo)).unwrap();
    assert!(
        std::fs::metadata(&canary).unwrap().len() > deckhand_tools::origin::MULTIPART_THRESHOLD
    );
    let key_path = dir.join("ops.key");
    std::fs::write(&key_path, key(1).to_file_text()).unwrap();
    let p = |p: &Path| p.to_str().unwrap().to_owned();
    let origin = s3.origin_arg("fleet");
    let mut args = publish_args(&origin, "shop-1", &key_path, &files, &files.metadata);
    args.extend([
        "--canary".into(),
        format!("{}={}", p(&canary), files.canaries[0].1),
    ]);
    let spawn = || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        deckhand(s3, &refs)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };

    s3.stats().set_part_delay(Duration::from_millis(400));
    let mut first = spawn();
    // Five small blobs complete, then the canary's parts crawl: kill in the middle of them.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while s3.stats().puts().len() < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first publish never got going"
        );
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first publish ended early"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    first.kill().unwrap();
    first.wait().unwrap();
    let before_kill = s3.stats().puts();
    assert_eq!(
        before_kill.len(),
        5,
        "the kill did not land mid-upload: {before_kill:?}"
    );
    let bucket = s3.bucket_dir();
    assert!(
        !bucket
            .join("fleet/deployments/shop-1/current.json")
            .exists(),
        "no manifest may exist yet"
    );

    s3.stats().set_part_delay(Duration::ZERO);
    s3.stats().reset();
    let out = spawn().wait_with_output().unwrap();
    let result = ok(&out);
    assert_eq!(result["version"], 1);
    let again = s3.stats().puts();
    for k in &before_kill {
        assert!(
            !again.contains(k),
            "{k} was uploaded again after the restart"
        );
    }
    assert!(again.iter().any(|k| k.ends_with("current.json")));
    assert_eq!(result["already_present"], 5);
}

/// An existing bucket can be published from without a local copy: inputs given as s3:// keys.
#[tokio::test]
async fn inputs_can_be_existing_s3_objects() {
    let w = s3_world("publish-from-s3").await;
    let root = deckhand_tools::origin::connect(&w.fleet.s3().origin_url(""), &w.cfg)
        .await
        .unwrap();
    let hef_key =
        "models/compilation/student-stage2/hailo8/pokemon_student_efficientnet_lite0_stage2.hef";
    root.put_file(hef_key, &w.files.hef, &|_| {}).await.unwrap();
    root.put_file("datasets/reference/index.json", &w.files.labels, &|_| {})
        .await
        .unwrap();
    let mut o = options(&w.files);
    o.inputs.hef = format!("s3://cards/{hef_key}").parse().unwrap();
    o.inputs.labels = "s3://cards/datasets/reference/index.json".parse().unwrap();
    let (p, v) = publish::publish(w.fleet.origin(), &w.cfg, &key(1), &o, &w.work)
        .await
        .unwrap();
    assert_eq!(v.version, 1);
    let hef = p.manifest.artifact(deckhand_protocol::Role::Hef).unwrap();
    assert_eq!(
        hef.blob,
        deckhand_protocol::BlobId::of(&std::fs::read(&w.files.hef).unwrap())
    );
    let report = releases::verify(w.fleet.origin(), &shop(), None, &trust(&key(1)), &w.work)
        .await
        .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // A key that does not exist is named in the error.
    o.inputs.onnx = "s3://cards/models/compilation/nope/model.onnx"
        .parse()
        .unwrap();
    let err = publish::publish(w.fleet.origin(), &w.cfg, &key(1), &o, &w.work)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("models/compilation/nope/model.onnx") && err.contains("no such object"),
        "{err}"
    );
}

/// An operator's laptop whose clock is a day off S3's still publishes. S3 refuses a signature more
/// than 15 minutes off; the SDK measures the skew from the answer's `Date` and signs its retry with
/// it, but knows such a refusal only by its error code, and the 403 to publish's first request, a
/// HEAD, has no body to carry one (before the client retried such a 403 itself, publish failed with
/// "refused (403): check the credentials").
#[tokio::test]
async fn an_operator_whose_clock_is_a_day_off_still_publishes() {
    let w = s3_world("publish-skewed").await;
    let key = w.fleet.join("ops.key");
    std::fs::write(&key, w.fleet.key().to_file_text()).unwrap();
    let origin = w.fleet.s3().origin_arg("fleet");
    let args = publish_args(&origin, "shop-1", &key, &w.files, &w.files.metadata);
    for offset in ["+1d", "-1d"] {
        let out = deckhand(
            w.fleet.s3(),
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .envs(deckhand_tests::clock_at(offset))
        .output()
        .unwrap();
        let published = ok(&out);
        assert!(published["version"].as_u64().is_some(), "{published}");
    }
}

/// An index whose vectors are not in embeddings.npy's row order (as one built on several threads) is
/// published, with a warning that names it and what it costs every shop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_of_an_index_out_of_row_order_warns_and_publishes() {
    let dir = world("index-row-order").start().await.unwrap();
    let s3 = dir.s3();
    let spec = SampleSpec::small(5);
    let files = fixtures::write_sample_release(&dir.join("release"), &spec).unwrap();
    let rows = fixtures::rewrite_index_rows_reversed(&files).unwrap();
    let key_path = dir.join("ops.key");
    std::fs::write(&key_path, key(1).to_file_text()).unwrap();
    let mut args = publish_args(
        &s3.origin_arg("fleet"),
        "shop-1",
        &key_path,
        &files,
        &files.metadata,
    );
    args.extend([
        "--embeddings".into(),
        files.embeddings.as_ref().unwrap().display().to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let v1 = ok(&deckhand_out(s3, &args));
    assert_eq!(v1["version"], 1);
    let warnings = v1["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{v1}");
    let w = warnings[0].as_str().unwrap();
    assert!(
        w.contains(&format!(
            "of the {rows} vectors in {}",
            files.index.display()
        )) && w.contains("threads=1"),
        "{w}"
    );
    // Without --json the warning goes to stderr.
    let plain: Vec<&str> = args.iter().copied().filter(|a| *a != "--json").collect();
    let out = deckhand_out(s3, &plain);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("warning: "), "{}", stderr(&out));
}
