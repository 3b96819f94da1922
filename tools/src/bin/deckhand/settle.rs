//! Settling flags: each value parsed and checked once, into what the library takes. A bad value is a
//! usage error (exit 2) that names the flag and the value.

use clap::Args;
use deckhand_protocol::layout::Name;
use deckhand_protocol::{PublicKey, SecretKey, TrustPolicy};
use deckhand_tools::ToolError;
use deckhand_tools::origin::{Bucket, OriginConfig, OriginUrl};
use deckhand_tools::publish::Input;
use jiff::SignedDuration;
use std::path::{Path, PathBuf};

/// Where a command works: an origin and a deployment in it.
#[derive(Args, Clone)]
pub struct OriginArgs {
    /// Where releases live: s3://bucket/prefix or file:///dir.
    #[arg(long)]
    pub origin: String,
    /// An S3-compatible endpoint; path-style addressing is used with it.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    /// The deployment name (e.g. shop-1).
    #[arg(long)]
    pub deployment: String,
}

/// Where a layout command works: a bucket (and prefix), without a deployment.
#[derive(Args, Clone)]
pub struct BucketArgs {
    /// The bucket: s3://bucket[/prefix] (or file:///dir).
    #[arg(long)]
    pub origin: String,
    /// An S3-compatible endpoint; path-style addressing is used with it.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
}

/// A usage error naming the flag, its value and what is wrong with it.
pub fn usage(flag: &str, value: &str, why: impl std::fmt::Display) -> ToolError {
    ToolError::Usage(format!("--{flag} {value:?}: {why}"))
}

/// Settled origin flags.
pub struct Target {
    pub origin: std::sync::Arc<dyn Bucket>,
    pub config: OriginConfig,
    pub deployment: Name,
}

pub async fn target(a: &OriginArgs) -> Result<Target, ToolError> {
    let url = origin_url(&a.origin)?;
    let deployment =
        Name::deployment(&a.deployment).map_err(|e| usage("deployment", &a.deployment, e))?;
    let (origin, config) = connect(&url, a.endpoint_url.as_deref()).await?;
    Ok(Target {
        origin,
        config,
        deployment,
    })
}

/// The bucket `--origin` names, through `--endpoint-url` when given.
pub async fn bucket(
    origin: &str,
    endpoint_url: Option<&str>,
) -> Result<std::sync::Arc<dyn Bucket>, ToolError> {
    Ok(connect(&origin_url(origin)?, endpoint_url).await?.0)
}

fn origin_url(origin: &str) -> Result<OriginUrl, ToolError> {
    origin.parse().map_err(|e| usage("origin", origin, e))
}

async fn connect(
    url: &OriginUrl,
    endpoint_url: Option<&str>,
) -> Result<(std::sync::Arc<dyn Bucket>, OriginConfig), ToolError> {
    let config = OriginConfig {
        endpoint_url: endpoint_url.filter(|e| !e.is_empty()).map(str::to_owned),
        ..OriginConfig::default()
    };
    let origin = deckhand_tools::origin::connect(url, &config).await?;
    Ok((origin, config))
}

pub fn read_secret_key(path: &Path) -> Result<SecretKey, ToolError> {
    let text = std::fs::read_to_string(path).map_err(ToolError::io("read key", path))?;
    SecretKey::from_file_text(&text).map_err(|e| usage("key", &path.display().to_string(), e))
}

pub fn read_public_keys(paths: &[PathBuf]) -> Result<Vec<PublicKey>, ToolError> {
    paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).map_err(ToolError::io("read trusted key", p))?;
            PublicKey::from_file_text(&text)
                .map_err(|e| usage("trust", &p.display().to_string(), e))
        })
        .collect()
}

/// The trust policy of `--trust` keys and `--threshold`.
pub fn policy(paths: &[PathBuf], threshold: usize) -> Result<TrustPolicy, ToolError> {
    TrustPolicy::new(read_public_keys(paths)?, threshold)
        .map_err(|e| usage("threshold", &threshold.to_string(), e))
}

/// A policy of one trusted signature from any of `paths`, or `None` when no key is given (signatures are
/// then not checked, and output says so).
pub fn optional_policy(paths: &[PathBuf]) -> Result<Option<TrustPolicy>, ToolError> {
    let keys = read_public_keys(paths)?;
    if keys.is_empty() {
        return Ok(None);
    }
    TrustPolicy::new(keys, 1)
        .map(Some)
        .map_err(|e| usage("trust", "", e))
}

/// Parses `30d`, `12h`, `90m`, `45s` or `2w`.
pub fn parse_duration(flag: &str, s: &str) -> Result<SignedDuration, ToolError> {
    let bad = |why: &str| usage(flag, s, why);
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| bad("needs a unit: s, m, h, d or w"))?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n
        .parse()
        .map_err(|_| bad("expected a whole number and a unit, like 30d"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(bad("the unit must be s, m, h, d or w")),
    };
    if n <= 0 {
        return Err(bad("must be above zero"));
    }
    n.checked_mul(secs)
        .map(SignedDuration::from_secs)
        .ok_or_else(|| bad("too long"))
}

pub fn parse_triple(flag: &str, s: &str) -> Result<[f32; 3], ToolError> {
    let v: Vec<f32> = s
        .split(',')
        .map(|p| p.trim().parse::<f32>())
        .collect::<Result<_, _>>()
        .map_err(|_| usage(flag, s, "expected three numbers, R,G,B"))?;
    let arr: [f32; 3] = v
        .try_into()
        .map_err(|_| usage(flag, s, "expected exactly three numbers, R,G,B"))?;
    if arr.iter().any(|x| !x.is_finite()) {
        return Err(usage(flag, s, "numbers must be finite"));
    }
    Ok(arr)
}

pub fn parse_input(flag: &str, s: &str) -> Result<Input, ToolError> {
    s.parse().map_err(|e: String| usage(flag, s, e))
}

pub fn work_dir() -> Result<tempfile::TempDir, ToolError> {
    tempfile::Builder::new()
        .prefix("deckhand-")
        .tempdir()
        .map_err(ToolError::io(
            "create a work directory in",
            &std::env::temp_dir(),
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_or_name_the_flag() {
        assert_eq!(
            parse_duration("expires-in", "30d").unwrap(),
            SignedDuration::from_secs(30 * 86_400)
        );
        assert_eq!(
            parse_duration("expires-in", "90m").unwrap(),
            SignedDuration::from_secs(5400)
        );
        for bad in ["30", "d", "-1d", "0h", "3y", "1.5d", ""] {
            let err = parse_duration("expires-in", bad).unwrap_err();
            assert!(
                matches!(err, ToolError::Usage(ref m) if m.starts_with("--expires-in")),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn triples_and_inputs_parse_or_name_the_flag() {
        assert_eq!(parse_triple("mean", "0.5, 0.5,0.5").unwrap(), [0.5; 3]);
        assert!(
            parse_triple("mean", "1,2")
                .unwrap_err()
                .to_string()
                .starts_with("--mean")
        );
        assert!(
            parse_triple("std", "a,b,c")
                .unwrap_err()
                .to_string()
                .starts_with("--std")
        );
        assert_eq!(
            parse_input("hef", "s3://b/models/compilation/j/hailo8/m.hef").unwrap(),
            Input::Remote {
                bucket: "b".into(),
                key: "models/compilation/j/hailo8/m.hef".into()
            }
        );
        assert!(
            parse_input("hef", "s3://b")
                .unwrap_err()
                .to_string()
                .starts_with("--hef")
        );
    }
}
