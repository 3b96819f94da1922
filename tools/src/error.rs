//! The operator CLI's errors. Every message names what went wrong and where; `exit_code` maps them to the
//! CLI's contract (1 failure, 2 usage).

use deckhand_agent::origin::OriginError;
use deckhand_agent::release::ReleaseError;
use deckhand_agent::release::loaders::LoadError;
use deckhand_protocol::VerifyError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// A flag's value is wrong; names the flag and the value.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("release refused: {0}")]
    Release(#[from] ReleaseError),
    #[error("release refused: {0}")]
    Load(#[from] LoadError),
    #[error("{context}: {why}")]
    TrustRoot { context: String, why: String },
    #[error("{context}: {source}")]
    Verify {
        context: String,
        #[source]
        source: VerifyError,
    },
    #[error(
        "version {version} of deployment {deployment} was published by another publisher after this publish \
         chose it; nothing was overwritten. Run the command again to publish as the next version."
    )]
    VersionTaken { deployment: String, version: u64 },
    #[error(
        "current.json changed under this publisher {attempts} times in a row (other publishers keep \
         writing); the manifest is published, current.json was not moved: run the command again"
    )]
    CurrentContended { attempts: u32 },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Journal(#[from] crate::layout::journal::JournalError),
    #[error(transparent)]
    Migration(#[from] deckhand_protocol::migration::MigrationError),
    #[error(transparent)]
    Fixture(#[from] crate::shop::fixtures::FixtureError),
    #[error(transparent)]
    Ca(#[from] crate::fleet_ca::CaError),
    #[error(transparent)]
    Name(#[from] deckhand_protocol::layout::LayoutError),
    #[error("a background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(
        "deckhand-agent was not found beside {beside} (or one directory up): build it \
         (cargo build --release) or set DECKHAND_AGENT_BIN"
    )]
    AgentBinary { beside: PathBuf },
    #[error("agent {name} did not start: {why} (its log: {log})")]
    AgentStart {
        name: String,
        why: String,
        log: PathBuf,
    },
    #[error("agent {name}: {why}")]
    AgentApi { name: String, why: String },
    #[error("agent {name}: no {what} after {secs} s; status: {status:?}")]
    Timeout {
        name: String,
        what: String,
        secs: u64,
        status: Box<deckhand_protocol::status::Status>,
    },
    #[error("--out {out}: {existing} already exists; refusing to overwrite a key")]
    KeyExists { out: PathBuf, existing: PathBuf },
    #[error("no randomness from the operating system: {0}")]
    Random(getrandom::Error),
    #[error(
        "{name} {input}: no such object, at that key or at a key a layout migration moved it to or from"
    )]
    NoSuchInput { name: String, input: String },
    #[error("{0} is empty")]
    EmptyFile(PathBuf),
    #[error("the deployment is at the highest possible version")]
    VersionsExhausted,
    #[error("the manifest this publish built is invalid: {0}")]
    BuiltManifest(#[source] deckhand_protocol::ManifestError),
    #[error("version {version} of deployment {deployment} does not exist ({key})")]
    NoSuchVersion {
        version: u64,
        deployment: String,
        key: String,
    },
    #[error("cannot roll back to version {version}: {}", missing.join("; "))]
    RollbackIncomplete { version: u64, missing: Vec<String> },
    #[error("{0} does not exist")]
    NoSuchObject(String),
    #[error("the bundle was refused and nothing was written: {}", problems.join("; "))]
    BundleRefused { problems: Vec<String> },
    #[error(
        "the demo saw {failed} failed and {mixed} mixed answers, recognised {right} photos and {counted} cards on the counter"
    )]
    DemoFailed {
        failed: u64,
        mixed: u64,
        right: usize,
        counted: usize,
    },
    #[error("mqtt broker: {0}")]
    Broker(String),
    #[error("network namespace: {0}")]
    Netns(String),
    #[error("{mode}: not every agent activated the release within {secs} s")]
    BenchTimeout { mode: &'static str, secs: u64 },
    #[error(transparent)]
    Store(#[from] deckhand_store::StoreError),
    #[error("{0} is not UTF-8")]
    NotUtf8(PathBuf),
    #[error("usearch: {0}")]
    Usearch(String),
    #[error(transparent)]
    Swap(#[from] deckhand_agent::recognizer::service::SwapError),
    #[error("the recognizer service: {0}")]
    Service(#[source] std::io::Error),
    #[error("shadow evaluation: {0}")]
    Shadow(String),
    #[error("a temporary directory: {0}")]
    TempDir(#[source] std::io::Error),
    #[error("{what} is corrupt: {why}")]
    Corrupt { what: String, why: &'static str },
    #[error(transparent)]
    Recognizer(#[from] deckhand_agent::recognizer::RecognizerError),
    #[error(transparent)]
    Backend(#[from] deckhand_agent::recognizer::BackendError),
    #[error(transparent)]
    Layout(#[from] crate::layout::LayoutError),
    #[error(transparent)]
    Check(#[from] crate::check::CheckError),
    #[error("cannot write the report as JSON: {0}")]
    Report(#[source] serde_json::Error),
}

impl ToolError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ToolError::Usage(_) => 2,
            _ => 1,
        }
    }

    pub fn io<'a>(
        what: &'static str,
        path: &'a std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> ToolError + 'a {
        move |source| ToolError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
}
