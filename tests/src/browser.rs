//! A real browser for the shop page's test: Debian's headless Chromium driven over the DevTools protocol
//! through `--remote-debugging-pipe` (JSON messages separated by NUL bytes on file descriptors 3 and 4),
//! so no port is opened and nothing is downloaded. The browser is killed when the value is dropped.

use serde_json::{Value, json};
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long one DevTools call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The Chromium binary, if one is installed (`.ci/run` installs Debian's `chromium`).
pub fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .map(move |dir| dir.join(name))
        })
        .find(|p| p.is_file())
}

pub struct Browser {
    child: Child,
    to: std::fs::File,
    from: mpsc::Receiver<Value>,
    next: u64,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts headless Chromium with a fresh profile, showing a `width` x `height` window.
    pub fn launch(width: u32, height: u32) -> Browser {
        let bin = chromium()
            .unwrap_or_else(|| panic!("chromium is not installed (apt install chromium)"));
        let profile = tempfile::tempdir().unwrap_or_else(|e| panic!("profile dir: {e}"));
        let (cmd_read, cmd_write) = std::io::pipe().unwrap_or_else(|e| panic!("pipe: {e}"));
        let (out_read, out_write) = std::io::pipe().unwrap_or_else(|e| panic!("pipe: {e}"));
        let cmd_read: OwnedFd = cmd_read.into();
        let out_write: OwnedFd = out_write.into();
        let (r, w) = (cmd_read.as_raw_fd(), out_write.as_raw_fd());
        let mut command = Command::new(bin);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-pipe",
                &format!("--window-size={width},{height}"),
                &format!("--user-data-dir={}", profile.path().display()),
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec only async-signal-safe calls (dup2) are made.
        unsafe {
            command.pre_exec(move || {
                // Out of the way of 3 and 4 first, so neither end is overwritten by the other's dup2.
                let (r, w) = (
                    libc::fcntl(r, libc::F_DUPFD, 10),
                    libc::fcntl(w, libc::F_DUPFD, 10),
                );
                if r < 0 || w < 0 || libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start chromium: {e}"));
        drop(cmd_read);
        drop(out_write);
        let (tx, rx) = mpsc::sync_channel(1024);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(std::fs::File::from(OwnedFd::from(out_read)));
            loop {
                let mut buf = Vec::new();
                match reader.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        buf.pop();
                        if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                            && tx.send(v).is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Browser {
            child,
            to: std::fs::File::from(OwnedFd::from(cmd_write)),
            from: rx,
            next: 0,
            session: None,
            _profile: profile,
        }
    }

    /// One DevTools call; returns its `result`, panicking on an error answer or a timeout.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.to
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("writing to chromium: {e}"));
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .from
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("{method}: no answer from chromium: {e}"));
            if v["id"].as_u64() == Some(id) {
                if let Some(err) = v.get("error") {
                    panic!("{method}: chromium answered {err}");
                }
                return v["result"].clone();
            }
        }
    }

    /// Opens `url` in a new tab and talks to that tab from now on.
    pub fn open(&mut self, url: &str) {
        self.session = None;
        let target = self.call("Target.createTarget", json!({ "url": url }));
        let id = target["targetId"].clone();
        let attached = self.call(
            "Target.attachToTarget",
            json!({ "targetId": id, "flatten": true }),
        );
        self.session = attached["sessionId"].as_str().map(str::to_owned);
        assert!(self.session.is_some(), "no DevTools session: {attached}");
    }

    /// Evaluates a JavaScript expression in the page; returns its value.
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Evaluates `expression` until it gives something truthy (not false, null, 0 or ""); returns it.
    pub fn wait_for(&mut self, what: &str, expression: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.eval(expression);
            let truthy = match &v {
                Value::Null | Value::Bool(false) => false,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "the page never showed {what} within {limit:?}; page text:\n{}",
                self.eval("document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Gives the file input matched by `selector` these files (its `change` event fires).
    pub fn set_files(&mut self, selector: &str, files: &[&Path]) {
        let doc = self.call("DOM.getDocument", json!({}));
        let node = self.call(
            "DOM.querySelector",
            json!({ "nodeId": doc["root"]["nodeId"], "selector": selector }),
        );
        let files: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        self.call(
            "DOM.setFileInputFiles",
            json!({ "nodeId": node["nodeId"], "files": files }),
        );
    }

    /// A PNG of the page as shown, written to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        use base64::Engine as _;
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let data = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("screenshot is not base64: {e}"));
        assert!(data.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        }
        std::fs::write(path, data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
