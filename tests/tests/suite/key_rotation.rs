//! A leaked or lost signing key, handled from the bucket: agents installed with the deployment's trust
//! root (`deckhand keys root`) follow the rotations the operator publishes (`deckhand keys rotate`, the
//! real CLI) without anyone touching a Pi. After a rotation the retired key's manifests are refused and
//! the new key's accepted; a root signed by too few of the previous keys, and an old root replayed, are
//! refused and change nothing; a Pi that was offline for three rotations catches up; and a Pi without S3
//! follows the roots on a USB stick.

use deckhand_protocol::SecretKey;
use deckhand_protocol::layout::Name;
use deckhand_protocol::root::{Role, Root};
use deckhand_tests::fixtures::{self, ReferenceSpec};
use deckhand_tests::{AgentOptions, Credentials, Fleet, deckhand_out, ok, secs, shop, stderr};
use std::path::{Path, PathBuf};

/// Writes key `n` as `ops-n.key` and returns it with its path.
fn key(fleet: &Fleet, n: u8) -> (SecretKey, PathBuf) {
    let k = SecretKey::from_seed(&[n; 32]);
    let path = fleet.join(format!("ops-{n}.key"));
    std::fs::write(&path, k.to_file_text()).unwrap();
    (k, path)
}

/// `deckhand keys rotate` at `origin` (the bucket, or a stick's `file://`) from the keys at `old` to the
/// keys at `new`: the new root's version.
fn rotate_at(fleet: &Fleet, origin: &str, old: &[&Path], new: &[&Path]) -> u64 {
    ok(&rotation(fleet, origin, old, new))["version"]
        .as_u64()
        .unwrap()
}

/// What `deckhand keys rotate --json` at `origin` from `old` to `new` printed.
fn rotation(fleet: &Fleet, origin: &str, old: &[&Path], new: &[&Path]) -> std::process::Output {
    let mut args = vec![
        "keys",
        "rotate",
        "--origin",
        origin,
        "--deployment",
        "shop-1",
        "--json",
    ];
    for k in old {
        args.extend(["--key", k.to_str().unwrap()]);
    }
    for k in new {
        args.extend(["--new-key", k.to_str().unwrap()]);
    }
    deckhand_out(fleet.s3(), &args)
}

/// [`rotate_at`] the shop's bucket.
fn rotate(fleet: &Fleet, old: &[&Path], new: &[&Path]) -> u64 {
    rotate_at(fleet, &fleet.s3().origin_arg("fleet"), old, new)
}

