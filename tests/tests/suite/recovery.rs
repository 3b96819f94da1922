//! Seed 002, recovery scenario 2: the bucket lost a deployment's objects (versioning is off, so nothing
//! else holds them). Any Pi holds the active and previous releases, verified: `deckhand-agent store
//! export` writes them as a bundle while the agent keeps serving, and `deckhand bundle push` restores
//! them to S3, refusing a bundle that does not verify and leaving the bucket as it was.

use deckhand_agent::release::ReleaseFiles;
use deckhand_tests::fixtures::{
    self, Perturbation, ReferenceSpec, card_image, encode_jpeg, perturb,
};
use deckhand_tests::{
    AgentOptions, Credentials, Fleet, TestDir, deckhand_out, ok, run, secs, shop,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const CARD: usize = 3;

fn photo() -> Vec<u8> {
    encode_jpeg(&perturb(&card_image(CARD, 0), Perturbation::Crop, 1), 85)
}

/// Version 2 of `files`: one card renamed in metadata.json.
fn renamed(fleet: &Fleet, files: &ReleaseFiles, spec: &ReferenceSpec) -> ReleaseFiles {
    deckhand_tests::with_card_renamed(fleet, files, spec, CARD, "Card three, restored")
}

/// Every object under the fleet's `deployments/`, with its bytes.
async fn objects(fleet: &Fleet) -> BTreeMap<String, Vec<u8>> {
    let prefix = deployments_prefix(fleet);
    let mut out = BTreeMap::new();
    for o in fleet.origin().list(&prefix).await.unwrap() {
        let bytes = fleet.origin().get(&o.key).await.unwrap();
        out.insert(o.key, bytes.to_vec());
    }
    out
}

fn deployments_prefix(fleet: &Fleet) -> String {
    let blob_dir = fleet.origin().layout().blob_dir();
    blob_dir
        .strip_suffix("_blob/")
        .unwrap_or_else(|| panic!("odd blob dir {blob_dir}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_lost_from_s3_is_restored_from_a_pi_while_it_serves() {
    let mut fleet = shop("s3-restore").start().await.unwrap();
    let spec = ReferenceSpec::small(40);
    let files = fixtures::write_reference_release(&fleet.join("release"), &spec).unwrap();
    let v1 = fleet.publish(&files).await.unwrap();
    fleet.start_agent("pi-1").await.unwrap();
    fleet.start_agent("pi-2").await.unwrap();
    // Each Pi serves version 1 before version 2 is published, so version 1 is kept as the previous.
    fleet
        .wait_all(secs(90), "version 1 active", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    let v2 = fleet
        .publish(&renamed(&fleet, &files, &spec))
        .await
        .unwrap();
    for a in &fleet.agents {
        a.wait_for(secs(90), "version 2 active", |s| {
            s.active_version() == Some(2)
        })
        .await
        .unwrap();
    }
    let before = objects(&fleet).await;
    let layout = fleet.origin().layout().clone();
    let d = deckhand_protocol::layout::Name::deployment("shop-1").unwrap();
    let manifests: Vec<Vec<u8>> = [1, 2]
        .map(|v| before[&layout.manifest(&d, v)].clone())
        .to_vec();

    // The bucket loses the deployment: every object under deployments/.
    for key in before.keys() {
        fleet.origin().delete(key).await.unwrap();
    }
    assert!(objects(&fleet).await.is_empty());

    // Export from pi-1 while it keeps answering: a client recognises cards the whole time.
    let t = TestDir::new("s3-restore-bundle");
    let bundle = t.join("bundle");
    let bundle_s = bundle.display().to_string();
    let data_dir = fleet.join("pi-1").display().to_string();
    let serving = Arc::new(AtomicBool::new(true));
    let (answered, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let http = fleet.agents[0].http().to_owned();
    let client = {
        let (serving, answered, failed) = (serving.clone(), answered.clone(), failed.clone());
        tokio::spawn(async move {
            let image = photo();
            while serving.load(Ordering::Relaxed) {
                match deckhand_agent::http::request_json(
                    &http,
                    "POST",
                    "/v1/recognize",
                    bytes::Bytes::from(image.clone()),
                )
                .await
                {
                    Ok((200, a)) if a["manifest_version"] == 2 => {
                        answered.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    // At least one answer before the export starts, so the client is really running alongside.
    while answered.load(Ordering::Relaxed) == 0 {
        tokio::task::yield_now().await;
    }
    let export = tokio::task::spawn_blocking(move || {
        run(
            "deckhand-agent",
            &[
                "store",
                "export",
                "--data-dir",
                &data_dir,
                "--out",
                &bundle_s,
                "--json",
            ],
            &[],
        )
    })
    .await
    .unwrap();
    let during = answered.load(Ordering::Relaxed);
    serving.store(false, Ordering::Relaxed);
    client.await.unwrap();
    let exported = ok(&export);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the export"
    );
    assert!(during >= 2, "only {during} answers during the export");
    let versions: Vec<u64> = exported["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2], "{exported}");
    assert_eq!(exported["releases"][0]["manifest_id"], v1.id.to_string());
    assert_eq!(exported["releases"][1]["manifest_id"], v2.id.to_string());

    // One release on its own, and a data directory with no store named as such.
    let previous = ok(&run(
        "deckhand-agent",
        &[
            "store",
            "export",
            "--data-dir",
            &fleet.join("pi-2").display().to_string(),
            "--out",
            &t.join("previous").display().to_string(),
            "--release",
            "previous",
            "--json",
        ],
        &[],
    ));
    assert_eq!(previous["releases"][0]["version"], 1, "{previous}");
    assert_eq!(previous["releases"].as_array().unwrap().len(), 1);
    let none = run(
        "deckhand-agent",
        &[
            "store",
            "export",
            "--data-dir",
            &t.join("no-such-pi").display().to_string(),
            "--out",
            &t.join("nothing").display().to_string(),
        ],
        &[],
    );
    assert!(!none.status.success());
    assert!(
        deckhand_tests::stderr(&none).contains("no store at"),
        "{}",
        deckhand_tests::stderr(&none)
    );

    let s3 = fleet.s3();
    let origin = s3.origin_arg("fleet");
    let trust = fleet.trust().display().to_string();
    let push = |from: &str| {
        deckhand_out(
            s3,
            &[
                "bundle",
                "push",
                "--from",
                from,
                "--origin",
                &origin,
                "--deployment",
                "shop-1",
                "--trust",
                &trust,
                "--json",
            ],
        )
    };

    // A bundle with one tampered blob is refused, naming it, and the bucket stays as it was (empty).
    let tampered = t.join("tampered");
    deckhand_tests::copy_dir(&bundle, &tampered);
    let meta_blob = v2
        .manifest
        .artifacts
        .iter()
        .find(|a| a.role == deckhand_protocol::manifest::Role::Metadata)
        .unwrap()
        .blob;
    let victim = tampered.join(layout_without_prefix().blob(&meta_blob));
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[10] ^= 0x20;
    std::fs::write(&victim, &bytes).unwrap();
    let refused = push(&tampered.display().to_string());
    assert!(!refused.status.success());
    let err = deckhand_tests::stderr(&refused);
    assert!(
        err.contains("refused") && err.contains(&meta_blob.to_string()),
        "{err}"
    );
    assert!(
        objects(&fleet).await.is_empty(),
        "a refused push wrote to the bucket"
    );

    // The real bundle restores the deployment.
    let pushed = ok(&push(&bundle.display().to_string()));
    assert_eq!(pushed["current_set_to"], 2, "{pushed}");
    assert_eq!(pushed["present"], 0, "{pushed}");
    let after = objects(&fleet).await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "the restored bucket holds other keys than before"
    );
    for (v, original) in [1, 2].into_iter().zip(&manifests) {
        assert_eq!(
            &after[&layout.manifest(&d, v)],
            original,
            "manifest {v} differs from the one signed"
        );
        let out = deckhand_out(
            s3,
            &[
                "verify",
                "--origin",
                &origin,
                "--deployment",
                "shop-1",
                "--version",
                &v.to_string(),
                "--trust",
                &trust,
            ],
        );
        assert!(
            out.status.success() && deckhand_tests::stdout(&out).contains("ok"),
            "{}{}",
            deckhand_tests::stdout(&out),
            deckhand_tests::stderr(&out)
        );
    }
    assert_eq!(
        after[&layout.current(&d)],
        manifests[1],
        "current.json is not version 2"
    );

    // Pushing again uploads nothing and leaves current.json alone.
    let again = ok(&push(&bundle.display().to_string()));
    assert_eq!(again["uploaded"], 0, "{again}");
    assert!(again["current_set_to"].is_null(), "{again}");

    // A new Pi, with S3 and no peer, syncs version 2 from the restored bucket alone.
    for a in std::mem::take(&mut fleet.agents) {
        a.stop().await.unwrap();
    }
    fleet.s3().stats().reset();
    let pi3 = fleet
        .start_agent_with(AgentOptions {
            name: "pi-3".into(),
            origin: true,
            credentials: Credentials::None,
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    pi3.wait_for(secs(90), "version 2 active", |s| {
        s.active_version() == Some(2)
    })
    .await
    .unwrap();
    let (code, answer) = pi3.recognize(&photo()).await.unwrap();
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["metadata"]["name"], "Card three, restored");
    // From the packs the push made beside the restored blobs.
    let sent = fleet.s3().stats().bytes_sent();
    let (packed, raw) = (
        deckhand_tests::packed_chunk_bytes(&files),
        deckhand_tests::unique_chunk_bytes(&files),
    );
    assert!(
        sent >= packed && sent < raw,
        "pi-3 took {sent} bytes from S3 for a release of {raw} bytes, {packed} packed"
    );
}

/// The bundle's key layout (an origin under an empty prefix).
fn layout_without_prefix() -> deckhand_protocol::layout::Layout {
    deckhand_protocol::layout::Layout::new("").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_never_overwrites_a_different_manifest_nor_a_newer_current_json() {
    let fleet = shop("s3-restore-rules").start().await.unwrap();
    let spec = ReferenceSpec::small(12);
    let files = fixtures::write_reference_release(&fleet.join("release"), &spec).unwrap();
    // A bundle holding versions 1 and 2: a file origin published to is one.
    let bundle = fleet.join("bundle");
    deckhand_tests::publish_to_dir(&fleet, &files, &bundle).await;
    deckhand_tests::publish_to_dir(&fleet, &renamed(&fleet, &files, &spec), &bundle).await;
    let s3 = fleet.s3();
    let origin = s3.origin_arg("fleet");
    let trust = fleet.trust().display().to_string();
    let push = |from: &std::path::Path, trust: &str| {
        deckhand_out(
            s3,
            &[
                "bundle",
                "push",
                "--from",
                &from.display().to_string(),
                "--origin",
                &origin,
                "--deployment",
                "shop-1",
                "--trust",
                trust,
                "--json",
            ],
        )
    };

    // Signed by a key the operator does not trust: refused, nothing written.
    let stranger = fleet.join("stranger");
    let out = run(
        "deckhand",
        &["keygen", "--out", &stranger.display().to_string()],
        &[],
    );
    assert!(out.status.success(), "{}", deckhand_tests::stderr(&out));
    let stranger_pub = format!("{}.pub", stranger.display());
    let out = push(&bundle, &stranger_pub);
    assert!(!out.status.success());
    assert!(
        deckhand_tests::stderr(&out).contains("does not verify"),
        "{}",
        deckhand_tests::stderr(&out)
    );
    assert!(objects(&fleet).await.is_empty());

    // Restored, then the operator publishes version 3; a later push of the same bundle (version 2's
    // manifest lost again meanwhile) writes version 2 back and leaves current.json at 3.
    ok(&push(&bundle, &trust));
    let v3 = fleet.publish(&files).await.unwrap();
    assert_eq!(v3.manifest.version, 3);
    let layout = fleet.origin().layout().clone();
    let d = deckhand_protocol::layout::Name::deployment("shop-1").unwrap();
    fleet
        .origin()
        .delete(&layout.manifest(&d, 2))
        .await
        .unwrap();
    let again = ok(&push(&bundle, &trust));
    assert_eq!(again["current_before"], 3, "{again}");
    assert!(again["current_set_to"].is_null(), "{again}");
    let written: Vec<(u64, bool)> = again["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["version"].as_u64().unwrap(),
                m["written"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(written, [(1, false), (2, true)], "{again}");
    let current = fleet.origin().get(&layout.current(&d)).await.unwrap();
    assert_eq!(current.as_ref(), &v3.envelope[..]);

    // Another history of the deployment (its own versions 1 and 2) is refused at the versions it
    // shares, and the bucket is unchanged.
    let other = fleet.join("other-bundle");
    let other_files =
        deckhand_tests::with_card_renamed(&fleet, &files, &spec, 1, "Another history");
    deckhand_tests::publish_to_dir(&fleet, &other_files, &other).await;
    let before = objects(&fleet).await;
    let out = push(&other, &trust);
    assert!(!out.status.success());
    let err = deckhand_tests::stderr(&out);
    assert!(
        err.contains(&layout.manifest(&d, 1)) && err.contains("different manifest"),
        "{err}"
    );
    assert_eq!(
        objects(&fleet).await,
        before,
        "a refused push changed the bucket"
    );
}
