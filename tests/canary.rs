//! Weighted canaries and the gray entry through the real daemon (issue 14): a canary with
//! `weight: 10%` takes 10% ± 2% of 10,000 requests through the real `kiln lb`, the gray port
//! never serves the old image once the rollout routes, the `X-Kiln-Canary` header pins a
//! client to either side, and promotion puts the whole fleet on the new image.

// The tests are synchronous: they block between polls of real processes, never in a runtime.
#![allow(clippy::disallowed_methods)]

mod support;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::daemon::{Daemon, for_commit, kiln};
use support::fleet::{APP_RUN, have_python3};
use support::git::{Entry, require_git};

const WAIT: Duration = Duration::from_secs(90);

/// The app: answers every GET with the content of `VERSION` beside it.
const APP: &str = r#"
import os, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = open(os.path.join(HERE, "VERSION")).read().strip()
WORK = os.getcwd()
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        body = VERSION.encode()
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

fn manifest(port: u16, gray: u16) -> String {
    format!(
        "fleets:
  - name: web
    paths: [image/, hooks/]
    image:
      stages:
        - {{ name: app, path: image/app, bake: hooks/bake-dir }}
      timeout: 1m
    rollout:
      provider: local
      capacity: 4
      maxSurge: 1
      maxUnavailable: 0
      canary: {{ weight: 10%, manual: true }}
      healthCheck: {{ http: /healthz, interval: 200ms, healthyThreshold: 1, timeout: 20s }}
      drain: 100ms
      loadBalancer: {{ port: {port}, grayPort: {gray} }}
"
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

/// A keep-alive HTTP/1.1 client on one connection (reconnects when the server closes it).
struct Client {
    port: u16,
    stream: Option<BufReader<TcpStream>>,
}

impl Client {
    fn new(port: u16) -> Client {
        Client { port, stream: None }
    }

    /// GET / with `extra` header lines: the status and body, or None if the request failed.
    fn get(&mut self, extra: &str) -> Option<(u16, String)> {
        for _ in 0..2 {
            if self.stream.is_none() {
                let stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
                stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
                self.stream = Some(BufReader::new(stream));
            }
            let reader = self.stream.as_mut()?;
            let request = format!("GET / HTTP/1.1\r\nHost: t\r\n{extra}\r\n");
            if reader.get_mut().write_all(request.as_bytes()).is_err() {
                self.stream = None;
                continue;
            }
            match read_response(reader) {
                Some((status, body, close)) => {
                    if close {
                        self.stream = None;
                    }
                    return Some((status, body));
                }
                // A keep-alive connection the server closed first: once more on a new one.
                None => self.stream = None,
            }
        }
        None
    }
}

fn read_response(reader: &mut BufReader<TcpStream>) -> Option<(u16, String, bool)> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
    let (mut length, mut close) = (0usize, false);
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "connection" => close = value.trim().eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    Some((status, String::from_utf8_lossy(&body).trim().to_owned(), close))
}

/// `n` requests over 4 keep-alive connections: how many answers were `v2`, `v1`, or other.
fn tally(port: u16, n: usize, extra: &'static str) -> (usize, usize, Vec<String>) {
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut client = Client::new(port);
                let (mut v2, mut v1, mut other) = (0, 0, Vec::new());
                for _ in 0..n / 4 {
                    match client.get(extra) {
                        Some((200, body)) if body == "v2" => v2 += 1,
                        Some((200, body)) if body == "v1" => v1 += 1,
                        reply => other.push(format!("{reply:?}")),
                    }
                }
                (v2, v1, other)
            })
        })
        .collect();
    let mut total = (0, 0, Vec::new());
    for thread in threads {
        let (v2, v1, other) = thread.join().expect("client");
        total.0 += v2;
        total.1 += v1;
        total.2.extend(other);
    }
    total
}

fn state_of(daemon: &Daemon, commit: &str) -> Option<String> {
    let log = daemon.log();
    for_commit(&log, commit).first().and_then(|e| e["state"].as_str()).map(str::to_owned)
}

