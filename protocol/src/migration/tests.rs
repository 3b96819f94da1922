use super::*;

fn obj(key: &str, size: u64, etag: &str) -> Listed {
    Listed {
        key: key.into(),
        size,
        etag: Some(etag.into()),
    }
}

fn now() -> Timestamp {
    "2026-11-28T12:00:00Z".parse().unwrap()
}

fn target_of<'p>(plan: &'p Plan, source: &str) -> Option<&'p str> {
    plan.moves
        .iter()
        .find(|m| m.source == source)
        .map(|m| m.target.as_str())
}

fn reason_of<'p>(plan: &'p Plan, key: &str) -> Option<&'p str> {
    plan.unplaced
        .iter()
        .find(|u| u.key == key)
        .map(|u| u.reason.as_str())
}

#[test]
fn the_default_rules_are_valid_and_place_every_seed_layout() {
    assert_eq!(Rules::defaults().len(), default_specs().len());
    let l = Layout::new("").unwrap();
    let listing = vec![
        obj("data/raw/card_images/base1-4.png", 10, "a"),
        obj("data/processed/classification/train/base1-4/0.png", 11, "b"),
        obj("data/calibration/cal_0001.png", 12, "c"),
        obj("data/reference/usearch.index", 13, "d"),
        obj(
            "project/pokemon-card-recognition/models/efficientnet-hailo/v2.1/m.hef",
            14,
            "e",
        ),
        obj(
            "project/pokemon-card-recognition/models/efficientnet-hailo/calibration/c.png",
            15,
            "f",
        ),
        obj(
            "project/pokemon-card-recognition/models/efficientnet-student/stage2/v2.0/s.onnx",
            16,
            "g",
        ),
        obj(
            "project/pokemon-card-recognition/models/dinov3-teacher/v1.0/model.tar.gz",
            17,
            "h",
        ),
        obj(
            "project/pokemon-card-recognition/experiments/mlflow/experiments_index.json",
            18,
            "i",
        ),
        obj(
            "project/pokemon-card-recognition/metadata/project_manifest.json",
            19,
            "j",
        ),
        obj("project/pokemon-card-recognition/README.md", 20, "k"),
        obj("models/embedding/student/pokemon_student.hef", 21, "l"),
        obj(
            "models/embedding/student/student_stage2_final.onnx",
            22,
            "m",
        ),
        obj(
            "models/embedding/teacher/job-1/output/model.tar.gz",
            23,
            "n",
        ),
        obj("models/detection/yolo11n-obb/yolo11n-obb.pt", 24, "o"),
        obj("models/registry/v1-dinov3-teacher/model.json", 25, "p"),
        obj("deployments/shop-1/current.json", 26, "q"),
        obj("models/training/job-a/model.pt", 27, "r"),
        obj("migration/m-20261128-0123456789abcdef/plan.json", 28, "s"),
    ];
    let p = plan(&l, &Rules::defaults(), &listing, "s3://b", now());
    let expect = [
        (
            "data/raw/card_images/base1-4.png",
            "datasets/card-images/base1-4.png",
        ),
        (
            "data/processed/classification/train/base1-4/0.png",
            "datasets/card-classification/train/base1-4/0.png",
        ),
        (
            "data/calibration/cal_0001.png",
            "datasets/hailo-calibration/cal_0001.png",
        ),
        (
            "data/reference/usearch.index",
            "datasets/reference-db/usearch.index",
        ),
        (
            "project/pokemon-card-recognition/models/efficientnet-hailo/v2.1/m.hef",
            "models/compilation/efficientnet-hailo/hailo8/v2.1/m.hef",
        ),
        (
            "project/pokemon-card-recognition/models/efficientnet-hailo/calibration/c.png",
            "datasets/hailo-calibration/c.png",
        ),
        (
            "project/pokemon-card-recognition/models/efficientnet-student/stage2/v2.0/s.onnx",
            "models/training/efficientnet-student/stage2/v2.0/s.onnx",
        ),
        (
            "project/pokemon-card-recognition/README.md",
            "datasets/project-metadata/README.md",
        ),
        (
            "models/embedding/student/pokemon_student.hef",
            "models/compilation/embedding-student/hailo8/pokemon_student.hef",
        ),
        (
            "models/embedding/student/student_stage2_final.onnx",
            "models/training/embedding-student/student_stage2_final.onnx",
        ),
        (
            "models/detection/yolo11n-obb/yolo11n-obb.pt",
            "models/training/detection/yolo11n-obb/yolo11n-obb.pt",
        ),
    ];
    for (from, to) in expect {
        assert_eq!(target_of(&p, from), Some(to), "{from}");
    }
    assert_eq!(p.moves.len(), 16);
    assert!(p.unplaced.is_empty(), "{:?}", p.unplaced);
    // deployments/ and models/training/ already fit; migration/ is the journals' own.
    assert_eq!(p.in_place, 2);
    for m in &p.moves {
        assert!(l.classify(&m.target).is_ok(), "{}", m.target);
        assert!(!m.target_existed);
    }
}

