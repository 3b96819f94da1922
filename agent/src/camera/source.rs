//! Where a camera's frames come from, and the task that reads them into the camera's one-frame slot.
//!
//! - `exec:COMMAND`: MJPEG on a child process's stdout (`rpicam-vid ... --codec mjpeg -o -` on a Pi),
//!   run with `sh -c`. The child is owned: killed when the agent stops, restarted with backoff when it
//!   exits (its last line on stderr is the camera's error).
//! - `http://...`: an IP camera's multipart MJPEG stream (the part headers are skipped as bytes between
//!   frames). Reconnected with backoff; a stream silent for 10 s counts as dead.
//! - `v4l2:/dev/videoN`: a USB camera through the kernel's V4L2 API, MJPEG or YUYV ([`super::v4l2`]),
//!   read on a blocking thread; reopened with backoff when it fails or is unplugged.
//! - `dir:PATH`: the images in a directory, in name order, once, at the camera's rate (tests, demos, a
//!   recorded day); the camera then says `ended`.
//!
//! The slot holds the newest frame only: a frame the analysis has not taken when the next arrives is
//! dropped (and counted), so nothing queues behind a slow recognizer.

use super::mjpeg::{MAX_FRAME, Splitter};
use super::{CameraState, Frame, Slot};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::AsyncReadExt as _;

/// How long a stream may send nothing before it counts as dead.
const SILENCE: Duration = Duration::from_secs(10);
/// Restart delays: doubling from 1 s to 30 s; back to 1 s after a run of a minute.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// A camera's source, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Exec(String),
    Http(String),
    V4l2(PathBuf),
    Dir(PathBuf),
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(cmd) = s.strip_prefix("exec:") {
            if cmd.trim().is_empty() {
                return Err("exec: needs a command".into());
            }
            Ok(Source::Exec(cmd.to_owned()))
        } else if let Some(dev) = s.strip_prefix("v4l2:") {
            if !dev.starts_with('/') || dev.contains('\0') {
                return Err("v4l2: needs a device's absolute path, e.g. v4l2:/dev/video0".into());
            }
            Ok(Source::V4l2(PathBuf::from(dev)))
        } else if let Some(dir) = s.strip_prefix("dir:") {
            if dir.is_empty() {
                return Err("dir: needs a directory".into());
            }
            Ok(Source::Dir(PathBuf::from(dir)))
        } else if s.starts_with("http://") {
            let uri: hyper::Uri = s.parse().map_err(|e| format!("not a URL: {e}"))?;
            if uri.host().is_none_or(str::is_empty) {
                return Err("the URL names no host".into());
            }
            Ok(Source::Http(s.to_owned()))
        } else {
            Err(
                "a source is exec:COMMAND, v4l2:/dev/videoN, http://HOST/PATH (MJPEG) or dir:PATH"
                    .into(),
            )
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Exec(c) => write!(f, "exec:{c}"),
            Source::Dir(d) => write!(f, "dir:{}", d.display()),
            Source::V4l2(d) => write!(f, "v4l2:{}", d.display()),
            // Credentials in the URL are not shown.
            Source::Http(u) => match u.parse::<hyper::Uri>() {
                Ok(uri) => write!(
                    f,
                    "http://{}{}",
                    uri.authority()
                        .map(|a| a.as_str().rsplit('@').next().unwrap_or_default())
                        .unwrap_or_default(),
                    uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
                ),
                Err(_) => write!(f, "http://"),
            },
        }
    }
}

