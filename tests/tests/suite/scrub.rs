//! Bit rot in the live release, found while the agent runs: the background scrub re-hashes the active
//! release's blobs, quarantines one that no longer matches its id, fetches it again from S3 and reloads
//! the release from the repaired store; recognition answers throughout and status says what happened.

use deckhand_tests::fixtures::{self, ReferenceSpec};
use deckhand_tests::{AgentOptions, Credentials, secs, shop};
use std::os::unix::fs::FileExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrub_finds_bit_rot_in_the_live_index_and_fetches_it_again() {
    let mut fleet = shop("scrub").without_peers().start().await.unwrap();
    let spec = ReferenceSpec::small(20);
    let files = fixtures::write_reference_release(&fleet.join("r1"), &spec).unwrap();
    fleet.publish(&files).await.unwrap();
    let photo = std::fs::read(&files.canaries[0].0).unwrap();
    fleet
        .start_agent_with(AgentOptions {
            name: "pi-0".into(),
            origin: true,
            credentials: Credentials::None,
            // A fast scrub, for the test (the default is 512 MiB an hour).
            extra: vec!["--scrub-per-hour".into(), "64GiB".into()],
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    let pi = fleet.agent(0);
    let s = pi
        .wait_for(secs(60), "version 1 active and scrubbed once", |s| {
            s.active_version() == Some(1) && s.scrub.as_ref().is_some_and(|c| c.passes >= 1)
        })
        .await
        .unwrap();
    let switched = s.last_switch.clone().unwrap().switched_at;
    let index = s.releases[0]
        .artifacts
        .iter()
        .find(|a| a.role == "index")
        .unwrap()
        .blob
        .trim_start_matches("b3:")
        .to_owned();
    let path = fleet.join("pi-0").join("store").join("blobs").join(&index);

    // One byte of the usearch index (which the recognizer maps) rots in place.
    fleet.s3().stats().reset();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut byte = [0u8; 1];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut byte, len / 2)
        .unwrap();
    f.write_all_at(&[byte[0] ^ 0x20], len / 2).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let s = pi
        .wait_for(
            secs(60),
            "the rotten index found, fetched again and reloaded",
            |s| {
                s.scrub.as_ref().is_some_and(|c| c.quarantined == 1)
                    && s.last_switch
                        .as_ref()
                        .is_some_and(|w| w.switched_at != switched)
                    && s.pending.is_none()
            },
        )
        .await
        .unwrap();
    let found = s.scrub.clone().unwrap().last_found.unwrap();
    assert!(
        found.contains(&index) && found.contains("hash to"),
        "{found}"
    );
    assert!(
        s.summary_line().contains("scrub found blob"),
        "{}",
        s.summary_line()
    );
    assert_eq!(s.active_version(), Some(1));
    assert_eq!(
        blake3::hash(&std::fs::read(&path).unwrap())
            .to_hex()
            .as_str(),
        index,
        "the index is whole again"
    );
    // Fetched again from its pack.
    let packed = deckhand_tests::packed_len(&std::fs::read(&path).unwrap());
    let sent = fleet.s3().stats().bytes_sent();
    assert!(
        sent >= packed && sent < 4 * len + 256 * 1024,
        "S3 sent {sent} bytes for a {len}-byte blob ({packed} packed)"
    );
    assert!(
        deckhand_tests::quarantined(&fleet.join("pi-0"), &index),
        "the rotten copy is kept in quarantine"
    );
    let metrics = deckhand_tests::metrics_text(pi).await;
    assert!(
        metrics.contains("deckhand_scrub_quarantined_total 1"),
        "{metrics}"
    );
    let (code, answer) = pi.recognize(&photo).await.unwrap();
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["card_id"], files.canaries[0].1.as_str(), "{answer}");
    fleet.agents.remove(0).stop().await.unwrap();
    deckhand_tests::verify_store(&fleet.join("pi-0"));
    fleet.stop().await.unwrap();
}