#[test]
fn plans_are_deterministic_and_round_trip() {
    let l = Layout::new("fleet").unwrap();
    let mut listing: Vec<Listed> = (0..50)
        .map(|i| {
            obj(
                &format!("fleet/data/raw/card_images/c{i}.png"),
                i,
                &format!("e{i}"),
            )
        })
        .collect();
    let a = plan(&l, &Rules::defaults(), &listing, "s3://b/fleet", now());
    listing.reverse();
    let b = plan(&l, &Rules::defaults(), &listing, "s3://b/fleet", now());
    assert_eq!(a, b);
    assert_eq!(a.moves[0].target, "fleet/datasets/card-images/c0.png");
    assert_eq!(Plan::decode(&a.encode()).unwrap(), a);
    assert_eq!(a.journal_id().unwrap(), b.journal_id().unwrap());
    assert!(a.journal_id().unwrap().as_str().starts_with("m-20261128-"));
    let c = plan(&l, &Rules::defaults(), &listing[1..], "s3://b/fleet", now());
    assert_ne!(a.journal_id().unwrap(), c.journal_id().unwrap());
    assert_eq!(a.bytes(), (0..50).sum::<u64>());

    let mut wrong = a.clone();
    wrong.schema = "other/v9".into();
    let err = Plan::decode(&wrong.encode()).unwrap_err().to_string();
    assert!(err.contains("other/v9"), "{err}");
    assert!(Plan::decode(b"{").is_err());
    assert!(matches!(
        Plan::decode(&vec![b' '; MAX_JOURNAL_OBJECT + 1]),
        Err(MigrationError::TooLarge { .. })
    ));
}

#[test]
fn bad_names_are_cleaned_or_reported() {
    let l = Layout::new("").unwrap();
    let listing = vec![
        obj("data/raw/card_images/Charizard ex (4).png", 1, "a"),
        obj("data/raw/card_images//double.png", 2, "b"),
        obj("data/raw/card_images/../escape.png", 3, "c"),
        obj("data/raw/card_images/", 0, "d"),
        obj("scratch/notes.txt", 4, "e"),
        // A listing without an entity tag still moves a key that meets no other.
        Listed {
            key: "data/calibration/untagged.png".into(),
            size: 5,
            etag: None,
        },
    ];
    let p = plan(&l, &Rules::defaults(), &listing, "s3://b", now());
    assert_eq!(
        target_of(&p, "data/calibration/untagged.png"),
        Some("datasets/hailo-calibration/untagged.png")
    );
    assert_eq!(
        target_of(&p, "data/raw/card_images/Charizard ex (4).png"),
        Some("datasets/card-images/Charizard-ex-(4).png")
    );
    assert_eq!(
        target_of(&p, "data/raw/card_images//double.png"),
        Some("datasets/card-images/double.png")
    );
    assert!(
        reason_of(&p, "data/raw/card_images/../escape.png")
            .unwrap()
            .contains("..")
    );
    assert!(
        reason_of(&p, "data/raw/card_images/")
            .unwrap()
            .contains("folder marker")
    );
    assert_eq!(
        reason_of(&p, "scratch/notes.txt"),
        Some("no rule places it")
    );
}

