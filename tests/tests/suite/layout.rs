//! `deckhand layout` against a real S3 server (s3s-fs, in-process, spoken to over HTTP by aws-sdk-s3),
//! with a bucket seeded in all of the seeds' legacy layouts at once: plan; migrate, killed at about half
//! way and resumed; audit; finalize; rollback to the exact original listing. Also: keys no rule places,
//! inputs found through the journal, copies in parts, and copies that come out wrong.

use deckhand_agent::release::ReleaseFiles;
use deckhand_protocol::SecretKey;
use deckhand_protocol::migration::{Record, Rules, VerifiedBy};
use deckhand_tests::fixtures::{self, SampleSpec};
use deckhand_tests::{Fleet, deckhand, deckhand_out, json, noise, ok, publish_options, shop};
use deckhand_tools::layout::journal::Journal;
use deckhand_tools::layout::{self, MigrateOptions, VerifyMode};
use deckhand_tools::origin::{Bucket, CopyOptions};
use deckhand_tools::publish::{self, PublishOptions};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

const P: &str = "project/pokemon-card-recognition";

/// Every object but the journals: key -> (size, blake3 of the content).
async fn listing(origin: &dyn Bucket) -> BTreeMap<String, (u64, String)> {
    let mut out = BTreeMap::new();
    for o in origin.list("").await.unwrap() {
        if o.key.starts_with("migration/") {
            continue;
        }
        let (size, hash) = origin.hash(&o.key).await.unwrap();
        assert_eq!(size, o.size, "{}", o.key);
        out.insert(o.key, (size, hash.to_hex().to_string()));
    }
    out
}

/// A shop's bucket, seeded in the legacy layouts; `origin` is the bucket's root.
struct Legacy {
    t: Fleet,
    origin: std::sync::Arc<dyn Bucket>,
    files: ReleaseFiles,
}

impl Legacy {
    async fn new(name: &str) -> Self {
        let t = shop(name).start().await.unwrap();
        let s3 = t.s3();
        let origin = deckhand_tools::origin::connect(&s3.origin_url(""), &s3.origin_config())
            .await
            .unwrap();
        let files =
            fixtures::write_sample_release(&t.join("release"), &SampleSpec::small(1)).unwrap();
        Self { t, origin, files }
    }

    async fn put(&self, key: &str, body: Vec<u8>) {
        self.origin.put(key, body.into()).await.unwrap();
    }

    async fn put_file(&self, key: &str, path: &Path) {
        self.origin.put_file(key, path, &|_| {}).await.unwrap();
    }

    /// The reference DB and models, where seed 000 (bucket root) and seeds 001-003 (project folder) put
    /// them.
    async fn seed_reference_and_models(&self) {
        let f = &self.files;
        for base in ["data/reference".to_owned(), format!("{P}/data/reference")] {
            self.put_file(&format!("{base}/usearch.index"), &f.index)
                .await;
            self.put_file(&format!("{base}/index.json"), &f.labels)
                .await;
            self.put_file(&format!("{base}/metadata.json"), &f.metadata)
                .await;
            self.put_file(
                &format!("{base}/embeddings.npy"),
                f.embeddings.as_ref().unwrap(),
            )
            .await;
        }
        let hef = "pokemon_student_efficientnet_lite0_stage2.hef";
        self.put_file(&format!("{P}/models/efficientnet-hailo/v2.1/{hef}"), &f.hef)
            .await;
        self.put_file(
            &format!("{P}/models/efficientnet-student/stage2/v2.0/student_stage2_final.onnx"),
            &f.onnx,
        )
        .await;
        self.put_file(&format!("models/embedding/student/{hef}"), &f.hef)
            .await;
        self.put_file(
            "models/embedding/student/student_stage2_final.onnx",
            &f.onnx,
        )
        .await;
    }