/// `deckhand keys root` at `origin`: root version 1 listing `key`, written to `out` as well (what a Pi
/// is installed with).
fn first_root(fleet: &Fleet, origin: &str, key: &Path, out: &Path) {
    let out = deckhand_out(
        fleet.s3(),
        &[
            "keys",
            "root",
            "--origin",
            origin,
            "--deployment",
            "shop-1",
            "--key",
            key.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

fn pi(name: &str, root: &Path) -> AgentOptions {
    AgentOptions {
        name: name.into(),
        origin: true,
        credentials: Credentials::None,
        trust_root: Some(root.to_owned()),
        ..AgentOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_follow_key_rotations_from_the_bucket_or_a_stick_and_refuse_bad_roots() {
    let mut fleet = shop("key-rotation").without_peers().start().await.unwrap();
    let spec = ReferenceSpec::small(20);
    let files = fixtures::write_reference_release(&fleet.join("r1"), &spec).unwrap();
    let renamed = |fleet: &Fleet, n: u64| {
        deckhand_tests::with_card_renamed(
            fleet,
            &files,
            &spec,
            3,
            &format!("Card three, print {n}"),
        )
    };
    let (a, a_path) = key(&fleet, 1);
    let (b, b_path) = key(&fleet, 2);
    let (c, c_path) = key(&fleet, 3);
    let (d, d_path) = key(&fleet, 4);

    // Root version 1 lists key a; the Pi is installed with it.
    let root1 = fleet.join("root-1.json");
    first_root(&fleet, &fleet.s3().origin_arg("fleet"), &a_path, &root1);
    fleet.publish_signed(&files, &a).await.unwrap();
    fleet.start_agent_with(pi("pi-0", &root1)).await.unwrap();
    fleet.agents[0]
        .wait_for(secs(60), "version 1 active", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();

    // a is retired for b: a's next manifest is refused, b's accepted.
    assert_eq!(rotate(&fleet, &[&a_path], &[&b_path]), 2);
    fleet.publish_signed(&renamed(&fleet, 2), &a).await.unwrap();
    let s = fleet.agents[0]
        .wait_for(secs(60), "the retired key's manifest refused", |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("1 from untrusted keys"))
        })
        .await
        .unwrap();
    assert_eq!(s.active_version(), Some(1), "{s:?}");
    fleet.publish_signed(&renamed(&fleet, 3), &b).await.unwrap();
    fleet.agents[0]
        .wait_for(secs(60), "the new key's manifest accepted", |s| {
            s.active_version() == Some(3)
        })
        .await
        .unwrap();

    // A root version 3 signed by the new key c alone (none of version 2's keys): refused, and c's
    // manifest with it. The CLI refuses to write such a root, so it is written to the bucket directly.
    let layout = fleet.origin().layout().clone();
    let dep = Name::deployment("shop-1").unwrap();
    let root3_key = layout.trust_root(&dep, 3);
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24 * 30);
    let c_role = [c.public().clone()];
    let role = Role {
        keys: &c_role,
        threshold: 1,
    };
    let forged = Root::new("shop-1", 3, jiff::Timestamp::now(), expires, role, role).sign(&[&c]);
    fleet.origin().put(&root3_key, forged.into()).await.unwrap();
    fleet.publish_signed(&renamed(&fleet, 4), &c).await.unwrap();
    let s = fleet.agents[0]
        .wait_for(secs(60), "the under-signed root refused", |s| {
            s.last_refused_manifest
                .as_deref()
                .is_some_and(|e| e.contains("not signed by enough of version 2's root keys"))
        })
        .await
        .unwrap();
    assert_eq!(s.active_version(), Some(3), "{s:?}");
    // Root version 1 replayed as version 3: refused too.
    fleet
        .origin()
        .put(&root3_key, std::fs::read(&root1).unwrap().into())
        .await
        .unwrap();
    let s = fleet.agents[0]
        .wait_for(secs(60), "the replayed root refused", |s| {
            s.last_refused_manifest
                .as_deref()
                .is_some_and(|e| e.contains("version 1 is not the next after version 2"))
        })
        .await
        .unwrap();
    assert_eq!(s.active_version(), Some(3), "{s:?}");
    // Manifest 4 (by c) was never admitted under root 2.
    assert!(
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("1 from untrusted keys")),
        "{s:?}"
    );

    // The bad object is removed and two proper rotations follow (b -> c -> d); d signs version 5.
    fleet.origin().delete(&root3_key).await.unwrap();
    assert_eq!(rotate(&fleet, &[&b_path], &[&c_path]), 3);
    assert_eq!(rotate(&fleet, &[&c_path], &[&d_path]), 4);
    fleet.publish_signed(&renamed(&fleet, 5), &d).await.unwrap();
    fleet.agents[0]
        .wait_for(secs(60), "version 5 active on pi-0", |s| {
            s.active_version() == Some(5)
        })
        .await
        .unwrap();

    // A Pi installed with root version 1 that was offline for all three rotations catches up: it
    // walks roots 2, 3 and 4 and accepts d's manifest.
    fleet.start_agent_with(pi("pi-1", &root1)).await.unwrap();
    let s = fleet.agents[1]
        .wait_for(
            secs(60),
            "version 5 active on the Pi that was offline",
            |s| s.active_version() == Some(5),
        )
        .await
        .unwrap();
    assert!(s.last_refused_manifest.is_none(), "{s:?}");
    // And after a restart it trusts the newest root it kept, not the installed one.
    let agent = fleet.agents.remove(1);
    agent.stop().await.unwrap();
    fleet.start_agent_with(pi("pi-1", &root1)).await.unwrap();
    // The log has colours: drop the escape sequences.
    let raw = std::fs::read_to_string(fleet.agents[1].log()).unwrap();
    let mut log = String::new();
    let mut in_escape = false;
    for ch in raw.chars() {
        match (in_escape, ch) {
            (false, '\u{1b}') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, c) => log.push(c),
        }
    }
    assert!(
        log.lines()
            .rfind(|l| l.contains("trusting the deployment's root"))
            .is_some_and(|l| l.contains("version=4")),
        "{log}"
    );

    // Without S3 at all: a USB stick carrying the roots and a release signed by d reaches a Pi installed
    // with root 1 (the roots are followed from the bundle as from the bucket).
    let stick = fleet.join("usb");
    std::fs::create_dir_all(&stick).unwrap();
    let stick_origin = format!("file://{}", stick.display());
    first_root(
        &fleet,
        &stick_origin,
        &a_path,
        &fleet.join("root-1-stick.json"),
    );
    for (old, new) in [(&a_path, &b_path), (&b_path, &c_path), (&c_path, &d_path)] {
        rotate_at(&fleet, &stick_origin, &[old], &[new]);
    }
    let mut args =
        deckhand_tests::publish_args(&stick_origin, "shop-1", &d_path, &files, &files.metadata);
    args.retain(|a| a != "--json");
    let out = deckhand_out(
        fleet.s3(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    fleet
        .start_agent_with(AgentOptions {
            origin: false,
            extra: vec!["--bundle-dir".into(), stick.display().to_string()],
            ..pi("pi-2", &root1)
        })
        .await
        .unwrap();
    let s = fleet.agents[2]
        .wait_for(secs(60), "the stick's release active on pi-2", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    assert!(s.bytes_from_bundles > 0, "{s:?}");

    // By hand at the Pi: `deckhand-agent import --trust-root` follows the stick's roots too; the retired
    // key alone (`--trust`) is refused, naming the signature, and nothing is imported.
    let import = |data: &Path, trust: [&str; 2]| {
        let d = data.display().to_string();
        let b = stick.display().to_string();
        deckhand_tests::run(
            "deckhand-agent",
            &[
                "import",
                "--data-dir",
                &d,
                "--deployment",
                "shop-1",
                trust[0],
                trust[1],
                "--backend",
                "cpu",
                "--bundle",
                &b,
            ],
            &[],
        )
    };
    let out = import(
        &fleet.join("pi-3"),
        ["--trust-root", root1.to_str().unwrap()],
    );
    assert!(
        out.status.success() && deckhand_tests::stdout(&out).contains("activated version 1"),
        "{}",
        stderr(&out)
    );
    let a_pub = fleet.join("ops-1.pub");
    std::fs::write(&a_pub, a.public().to_file_text()).unwrap();
    let out = import(&fleet.join("pi-4"), ["--trust", a_pub.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("signature"), "{}", stderr(&out));
    let out = import(
        &fleet.join("pi-4"),
        ["--trust-root", root1.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    fleet.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pi_without_s3_follows_rotations_through_its_peer() {
    let mut fleet = shop("key-rotation-peer").start().await.unwrap();
    let spec = ReferenceSpec::small(20);
    let files = fixtures::write_reference_release(&fleet.join("r1"), &spec).unwrap();
    let (a, a_path) = key(&fleet, 1);
    let (_b, b_path) = key(&fleet, 2);
    let (c, c_path) = key(&fleet, 3);
    let root1 = fleet.join("root-1.json");
    first_root(&fleet, &fleet.s3().origin_arg("fleet"), &a_path, &root1);
    fleet.publish_signed(&files, &a).await.unwrap();
    // pi-0 reads S3 and follows two rotations (a -> b -> c); c signs version 2.
    fleet
        .start_agent_with(AgentOptions {
            credentials: Credentials::Enroll,
            ..pi("pi-0", &root1)
        })
        .await
        .unwrap();
    fleet.agents[0]
        .wait_for(secs(60), "version 1 active on pi-0", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    assert_eq!(rotate(&fleet, &[&a_path], &[&b_path]), 2);
    assert_eq!(rotate(&fleet, &[&b_path], &[&c_path]), 3);
    let v2 = deckhand_tests::with_card_renamed(&fleet, &files, &spec, 3, "Card three, print 2");
    fleet.publish_signed(&v2, &c).await.unwrap();
    fleet.agents[0]
        .wait_for(secs(60), "version 2 active on pi-0", |s| {
            s.active_version() == Some(2)
        })
        .await
        .unwrap();
    // pi-1 has no S3, only pi-0, and was installed with root 1: it takes roots 2 and 3 from pi-0, then
    // version 2 (signed by c) verifies; pi-0 is not banned for relaying it.
    let peers = fleet.quic_addrs();
    fleet
        .start_agent_with(AgentOptions {
            origin: false,
            peers,
            credentials: Credentials::Enroll,
            ..pi("pi-1", &root1)
        })
        .await
        .unwrap();
    let s = fleet.agents[1]
        .wait_for(secs(60), "version 2 active on pi-1 through its peer", |s| {
            s.active_version() == Some(2)
        })
        .await
        .unwrap();
    assert!(s.bytes_from_peers > 0, "{s:?}");
    assert!(
        s.peers.iter().all(|p| !p.banned),
        "a peer relaying a rotated key's manifest was banned: {s:?}"
    );
    fleet.stop().await.unwrap();
}

/// What a thief with the release key does: re-signs the operator's current manifest as `version`,
/// created at `created_at` (expiring 150 days later), and makes it the deployment's current.json.
/// Returns the envelope.
async fn fast_forward(
    fleet: &Fleet,
    leaked: &SecretKey,
    template: &[u8],
    version: u64,
    created_at: jiff::Timestamp,
) -> Vec<u8> {
    let mut m = deckhand_protocol::envelope::inspect_unverified(template).unwrap();
    m.version = version;
    m.created_at = created_at;
    m.expires_at = created_at + jiff::SignedDuration::from_hours(24 * 150);
    let envelope = deckhand_protocol::Envelope::sign_manifest(&m, &[leaked]).to_bytes();
    set_current(fleet, &envelope).await;
    envelope
}

async fn set_current(fleet: &Fleet, envelope: &[u8]) {
    let key = current_key(fleet);
    fleet
        .origin()
        .put(&key, envelope.to_vec().into())
        .await
        .unwrap();
}

fn current_key(fleet: &Fleet) -> String {
    let dep = Name::deployment("shop-1").unwrap();
    fleet.origin().layout().current(&dep)
}

async fn current(fleet: &Fleet) -> Vec<u8> {
    let key = current_key(fleet);
    fleet
        .origin()
        .get_opt(&key)
        .await
        .unwrap()
        .unwrap()
        .to_vec()
}

/// TUF's fast-forward attack and its recovery. The root keys are kept offline; the release key leaks.
/// The thief cannot publish a root, but signs a manifest at version 2^63 and one created in 9999 and
/// slips them into current.json, then puts the operator's manifest back: every later release of the
/// operator's is refused (stale, then expired at the trusted now of 9999), except that a Pi whose clock
/// is synchronised refuses the manifest from 9999 outright. One `deckhand keys rotate --new-key`
/// (signed by the offline root key) starts a new floor epoch: the operator's next release, at a
/// version far below the thief's, goes live on both Pis, and the thief's manifests stay refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_forward_by_a_leaked_release_key_freezes_nothing_after_one_rotation() {
    let mut fleet = shop("fast-forward").start().await.unwrap();
    let spec = ReferenceSpec::small(20);
    let files = fixtures::write_reference_release(&fleet.join("r1"), &spec).unwrap();
    let renamed = |fleet: &Fleet, n: u64| {
        deckhand_tests::with_card_renamed(fleet, &files, &spec, 3, &format!("Card three, {n}"))
    };
    let (_, root_path) = key(&fleet, 10);
    let (leaked, leaked_path) = key(&fleet, 11);
    let (fresh, _) = key(&fleet, 12);
    let (_, thief_path) = key(&fleet, 13);
    // The release keys are listed by their public halves: they never sign a root.
    let public = |k: &SecretKey, name: &str| {
        let p = fleet.join(name);
        std::fs::write(&p, k.public().to_file_text()).unwrap();
        p
    };
    let leaked_pub = public(&leaked, "release-1.pub");
    let fresh_pub = public(&fresh, "release-2.pub");
    let root1 = fleet.join("root-1.json");
    let out = deckhand_out(
        fleet.s3(),
        &[
            "keys",
            "root",
            "--origin",
            &fleet.s3().origin_arg("fleet"),
            "--deployment",
            "shop-1",
            "--root-key",
            root_path.to_str().unwrap(),
            "--key",
            leaked_pub.to_str().unwrap(),
            "--out",
            root1.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    fleet.publish_signed(&files, &leaked).await.unwrap();
    let v1 = current(&fleet).await;
    // pi-0 and pi-1 read S3; pi-2 has only its peers.
    for (name, clock, origin) in [
        ("pi-0", "no", true),
        ("pi-1", "yes", true),
        ("pi-2", "no", false),
    ] {
        let peers = fleet.quic_addrs();
        fleet
            .start_agent_with(AgentOptions {
                extra: vec!["--clock-synchronised".into(), clock.into()],
                credentials: Credentials::Enroll,
                origin,
                peers,
                ..pi(name, &root1)
            })
            .await
            .unwrap();
    }
    for a in &fleet.agents {
        a.wait_for(secs(60), "version 1 active", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    }

    // The leaked release key cannot publish a root naming its thief.
    let bucket = fleet.s3().origin_arg("fleet");
    let out = rotation(&fleet, &bucket, &[&leaked_path], &[&thief_path]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not signed by enough of version 1's root keys"),
        "{}",
        stderr(&out)
    );

    // Version 2^63, created now: every Pi takes it (it points at version 1's blobs), pi-2 from a peer.
    let huge = 1u64 << 63;
    let ahead = fast_forward(&fleet, &leaked, &v1, huge, jiff::Timestamp::now()).await;
    for a in &fleet.agents {
        a.wait_for(secs(60), "version 2^63 active", |s| {
            s.active_version() == Some(huge)
        })
        .await
        .unwrap();
    }
    // The thief puts the operator's manifest back; the operator's next release is stale.
    set_current(&fleet, &v1).await;
    fleet
        .publish_signed(&renamed(&fleet, 2), &leaked)
        .await
        .unwrap();
    let v2 = current(&fleet).await;
    let stale = format!("version 2 is not above the highest accepted version {huge}");
    for a in &fleet.agents[..2] {
        a.wait_for(secs(60), "the operator's version 2 refused", |s| {
            s.last_refused_manifest
                .as_deref()
                .is_some_and(|e| e.contains(&stale))
        })
        .await
        .unwrap();
    }

    // Created in 9999: the Pi without a synchronised clock takes it and its time floor is 9999; the
    // one with NTP refuses it.
    let y9999: jiff::Timestamp = "9999-01-01T00:00:00Z".parse().unwrap();
    fast_forward(&fleet, &leaked, &v1, huge + 1, y9999).await;
    for i in [0, 2] {
        let s = fleet.agents[i]
            .wait_for(secs(60), "the manifest from 9999 active", |s| {
                s.active_version() == Some(huge + 1)
            })
            .await
            .unwrap();
        assert!(
            s.newest_manifest_at
                .as_deref()
                .is_some_and(|t| t.starts_with("9999-")),
            "{s:?}"
        );
    }
    let s = fleet.agents[1]
        .wait_for(secs(60), "the manifest from 9999 refused by pi-1", |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("ahead of this Pi's synchronised clock"))
        })
        .await
        .unwrap();
    assert_eq!(s.active_version(), Some(huge), "{s:?}");
    // The operator's version 2 back in current.json: expired at pi-0's trusted now of 9999.
    set_current(&fleet, &v2).await;
    fleet.agents[0]
        .wait_for(secs(60), "version 2 expired at 9999 on pi-0", |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("version 2 expired at"))
        })
        .await
        .unwrap();

    // The recovery: one rotation of the release keys, signed by the offline root key, then the
    // operator's next release (version 3, far below the thief's) goes live on every Pi: pi-2 learns of
    // the rotation from its peers' Hellos (they follow a newer root), though they announce a version
    // below its own; they do not take pi-2's version 2^63 + 1 for a newer release, nor ban it.
    assert_eq!(rotate_at(&fleet, &bucket, &[&root_path], &[&fresh_pub]), 2);
    fleet
        .publish_signed(&renamed(&fleet, 3), &fresh)
        .await
        .unwrap();
    for a in &fleet.agents {
        let s = a
            .wait_for(secs(60), "version 3 active after the rotation", |s| {
                s.active_version() == Some(3)
            })
            .await
            .unwrap();
        let floor: jiff::Timestamp = s.newest_manifest_at.as_deref().unwrap().parse().unwrap();
        assert!(
            floor < jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1),
            "{s:?}"
        );
        assert!(s.peers.iter().all(|p| !p.banned), "{s:?}");
    }
    let s = fleet.agents[2].status().await.unwrap();
    assert!(s.bytes_from_origin == 0 && s.bytes_from_peers > 0, "{s:?}");
    // The thief's manifests stay refused: the rotation retired the key that signed them.
    set_current(&fleet, &ahead).await;
    for a in &fleet.agents[..2] {
        let s = a
            .wait_for(secs(60), "the thief's version 2^63 refused", |s| {
                s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("1 from untrusted keys"))
            })
            .await
            .unwrap();
        assert_eq!(s.active_version(), Some(3), "{s:?}");
    }
    fleet.stop().await.unwrap();
}