#[test]
fn a_weighted_canary_takes_its_share_and_the_gray_port_never_serves_the_old_image() {
    if !require_git("a_weighted_canary_takes_its_share") || !have_python3() {
        return;
    }
    let repo = support::git::TestRepo::new();
    let hook =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/bake-dir"))
            .expect("bake-dir");
    let (port, gray) = (free_port(), free_port());
    let first = repo.commit_entries(
        "v1",
        &[
            Entry::File("kiln.yaml", &manifest(port, gray)),
            Entry::Exec("hooks/bake-dir", &hook),
            Entry::Exec("image/app/run", APP_RUN),
            Entry::File("image/app/app.py", APP),
            Entry::File("image/app/VERSION", "v1\n"),
        ],
    );
    let data = repo.scratch("data");
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "1s"]);
    daemon.wait_log("the first rollout", WAIT, |log| {
        for_commit(log, &first).iter().any(|e| e["state"] == "succeeded")
    });
    // Between rollouts the gray port serves the fleet.
    let (v2, v1, other) = tally(gray, 8, "");
    assert_eq!((v2, v1), (0, 8), "gray port before the rollout: {other:?}");

    // The gray port is polled from before the push: once it leaves the old image it must never
    // serve it again, and it must leave it before the canary serves anyone.
    let stop = Arc::new(AtomicBool::new(false));
    let gray_seen: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let poller = {
        let (stop, seen) = (stop.clone(), gray_seen.clone());
        std::thread::spawn(move || {
            let mut client = Client::new(gray);
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let answer = match client.get("") {
                    Some((200, body)) => body,
                    Some((status, _)) => format!("status {status}"),
                    None => "failed".to_owned(),
                };
                if let Ok(mut seen) = seen.lock() {
                    seen.push((started, answer));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let second = repo.commit("v2", &[("image/app/VERSION", "v2\n")]);
    let mut first_v2_main = None;
    let mut main = Client::new(port);
    let deadline = Instant::now() + WAIT;
    while state_of(&daemon, &second).as_deref() != Some("paused") {
        assert!(Instant::now() < deadline, "the canary never paused\n{}", daemon.logs());
        for _ in 0..20 {
            if let Some((200, body)) = main.get("") {
                if body == "v2" && first_v2_main.is_none() {
                    first_v2_main = Some(Instant::now());
                }
            }
        }
    }

    // The canary (1 of 4 instances) takes 10% ± 2% of 10,000 requests.
    let (v2, v1, other) = tally(port, 10_000, "");
    eprintln!("10,000 requests during the canary: v2 {v2}, v1 {v1}, other {other:?}");
    assert!(other.is_empty(), "failed requests: {other:?}");
    assert!((800..=1200).contains(&v2), "the canary took {v2} of 10,000 requests");
    // The pin header picks a side.
    assert_eq!(tally(port, 40, "X-Kiln-Canary: always\r\n").0, 40, "pinned to the canary");
    assert_eq!(tally(port, 40, "X-Kiln-Canary: never\r\n").1, 40, "pinned to the stable image");

    // Promote: the whole fleet ends on v2; the gray port still never served v1.
    let (code, out, err) = kiln(&data, &["resume", "web"]);
    assert_eq!(code, 0, "kiln resume: {out}{err}");
    daemon.wait_log("the promoted rollout", WAIT, |log| {
        for_commit(log, &second).iter().any(|e| e["state"] == "succeeded")
    });
    stop.store(true, Ordering::SeqCst);
    poller.join().expect("gray poller");
    let (v2, v1, other) = tally(port, 100, "");
    assert_eq!((v2, v1), (100, 0), "after promotion: {other:?}");

    let seen = gray_seen.lock().expect("gray answers").clone();
    let left = seen.iter().position(|(_, answer)| answer != "v1").expect("the gray port left v1");
    let after: Vec<&String> = seen[left..].iter().map(|(_, a)| a).collect();
    assert!(
        after.iter().all(|a| *a == "v2" || a.starts_with("status 503")),
        "the gray port served something else than the new image during the rollout: {after:?}"
    );
    assert!(after.iter().any(|a| *a == "v2"), "the gray port served the canary");
    if let (Some(first_v2), Some((last_v1, _))) = (first_v2_main, seen[..left].last()) {
        assert!(*last_v1 < first_v2, "the gray port served v1 after the canary served users");
    }
    eprintln!(
        "gray port: {} answers of v1 before the rollout routed, then {} x 503, {} x v2",
        left,
        after.iter().filter(|a| a.starts_with("status")).count(),
        after.iter().filter(|a| **a == "v2").count()
    );
}