    /// Everything else the seeds list, with small objects standing in for the card images.
    async fn seed_everything_else(&self) -> usize {
        let mut n = 0;
        let mut put = |key: String, seed: u64, len: usize| {
            n += 1;
            async move { self.put(&key, noise(seed, len)).await }
        };
        for i in 0..160u64 {
            put(
                format!("data/raw/card_images/card_{i:05}.png"),
                i,
                300 + i as usize,
            )
            .await;
        }
        put(
            "data/raw/card_images/Charizard ex (base1-4).png".into(),
            999,
            777,
        )
        .await;
        for i in 0..100u64 {
            put(
                format!("data/processed/classification/train/card_{i:05}/0.png"),
                1000 + i,
                200,
            )
            .await;
        }
        for split in ["val", "test"] {
            put(
                format!("data/processed/classification/{split}/card_00000/0.png"),
                7,
                90,
            )
            .await;
        }
        for i in 0..40u64 {
            put(format!("data/calibration/cal_{i:04}.png"), 2000 + i, 150).await;
            put(
                format!("{P}/models/efficientnet-hailo/calibration/cal_{i:04}.png"),
                2000 + i,
                150,
            )
            .await;
        }
        for (key, seed) in [
            (
                format!("{P}/models/efficientnet-student/stage2/v2.0/student_stage2_final.pt"),
                1,
            ),
            (format!("{P}/models/dinov3-teacher/v1.0/model.tar.gz"), 2),
            (format!("{P}/experiments/mlflow/experiments_index.json"), 3),
            (format!("{P}/analytics/dashboards/dashboard_config.json"), 4),
            (format!("{P}/analytics/metrics/model_performance.csv"), 5),
            (format!("{P}/profiling/teacher/2026-01-10/trace.json"), 6),
            (format!("{P}/metadata/project_manifest.json"), 7),
            (format!("{P}/pipelines/training/teacher_training.py"), 8),
            (format!("{P}/README.md"), 9),
            (
                "models/embedding/teacher/pokemon-card-dinov3-teacher-1/output/model.tar.gz".into(),
                10,
            ),
            (
                "models/embedding/student/pytorch-training-1/output/model.tar.gz".into(),
                11,
            ),
            ("models/detection/yolo11n-obb/yolo11n-obb.pt".into(), 12),
            ("models/detection/yolo11n-obb/yolo11n-obb.onnx".into(), 13),
            (
                "models/registry/v3-efficientnet-stage2-production/model.json".into(),
                14,
            ),
            ("pipelines/inference/batch_inference.py".into(), 15),
        ] {
            put(key, 5000 + seed, 4096).await;
        }
        n
    }
}

async fn publish_from_bucket(b: &Legacy, key: &SecretKey, index: &str) -> u64 {
    let mut o: PublishOptions = publish_options(&b.files);
    o.inputs.index = index.parse().unwrap();
    let work = b.t.join("publish-work");
    std::fs::create_dir_all(&work).unwrap();
    let (_, published) = publish::publish(&*b.origin, &b.t.s3().origin_config(), key, &o, &work)
        .await
        .unwrap();
    published.version
}

/// A bucket seeded in every legacy layout, with a live deployment published from the legacy keys, and
/// its migration planned (the plan checked: every legacy key placed, nothing written).
struct Planned {
    b: Legacy,
    /// The listing before anything moved.
    before: BTreeMap<String, (u64, String)>,
    legacy: usize,
    plan_file: std::path::PathBuf,
    moves: Vec<serde_json::Value>,
    distinct_targets: usize,
}

async fn seeded_and_planned(name: &str) -> Planned {
    let b = Legacy::new(name).await;
    b.seed_reference_and_models().await;
    let others = b.seed_everything_else().await;
    // A live deployment, published from the legacy keys: deployments/ already fits the layout.
    publish_from_bucket(&b, b.t.key(), "s3://cards/data/reference/usearch.index").await;
    let before = listing(&*b.origin).await;
    let legacy = before
        .keys()
        .filter(|k| !k.starts_with("deployments/"))
        .count();
    assert_eq!(legacy, 12 + others);
    assert!(legacy > 300, "hundreds of small objects: {legacy}");

    // The plan.
    let plan_file = b.t.join("plan.json");
    let plan_s = plan_file.display().to_string();
    let plan = ok(&deckhand_out(
        b.t.s3(),
        &[
            "layout",
            "plan",
            "--origin",
            "s3://cards",
            "--out",
            &plan_s,
            "--json",
        ],
    ));
    let moves = plan["moves"].as_array().unwrap().clone();
    assert_eq!(moves.len(), legacy, "every legacy key is placed");
    assert_eq!(
        plan["unplaced"].as_array().unwrap().len(),
        0,
        "{}",
        plan["unplaced"]
    );
    assert_eq!(
        plan["in_place"].as_u64().unwrap() as usize,
        before.len() - legacy
    );
    let target = |source: &str| {
        moves
            .iter()
            .find(|m| m["source"] == source)
            .map(|m| m["target"].as_str().unwrap().to_owned())
    };
    assert_eq!(
        target("data/reference/usearch.index").as_deref(),
        Some("datasets/reference-db/usearch.index")
    );
    assert_eq!(
        target(&format!("{P}/data/reference/usearch.index")).as_deref(),
        Some("datasets/reference-db/usearch.index"),
        "the project's copy of the same file meets it at one key"
    );
    assert_eq!(
        target(&format!(
            "{P}/models/efficientnet-hailo/v2.1/pokemon_student_efficientnet_lite0_stage2.hef"
        ))
        .as_deref(),
        Some(
            "models/compilation/efficientnet-hailo/hailo8/v2.1/pokemon_student_efficientnet_lite0_stage2.hef"
        )
    );
    assert_eq!(
        target("data/raw/card_images/Charizard ex (base1-4).png").as_deref(),
        Some("datasets/card-images/Charizard-ex-(base1-4).png")
    );
    let distinct_targets: std::collections::BTreeSet<&str> = moves
        .iter()
        .map(|m| m["target"].as_str().unwrap())
        .collect();
    // The plan wrote nothing.
    assert_eq!(listing(&*b.origin).await, before);

    let distinct_targets = distinct_targets.len();
    Planned {
        b,
        before,
        legacy,
        plan_file,
        moves,
        distinct_targets,
    }
}

