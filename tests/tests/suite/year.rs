//! A year in a shop, in minutes (issue 24). Three Pis, enrolled with the default certificates (365 days)
//! and installed with the deployment's trust root (a root key kept offline, a release key), live
//! through twelve months: each month every clock moves 30 days on (libfaketime reads the offset from a
//! file the test rewrites, the operator's machine included), the operator publishes a release, one Pi
//! restarts, and a till keeps recognising on every Pi. Month 4: a Pi boots at 1970 (no RTC battery)
//! and NTP sets its clock later. Month 6: the release key is rotated (`deckhand keys rotate`). Month 9:
//! a Pi's catalog is damaged while it is down. Month 11: the certificates are renewed from the
//! operator's machine (`deckhand fleet renew --origin`). A week past the year, when the first
//! certificates and the first root have expired, every Pi serves the newest release with its peers,
//! nothing is about to expire, every store verifies, and no recognition failed except at a Pi that was
//! restarting; none saw a mix of two releases. A new Pi then joins from a stick exported from one of
//! them: the stick carries the trust roots and the fleet bundle too.

use deckhand_protocol::status::Status;
use deckhand_tests::fixtures::{self, ReferenceSpec};
use deckhand_tests::{
    AgentOptions, Credentials, Fleet, clock_from, publish_args, secs, set_clock, shop,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const NAMES: [&str; 3] = ["pi-0", "pi-1", "pi-2"];
const DAYS_A_MONTH: u64 = 30;

/// What the till sees of one Pi.
#[derive(Default)]
struct Counter {
    /// Where it answers; `None` while it restarts.
    http: Option<String>,
    /// How many times it was restarted: a request that fails across a restart was sent to a Pi that
    /// was going down.
    restarts: u64,
    answered: u64,
    /// Requests that failed while the Pi was restarting.
    while_restarting: u64,
    /// The newest release it answered with.
    version: u64,
}

#[derive(Default)]
struct Till {
    counters: [Counter; 3],
    /// What went wrong anywhere else: a failed request at a Pi in service, a wrong card, a mix of two
    /// releases, a release older than one it answered with before.
    failures: Vec<String>,
}

/// The card name release `version` gives card 0 (the till's photo): an answer whose details are not its
/// release's is a mix of two releases.
fn print(version: u64) -> String {
    format!("Card zero, print {version}")
}

/// A till recognising the same photo at every Pi in service, ten times a second each, until `stop`.
async fn till(state: Arc<Mutex<Till>>, photo: Vec<u8>, card: String, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        for (i, name) in NAMES.iter().enumerate() {
            let (addr, restarts) = {
                let s = state.lock().unwrap();
                (s.counters[i].http.clone(), s.counters[i].restarts)
            };
            let Some(addr) = addr else { continue };
            let answer = deckhand_agent::http::request_json(
                &addr,
                "POST",
                "/v1/recognize",
                photo.clone().into(),
            )
            .await;
            let mut s = state.lock().unwrap();
            let c = &mut s.counters[i];
            let problem = match answer {
                Ok((200, a)) => {
                    let v = a["manifest_version"].as_u64().unwrap_or(0);
                    let name_ok = a["metadata"]["name"].as_str() == Some(print(v).as_str());
                    if a["card_id"].as_str() != Some(card.as_str()) || !name_ok || v < c.version {
                        // Never excused, restart or not.
                        let what =
                            format!("{name}: a wrong answer after version {}: {a}", c.version);
                        s.failures.push(what);
                        continue;
                    }
                    c.answered += 1;
                    c.version = v;
                    continue;
                }
                Ok((code, a)) => format!("{code} {a}"),
                Err(e) => e.to_string(),
            };
            if c.http.is_none() || c.restarts != restarts {
                c.while_restarting += 1;
            } else {
                s.failures.push(format!("{name}: {problem}"));
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The shop over the year: its agents, their clocks, the operator's clock and keys.
struct Year {
    fleet: Fleet,
    clocks: [PathBuf; 3],
    operator_clock: PathBuf,
    root: PathBuf,
    till: Arc<Mutex<Till>>,
    files: deckhand_agent::release::ReleaseFiles,
    release_key: PathBuf,
    /// The day every clock is at.
    day: u64,
}

impl Year {
    /// `deckhand ARGS` on the operator's machine, at its clock; checks that it succeeded.
    fn operator(&self, args: &[&str]) -> std::process::Output {
        let out = deckhand_tests::deckhand(self.fleet.s3(), args)
            .envs(clock_from(&self.operator_clock))
            .output()
            .unwrap_or_else(|e| panic!("cannot run deckhand: {e}"));
        let err = deckhand_tests::stderr(&out);
        assert!(out.status.success(), "deckhand {args:?}: {err}");
        out
    }

    fn origin(&self) -> String {
        self.fleet.s3().origin_arg("fleet")
    }

    /// Every clock (the operator's and the Pis') at `day` days after the start. Returns once every
    /// running Pi sees it (libfaketime reads its file again within a second): the newest manifest it
    /// verified, from the day before, has aged by the jump.
    async fn set_day(&mut self, day: u64) {
        for c in self.clocks.iter().chain([&self.operator_clock]) {
            set_clock(c, &format!("+{day}d"));
        }
        let aged = ((day - self.day) * 86_400).saturating_sub(3_600);
        self.day = day;
        for agent in &self.fleet.agents {
            let deadline = std::time::Instant::now() + secs(10);
            while deckhand_tests::metric(agent, "deckhand_newest_manifest_age_seconds").await < aged
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{} does not see day {day}",
                    agent.name
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }

    /// Publishes release `version` (card 0 renamed [`print`]), signed with the current release key.
    fn publish(&self, version: u64) {
        let meta = self.fleet.join(format!("metadata-{version}.json"));
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&self.files.metadata).unwrap()).unwrap();
        m[fixtures::card_id(0)]["name"] = serde_json::json!(print(version));
        std::fs::write(&meta, m.to_string()).unwrap();
        let args = publish_args(
            &self.origin(),
            "shop-1",
            &self.release_key,
            &self.files,
            &meta,
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.operator(&args);
    }

    fn options(&self, i: usize, credentials: Credentials) -> AgentOptions {
        AgentOptions {
            name: NAMES[i].into(),
            origin: true,
            peers: self.fleet.quic_addrs(),
            credentials,
            trust_root: Some(self.root.clone()),
            env: clock_from(&self.clocks[i]),
            ..AgentOptions::default()
        }
    }

    fn index(&self, i: usize) -> usize {
        self.fleet
            .agents
            .iter()
            .position(|a| a.name == NAMES[i])
            .unwrap_or_else(|| panic!("{} is not running", NAMES[i]))
    }

    fn agent(&self, i: usize) -> &deckhand_tests::Agent {
        &self.fleet.agents[self.index(i)]
    }

    async fn status(&self, i: usize) -> Status {
        self.agent(i).status().await.unwrap()
    }

    /// Starts Pi `i` and hands it to the till once it serves a release.
    async fn start(&mut self, i: usize, credentials: Credentials) {
        let opts = self.options(i, credentials);
        self.fleet.start_agent_with(opts).await.unwrap();
        let agent = self.agent(i);
        agent
            .wait_for(secs(60), "serving a release", |s| s.active.is_some())
            .await
            .unwrap();
        let http = agent.http().to_owned();
        self.till.lock().unwrap().counters[i].http = Some(http);
    }

    /// Takes Pi `i` from the till and stops it.
    async fn stop(&mut self, i: usize) {
        {
            let mut till = self.till.lock().unwrap();
            let c = &mut till.counters[i];
            c.http = None;
            c.restarts += 1;
        }
        let agent = self.fleet.agents.remove(self.index(i));
        agent.stop().await.unwrap();
    }

    fn catalog(&self, i: usize) -> PathBuf {
        self.fleet
            .join(NAMES[i])
            .join("store")
            .join("catalog.sqlite")
    }

    /// Every Pi serves `version` and has heard from both others, in a Hello, that they serve it too.
    async fn all_serve(&self, version: u64) -> Vec<Status> {
        self.fleet
            .wait_all(secs(90), &format!("version {version} served"), |s| {
                s.active_version() == Some(version)
                    && s.peers
                        .iter()
                        .filter(|p| p.live && p.active == Some(version))
                        .count()
                        == 2
            })
            .await
            .unwrap()
    }
}

fn write_key(fleet: &Fleet, name: &str, seed: u8) -> (PathBuf, PathBuf) {
    let k = deckhand_protocol::SecretKey::from_seed(&[seed; 32]);
    let (secret, public) = (
        fleet.join(format!("{name}.key")),
        fleet.join(format!("{name}.pub")),
    );
    std::fs::write(&secret, k.to_file_text()).unwrap();
    std::fs::write(&public, k.public().to_file_text()).unwrap();
    (secret, public)
}

fn serial(s: &Status) -> Option<String> {
    s.fleet_trust.as_ref()?.certificate_serial.clone()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_year_in_a_shop_certificates_clocks_a_key_rotation_and_damage_never_stop_the_tills() {
    let fleet = shop("year").start().await.unwrap();
    let clocks = NAMES.map(|n| fleet.join(format!("clock-{n}")));
    let operator_clock = fleet.join("clock-operator");
    let spec = ReferenceSpec::small(20);
    let files = fixtures::write_reference_release(&fleet.join("r1"), &spec).unwrap();
    let (photo, card) = files.canaries[0].clone();
    let photo = std::fs::read(photo).unwrap();
    // The root key stays on the operator's offline machine; release keys sign manifests.
    let (root_key, _) = write_key(&fleet, "root", 31);
    let (release_1, release_1_pub) = write_key(&fleet, "release-1", 32);
    let (release_2, release_2_pub) = write_key(&fleet, "release-2", 33);
    let root = fleet.join("root-1.json");
    let mut year = Year {
        fleet,
        clocks,
        operator_clock,
        root,
        till: Arc::default(),
        files,
        release_key: release_1,
        day: 0,
    };
    year.set_day(0).await;
    let origin = year.origin();
    year.operator(&[
        "keys",
        "root",
        "--origin",
        &origin,
        "--deployment",
        "shop-1",
        "--key",
        p(&release_1_pub),
        "--root-key",
        p(&root_key),
        "--out",
        p(&year.root),
    ]);
    year.publish(1);
    for i in 0..3 {
        year.start(i, Credentials::Enroll).await;
    }
    year.all_serve(1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let till_task = tokio::spawn(till(year.till.clone(), photo, card, stop.clone()));

    let mut serials = Vec::new();
    let mut renewed = None;
    for month in 1..=12u64 {
        let version = month + 1;
        year.set_day(month * DAYS_A_MONTH).await;
        match month {
            // The release key is rotated; the root key signs the new root, the new key the release.
            6 => {
                let out = year.operator(&[
                    "keys",
                    "rotate",
                    "--json",
                    "--origin",
                    &origin,
                    "--deployment",
                    "shop-1",
                    "--key",
                    p(&root_key),
                    "--new-key",
                    p(&release_2_pub),
                ]);
                assert_eq!(deckhand_tests::json(&out)["version"].as_u64(), Some(2));
                year.release_key = release_2.clone();
            }
            // Renewed from the operator's machine: every certificate ends within 35 days.
            11 => {
                for i in 0..3 {
                    serials.push(serial(&year.status(i).await));
                }
                let ca = year.fleet.ca().dir.display().to_string();
                let out = year.operator(&[
                    "fleet", "renew", "--within", "60", "--dir", &ca, "--origin", &origin,
                ]);
                let err = deckhand_tests::stderr(&out);
                renewed = err.lines().find_map(|l| {
                    l.strip_prefix("fleet bundle ")?
                        .split(' ')
                        .next()?
                        .parse::<u64>()
                        .ok()
                });
                assert!(renewed.is_some(), "{err}");
            }
            _ => {}
        }
        year.publish(version);

        // One Pi restarts each month.
        let who = (month % 3) as usize;
        year.stop(who).await;
        match month {
            // No RTC battery: it boots at 1970.
            4 => set_clock(&year.clocks[who], "@1970-01-02 00:00:00"),
            // A bad sector: the catalog's first page is overwritten while the Pi is down. The clean
            // stop left the catalog whole in one file (its log checkpointed into it and removed).
            9 => {
                let wal = year.catalog(who).with_extension("sqlite-wal");
                assert!(!wal.exists(), "{} left after a clean stop", wal.display());
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(year.catalog(who))
                    .unwrap();
                f.write_all_at(&[0x5A; 4096], 0).unwrap();
                f.sync_all().unwrap();
            }
            _ => {}
        }
        year.start(who, Credentials::Existing).await;
        let all = year.all_serve(version).await;
        eprintln!(
            "month {month}: every Pi serves version {version}; {} restarted",
            NAMES[who]
        );
        match month {
            4 => {
                let st = &all[year.index(who)];
                assert!(st.clock_behind_trusting.is_some(), "{st:?}");
                assert_eq!(st.fleet_error, None, "{st:?}");
                // NTP answers: the clock is right again.
                set_clock(&year.clocks[who], &format!("+{}d", month * DAYS_A_MONTH));
                year.agent(who)
                    .wait_for(secs(30), "the clock trusted again", |s| {
                        s.clock_behind_trusting.is_none()
                    })
                    .await
                    .unwrap();
            }
            9 => {
                let st = &all[year.index(who)];
                let repair = st.store_repair.clone().unwrap_or_default();
                assert!(repair.contains("the catalog was damaged"), "{st:?}");
            }
            11 => {
                year.fleet
                    .wait_all(secs(60), "the renewal taken", |s| {
                        s.fleet_trust.as_ref().and_then(|t| t.bundle) == renewed
                    })
                    .await
                    .unwrap();
            }
            _ => {}
        }
    }

    // A week past the year (day 372): the first certificates and the first root have expired. Every
    // Pi takes the next release, its peers still live: each presents its renewed certificate, follows
    // the rotated root and warns of nothing.
    year.set_day(12 * DAYS_A_MONTH + 12).await;
    year.publish(14);
    let end = year.all_serve(14).await;
    for st in &end {
        let name = &st.agent_id;
        assert_eq!(st.fleet_error, None, "{name}: {st:?}");
        assert_eq!(
            st.expiries
                .iter()
                .filter_map(|e| e.warning.as_deref())
                .collect::<Vec<_>>(),
            Vec::<&str>::new(),
            "{name}: {:?}",
            st.expiries
        );
        assert!(
            !serials.contains(&serial(st)),
            "{name} presents a certificate from before the renewal: {st:?}"
        );
        assert_eq!(st.fleet_trust.as_ref().and_then(|t| t.bundle), renewed);
    }
    // The till ran through the year: every Pi answered with the newest release; nothing failed at a
    // Pi in service.
    let deadline = std::time::Instant::now() + secs(10);
    let behind = |till: &Mutex<Till>| till.lock().unwrap().counters.iter().any(|c| c.version < 14);
    while behind(&year.till) {
        assert!(
            std::time::Instant::now() < deadline,
            "the till never saw version 14 everywhere"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    till_task.await.unwrap();
    let till = std::mem::take(&mut *year.till.lock().unwrap());
    for (name, c) in NAMES.iter().zip(&till.counters) {
        eprintln!(
            "{name}: {} answered, {} failed while it restarted ({} restarts)",
            c.answered, c.while_restarting, c.restarts
        );
        assert_eq!(c.version, 14, "{name}");
        assert!(c.answered >= 100, "{name}: {} answers", c.answered);
    }
    assert_eq!(till.failures, Vec::<String>::new());
    // Every store verifies.
    for (i, name) in NAMES.iter().enumerate() {
        year.stop(i).await;
        deckhand_tests::verify_store(&year.fleet.join(name));
    }

    // A new Pi joins with only a stick exported from pi-0: the stick carries the trust roots pi-0
    // kept and the fleet bundle it took, so the new Pi, installed with the first root, follows the
    // rotation to the newest release and holds the renewed certificates.
    let stick = year.fleet.join("stick");
    let exported = deckhand_tests::ok(&deckhand_tests::run(
        "deckhand-agent",
        &[
            "store",
            "export",
            "--data-dir",
            p(&year.fleet.join(NAMES[0])),
            "--out",
            p(&stick),
            "--json",
        ],
        &[],
    ));
    assert_eq!(exported["roots"], serde_json::json!([1, 2]), "{exported}");
    assert_eq!(exported["fleet_bundle"], true, "{exported}");
    // The same stick restores a lost bucket (here: another prefix) with the roots and the fleet
    // bundle, not only the releases.
    let restored = year.fleet.s3().origin_arg("restored");
    let out = year.operator(&[
        "bundle",
        "push",
        "--from",
        p(&stick),
        "--origin",
        &restored,
        "--deployment",
        "shop-1",
        "--trust",
        p(&release_2_pub),
        "--json",
    ]);
    let pushed = deckhand_tests::json(&out);
    assert_eq!(pushed["roots"], serde_json::json!([1, 2]), "{pushed}");
    assert_eq!(pushed["fleet_bundle"], true, "{pushed}");
    let bucket = |prefix: &str, key: &str| {
        std::fs::read(year.fleet.join("s3").join("cards").join(prefix).join(key)).unwrap()
    };
    for key in [
        "deployments/shop-1/root/00000000000000000002.json",
        "fleet/bundle.pem",
    ] {
        assert_eq!(bucket("restored", key), bucket("fleet", key), "{key}");
    }
    // A root that does not follow the one before it (root 1 replayed as root 3) refuses the push
    // whole: nothing is written.
    let third = stick.join("deployments/shop-1/root/00000000000000000003.json");
    std::fs::copy(&year.root, &third).unwrap();
    let refused = deckhand_tests::deckhand(
        year.fleet.s3(),
        &[
            "bundle",
            "push",
            "--from",
            p(&stick),
            "--origin",
            &year.fleet.s3().origin_arg("refused"),
            "--deployment",
            "shop-1",
            "--trust",
            p(&release_2_pub),
        ],
    )
    .envs(clock_from(&year.operator_clock))
    .output()
    .unwrap();
    let err = deckhand_tests::stderr(&refused);
    assert!(
        !refused.status.success()
            && err.contains("00000000000000000003.json in the bundle does not follow"),
        "{err}"
    );
    assert!(!year.fleet.join("s3/cards/refused").exists());
    std::fs::remove_file(&third).unwrap();
    let ca = year.fleet.ca().dir.display().to_string();
    let certs = year.fleet.join("certs").display().to_string();
    year.operator(&[
        "fleet", "enroll", "--dir", &ca, "--name", "pi-3", "--out", &certs,
    ]);
    let clock = year.fleet.join("clock-pi-3");
    set_clock(&clock, &format!("+{}d", 12 * DAYS_A_MONTH + 12));
    let opts = AgentOptions {
        name: "pi-3".into(),
        origin: false,
        credentials: Credentials::Existing,
        trust_root: Some(year.root.clone()),
        env: clock_from(&clock),
        extra: vec!["--bundle-dir".into(), stick.display().to_string()],
        ..AgentOptions::default()
    };
    year.fleet.start_agent_with(opts).await.unwrap();
    let st = year.fleet.agents[0]
        .wait_for(secs(60), "the stick's release and fleet bundle", |s| {
            s.active_version() == Some(14)
                && s.fleet_trust.as_ref().and_then(|t| t.bundle) == renewed
        })
        .await
        .unwrap();
    assert!(st.bytes_from_bundles > 0, "{st:?}");
    assert_eq!(st.fleet_error, None, "{st:?}");
    year.fleet.agents.remove(0).stop().await.unwrap();
}
