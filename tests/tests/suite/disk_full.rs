//! A full SD card, for real: the agent's data directory is a small tmpfs this test mounts, so the disk
//! fills (ENOSPC), not a configured budget. The active release keeps serving; status and /metrics say the
//! disk is full and how much the pending release needs; the store verifies clean; once the disk grows the
//! release completes without S3 sending anything twice. A card with not a byte free at boot still serves.

use deckhand_tests::fixtures::{self, Perturbation, ReferenceSpec};
use deckhand_tests::{AgentOptions, Credentials, MIB, secs, shop};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for the test, unmounted (lazily, so a still-running process cannot keep it) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size_mib: u64) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m"),
                "deckhand-sd",
            ])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {} (the test needs root): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_owned())
    }

    fn resize(&self, size_mib: u64) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size_mib}m")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `path` until the file system has no byte left (ENOSPC).
fn fill_up(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0xEEu8; 64 * 1024];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // The last partial block, byte by byte.
    while f.write(&[0xEE]).is_ok_and(|n| n == 1) {}
    let _ = f.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sd_card_keeps_serving_says_what_it_needs_and_resumes_without_refetching() {
    let mut fleet = shop("disk-full").start().await.unwrap();
    let spec = ReferenceSpec::small(40);
    let (d1, d2) = (fleet.join("release-1"), fleet.join("release-2"));
    let (s1, s2) = (spec.clone(), spec.clone());
    let v1 =
        tokio::task::spawn_blocking(move || fixtures::write_sized_release(&d1, &s1, 4 * MIB, 1))
            .await
            .unwrap()
            .unwrap();
    let v2 =
        tokio::task::spawn_blocking(move || fixtures::write_sized_release(&d2, &s2, 24 * MIB, 2))
            .await
            .unwrap()
            .unwrap();

    // The Pi's SD card: 16 MiB, room for version 1 but not for version 2 beside it.
    let card = fleet.join("pi");
    let sd = Tmpfs::mount(&card, 16);
    fleet.publish(&v1).await.unwrap();
    let opts = AgentOptions {
        name: "pi".into(),
        origin: true,
        credentials: Credentials::None,
        ..AgentOptions::default()
    };
    fleet.start_agent_with(opts.clone()).await.unwrap();
    let pi = fleet.agent(0);
    pi.wait_for(secs(60), "version 1 active", |s| {
        s.active_version() == Some(1)
    })
    .await
    .unwrap();

    fleet.s3().stats().reset();
    let published = fleet.publish(&v2).await.unwrap();
    let v2_bytes = published.manifest.total_bytes();
    let pi = fleet.agent(0);
    let status = pi
        .wait_for(secs(60), "the disk reported full", |s| {
            s.disk_full.is_some()
        })
        .await
        .unwrap();
    let full = status.disk_full.clone().unwrap();
    assert_eq!(status.active_version(), Some(1), "version 1 keeps serving");
    assert_eq!(status.pending.as_ref().map(|p| p.version), Some(2));
    assert!(
        full.bytes_needed > full.bytes_free && full.bytes_needed <= v2_bytes,
        "needs {} of a {v2_bytes}-byte release, {} free",
        full.bytes_needed,
        full.bytes_free
    );
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("No space left on device")),
        "{:?}",
        status.last_error
    );
    assert!(
        status.summary_line().contains("disk full: needs"),
        "{}",
        status.summary_line()
    );
    let metrics = deckhand_tests::metrics_text(pi).await;
    assert!(metrics.contains("deckhand_disk_full 1"), "{metrics}");
    assert!(
        metrics.contains(&format!("deckhand_disk_bytes_needed {}", full.bytes_needed)),
        "{metrics}"
    );
    // Recognition goes on.
    let photo = fixtures::encode_jpeg(
        &fixtures::perturb(&fixtures::card_image(5, 0), Perturbation::Noise, 1),
        85,
    );
    let (code, answer) = pi.recognize(&photo).await.unwrap();
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["card_id"], spec.card_id(5));
    assert_eq!(answer["manifest_version"], 1);

    // The store is consistent: stop the agent and verify it.
    let agent = fleet.agents.remove(0);
    agent.stop().await.unwrap();
    deckhand_tests::verify_store(&card);

    // Booting on a card with not one byte free (a log grew into the rest, say): the agent starts,
    // serves version 1 and says the disk is full. A download begun before (a 4 MiB blob) whose partial
    // file went missing must be recreated at open, and cannot be: it is dropped, to be fetched again
    // when there is room.
    let begun = deckhand_protocol::testdata::noise(99, 4 * MIB as usize);
    {
        let store = deckhand_store::Store::open(card.join("store"), Default::default()).unwrap();
        let map = deckhand_protocol::ChunkMap::build(&begun);
        store.begin(&map).unwrap();
        std::fs::remove_file(card.join("store").join("partial").join(map.blob().to_hex())).unwrap();
    }
    let filler = card.join("filler");
    fill_up(&filler);
    if let Err(e) = fleet.start_agent_with(opts.clone()).await {
        panic!(
            "{e}: {}",
            std::fs::read_to_string(fleet.join("logs").join("pi.log")).unwrap_or_default()
        );
    }
    let pi = fleet.agent(0);
    let status = pi
        .wait_for(secs(60), "version 1 served from a full card", |s| {
            s.active_version() == Some(1) && s.disk_full.is_some()
        })
        .await
        .unwrap();
    assert!(
        status
            .store_repair
            .as_deref()
            .is_some_and(|r| r.contains("1 partial download(s) dropped")),
        "{status:?}"
    );
    let (code, answer) = pi.recognize(&photo).await.unwrap();
    assert_eq!(
        (code, answer["manifest_version"].as_u64()),
        (200, Some(1)),
        "{answer}"
    );
    fleet.agents.remove(0).stop().await.unwrap();
    std::fs::remove_file(&filler).unwrap();
    deckhand_tests::verify_store(&card);

    // A bigger card: version 2 completes, and S3 sent no byte of it twice.
    sd.resize(96);
    fleet.start_agent_with(opts).await.unwrap();
    let pi = fleet.agent(0);
    let status = pi
        .wait_for(secs(120), "version 2 active", |s| {
            s.active_version() == Some(2)
        })
        .await
        .unwrap();
    assert!(status.disk_full.is_none(), "{:?}", status.disk_full);
    let sent = fleet.s3().stats().bytes_sent();
    assert!(
        sent <= v2_bytes + v2_bytes / 50,
        "S3 sent {sent} bytes for a {v2_bytes}-byte release: something was fetched twice"
    );
    println!(
        "disk full: needed {} bytes with {} free; after the resize S3 sent {sent} bytes for a {v2_bytes}-byte \
         release ({:.3}x)",
        full.bytes_needed,
        full.bytes_free,
        sent as f64 / v2_bytes as f64
    );
    fleet.stop().await.unwrap();
    drop(sd);
}