/// `deckhand layout audit` with the operator's key, which must exit 0.
fn audit_clean(b: &Legacy) -> serde_json::Value {
    let trust = b.t.trust().display().to_string();
    ok(&deckhand_out(
        b.t.s3(),
        &[
            "layout",
            "audit",
            "--origin",
            "s3://cards",
            "--trust",
            &trust,
            "--json",
        ],
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_bucket_migration_killed_half_way_resumes_and_audits_clean() {
    let Planned {
        b,
        before,
        legacy,
        plan_file,
        moves,
        distinct_targets,
    } = seeded_and_planned("layout-migrate").await;
    let plan_s = plan_file.display().to_string();
    // Migrate, killed at about half way, then resumed.
    b.t.s3().stats().set_copy_delay(Duration::from_millis(20));
    let mut child = deckhand(
        b.t.s3(),
        &[
            "layout",
            "migrate",
            "--plan",
            &plan_s,
            "--parallel",
            "4",
            "--no-progress",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let half = distinct_targets as u64 / 2;
    let t0 = Instant::now();
    while b.t.s3().stats().copies() < half {
        assert!(
            child.try_wait().unwrap().is_none(),
            "migrate ended before it was killed"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "migrate made no progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    b.t.s3().stats().set_copy_delay(Duration::ZERO);
    let first_run = b.t.s3().stats().copies();
    assert!(
        first_run < distinct_targets as u64,
        "killed at {first_run} of {}",
        distinct_targets
    );
    let plan_obj =
        deckhand_protocol::migration::Plan::decode(&std::fs::read(&plan_file).unwrap()).unwrap();
    let journal_id = plan_obj.journal_id().unwrap();
    let journaled = Journal::load(&*b.origin, &journal_id).await.unwrap();
    let recorded = journaled.state.copied.len();
    assert!(
        recorded > 0 && recorded < moves.len(),
        "{recorded} of {} journaled at the kill",
        moves.len()
    );
    let resumed = ok(&deckhand_out(
        b.t.s3(),
        &[
            "layout",
            "migrate",
            "--plan",
            &plan_s,
            "--no-progress",
            "--json",
        ],
    ));
    assert_eq!(resumed["journal"], journal_id.as_str());
    assert_eq!(resumed["already"].as_u64().unwrap() as usize, recorded);
    assert_eq!(
        resumed["done"].as_u64().unwrap() as usize,
        moves.len() - recorded
    );
    assert_eq!(resumed["failures"].as_array().unwrap().len(), 0);
    let second_run = b.t.s3().stats().copies() - first_run;
    assert!(
        second_run as usize <= moves.len() - recorded,
        "the resumed run copied {second_run} objects; only {} were not journaled",
        moves.len() - recorded
    );
    assert!(
        b.t.s3().stats().copies() as usize <= distinct_targets,
        "{} copies for {} targets: something was copied twice",
        b.t.s3().stats().copies(),
        distinct_targets
    );
    // migrate deleted nothing, and every new key holds its source's bytes.
    let migrated = listing(&*b.origin).await;
    for (k, v) in &before {
        assert_eq!(migrated.get(k), Some(v), "{k}");
    }
    for m in &moves {
        let (s, t) = (m["source"].as_str().unwrap(), m["target"].as_str().unwrap());
        assert_eq!(migrated.get(t), before.get(s), "{s} -> {t}");
    }
    // Running it again finds nothing to do.
    let again = ok(&deckhand_out(
        b.t.s3(),
        &[
            "layout",
            "migrate",
            "--plan",
            &plan_s,
            "--no-progress",
            "--json",
        ],
    ));
    assert_eq!(again["done"], 0);

    // The audit comes out clean (the legacy keys await finalize; they are not violations).
    let audit = audit_clean(&b);
    for list in [
        "misplaced",
        "bad_manifests",
        "missing",
        "unreachable",
        "orphans",
    ] {
        assert_eq!(audit[list].as_array().unwrap().len(), 0, "{list}: {audit}");
    }
    assert_eq!(
        audit["awaiting_finalize"].as_u64().unwrap() as usize,
        legacy
    );
    assert!(audit["manifests"].as_u64().unwrap() >= 2, "{audit}");
    assert!(audit["blobs_checked"].as_u64().unwrap() >= 5, "{audit}");
    assert_eq!(
        audit["folders"]["data"]["objects"].as_u64().unwrap(),
        160 + 1 + 102 + 40 + 4
    );
    assert!(audit["folders"]["datasets"]["objects"].as_u64().unwrap() > 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_bucket_is_finalized_then_rolled_back_to_its_exact_listing() {
    let Planned {
        b,
        before,
        legacy,
        plan_file,
        moves,
        distinct_targets,
    } = seeded_and_planned("layout-finalize").await;
    let plan_s = plan_file.display().to_string();
    let migrated = ok(&deckhand_out(
        b.t.s3(),
        &[
            "layout",
            "migrate",
            "--plan",
            &plan_s,
            "--no-progress",
            "--json",
        ],
    ));
    assert_eq!(migrated["done"].as_u64().unwrap() as usize, moves.len());
    assert_eq!(
        audit_clean(&b)["awaiting_finalize"].as_u64().unwrap() as usize,
        legacy
    );
    assert!(distinct_targets <= moves.len());
    let plan_obj =
        deckhand_protocol::migration::Plan::decode(&std::fs::read(&plan_file).unwrap()).unwrap();
    let journal_id = plan_obj.journal_id().unwrap();

    // Finalize: nothing is old enough by default; with --min-age 0 every source goes.
    let j = journal_id.as_str();
    let early = ok(&deckhand_out(
        b.t.s3(),
        &[
            "layout",
            "finalize",
            "--origin",
            "s3://cards",
            "--journal",
            j,
            "--json",
            "--no-progress",
        ],
    ));
    assert_eq!(
        (early["done"].as_u64(), early["waiting"].as_u64()),
        (Some(0), Some(moves.len() as u64))
    );
    let fin = ok(&deckhand_out(
        b.t.s3(),
        &[
            "layout",
            "finalize",
            "--origin",
            "s3://cards",
            "--journal",
            j,
            "--min-age",
            "0",
            "--json",
            "--no-progress",
        ],
    ));
    assert_eq!(fin["done"].as_u64().unwrap() as usize, moves.len());
    let finalized = listing(&*b.origin).await;
    for m in &moves {
        assert!(!finalized.contains_key(m["source"].as_str().unwrap()));
    }
    let audit = audit_clean(&b);
    assert_eq!(audit["awaiting_finalize"], 0, "{audit}");
    assert!(audit["folders"].get("data").is_none(), "{audit}");
    // Agents are unaffected: deployments/ did not move.
    for (k, v) in before.iter().filter(|(k, _)| k.starts_with("deployments/")) {
        assert_eq!(finalized.get(k), Some(v));
    }

    // A rollback restores the original listing exactly: keys, sizes and content.
    let back = ok(&deckhand_out(
        b.t.s3(),
        &[
            "layout",
            "rollback",
            "--origin",
            "s3://cards",
            "--journal",
            j,
            "--json",
            "--no-progress",
        ],
    ));
    assert_eq!(back["failures"].as_array().unwrap().len(), 0, "{back}");
    assert_eq!(listing(&*b.origin).await, before);
    // The journal says so, and a second rollback has nothing left to do.
    assert!(
        Journal::load(&*b.origin, &journal_id)
            .await
            .unwrap()
            .state
            .rolled_back()
    );
    let twice = ok(&deckhand_out(
        b.t.s3(),
        &[
            "layout",
            "rollback",
            "--origin",
            "s3://cards",
            "--journal",
            j,
            "--json",
            "--no-progress",
        ],
    ));
    assert_eq!(twice["done"], 0);
    // The old layout is live again, and the audit says its keys do not fit.
    let out = deckhand_out(
        b.t.s3(),
        &["layout", "audit", "--origin", "s3://cards", "--json"],
    );
    assert_eq!(out.status.code(), Some(1));
    let audit = json(&out);
    assert_eq!(
        audit["misplaced"].as_array().unwrap().len(),
        legacy,
        "{audit}"
    );
    assert_eq!(audit["awaiting_finalize"], 0);
    // A rolled-back journal cannot be finalized.
    let out = deckhand_out(
        b.t.s3(),
        &[
            "layout",
            "finalize",
            "--origin",
            "s3://cards",
            "--journal",
            j,
            "--min-age",
            "0",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rolled back"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplaceable_keys_are_reported_and_the_rest_moves_and_stays_findable() {
    let b = Legacy::new("layout-unplaced").await;
    b.seed_reference_and_models().await;
    b.put("scratch/notes.txt", b"remember the milk".to_vec())
        .await;
    b.put("exports/2026/cards.csv", b"id,name\n".to_vec()).await;
    let rules = Rules::defaults();
    let plan = layout::plan(&*b.origin, &rules).await.unwrap();
    let unplaced: Vec<(&str, &str)> = plan
        .unplaced
        .iter()
        .map(|u| (u.key.as_str(), u.reason.as_str()))
        .collect();
    assert_eq!(
        unplaced,
        [
            ("exports/2026/cards.csv", "no rule places it"),
            ("scratch/notes.txt", "no rule places it")
        ]
    );
    let opts = MigrateOptions {
        progress: false,
        ..MigrateOptions::default()
    };
    let r = layout::migrate(&*b.origin, &plan, &opts).await.unwrap();
    assert_eq!((r.done, r.failures.len()), (plan.moves.len(), 0));
    assert!(b.origin.head("scratch/notes.txt").await.unwrap().is_some());

    // The audit names what does not fit, and exits 1.
    let out = deckhand_out(b.t.s3(), &["layout", "audit", "--origin", "s3://cards"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("misplaced: key \"scratch/notes.txt\" does not fit the layout"),
        "{text}"
    );
    assert!(text.contains("2 violations"), "{text}");
    // A rules file places them; rules that make no sense are refused, naming the rule.
    let rules_file = b.t.join("rules.toml");
    std::fs::write(
        &rules_file,
        "[[rule]]\nfrom = \"scratch\"\nto = \"datasets/scratch\"\n\n[[rule]]\nfrom = \"exports/\"\nto = \"models/training/exports\"\n",
    )
    .unwrap();
    let rules_s = rules_file.display().to_string();
    let p2 = ok(&deckhand_out(
        b.t.s3(),
        &[
            "layout",
            "plan",
            "--origin",
            "s3://cards",
            "--rules",
            &rules_s,
            "--json",
        ],
    ));
    assert_eq!(p2["unplaced"].as_array().unwrap().len(), 0, "{p2}");
    assert!(p2["moves"].as_array().unwrap().iter().any(|m| {
        m["source"] == "scratch/notes.txt" && m["target"] == "datasets/scratch/notes.txt"
    }));
    std::fs::write(
        &rules_file,
        "[[rule]]\nfrom = \"scratch\"\nto = \"deployments/x\"\n",
    )
    .unwrap();
    let out = deckhand_out(
        b.t.s3(),
        &[
            "layout",
            "plan",
            "--origin",
            "s3://cards",
            "--rules",
            &rules_s,
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--rules") && err.contains("rule 0 (from \"scratch\")"),
        "{err}"
    );

    // Backward compatibility (004 R4.3, R5.5): after finalize deleted the old keys, a publish naming an
    // old key finds the object at its new key; after a rollback removed the new keys, the new key finds
    // it at its old one.
    let signer = SecretKey::from_seed(&[3; 32]);
    let id = plan.journal_id().unwrap();
    layout::finalize(&*b.origin, &id, jiff::SignedDuration::ZERO, 8, false)
        .await
        .unwrap();
    assert!(
        b.origin
            .head("data/reference/usearch.index")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        publish_from_bucket(&b, &signer, "s3://cards/data/reference/usearch.index").await,
        1
    );
    layout::rollback(&*b.origin, &id, &opts).await.unwrap();
    assert!(
        b.origin
            .head("datasets/reference-db/usearch.index")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        publish_from_bucket(
            &b,
            &signer,
            "s3://cards/datasets/reference-db/usearch.index"
        )
        .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_are_copied_in_parts_and_bad_copies_are_caught() {
    let b = Legacy::new("layout-parts").await;
    // 12 MiB uploaded whole; 20 MiB uploaded in parts (its entity tag is not an MD5).
    let (small, large) = (b.t.join("small.bin"), b.t.join("large.bin"));
    std::fs::write(&small, noise(1, 12 << 20)).unwrap();
    std::fs::write(&large, noise(2, 20 << 20)).unwrap();
    b.put_file("data/raw/card_images/small.bin", &small).await;
    b.put_file("models/detection/large.bin", &large).await;
    assert!(
        b.origin
            .head("models/detection/large.bin")
            .await
            .unwrap()
            .unwrap()
            .etag
            .unwrap()
            .contains('-'),
        "the large object went up in parts"
    );
    let plan = layout::plan(&*b.origin, &Rules::defaults()).await.unwrap();
    assert_eq!(plan.moves.len(), 2);
    // Copies above 6 MiB go in 5 MiB parts (UploadPartCopy): 3 + 4 parts.
    let opts = MigrateOptions {
        progress: false,
        copy: CopyOptions {
            part_threshold: 6 << 20,
            part_size: 5 << 20,
            concurrency: 2,
        },
        ..MigrateOptions::default()
    };
    let r = layout::migrate(&*b.origin, &plan, &opts).await.unwrap();
    assert_eq!((r.done, r.failures.len()), (2, 0), "{:?}", r.failures);
    assert_eq!(b.t.s3().stats().copies(), 7);
    let journal = Journal::load(&*b.origin, &plan.journal_id().unwrap())
        .await
        .unwrap();
    for rec in journal.state.copied.values() {
        let Record::Copied {
            verified, target, ..
        } = rec
        else {
            unreachable!()
        };
        // A copy made in parts has a new entity tag: its content was compared instead.
        assert_eq!(*verified, VerifiedBy::Content, "{target}");
    }
    assert_eq!(
        b.origin
            .hash("datasets/card-images/small.bin")
            .await
            .unwrap(),
        b.origin
            .hash("data/raw/card_images/small.bin")
            .await
            .unwrap()
    );

    // A server that writes bad copies: each is caught, reported with its key, and not journaled.
    let c = Legacy::new("layout-damage").await;
    for i in 0..5u64 {
        c.put(&format!("data/calibration/c{i}.png"), noise(i, 1000))
            .await;
    }
    let plan = layout::plan(&*c.origin, &Rules::defaults()).await.unwrap();
    c.t.s3().stats().set_damage_copies(true);
    let small_opts = MigrateOptions {
        progress: false,
        verify: VerifyMode::Content,
        ..MigrateOptions::default()
    };
    let r = layout::migrate(&*c.origin, &plan, &small_opts)
        .await
        .unwrap();
    assert_eq!((r.done, r.failures.len()), (0, 5));
    assert!(
        r.failures
            .iter()
            .any(|f| f.starts_with("datasets/hailo-calibration/c0.png: the copy is 999 bytes")),
        "{:?}",
        r.failures
    );
    let journal = Journal::load(&*c.origin, &plan.journal_id().unwrap())
        .await
        .unwrap();
    assert!(journal.state.copied.is_empty());
    // Once the server behaves, the same plan resumes and the bad copies are replaced.
    c.t.s3().stats().set_damage_copies(false);
    let r = layout::migrate(&*c.origin, &plan, &small_opts)
        .await
        .unwrap();
    assert_eq!((r.done, r.failures.len()), (5, 0));
    for i in 0..5 {
        assert_eq!(
            c.origin
                .hash(&format!("datasets/hailo-calibration/c{i}.png"))
                .await
                .unwrap(),
            c.origin
                .hash(&format!("data/calibration/c{i}.png"))
                .await
                .unwrap()
        );
    }
}
