//! The agent daemon (`deckhand-agent run`) and the manual sideload (`deckhand-agent import`).
//!
//! At start the daemon opens the store, loads the active release recorded there (signatures re-checked;
//! an expired manifest keeps serving, since recognition must never stop), and serves recognitions over
//! HTTP and the inbox. It needs no network to do so.

use crate::activation::{self, ActivationError};
use crate::http::{AppState, StatusFn};
use crate::inbox::Inbox;
use crate::metrics::Metrics;
use crate::recognizer::BackendChoice;
use crate::recognizer::service::{Service, check_canaries};
use deckhand_protocol::{PublicKey, TrustPolicy};
use deckhand_store::{Options, Store, StoreError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// A settled configuration for `run`.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub data_dir: PathBuf,
    pub deployment: String,
    pub trust: Vec<PublicKey>,
    pub threshold: usize,
    pub http_listen: SocketAddr,
    pub inbox: Option<PathBuf>,
    pub outbox: Option<PathBuf>,
    pub backend: BackendChoice,
    pub store_budget: Option<u64>,
    /// Where releases come from; `None` runs from the store alone.
    pub origin: Option<(crate::origin::OriginUrl, crate::origin::OriginConfig)>,
    /// How often current.json is polled.
    pub poll: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(String),
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
    Inbox(#[from] crate::inbox::InboxError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Origin(#[from] crate::origin::OriginError),
}

pub fn open_store(data_dir: &std::path::Path, budget: Option<u64>) -> Result<Store, StoreError> {
    Store::open(data_dir.join("store"), Options { budget })
}

/// Loads the active release recorded in the store into the service. Returns its version, or `None`.
pub async fn restore_active(
    store: &Store,
    service: &Service,
    policy: &TrustPolicy,
    backend: BackendChoice,
) -> Result<Option<u64>, DaemonError> {
    let Some(envelope) = activation::active_envelope(store)? else {
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
    .await
    .map_err(|e| DaemonError::Config(format!("loader stopped: {e}")))??;
    let version = recognizer.version;
    if let Err(e) = service.activate(recognizer, &canaries) {
        return Err(DaemonError::Activation(ActivationError::Release {
            version,
            why: e.to_string(),
        }));
    }
    Ok(Some(version))
}

/// Runs until `shutdown` resolves.
pub async fn run(
    cfg: RunConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let policy = TrustPolicy::new(cfg.trust.clone(), cfg.threshold)
        .map_err(|e| DaemonError::Config(format!("--trust/--threshold: {e}")))?;
    let store = open_store(&cfg.data_dir, cfg.store_budget)?;
    let metrics = Arc::new(Metrics::default());
    let service = Service::start(metrics.clone())?;
    match restore_active(&store, &service, &policy, cfg.backend).await {
        Ok(Some(v)) => tracing::info!(version = v, "serving the active release from the store"),
        Ok(None) => {
            tracing::warn!("no release in the store yet; recognitions answer 503 until one arrives")
        }
        Err(e) => {
            tracing::error!(cause = %e, "the recorded active release does not load");
            service.refuse(0, "", &e.to_string());
        }
    }
    let sync_status = Arc::new(std::sync::Mutex::new(crate::sync::SyncStatus::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sync_task = match &cfg.origin {
        Some((url, origin_cfg)) => {
            let origin = crate::origin::Origin::connect(url, origin_cfg).await?;
            let deployment = deckhand_protocol::layout::Name::deployment(&cfg.deployment)
                .map_err(|e| DaemonError::Config(format!("--deployment: {e}")))?;
            let sc = crate::sync::SyncConfig {
                origin,
                deployment,
                policy: policy.clone(),
                backend: cfg.backend,
                poll: cfg.poll,
                max_backoff: cfg.poll.max(std::time::Duration::from_secs(60)),
            };
            Some(tokio::spawn(crate::sync::run(
                sc,
                store.clone(),
                service.clone(),
                sync_status.clone(),
                stop_rx,
            )))
        }
        None => None,
    };
    let status: StatusFn = {
        let (service, deployment, sync_status) =
            (service.clone(), cfg.deployment.clone(), sync_status.clone());
        Arc::new(move || {
            let active = service.active();
            let sync = sync_status.lock().map(|s| s.clone()).unwrap_or_default();
            serde_json::json!({
                "deployment": deployment,
                "active": active.as_ref().map(|r| serde_json::json!({
                    "version": r.version, "manifest": r.manifest_id.to_string(), "backend": r.backend(),
                })),
                "pending": sync.pending,
                "offline_since": sync.offline_since,
                "last_error": sync.last_error,
                "last_refused": service.last_refusal(),
            })
        })
    };
    let listener = tokio::net::TcpListener::bind(cfg.http_listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: cfg.http_listen,
            source,
        })?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    let _inbox = match &cfg.inbox {
        Some(inbox) => {
            let outbox = cfg
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
    });
    crate::http::serve(listener, app, shutdown).await?;
    let _ = stop_tx.send(true);
    if let Some(t) = sync_task {
        let _ = t.await;
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
    pub bundle: PathBuf,
    pub backend: BackendChoice,
}

/// Sideloads the newest release of a bundle directory into the store and makes it the active one: the
/// manifest is verified and must be newer than anything accepted; every blob is imported and checked;
/// the release must load and pass its canaries. Returns the version.
pub fn import(cfg: &ImportConfig) -> Result<u64, DaemonError> {
    let policy = TrustPolicy::new(cfg.trust.clone(), cfg.threshold)
        .map_err(|e| DaemonError::Config(format!("--trust/--threshold: {e}")))?;
    let store = open_store(&cfg.data_dir, None)?;
    let name = deckhand_protocol::layout::Name::deployment(&cfg.deployment)
        .map_err(|e| DaemonError::Config(format!("--deployment: {e}")))?;
    let current = cfg.bundle.join(
        deckhand_protocol::layout::Layout::new("")
            .map_err(|e| DaemonError::Config(e.to_string()))?
            .current(&name),
    );
    let envelope = std::fs::read(&current)
        .map_err(|e| DaemonError::Config(format!("bundle {}: {e}", current.display())))?;
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
