//! A damaged or lost catalog (an SD card's failure mode) never stops the Pi: the store sets a damaged
//! catalog aside, rebuilds it from the blobs on disk (each hashed) and takes the floors, trust roots and
//! releases back from the catalog mirror, so the agent serves the release it served before without
//! downloading it again, and a replayed older manifest is still refused.

use deckhand_tests::fixtures::{self, ReferenceSpec};
use deckhand_tests::{AgentOptions, Credentials, Fleet, secs, shop};
use std::path::PathBuf;

fn pi() -> AgentOptions {
    AgentOptions {
        name: "pi-0".into(),
        origin: true,
        credentials: Credentials::None,
        ..AgentOptions::default()
    }
}

fn catalog(fleet: &Fleet) -> PathBuf {
    fleet.join("pi-0").join("store").join("catalog.sqlite")
}

/// Restarts pi-0 and waits until it serves version 2, has refused the replayed version 1 and says what
/// its store repaired; checks that nothing but small objects came from S3 and that it recognises.
async fn restarted_serves_version_2(fleet: &mut Fleet, repaired: &str, photo: &[u8]) {
    fleet.s3().stats().reset();
    fleet.start_agent_with(pi()).await.unwrap();
    let s = fleet.agents[0]
        .wait_for(secs(60), "version 2 served and version 1 refused", |s| {
            s.active_version() == Some(2)
                && s.last_refused_manifest.as_deref().is_some_and(|e| {
                    e.contains("version 1 is not above the highest accepted version 2")
                })
        })
        .await
        .unwrap();
    let repair = s.store_repair.clone().unwrap_or_default();
    assert!(
        repair.contains(repaired)
            && repair.contains("restored from the mirror")
            && repair.contains(", 0 quarantined"),
        "{s:?}"
    );
    assert!(s.summary_line().contains("store repaired"), "{s:?}");
    assert!(
        fleet.s3().stats().bytes_sent() < 64 * 1024,
        "the release was downloaded again: {} bytes",
        fleet.s3().stats().bytes_sent()
    );
    let (code, answer) = fleet.agents[0].recognize(photo).await.unwrap();
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["manifest_version"].as_u64(), Some(2), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_missing_catalog_is_rebuilt_from_the_blobs_and_keeps_the_floors() {
    let mut fleet = shop("catalog-repair")
        .without_peers()
        .start()
        .await
        .unwrap();
    let spec = ReferenceSpec::small(20);
    let files = fixtures::write_reference_release(&fleet.join("r1"), &spec).unwrap();
    let v1 = fleet.publish(&files).await.unwrap();
    let photo = std::fs::read(&files.canaries[0].0).unwrap();
    fleet.start_agent_with(pi()).await.unwrap();
    fleet.agents[0]
        .wait_for(secs(60), "version 1 active", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    let files2 = deckhand_tests::with_card_renamed(&fleet, &files, &spec, 3, "Card three, again");
    fleet.publish(&files2).await.unwrap();
    fleet.agents[0]
        .wait_for(secs(60), "version 2 active", |s| {
            s.active_version() == Some(2)
        })
        .await
        .unwrap();
    let current = fleet
        .origin()
        .layout()
        .current(&deckhand_protocol::layout::Name::deployment("shop-1").unwrap());

    // A bad sector: the catalog's first 4 KiB overwritten while the agent is down (before this change
    // the agent exited: "catalog: enable WAL: file is not a database"). The bucket meanwhile offers
    // version 1 again.
    fleet.agents.remove(0).stop().await.unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(catalog(&fleet))
            .unwrap();
        f.write_all_at(&[0x5A; 4096], 0).unwrap();
        f.sync_all().unwrap();
    }
    fleet
        .origin()
        .put(&current, v1.envelope.clone().into())
        .await
        .unwrap();
    restarted_serves_version_2(&mut fleet, "the catalog was damaged", &photo).await;
    assert!(
        deckhand_tests::quarantined(&fleet.join("pi-0"), "catalog-"),
        "the damaged catalog is kept"
    );

    // The catalog lost altogether (before this change recovery deleted every blob as an orphan and
    // forgot the floors): the same.
    fleet.agents.remove(0).stop().await.unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", catalog(&fleet).display()));
    }
    restarted_serves_version_2(&mut fleet, "the catalog was missing", &photo).await;
    fleet.stop().await.unwrap();
}