#[test]
fn keys_meeting_at_one_target_must_agree() {
    let l = Layout::new("").unwrap();
    let p = plan(
        &l,
        &Rules::defaults(),
        &[
            // The same reference DB at the root and in the project folder (seed 003 copied it).
            obj("data/reference/index.json", 5, "same"),
            obj(
                "project/pokemon-card-recognition/data/reference/index.json",
                5,
                "same",
            ),
            // Two different metadata.json files.
            obj("data/reference/metadata.json", 5, "one"),
            obj(
                "project/pokemon-card-recognition/data/reference/metadata.json",
                5,
                "two",
            ),
            // A target that exists already, with the same and with other content.
            obj("data/calibration/a.png", 7, "x"),
            obj("datasets/hailo-calibration/a.png", 7, "x"),
            obj("data/calibration/b.png", 7, "x"),
            obj("datasets/hailo-calibration/b.png", 7, "y"),
        ],
        "s3://b",
        now(),
    );
    for s in [
        "data/reference/index.json",
        "project/pokemon-card-recognition/data/reference/index.json",
    ] {
        assert_eq!(target_of(&p, s), Some("datasets/reference-db/index.json"));
    }
    for s in [
        "data/reference/metadata.json",
        "project/pokemon-card-recognition/data/reference/metadata.json",
    ] {
        assert!(
            reason_of(&p, s).unwrap().contains("different content"),
            "{s}"
        );
    }
    let a = p
        .moves
        .iter()
        .find(|m| m.source == "data/calibration/a.png")
        .unwrap();
    assert!(a.target_existed);
    assert!(
        reason_of(&p, "data/calibration/b.png")
            .unwrap()
            .contains("already exists")
    );
    assert_eq!(p.in_place, 2);
}

#[test]
fn rules_files_come_first_and_are_checked() {
    let specs = vec![
        RuleSpec {
            from: "data/reference/".into(),
            suffix: Some(".index".into()),
            to: "datasets/search-index/v1".into(),
        },
        RuleSpec {
            from: "legacy/cars".into(),
            suffix: None,
            to: "models/compilation/cars/rpi5/".into(),
        },
    ];
    let rules = Rules::with_defaults(&specs).unwrap();
    let l = Layout::new("").unwrap();
    let p = plan(
        &l,
        &rules,
        &[
            obj("data/reference/usearch.index", 1, "a"),
            obj("data/reference/index.json", 1, "b"),
            obj("legacy/cars/x/y.hef", 1, "c"),
        ],
        "s3://b",
        now(),
    );
    assert_eq!(
        target_of(&p, "data/reference/usearch.index"),
        Some("datasets/search-index/v1/usearch.index")
    );
    assert_eq!(
        target_of(&p, "data/reference/index.json"),
        Some("datasets/reference-db/index.json")
    );
    assert_eq!(
        target_of(&p, "legacy/cars/x/y.hef"),
        Some("models/compilation/cars/rpi5/x/y.hef")
    );

    let bad = |from: &str, suffix: Option<&str>, to: &str| {
        Rules::new(&[
            specs[0].clone(),
            RuleSpec {
                from: from.into(),
                suffix: suffix.map(Into::into),
                to: to.into(),
            },
        ])
        .unwrap_err()
        .to_string()
    };
    let e = bad("a//b", None, "datasets/x");
    assert!(e.starts_with("rule 1 (from \"a//b\")"), "{e}");
    assert!(bad("a", None, "deployments/x").contains("expected datasets/NAME"));
    assert!(bad("a", None, "datasets/b c").contains("' '"));
    assert!(bad("a", None, "models/compilation/job").contains("expected"));
    assert!(bad("migration/x", None, "datasets/x").contains("journals"));
    assert!(bad("a", Some(""), "datasets/x").contains("suffix"));
}

fn copied(source: &str, target: &str, created: bool, at: Timestamp) -> Record {
    Record::Copied {
        source: source.into(),
        target: target.into(),
        size: 1,
        etag: Some("e".into()),
        target_etag: Some("e".into()),
        created,
        verified: VerifiedBy::Etag,
        at,
    }
}

#[test]
fn journal_state_replays_batches_in_order_and_ages_copies() {
    let j = Name::new("journal", "m-1").unwrap();
    let t0 = now();
    let t1 = t0 + SignedDuration::from_hours(30);
    let batches = vec![
        Batch::new(
            &j,
            1,
            vec![
                Record::Deleted {
                    source: "a".into(),
                    at: t1,
                },
                copied("c", "C", true, t1),
            ],
        ),
        Batch::new(
            &j,
            0,
            vec![copied("a", "A", true, t0), copied("b", "B", false, t0)],
        ),
    ];
    let round: Vec<Batch> = batches
        .iter()
        .map(|b| Batch::decode(&b.encode(), &j).unwrap())
        .collect();
    assert_eq!(round, batches);
    let s = JournalState::replay(batches);
    assert_eq!(s.next_seq, 2);
    assert_eq!(s.copied.len(), 3);
    assert!(s.deleted.contains("a"));
    // b is 30 h old; c was copied just now; a is already deleted.
    let ready: Vec<_> = s
        .finalizable(t1, SignedDuration::from_hours(24))
        .into_iter()
        .map(|r| match r {
            Record::Copied { source, .. } => source.clone(),
            _ => String::new(),
        })
        .collect();
    assert_eq!(ready, ["b"]);
    assert_eq!(s.finalizable(t1, SignedDuration::ZERO).len(), 2);
    assert_eq!(s.migrating_sources(), ["b", "c"].into_iter().collect());

    let mut s = s;
    assert!(!s.rolled_back());
    s.apply(Record::Restored {
        source: "a".into(),
        at: t1,
    });
    s.apply(Record::Removed {
        target: "A".into(),
        at: t1,
    });
    assert!(!s.rolled_back(), "C was created and is still there");
    s.apply(Record::Removed {
        target: "C".into(),
        at: t1,
    });
    assert!(s.rolled_back(), "B existed before the migration and stays");

    let other = Name::new("journal", "m-2").unwrap();
    let e = Batch::decode(&Batch::new(&other, 0, vec![]).encode(), &j).unwrap_err();
    assert!(matches!(e, MigrationError::WrongJournal { .. }), "{e}");
}