/// Reads `source` into the slot until `stop`, restarting it with backoff when it fails.
pub async fn run(
    source: Source,
    fps: u32,
    slot: Arc<Slot>,
    state: Arc<CameraState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut retry = FIRST_RETRY;
    loop {
        let began = tokio::time::Instant::now();
        state.running();
        let ended = match &source {
            Source::Exec(cmd) => exec(cmd, &slot, &state, &mut stop).await,
            Source::Http(url) => http(url, &slot, &state, &mut stop).await,
            Source::V4l2(dev) => v4l2(dev, fps, &slot, &state, &mut stop).await,
            Source::Dir(dir) => match replay(dir, fps, &slot, &mut stop).await {
                Ok(()) => {
                    state.ended();
                    stopped(&mut stop).await;
                    return;
                }
                Err(e) => Err(e),
            },
        };
        match ended {
            Ok(()) => return,
            Err(why) => {
                if began.elapsed() > Duration::from_secs(60) {
                    retry = FIRST_RETRY;
                }
                tracing::warn!(cause = %why, retry_in_s = retry.as_secs(), "camera failed; restarting");
                state.failed(why, retry);
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = stopped(&mut stop) => return,
                }
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

/// Resolves once `stop` is set (or its sender is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Feeds bytes through a splitter into the slot; counts what it refused.
fn feed(splitter: &mut Splitter, bytes: &[u8], slot: &Slot, state: &CameraState) {
    splitter.push(bytes);
    while let Some(frame) = splitter.next_frame() {
        slot.put(Frame::Jpeg(frame));
    }
    state.stream(splitter.refused, splitter.skipped);
}

/// `Ok` on stop; `Err` when the child exits or its output cannot be read.
async fn exec(
    cmd: &str,
    slot: &Slot,
    state: &CameraState,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the camera command: {e}"))?;
    let (Some(mut out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        return Err("the camera command has no output".into());
    };
    let mut err = tokio::io::BufReader::new(err);
    let mut last_err = String::new();
    let mut line = String::new();
    let mut err_open = true;
    let mut splitter = Splitter::new(MAX_FRAME);
    let mut buf = vec![0u8; 64 * 1024];
    let outcome = loop {
        tokio::select! {
            n = tokio::time::timeout(SILENCE, out.read(&mut buf)) => match n {
                Ok(Ok(0)) => break None,
                Ok(Ok(n)) => feed(&mut splitter, &buf[..n], slot, state),
                Ok(Err(e)) => break Some(format!("reading the camera command's output: {e}")),
                Err(_) => break Some(format!("the camera command sent nothing for {} s", SILENCE.as_secs())),
            },
            r = tokio::io::AsyncBufReadExt::read_line(&mut err, &mut line), if err_open => {
                match r {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(_) => {
                        let l = line.trim();
                        if !l.is_empty() {
                            last_err = l.chars().take(300).collect();
                        }
                        line.clear();
                    }
                }
            }
            () = stopped(stop) => {
                let _ = child.kill().await;
                return Ok(());
            }
        }
    };
    // Stopped sending (exited, or silent): make sure it is gone, and say how it ended.
    let _ = child.start_kill();
    let status = tokio::time::timeout(Duration::from_secs(2), child.wait())
        .await
        .ok()
        .and_then(Result::ok);
    let how = match status {
        Some(s) => format!("the camera command exited ({s})"),
        None => "the camera command did not exit".to_owned(),
    };
    Err(match (outcome, last_err.is_empty()) {
        (Some(why), _) => why,
        (None, true) => how,
        (None, false) => format!("{how}: {last_err}"),
    })
}

/// A V4L2 device, read on a blocking thread that looks at its stop flag between frames. `Ok` on stop.
async fn v4l2(
    dev: &std::path::Path,
    fps: u32,
    slot: &Arc<Slot>,
    state: &Arc<CameraState>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let flag = Arc::new(AtomicBool::new(false));
    let mut reader = {
        let (dev, slot, state, flag) = (dev.to_owned(), slot.clone(), state.clone(), flag.clone());
        tokio::task::spawn_blocking(move || {
            super::v4l2::capture(&dev, fps, SILENCE, &slot, &state, &flag)
        })
    };
    tokio::select! {
        r = &mut reader => r.unwrap_or_else(|e| Err(format!("the camera's reader failed: {e}"))),
        () = stopped(stop) => {
            flag.store(true, Ordering::Relaxed);
            let _ = reader.await;
            Ok(())
        }
    }
}

/// An MJPEG stream over HTTP. `Ok` on stop.
async fn http(
    url: &str,
    slot: &Slot,
    state: &CameraState,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    use http_body_util::BodyExt as _;
    let uri: hyper::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let request = async {
        tokio::time::timeout(SILENCE, client.get(uri))
            .await
            .map_err(|_| format!("no answer within {} s", SILENCE.as_secs()))?
            .map_err(|e| format!("cannot reach the camera: {e}"))
    };
    let resp = tokio::select! {
        r = request => r?,
        () = stopped(stop) => return Ok(()),
    };
    if !resp.status().is_success() {
        return Err(format!("the camera answered {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut splitter = Splitter::new(MAX_FRAME);
    loop {
        tokio::select! {
            f = tokio::time::timeout(SILENCE, body.frame()) => match f {
                Ok(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        feed(&mut splitter, data, slot, state);
                    }
                }
                Ok(Some(Err(e))) => return Err(format!("the stream broke: {e}")),
                Ok(None) => return Err("the camera ended the stream".into()),
                Err(_) => return Err(format!("the stream sent nothing for {} s", SILENCE.as_secs())),
            },
            () = stopped(stop) => return Ok(()),
        }
    }
}

/// The images in `dir`, in name order, at `fps`. `Ok` when all were played (or on stop).
async fn replay(
    dir: &std::path::Path,
    fps: u32,
    slot: &Slot,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg"))
        })
        .collect();
    names.sort();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(fps.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for path in names {
        tokio::select! {
            _ = tick.tick() => {}
            () = stopped(stop) => return Ok(()),
        }
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        slot.put(Frame::Jpeg(bytes));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_and_show_no_credentials() {
        assert_eq!(
            "exec:rpicam-vid -t 0 -o -".parse::<Source>(),
            Ok(Source::Exec("rpicam-vid -t 0 -o -".into()))
        );
        assert_eq!(
            "v4l2:/dev/video0".parse::<Source>(),
            Ok(Source::V4l2("/dev/video0".into()))
        );
        assert_eq!(
            Source::V4l2("/dev/video2".into()).to_string(),
            "v4l2:/dev/video2"
        );
        assert_eq!(
            "dir:/srv/day".parse::<Source>(),
            Ok(Source::Dir("/srv/day".into()))
        );
        let cam: Source = "http://admin:pw@10.0.0.9:8080/video.mjpg".parse().unwrap();
        assert_eq!(cam.to_string(), "http://10.0.0.9:8080/video.mjpg");
        for bad in [
            "exec:",
            "dir:",
            "rtsp://cam/1",
            "/dev/video0",
            "http://",
            "v4l2:",
            "v4l2:video0",
            "v4l2:/dev/vid\0eo0",
        ] {
            assert!(bad.parse::<Source>().is_err(), "{bad}");
        }
    }
}
