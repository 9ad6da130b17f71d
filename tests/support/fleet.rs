//! Test support: fleet. Directory images holding a tiny HTTP app, and helpers to wait on
//! processes and HTTP with deadlines.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How an app image behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppKind {
    /// `GET /` names the image, `/healthz` answers 200.
    Healthy,
    /// Like `Healthy`, but `/healthz` answers 500.
    Unhealthy,
    /// Like `Healthy`, but every answer takes `SLOW_MS` milliseconds.
    Slow,
}

/// How long every answer of an [`AppKind::Slow`] app takes.
pub const SLOW_MS: u64 = 500;

/// The app: python3 stdlib only. Routes: `/` (names `$KILN_IMAGE` and `$KILN_INSTANCE_ID`),
/// `/healthz`, `/slow?ms=N` (answers after N ms), `/pid`. It exits when its working directory
/// disappears, so a test's temp dir never leaves it running.
const APP: &str = r#"
import os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs

KIND = sys.argv[1] if len(sys.argv) > 1 else "healthy"
IMAGE = os.environ.get("KILN_IMAGE", "")
INSTANCE = os.environ.get("KILN_INSTANCE_ID", "")
SLOW_MS = int(os.environ.get("APP_SLOW_MS", "500"))
HOME_DIR = os.getcwd()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, text):
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        url = urlparse(self.path)
        if KIND == "slow":
            time.sleep(SLOW_MS / 1000)
        if url.path == "/healthz":
            if KIND == "unhealthy":
                self.reply(500, "unhealthy\n")
            else:
                self.reply(200, "ok\n")
        elif url.path == "/slow":
            ms = int(parse_qs(url.query).get("ms", ["1000"])[0])
            time.sleep(ms / 1000)
            self.reply(200, "slow image=%s instance=%s\n" % (IMAGE, INSTANCE))
        elif url.path == "/pid":
            self.reply(200, "%d\n" % os.getpid())
        else:
            self.reply(200, "image=%s instance=%s\n" % (IMAGE, INSTANCE))

    do_HEAD = do_GET

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(n)
        self.reply(200, "posted %d bytes to instance=%s\n" % (len(data), INSTANCE))

def watchdog():
    while os.path.isdir(HOME_DIR):
        time.sleep(1)
    os._exit(0)

class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

threading.Thread(target=watchdog, daemon=True).start()
Server(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// Creates the directory image `dir/name` holding a healthy app; returns its absolute path
/// (which is the image id).
pub fn write_app_image(dir: &Path, name: &str) -> PathBuf {
    write_app_image_kind(dir, name, AppKind::Healthy)
}

/// Creates the directory image `dir/name` holding an app of `kind`; returns its absolute path.
pub fn write_app_image_kind(dir: &Path, name: &str, kind: AppKind) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let image = dir.join(name);
    std::fs::create_dir_all(&image).expect("create image dir");
    std::fs::write(image.join("app.py"), APP).expect("write app.py");
    let kind = match kind {
        AppKind::Healthy => "healthy",
        AppKind::Unhealthy => "unhealthy",
        AppKind::Slow => "slow",
    };
    // `exec` keeps the app the process the provider started, so its pid is the app's.
    let run = format!(
        "#!/bin/sh\nexport APP_SLOW_MS={SLOW_MS}\nexec python3 \"$(dirname \"$0\")/app.py\" {kind}\n"
    );
    std::fs::write(image.join("run"), run).expect("write run");
    std::fs::set_permissions(image.join("run"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod run");
    image.canonicalize().expect("canonical image path")
}

/// Whether python3 (which the app images need) is installed. Prints a loud SKIP when it is
/// not, and panics instead when `CI=true`.
pub fn have_python3() -> bool {
    let found = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "python3 is required on CI");
        eprintln!("SKIP: python3 not found; the app images need it");
    }
    found
}

/// Polls `check` every 20 ms until it returns `Some`, panicking with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GETs `url` and returns (status, body), or `None` on a connection error.
pub async fn get(client: &reqwest::Client, url: &str) -> Option<(u16, String)> {
    let reply = client.get(url).timeout(Duration::from_secs(10)).send().await.ok()?;
    let status = reply.status().as_u16();
    Some((status, reply.text().await.ok()?))
}

/// Waits until `GET http://address/healthz` answers 200.
pub async fn wait_healthy(client: &reqwest::Client, address: &str) {
    let url = format!("http://{address}/healthz");
    wait_for(&format!("{url} to answer 200"), Duration::from_secs(20), || async {
        get(client, &url).await.filter(|(status, _)| *status == 200).map(|_| ())
    })
    .await
}

/// Whether a process with `pid` exists (zombies count as gone).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        }
        Err(_) => false,
    }
}

/// Whether any process is in process group `pgid`.
pub fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.filter_map(Result::ok).any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Fields after the command: state, ppid, pgrp.
        fields.first() != Some(&"Z") && fields.get(2) == Some(&pgid.to_string().as_str())
    })
}

/// A client that never goes through a proxy (tests talk to 127.0.0.1 only).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().expect("http client")
}

/// An instance app for a repo's image directory (`app.py` beside [`APP_RUN`]): every GET answers
/// `image=<basename of $KILN_IMAGE>`; it exits when its work dir is removed.
pub const IMAGE_APP: &str = r#"
import os, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
IMAGE = os.path.basename(os.environ.get("KILN_IMAGE", "?"))
WORK = os.getcwd()
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        body = ("image=%s\n" % IMAGE).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
def watchdog():
    while os.path.isdir(WORK):
        time.sleep(1)
    os._exit(0)
class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
threading.Thread(target=watchdog, daemon=True).start()
Server(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// The image's `run` entry point for [`IMAGE_APP`] (or any `app.py` beside it).
pub const APP_RUN: &str = "#!/bin/sh\nexec python3 \"$(dirname \"$0\")/app.py\"\n";
