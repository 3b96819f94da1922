//! An agent keeping itself in sync with a real S3 server (s3s-fs in-process, spoken to by aws-sdk-s3):
//! it resolves current.json, fetches only what it misses, activates; keeps serving when S3 goes away;
//! refuses a replayed older manifest; and restarts offline from its store.

use deckhand_agent::release::ReleaseFiles;
use deckhand_protocol::layout::Name;
use deckhand_tests::fixtures::{
    self, Perturbation, ReferenceSpec, card_image, encode_jpeg, perturb,
};
use deckhand_tests::{AgentOptions, Credentials, Fleet, secs, shop};

const CARD: usize = 6;

/// A shop with one agent (no peers) serving version 1 of a reference release.
async fn one_agent_on_v1(name: &str) -> (Fleet, ReleaseFiles, ReferenceSpec) {
    let mut fleet = shop(name).without_peers().start().await.unwrap();
    let spec = ReferenceSpec::small(40);
    let files = fixtures::write_reference_release(&fleet.join("release"), &spec).unwrap();
    fleet.publish(&files).await.unwrap();
    fleet.s3().stats().reset();
    fleet.start_agent("pi").await.unwrap();
    fleet.agents[0]
        .wait_for(secs(60), "version 1 active", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    (fleet, files, spec)
}

fn photo() -> Vec<u8> {
    encode_jpeg(&perturb(&card_image(CARD, 0), Perturbation::Crop, 2), 85)
}

/// Version 2 of `files`: one card renamed in metadata.json.
fn renamed(fleet: &Fleet, files: &ReleaseFiles, spec: &ReferenceSpec) -> ReleaseFiles {
    deckhand_tests::with_card_renamed(fleet, files, spec, CARD, "Card six, second print")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_follows_s3_and_fetches_only_what_changed() {
    let (fleet, files, spec) = one_agent_on_v1("agent-sync").await;
    let agent = &fleet.agents[0];
    // Identical chunks anywhere in the release (the HEF and the ONNX carry the same weights) cross the
    // uplink once, and packed: what the agent needs from S3 is the release's unique chunks as the
    // blobs' packs store them (the text compressed, the weights as they are), plus the manifest, the
    // chunk maps and the packs' headers.
    let unique_bytes = deckhand_tests::unique_chunk_bytes(&files);
    let packed = deckhand_tests::packed_chunk_bytes(&files);
    assert!(packed < unique_bytes, "{packed} of {unique_bytes}");
    let sent = fleet.s3().stats().bytes_sent();
    assert!(
        sent >= packed && sent < packed + 100_000,
        "S3 sent {sent} bytes for {unique_bytes} unique bytes of release, {packed} packed"
    );
    // The agent counts what the ranges carried (a range over a chunk a blob holds twice carries it
    // twice), all of which S3 sent.
    let s = agent.status().await.unwrap();
    assert!(
        (packed..=sent).contains(&s.bytes_from_origin),
        "{} from the origin, {packed} packed, {sent} sent",
        s.bytes_from_origin
    );
    let (code, answer) = agent.recognize(&photo()).await.unwrap();
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        (
            answer["card_id"].as_str(),
            answer["manifest_version"].as_u64()
        ),
        (Some(spec.card_id(CARD).as_str()), Some(1))
    );

    // Version 2 changes only metadata.json: only its changed chunks cross the uplink.
    let v2 = renamed(&fleet, &files, &spec);
    fleet.publish(&v2).await.unwrap();
    fleet.s3().stats().reset();
    agent
        .wait_for(secs(60), "version 2 active", |s| {
            s.active_version() == Some(2)
        })
        .await
        .unwrap();
    let meta_len = std::fs::metadata(&v2.metadata).unwrap().len();
    let sent = fleet.s3().stats().bytes_sent();
    assert!(
        sent < meta_len + 100_000,
        "S3 sent {sent} bytes for a change in a {meta_len}-byte file"
    );
    let (_, answer) = agent.recognize(&photo()).await.unwrap();
    assert_eq!(answer["metadata"]["name"], "Card six, second print");
}

/// A release that edits the active one crosses the uplink as patches against it: each chunk the Pi
/// lacks, compressed with the bytes of the active release's blob around its place as dictionary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_crosses_the_uplink_as_patches_against_the_release_the_pi_serves() {
    use deckhand_protocol::{ChunkMap, delta, pack};
    let (fleet, files, spec) = one_agent_on_v1("agent-sync-delta").await;
    let agent = &fleet.agents[0];
    let before = agent.status().await.unwrap().bytes_from_origin;
    let v2 = renamed(&fleet, &files, &spec);
    fleet.s3().stats().reset();
    fleet.publish(&v2).await.unwrap();
    agent
        .wait_for(secs(60), "version 2 active", |s| {
            s.active_version() == Some(2)
        })
        .await
        .unwrap();
    let (old, new) = (
        std::fs::read(&files.metadata).unwrap(),
        std::fs::read(&v2.metadata).unwrap(),
    );
    let held: std::collections::HashSet<_> = files
        .paths()
        .iter()
        .flat_map(|p| {
            let map = ChunkMap::build(&std::fs::read(p).unwrap());
            map.chunks().iter().map(|c| c.id).collect::<Vec<_>>()
        })
        .collect();
    let map = ChunkMap::build(&new);
    let missing: Vec<_> = map
        .chunks()
        .iter()
        .filter(|c| !held.contains(&c.id))
        .collect();
    let d = delta::build(
        &map,
        &new,
        deckhand_protocol::BlobId::of(&old),
        &old,
        |c| !held.contains(&c.id),
        pack::PACK_LEVEL,
    )
    .unwrap();
    let patches = d.len() as u64 - delta::header_len(&map);
    let packed: u64 = missing
        .iter()
        .map(|c| {
            pack::pack_chunk(
                &new[c.range().start as usize..c.range().end as usize],
                pack::PACK_LEVEL,
            )
            .len() as u64
        })
        .sum();
    // The origin sent the new chunk map and the patches.
    let s = agent.status().await.unwrap();
    assert_eq!(
        s.bytes_from_origin - before,
        map.encode().len() as u64 + patches,
        "{s:?}"
    );
    assert!(
        patches * 4 < packed,
        "{patches} bytes of patches for {packed} packed ({} raw)",
        missing.iter().map(|c| u64::from(c.len)).sum::<u64>()
    );
    let layout = fleet.origin().layout();
    let ranges = fleet.s3().stats().ranges();
    let key = layout.delta(&map.id(), &deckhand_protocol::BlobId::of(&old));
    assert!(ranges.iter().any(|(k, _)| *k == key), "{ranges:?}");
    assert!(
        !ranges
            .iter()
            .any(|(k, _)| *k == layout.pack(&map.id()) || *k == layout.blob(&map.blob())),
        "{ranges:?}"
    );
    let (_, answer) = agent.recognize(&photo()).await.unwrap();
    assert_eq!(answer["metadata"]["name"], "Card six, second print");
}