#[test]
fn journal_keys_are_built_by_the_layout_and_read_back() {
    let l = Layout::new("fleet").unwrap();
    let j = Name::new("journal", "m-20261128-00ff").unwrap();
    let k = l.journal_batch(&j, 42);
    assert_eq!(
        k,
        "fleet/migration/m-20261128-00ff/batch-00000000000000000042.json"
    );
    assert_eq!(batch_seq(&l, &j, &k), Some(42));
    assert_eq!(batch_seq(&l, &j, &l.journal_plan(&j)), None);
    let other = Name::new("journal", "m-other").unwrap();
    assert_eq!(batch_seq(&l, &other, &k), None);
    assert_eq!(
        batch_seq(&l, &j, "fleet/migration/m-20261128-00ff/batch-42.json"),
        None
    );
    assert!(k.starts_with(&l.journal_dir(&j)));
}

#[test]
fn an_object_is_found_under_its_old_or_new_key() {
    let l = Layout::new("").unwrap();
    let p = plan(
        &l,
        &Rules::defaults(),
        &[obj("data/reference/usearch.index", 1, "a")],
        "s3://b",
        now(),
    );
    assert_eq!(
        alternate(&p, "data/reference/usearch.index"),
        Some("datasets/reference-db/usearch.index")
    );
    assert_eq!(
        alternate(&p, "datasets/reference-db/usearch.index"),
        Some("data/reference/usearch.index")
    );
    assert_eq!(alternate(&p, "data/reference/other"), None);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// A plan and a journal batch, damaged: decoding never panics, and whatever still decodes encodes and
    /// decodes back to itself (a batch only for its own journal).
    #[test]
    fn damaged_plans_and_journal_batches_never_panic_and_decode_consistently(
        which_batch: bool,
        edits in proptest::collection::vec(
            (proptest::prelude::any::<u32>(), proptest::prelude::any::<u8>(), 0u8..3),
            1..6,
        ),
    ) {
        let j = Name::new("journal", "m-1").unwrap();
        let t0 = now();
        if which_batch {
            let batch = Batch::new(
                &j,
                3,
                vec![
                    copied("data/a.png", "datasets/a.png", true, t0),
                    Record::Deleted { source: "data/a.png".into(), at: t0 },
                ],
            );
            let mut bytes = batch.encode();
            crate::testdata::mutate(&mut bytes, &edits);
            if let Ok(b) = Batch::decode(&bytes, &j) {
                proptest::prop_assert_eq!(b.journal.as_str(), j.as_str());
                proptest::prop_assert_eq!(Batch::decode(&b.encode(), &j).ok(), Some(b));
            }
        } else {
            let plan = Plan {
                schema: PLAN_SCHEMA.into(),
                origin: "s3://cards/fleet".into(),
                created_at: t0,
                in_place: 4,
                moves: vec![Move {
                    source: "data/reference/usearch.index".into(),
                    target: "datasets/reference/usearch.index".into(),
                    size: 13,
                    etag: Some("d".into()),
                    target_existed: false,
                }],
                unplaced: vec![Unplaced { key: "notes.txt".into(), reason: "no rule".into() }],
            };
            let mut bytes = plan.encode();
            crate::testdata::mutate(&mut bytes, &edits);
            if let Ok(p) = Plan::decode(&bytes) {
                proptest::prop_assert_eq!(p.schema.as_str(), PLAN_SCHEMA);
                proptest::prop_assert_eq!(Plan::decode(&p.encode()).ok(), Some(p));
            }
        }
    }
}
