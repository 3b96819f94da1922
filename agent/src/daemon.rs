//! The agent daemon (`deckhand-agent run`) and the manual sideload (`deckhand-agent import`).
//!
//! At start the daemon opens the store, loads the active release recorded there (signatures re-checked;
//! an expired manifest keeps serving, since recognition must never stop), and serves recognitions over
//! HTTP and the inbox. It needs no network to do so.

use crate::http::{AppState, FleetFn, StatusFn};
use crate::metrics::Metrics;
use crate::recognizer::BackendChoice;
use crate::recognizer::inbox::Inbox;
use crate::recognizer::service::{Service, check_canaries};
use crate::sync::activation::{self, ActivationError};
use deckhand_protocol::status::{ActiveRelease, FleetMember, FleetView, Status};
use deckhand_protocol::{PublicKey, TrustPolicy};
use deckhand_store::{Options, Store, StoreError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::Instrument as _;

/// How long the daemon's tasks get to stop after the HTTP API stopped, before they are aborted.
const TASKS_STOP: std::time::Duration = std::time::Duration::from_secs(1);

pub use crate::config::RunConfig;

/// The agent's id: its certificate's name when it has fleet credentials, else one made up at first
/// start and kept in the store.
pub fn agent_id(
    store: &Store,
    creds: Option<&crate::peer::tls::FleetCredentials>,
) -> Result<String, StoreError> {
    let ledger = crate::ledger::Ledger::new(store);
    if let Some(c) = creds {
        ledger.set_agent_id(&c.agent_id)?;
        return Ok(c.agent_id.clone());
    }
    if let Some(id) = ledger.agent_id()? {
        return Ok(id);
    }
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        // No randomness from the OS (Linux has it once booted): the id only has to differ between the
        // shop's agents, so the clock and the process id make it.
        let seed = format!("{:?} {}", std::time::SystemTime::now(), std::process::id());
        b.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..4]);
    }
    let id = format!("agent-{}", hex::encode(b));
    ledger.set_agent_id(&id)?;
    Ok(id)
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("--trust/--threshold: {0}")]
    Trust(#[source] deckhand_protocol::VerifyError),
    #[error("--trust-root: {0}")]
    TrustRoot(#[source] deckhand_protocol::root::RootError),
    #[error("--deployment: {0}")]
    Deployment(#[source] deckhand_protocol::layout::LayoutError),
    #[error("--peer needs fleet credentials (--fleet-ca, --fleet-cert, --fleet-key)")]
    PeersWithoutCredentials,
    #[error("bundle {path}: {source}")]
    BundleRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than any signed document may be ({limit} bytes); not read")]
    EnvelopeTooLarge { path: PathBuf, limit: u64 },
    #[error("a loader task stopped: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Activation(#[from] ActivationError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Inbox(#[from] crate::recognizer::inbox::InboxError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Origin(#[from] crate::origin::OriginError),
    #[error("fleet credentials: {0}")]
    Fleet(#[from] crate::peer::tls::FleetError),
    #[error(transparent)]
    Peer(#[from] crate::peer::PeerError),
    #[error(transparent)]
    Discovery(#[from] crate::peer::discovery::DiscoveryError),
    #[error(transparent)]
    Bundle(#[from] crate::sync::bundle::BundleError),
}

pub fn open_store(data_dir: &std::path::Path, budget: Option<u64>) -> Result<Store, StoreError> {
    Store::open(data_dir.join("store"), Options { budget })
}

/// What this agent trusts: the keys given, or the trust root it was installed with, or the newer one
/// it followed to and kept in the store.
fn trust(cfg: &RunConfig, store: &Store) -> Result<crate::sync::trust::Trust, DaemonError> {
    load_trust(
        &cfg.deployment,
        &cfg.trust,
        usize::from(cfg.settings.threshold),
        cfg.trust_root.as_deref(),
        store,
    )
}

/// [`trust`] for `run` and `import` alike: `keys` at `threshold`, or the root `trust_root` (an envelope)
/// and the newer one kept in the store.
fn load_trust(
    deployment: &str,
    keys: &[deckhand_protocol::PublicKey],
    threshold: usize,
    trust_root: Option<&[u8]>,
    store: &Store,
) -> Result<crate::sync::trust::Trust, DaemonError> {
    use crate::sync::trust::Trust;
    use deckhand_protocol::root::TrustedRoot;
    let Some(installed) = trust_root else {
        let policy = TrustPolicy::new(keys.to_vec(), threshold).map_err(DaemonError::Trust)?;
        return Ok(Trust::keys(policy));
    };
    let installed =
        TrustedRoot::installed(installed, deployment).map_err(DaemonError::TrustRoot)?;
    // The store's root was reached from an installed one by the chain's rules; it is used if it is
    // newer (a root installed later than the store's wins).
    let ledger = crate::ledger::Ledger::new(store);
    let kept = ledger
        .followed_root()?
        .and_then(|b| TrustedRoot::installed(&b, deployment).ok())
        .filter(|k| k.version() > installed.version());
    // Every root held is kept by version, to pass on to peers that are behind.
    ledger.keep_root(installed.version(), installed.envelope())?;
    let root = kept.unwrap_or(installed);
    tracing::info!(version = root.version(), "trusting the deployment's root");
    Ok(Trust::root(root))
}

/// Reads a signed document (a manifest or trust root envelope) from a file, refusing one larger than any
/// envelope may be before reading it whole. `Ok(None)` when the file does not exist.
fn read_envelope_file(path: &Path) -> Result<Option<Vec<u8>>, DaemonError> {
    use std::io::Read as _;
    let limit = deckhand_protocol::envelope::MAX_ENVELOPE as u64;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DaemonError::BundleRead {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut body = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut body)
        .map_err(|source| DaemonError::BundleRead {
            path: path.to_owned(),
            source,
        })?;
    if body.len() as u64 > limit {
        return Err(DaemonError::EnvelopeTooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(Some(body))
}

/// Follows the chain of trust roots the operator put in a bundle directory (`deployments/D/root/N.json`,
/// as at the origin), keeping each in the store before it is used. A root that does not verify is an
/// error: the operator is at the Pi, and must know.
fn follow_bundle_roots(
    trust: &crate::sync::trust::Trust,
    store: &Store,
    bundle: &Path,
    deployment: &deckhand_protocol::layout::Name,
) -> Result<(), DaemonError> {
    let layout = deckhand_protocol::layout::Layout::new("").map_err(DaemonError::Deployment)?;
    for _ in 0..crate::sync::trust::MAX_ROOTS_FOLLOWED {
        let Some(next) = trust.next_root() else {
            return Ok(());
        };
        let Some(body) = read_envelope_file(&bundle.join(layout.trust_root(deployment, next)))?
        else {
            return Ok(());
        };
        let Some(root) = trust.advance(&body).map_err(DaemonError::TrustRoot)? else {
            return Ok(());
        };
        crate::ledger::Ledger::new(store).follow_root(root.version(), root.envelope())?;
        tracing::info!(
            version = root.version(),
            "trust root updated from the bundle"
        );
    }
    Ok(())
}

/// Loads the active release recorded in the store into the service. Returns its version, or `None`.
pub async fn restore_active(
    store: &Store,
    service: &Service,
    policy: &TrustPolicy,
    backend: BackendChoice,
) -> Result<Option<u64>, DaemonError> {
    let Some(envelope) = crate::ledger::Ledger::new(store).active()? else {
        return Ok(None);
    };
    // Signatures are checked again; expiry is not: a release that was valid when it went live keeps
    // serving until a newer one arrives.
    let verified = policy
        .verify_ignoring_expiry(&envelope)
        .map_err(ActivationError::from)?;
    let (store2, v2) = (store.clone(), verified.clone());
    let (recognizer, canaries) = tokio::task::spawn_blocking(move || {
        let r = activation::load_recognizer(&store2, &v2, backend)?;
        let c = activation::canaries(&store2, &v2.manifest)?;
        Ok::<_, ActivationError>((r, c))
    })
    .await??;
    let version = recognizer.version;
    if let Err(e) = service.activate(recognizer, &canaries) {
        return Err(DaemonError::Activation(ActivationError::Release {
            version,
            why: e.to_string(),
        }));
    }
    Ok(Some(version))
}

/// Runs until `shutdown` resolves. Prints where it listens on stdout (`quic listening on ADDR`, then
/// `listening on http://ADDR`), once serving: the shop's `Fleet` and anyone supervising the process read
/// those lines.
pub async fn run(
    cfg: RunConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let store = open_store(&cfg.settings.data_dir, cfg.settings.store_budget)?;
    let trust = Arc::new(trust(&cfg, &store)?);
    let policy = trust.policy();
    let metrics = Arc::new(Metrics::default());
    let service = Service::start(metrics.clone())?;
    match restore_active(&store, &service, &policy, cfg.settings.backend).await {
        Ok(Some(v)) => tracing::info!(version = v, "serving the active release from the store"),
        Ok(None) => {
            tracing::warn!("no release in the store yet; recognitions answer 503 until one arrives")
        }
        Err(e) => {
            tracing::error!(cause = %e, "the recorded active release does not load");
            service.refuse(0, "", &e.to_string());
        }
    }
    {
        let store = store.clone();
        match tokio::task::spawn_blocking(move || activation::collect_at_start(&store)).await {
            Ok(Ok(Some(gc))) if gc.blobs_removed > 0 => {
                tracing::info!(
                    blobs = gc.blobs_removed,
                    freed = gc.bytes_freed,
                    "collected what an interrupted activation left"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(cause = %e, "collecting at start failed"),
            Err(e) => tracing::warn!(cause = %e, "collecting at start failed"),
        }
    }
    let creds = cfg
        .fleet
        .as_ref()
        .map(crate::peer::tls::FleetCredentials::load)
        .transpose()?;
    let me = agent_id(&store, creds.as_ref())?;
    let span = tracing::info_span!("agent", agent = %me, deployment = %cfg.deployment);
    let deployment = deckhand_protocol::layout::Name::deployment(&cfg.deployment)
        .map_err(DaemonError::Deployment)?;
    let sync_status = Arc::new(std::sync::Mutex::new(crate::sync::SyncStatus::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (peers, hints) = match &creds {
        Some(creds) => {
            let (node, hints) = crate::peer::PeerNode::start(
                crate::peer::PeerConfig {
                    creds: creds.clone(),
                    deployment: cfg.deployment.clone(),
                    listen: cfg.settings.quic_listen,
                    static_peers: cfg.settings.peers.clone(),
                    streams_per_peer: 8,
                    serve_bytes_per_sec: cfg.settings.serve_bytes_per_sec,
                },
                store.clone(),
                metrics.clone(),
                stop_rx.clone(),
            )
            .await?;
            (Some(node), Some(hints))
        }
        None => {
            if !cfg.settings.peers.is_empty() {
                return Err(DaemonError::PeersWithoutCredentials);
            }
            (None, None)
        }
    };
    // Every task the daemon starts is owned here and stops on `stop_rx` (the peer node owns its own).
    let mut tasks = tokio::task::JoinSet::new();
    let _mdns = match (&peers, cfg.settings.mdns) {
        (Some(node), true) => {
            match crate::peer::discovery::Mdns::start(
                node.clone(),
                &cfg.deployment,
                stop_rx.clone(),
            ) {
                Ok((m, browse)) => {
                    tasks.spawn(browse.instrument(span.clone()));
                    Some(m)
                }
                Err(e) => {
                    // Static peers still work; a LAN without multicast is no reason not to serve.
                    tracing::warn!(cause = %e, "mdns discovery is off");
                    None
                }
            }
        }
        _ => None,
    };
    let (bundle_tx, bundle_rx) = tokio::sync::mpsc::channel(4);
    let _bundles = match &cfg.settings.bundle_dir {
        Some(dir) => {
            let (watcher, debounce) =
                crate::sync::bundle::BundleWatcher::start(dir.clone(), bundle_tx, stop_rx.clone())?;
            tasks.spawn(debounce.instrument(span.clone()));
            Some(watcher)
        }
        None => None,
    };
    let origin = match &cfg.origin {
        Some((url, origin_cfg)) => Some(crate::origin::connect(url, origin_cfg).await?),
        None => None,
    };
    let engine = crate::sync::Engine::new(
        crate::sync::SyncConfig {
            agent_id: me.clone(),
            origin,
            deployment,
            trust: trust.clone(),
            backend: cfg.settings.backend,
            poll: cfg.settings.poll,
            max_backoff: cfg.settings.poll.max(std::time::Duration::from_secs(60)),
            max_wait: cfg.settings.max_wait,
            gather: cfg.settings.gather,
            budget: cfg.budget.clone(),
            activate: cfg.settings.activate,
            activate_deadline: cfg.settings.activate_deadline,
        },
        store.clone(),
        service.clone(),
        sync_status.clone(),
        peers.clone(),
    );
    let sync_beat = engine.beat();
    tasks.spawn(
        engine
            .run(
                crate::sync::Inputs {
                    hints,
                    haves: peers.as_ref().and_then(|p| p.take_haves()),
                    bundles: Some(bundle_rx),
                },
                stop_rx.clone(),
            )
            .instrument(span.clone()),
    );
    let status: StatusFn = {
        let (service, deployment, sync_status, peers, me, store) = (
            service.clone(),
            cfg.deployment.clone(),
            sync_status.clone(),
            peers.clone(),
            me.clone(),
            store.clone(),
        );
        Arc::new(move || {
            // The active release is read under the sync status's lock, which the swap also holds:
            // a document never shows the new release beside the old one's errors or progress.
            let (sync, active) = match sync_status.lock() {
                Ok(s) => (s.clone(), service.active()),
                Err(_) => (Default::default(), service.active()),
            };
            let usage = store.usage().ok();
            Status {
                agent_id: me.clone(),
                deployment: deployment.clone(),
                active: active.map(|r| ActiveRelease {
                    version: r.version,
                    manifest: r.manifest_id.to_string(),
                    backend: r.backend().to_owned(),
                    activated_at: r.activated_at().map(|t| t.to_string()),
                }),
                pending: sync.pending,
                offline_since: sync.offline_since,
                disk_full: sync.disk_full,
                last_error: sync.last_error,
                last_refused: service.last_refusal(),
                last_switch: sync.last_switch,
                clock_behind_trusting: crate::ledger::Ledger::new(&store)
                    .time_floor()
                    .ok()
                    .flatten()
                    .filter(|f| *f > jiff::Timestamp::now())
                    .map(|f| f.to_string()),
                last_refused_manifest: sync.last_refused_manifest,
                bytes_from_peers: sync.bytes_from_peers,
                bytes_from_origin: sync.bytes_from_origin,
                bytes_from_bundles: sync.bytes_from_bundles,
                bytes_served: service.metrics().served(),
                quic_listen: peers.as_ref().map(|p| p.listen_addr().to_string()),
                peers: peers.as_ref().map(|p| p.peers()).unwrap_or_default(),
                recognitions: Some(service.metrics().recognition_stats()),
                recent: service.metrics().recent(),
                releases: activation::release_summaries(&store).unwrap_or_default(),
                store_bytes: usage.as_ref().map(|u| u.complete_bytes + u.partial_bytes),
                store_budget: usage.as_ref().and_then(|u| u.budget),
            }
        })
    };
    let peer_statuses = crate::http::shop::PeerStatuses::default();
    if let Some(node) = &peers {
        let status = status.clone();
        node.set_status_source(Arc::new(move || {
            serde_json::to_vec(&status()).unwrap_or_default()
        }));
        tasks.spawn(
            crate::http::shop::watch(node.clone(), peer_statuses.clone(), stop_rx.clone())
                .instrument(span.clone()),
        );
    }
    let fleet: FleetFn = {
        let status = status.clone();
        let peer_statuses = peer_statuses.clone();
        Arc::new(move || {
            peer_statuses.touch();
            let s = status();
            let mut agents = vec![FleetMember {
                id: s.agent_id,
                is_self: true,
                live: true,
                active: s.active.map(|a| a.version),
                pending: s.pending.as_ref().map(|p| p.version),
                bytes_from_peers: s.bytes_from_peers,
                bytes_from_origin: s.bytes_from_origin,
                last_error: s.last_error,
                progress: s.pending,
                reaches_origin: Some(s.offline_since.is_none()),
                ..FleetMember::default()
            }];
            agents.extend(s.peers.into_iter().map(|p| {
                FleetMember {
                    progress: p
                        .live
                        .then(|| peer_statuses.get(&p.id).and_then(|st| st.pending))
                        .flatten(),
                    id: p.id,
                    is_self: false,
                    live: p.live,
                    addr: Some(p.addr),
                    active: p.active,
                    pending: p.pending,
                    banned: p.banned,
                    bytes_from: p.bytes_from,
                    bytes_to: p.bytes_to,
                    last_error: p.last_error,
                    reaches_origin: p.origin,
                    last_seen: p.last_seen,
                    banned_until: p.banned_until,
                    ..FleetMember::default()
                }
            }));
            FleetView {
                deployment: s.deployment,
                agents,
            }
        })
    };
    let listener = tokio::net::TcpListener::bind(cfg.settings.http_listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: cfg.settings.http_listen,
            source,
        })?;
    let addr = listener.local_addr()?;
    if let Some(node) = &peers {
        println!("quic listening on {}", node.listen_addr());
    }
    println!("listening on http://{addr}");
    crate::systemd::ready();
    {
        let (status, service) = (status.clone(), service.clone());
        tasks.spawn(
            crate::systemd::run(
                move || status().summary_line(),
                move || {
                    service.inference_alive(crate::systemd::INFERENCE_LIMIT)?;
                    let quiet = sync_beat.since();
                    if quiet > crate::systemd::SYNC_LIMIT {
                        return Err(format!(
                            "the sync loop has not gone round for {:.0} s",
                            quiet.as_secs_f64()
                        ));
                    }
                    Ok(())
                },
                stop_rx,
            )
            .instrument(span.clone()),
        );
    }
    let _inbox = match &cfg.settings.inbox {
        Some(inbox) => {
            let outbox = cfg
                .settings
                .outbox
                .clone()
                .unwrap_or_else(|| inbox.with_file_name("outbox"));
            Some(Inbox::start(service.clone(), inbox.clone(), outbox)?)
        }
        None => None,
    };
    let app = crate::http::router(AppState {
        service: service.clone(),
        status,
        fleet,
    });
    crate::http::serve(listener, app, shutdown).await?;
    crate::systemd::stopping();
    tracing::debug!("the HTTP API stopped");
    let _ = stop_tx.send(true);
    // Each task drops its work at once on stop; one that does not within the bound is aborted.
    if tokio::time::timeout(TASKS_STOP, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            left = tasks.len(),
            "tasks still running at shutdown; aborted"
        );
        tasks.abort_all();
    }
    tracing::debug!("the sync engine stopped");
    if let Some(node) = &peers {
        node.shutdown(std::time::Duration::from_secs(1)).await;
        tracing::debug!("left the fleet");
    }
    service.shutdown();
    Ok(())
}

/// A settled configuration for `import`.
#[derive(Clone, Debug)]
pub struct ImportConfig {
    pub data_dir: PathBuf,
    pub deployment: String,
    pub trust: Vec<PublicKey>,
    pub threshold: usize,
    /// The deployment's trust root envelope (`--trust-root`), instead of `trust` and `threshold`.
    pub trust_root: Option<Vec<u8>>,
    pub bundle: PathBuf,
    pub backend: BackendChoice,
}

/// Sideloads the newest release of a bundle directory into the store and makes it the active one: the
/// manifest is verified and must be newer than anything accepted; every blob is imported and checked;
/// the release must load and pass its canaries. Returns the version.
pub fn import(cfg: &ImportConfig) -> Result<u64, DaemonError> {
    let store = open_store(&cfg.data_dir, None)?;
    let name = deckhand_protocol::layout::Name::deployment(&cfg.deployment)
        .map_err(DaemonError::Deployment)?;
    let trust = load_trust(
        &cfg.deployment,
        &cfg.trust,
        cfg.threshold,
        cfg.trust_root.as_deref(),
        &store,
    )?;
    follow_bundle_roots(&trust, &store, &cfg.bundle, &name)?;
    let now = crate::ledger::Ledger::new(&store).trusted_now(jiff::Timestamp::now())?;
    let policy = trust.admit_policy(now).map_err(DaemonError::TrustRoot)?;
    let current = cfg.bundle.join(
        deckhand_protocol::layout::Layout::new("")
            .map_err(DaemonError::Deployment)?
            .current(&name),
    );
    let envelope = read_envelope_file(&current)?.ok_or_else(|| DaemonError::BundleRead {
        path: current.clone(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    let verified = activation::accept(
        &store,
        &policy,
        &cfg.deployment,
        &envelope,
        jiff::Timestamp::now(),
    )?;
    activation::import_bundle(&store, &cfg.bundle, &verified.manifest)?;
    let recognizer = activation::load_recognizer(&store, &verified, cfg.backend)?;
    let canaries = activation::canaries(&store, &verified.manifest)?;
    check_canaries(&recognizer, &canaries).map_err(|e| ActivationError::Release {
        version: verified.manifest.version,
        why: e.to_string(),
    })?;
    activation::record_active(&store, &verified)?;
    Ok(verified.manifest.version)
}