/// A delta pack or a pack that answers wrong bytes, or is another blob's, is set aside and the next
/// way tried (delta pack, then pack, then the blob itself): the release arrives whole, and the
/// origin's blob is not called damaged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_or_foreign_packs_are_set_aside_and_the_blob_itself_is_read() {
    use deckhand_protocol::{BlobId, ChunkMap, delta, pack};
    let (fleet, files, spec) = one_agent_on_v1("agent-sync-pack").await;
    let agent = &fleet.agents[0];
    let layout = fleet.origin().layout().clone();
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.metadata).unwrap()).unwrap();
    let mut base = std::fs::read(&files.metadata).unwrap();
    // A byte of every stored chunk flipped, the header intact.
    let flip = |mut body: Vec<u8>, parts: Vec<std::ops::Range<u64>>| {
        for p in parts {
            body[((p.start + p.end) / 2) as usize] ^= 0x5a;
        }
        body
    };
    for (version, damage) in [(2u64, "damaged"), (3, "foreign")] {
        let name = format!("Card six, print {version}");
        meta[spec.card_id(CARD)]["name"] = serde_json::json!(name);
        let mut next = files.clone();
        next.metadata = fleet.join(format!("metadata-v{version}.json"));
        std::fs::write(&next.metadata, meta.to_string()).unwrap();
        // The packs are in place before the publish, which keeps what it finds there.
        let bytes = std::fs::read(&next.metadata).unwrap();
        let map = ChunkMap::build(&bytes);
        let base_id = BlobId::of(&base);
        let (pack_body, delta_body) = match damage {
            "damaged" => {
                let p = pack::build(&map, &bytes, pack::PACK_LEVEL);
                let n = pack::header_len(&map) as usize;
                let index = pack::PackIndex::decode(&map, &p[..n]).unwrap();
                let mut parts = Vec::new();
                let mut at = n as u64;
                for i in 0..map.chunks().len() {
                    let len = index.stored_len(i).unwrap();
                    parts.push(at..at + len);
                    at += len;
                }
                let d = delta::build(&map, &bytes, base_id, &base, |_| true, 3).unwrap();
                let n = delta::header_len(&map) as usize;
                let index =
                    delta::DeltaIndex::decode(&map, base_id, base.len() as u64, &d[..n]).unwrap();
                let patches = (0..map.chunks().len())
                    .map(|i| index.patch(i).unwrap().0)
                    .collect();
                (flip(p, parts), flip(d, patches))
            }
            _ => {
                // Version 2's, under version 3's keys.
                let v2 = std::fs::read(fleet.join("metadata-v2.json")).unwrap();
                let v2_map = ChunkMap::build(&v2);
                let v1 = std::fs::read(&files.metadata).unwrap();
                let d = delta::build(&v2_map, &v2, BlobId::of(&v1), &v1, |_| true, 3).unwrap();
                (pack::build(&v2_map, &v2, pack::PACK_LEVEL), d)
            }
        };
        let o = fleet.origin();
        o.put(&layout.pack(&map.id()), pack_body.into())
            .await
            .unwrap();
        o.put(&layout.delta(&map.id(), &base_id), delta_body.into())
            .await
            .unwrap();
        fleet.s3().stats().reset();
        fleet.publish(&next).await.unwrap();
        let s = agent
            .wait_for(secs(60), "the next version active", |s| {
                s.active_version() == Some(version)
            })
            .await
            .unwrap();
        assert_eq!(s.last_error, None, "{damage}: {s:?}");
        let (code, answer) = agent.recognize(&photo()).await.unwrap();
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["metadata"]["name"], name.as_str(), "{damage}");
        // The changed chunks came from the blob itself.
        let blob = layout.blob(&map.blob());
        let ranges = fleet.s3().stats().ranges();
        assert!(
            ranges.iter().any(|(k, _)| *k == blob),
            "{damage}: nothing read from {blob}: {ranges:?}"
        );
        base = bytes;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_keeps_serving_when_s3_goes_away_and_refuses_a_replayed_manifest() {
    let (fleet, files, spec) = one_agent_on_v1("agent-offline-replay").await;
    let agent = &fleet.agents[0];
    let v1_envelope = fleet
        .origin()
        .get(
            &fleet
                .origin()
                .layout()
                .current(&Name::deployment("shop-1").unwrap()),
        )
        .await
        .unwrap();
    fleet
        .publish(&renamed(&fleet, &files, &spec))
        .await
        .unwrap();
    agent
        .wait_for(secs(60), "version 2 active", |s| {
            s.active_version() == Some(2)
        })
        .await
        .unwrap();

    // S3 goes away: recognition goes on, status says offline since when.
    fleet.s3().set_down(true);
    let status = agent
        .wait_for(secs(30), "offline_since", |s| s.offline_since.is_some())
        .await
        .unwrap();
    assert_eq!(status.active_version(), Some(2));
    let (code, answer) = agent.recognize(&photo()).await.unwrap();
    assert_eq!((code, answer["manifest_version"].as_u64()), (200, Some(2)));

    // S3 comes back with a replayed older manifest: refused (status names it), version 2 keeps
    // serving.
    fleet.s3().set_down(false);
    fleet
        .origin()
        .put(
            &fleet
                .origin()
                .layout()
                .current(&Name::deployment("shop-1").unwrap()),
            v1_envelope,
        )
        .await
        .unwrap();
    let status = agent
        .wait_for(secs(30), "the replay refused", |s| {
            s.offline_since.is_none() && s.last_refused_manifest.is_some()
        })
        .await
        .unwrap();
    let refused = status.last_refused_manifest.clone().unwrap_or_default();
    assert!(refused.contains("version 1"), "{refused}");
    assert_eq!(status.active_version(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_while_s3_is_unreachable_serves_from_its_store() {
    let (mut fleet, _files, spec) = one_agent_on_v1("agent-restart-offline").await;
    fleet.agents.remove(0).stop().await.unwrap();
    fleet.s3().set_down(true);
    let agent = fleet.start_agent("pi").await.unwrap();
    let (code, answer) = agent.recognize(&photo()).await.unwrap();
    assert_eq!(
        (
            code,
            answer["card_id"].as_str(),
            answer["manifest_version"].as_u64()
        ),
        (200, Some(spec.card_id(CARD).as_str()), Some(1)),
        "{answer}"
    );
    agent
        .wait_for(secs(30), "offline_since after restart", |s| {
            s.offline_since.is_some()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_an_error_in_status_not_offline() {
    let mut fleet = shop("agent-denied").without_peers().start().await.unwrap();
    let files =
        fixtures::write_reference_release(&fleet.join("release"), &ReferenceSpec::small(20))
            .unwrap();
    fleet.publish(&files).await.unwrap();
    fleet
        .start_agent_with(AgentOptions {
            name: "pi".into(),
            origin: true,
            credentials: Credentials::None,
            env: vec![("AWS_SECRET_ACCESS_KEY", "not-the-secret".into())],
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    let s = fleet.agents[0]
        .wait_for(secs(30), "the refusal in status", |s| {
            s.last_error.is_some()
        })
        .await
        .unwrap();
    let err = s.last_error.clone().unwrap_or_default();
    assert!(
        err.contains("refused (403)") && err.contains("credentials"),
        "{err}"
    );
    assert_eq!(
        s.offline_since, None,
        "a refusal is not being offline: {s:?}"
    );
    assert_eq!(s.active, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_gib_current_json_at_the_origin_is_refused_without_being_read() {
    let (fleet, _files, _spec) = one_agent_on_v1("origin-endless").await;
    // current.json becomes 2 GiB (sparse: no disk used). s3s-fs keeps each object's ETag in a file
    // beside it; without it, the server computes a new one, so the agent sees a change.
    let key = deckhand_protocol::layout::Layout::new("fleet")
        .unwrap()
        .current(&Name::deployment("shop-1").unwrap());
    let path = fleet.s3().bucket_dir().join(&key);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let etag_file = fleet.s3().bucket_dir().parent().unwrap().join(format!(
        ".bucket-{}.object-{}.internal.json",
        b64(fleet.s3().bucket()),
        b64(&key)
    ));
    std::fs::remove_file(&etag_file).unwrap();
    let st = fleet.agents[0]
        .wait_for(secs(60), "the oversized current.json refused", |s| {
            s.last_error.as_deref().is_some_and(|e| {
                e.contains("current.json") && e.contains("2147483648 bytes, over the limit")
            })
        })
        .await
        .unwrap();
    assert_eq!(st.active_version(), Some(1));
    let (code, answer) = fleet.agents[0].recognize(&photo()).await.unwrap();
    assert_eq!(code, 200, "{answer}");
    // Memory stayed bounded: the agent's peak resident set is far below the object's size.
    let pid = fleet.agents[0].pid().unwrap();
    let peak_kib = deckhand_tests::peak_rss_kib(pid);
    assert!(peak_kib < 512 * 1024, "peak RSS {peak_kib} KiB");
    // cpu_threads' default: one image may use every core, through a pool of that many threads.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(
        deckhand_tests::threads_named(pid, "deckhand-cpu-"),
        if cores > 1 { cores } else { 0 },
        "the CPU backend's pool has a thread per core"
    );
}

/// Writes `body` over the object `key` in the local S3's bucket, as someone with write access to the
/// bucket would (s3s-fs keeps an object's entity tag beside it; without it, a new one is computed).
fn overwrite_object(fleet: &Fleet, key: &str, body: &[u8]) {
    std::fs::write(fleet.s3().bucket_dir().join(key), body).unwrap();
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let _ = std::fs::remove_file(fleet.s3().bucket_dir().parent().unwrap().join(format!(
        ".bucket-{}.object-{}.internal.json",
        b64(fleet.s3().bucket()),
        b64(key)
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_swapped_at_the_origin_are_refused_and_version_1_keeps_serving() {
    use deckhand_protocol::manifest::Role;
    let (mut fleet, files, spec) = one_agent_on_v1("origin-swapped").await;
    let meta1_blob = deckhand_protocol::BlobId::of(&std::fs::read(&files.metadata).unwrap());
    // The agent is off while version 2 is published and its objects are tampered with.
    let dir = fleet.join("pi");
    fleet.agents.remove(0).stop().await.unwrap();
    let v2 = fleet
        .publish(&renamed(&fleet, &files, &spec))
        .await
        .unwrap()
        .manifest;
    let layout = fleet.origin().layout().clone();
    let meta2 = v2.artifact(Role::Metadata).unwrap().clone();
    assert_ne!(meta1_blob, meta2.blob);
    let map_key = layout.blob(&meta2.chunk_map);
    let blob_key = layout.blob(&meta2.blob);
    let map_good = std::fs::read(fleet.s3().bucket_dir().join(&map_key)).unwrap();
    let blob_good = std::fs::read(fleet.s3().bucket_dir().join(&blob_key)).unwrap();

    // 1. Version 2's chunk map becomes one claiming 10^9 chunks (its header's count field).
    let mut huge = map_good.clone();
    huge[57..61].copy_from_slice(&1_000_000_000u32.to_le_bytes());
    overwrite_object(&fleet, &map_key, &huge);
    fleet
        .start_agent_with(AgentOptions {
            name: "pi".into(),
            origin: true,
            credentials: Credentials::None,
            ..AgentOptions::default()
        })
        .await
        .unwrap();
    let pi = &fleet.agents[0];
    let s = pi
        .wait_for(secs(60), "the forged chunk map refused", |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains(&meta2.chunk_map.to_string()))
        })
        .await
        .unwrap();
    assert_eq!(s.active_version(), Some(1), "{s:?}");
    let (code, answer) = pi.recognize(&photo()).await.unwrap();
    assert_eq!((code, answer["manifest_version"].as_u64()), (200, Some(1)));
    let peak_kib = deckhand_tests::peak_rss_kib(pi.pid().unwrap());
    assert!(peak_kib < 512 * 1024, "peak RSS {peak_kib} KiB");

    let pi = &fleet.agents[0];
    // 2. The chunk map is whole again, but version 2's metadata object is version 1's metadata (another
    //    release's blob), its pack version 1's pack and its delta pack gone (the packs set aside for
    //    the blob: one is another chunk map's, the other missing): every range of the blob is
    //    refused, status names it, version 1 serves on.
    let meta1_pack = layout
        .pack(&deckhand_protocol::ChunkMap::build(&std::fs::read(&files.metadata).unwrap()).id());
    let pack_key = layout.pack(&meta2.chunk_map);
    let pack_good = std::fs::read(fleet.s3().bucket_dir().join(&pack_key)).unwrap();
    let delta_key = layout.delta(&meta2.chunk_map, &meta1_blob);
    let delta_good = std::fs::read(fleet.s3().bucket_dir().join(&delta_key)).unwrap();
    std::fs::remove_file(fleet.s3().bucket_dir().join(&delta_key)).unwrap();
    overwrite_object(
        &fleet,
        &pack_key,
        &std::fs::read(fleet.s3().bucket_dir().join(meta1_pack)).unwrap(),
    );
    overwrite_object(
        &fleet,
        &blob_key,
        &std::fs::read(fleet.s3().bucket_dir().join(layout.blob(&meta1_blob))).unwrap(),
    );
    // Last, so that no download starts before the rest is in place.
    overwrite_object(&fleet, &map_key, &map_good);
    let s = pi
        .wait_for(secs(60), "the swapped blob refused", |s| {
            s.last_error.as_deref().is_some_and(|e| {
                e.contains(&meta2.blob.to_string()) && e.contains("another release's")
            })
        })
        .await
        .unwrap();
    assert_eq!(s.active_version(), Some(1), "{s:?}");
    assert!(
        deckhand_tests::metric(pi, "deckhand_origin_ranges_failed_total{why=\"bad\"}").await >= 1
    );
    let (code, answer) = pi.recognize(&photo()).await.unwrap();
    assert_eq!((code, answer["manifest_version"].as_u64()), (200, Some(1)));

    // 3. The operator repairs the bucket: version 2 completes, with nothing lost on the way.
    overwrite_object(&fleet, &blob_key, &blob_good);
    overwrite_object(&fleet, &pack_key, &pack_good);
    overwrite_object(&fleet, &delta_key, &delta_good);
    let s = pi
        .wait_for(secs(120), "version 2 active", |s| {
            s.active_version() == Some(2)
        })
        .await
        .unwrap();
    assert!(s.last_error.is_none(), "{s:?}");
    fleet.agents.remove(0).stop().await.unwrap();
    deckhand_tests::verify_store(&dir);
}

/// An agent's threads share glibc's one main malloc arena (an idle Pi's heap otherwise lay scattered
/// over a dozen: agent/src/systemd.rs, `MALLOC_ARENAS`), unless the operator's `GLIBC_TUNABLES` says
/// otherwise, which then stands (and shows the count sees arenas where there are some).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_threads_share_one_malloc_arena_unless_the_operator_tunes_it() {
    let (mut fleet, _files, spec) = one_agent_on_v1("malloc-arenas").await;
    fleet
        .start_agent_with(AgentOptions {
            name: "tuned".into(),
            origin: true,
            credentials: Credentials::None,
            env: vec![("GLIBC_TUNABLES", "glibc.malloc.arena_max=8".into())],
            ..Default::default()
        })
        .await
        .unwrap();
    fleet
        .wait_all(secs(60), "version 1 active", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    let mut arenas = Vec::new();
    for agent in &fleet.agents {
        // Every thread has allocated by now: the sync, the store's, the recognizer's.
        let (code, answer) = agent.recognize(&photo()).await.unwrap();
        assert_eq!(code, 200, "{}: {answer}", agent.name);
        assert_eq!(
            answer["card_id"].as_str(),
            Some(spec.card_id(CARD).as_str())
        );
        let pid = agent.pid().unwrap();
        arenas.push(deckhand_tests::malloc_arenas_besides_main(pid));
    }
    assert_eq!(
        arenas[0], 0,
        "the default agent's arenas besides the main one"
    );
    assert!(
        arenas[1] >= 1,
        "with arena_max=8 the agent has {} arenas besides the main one",
        arenas[1]
    );
    fleet.stop().await.unwrap();
}
