//! `kiln lb` attacked and reconfigured through the real daemon (issue 9): the admin endpoint
//! refuses strangers and the daemon removes backends it did not attach; a commit moving
//! `rollout.loadBalancer.port` moves the listener without dropping the fleet, and a busy port
//! is a recorded failure while the old port keeps serving.

// The tests are synchronous: they block between polls of real processes, never in a runtime.
#![allow(clippy::disallowed_methods)]

mod support;

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln::provider::local::lb;
use support::daemon::{Daemon, for_commit};
use support::fleet::{APP_RUN, IMAGE_APP, have_python3};
use support::git::{Entry, require_git};

const WAIT: Duration = Duration::from_secs(60);

fn manifest(port: u16) -> String {
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
      capacity: 2
      maxSurge: 1
      maxUnavailable: 0
      healthCheck: {{ http: /healthz, interval: 200ms, healthyThreshold: 1, timeout: 20s }}
      minHealthy: 100ms
      drain: 100ms
      loadBalancer: {{ port: {port} }}
"
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

/// GET `http://127.0.0.1:port/` with a fresh connection: the status, or None if refused/broken.
fn get(port: u16) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    reply.split_whitespace().nth(1)?.parse().ok()
}

fn wait_until(what: &str, daemon: &Daemon, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", daemon.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A raw admin call: (status, body).
fn admin(
    state: &lb::LbState,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", state.admin_port)).expect("admin port");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read");
    let status = reply.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// A server on loopback that answers "attacker" to anything, until the test ends.
fn attacker() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind attacker");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nattacker\n",
            );
        }
    });
    port
}

fn lb_dir(data: &Path) -> std::path::PathBuf {
    data.join("fleets").join("web").join("lb")
}

#[test]
fn admin_endpoint_and_port_changes_through_the_daemon() {
    if !require_git("admin_endpoint_and_port_changes_through_the_daemon") || !have_python3() {
        return;
    }
    let repo = support::git::TestRepo::new();
    let hook =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/bake-dir"))
            .expect("bake-dir");
    let old_port = free_port();
    let first = repo.commit_entries(
        "first",
        &[
            Entry::File("kiln.yaml", &manifest(old_port)),
            Entry::Exec("hooks/bake-dir", &hook),
            Entry::Exec("image/app/run", APP_RUN),
            Entry::File("image/app/app.py", IMAGE_APP),
        ],
    );
    let data = repo.scratch("data");
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "1s"]);
    daemon.wait_log("the first rollout", WAIT, |log| {
        for_commit(log, &first).iter().any(|e| e["state"] == "succeeded")
    });
    wait_until("the fleet to serve on its port", &daemon, || get(old_port) == Some(200));
    let dir = lb_dir(&data);
    let state = lb::read_state(&dir).expect("lb.json");
    let token = std::fs::read_to_string(dir.join(lb::TOKEN_FILE)).expect("admin-token");
    let token = token.trim();

    // 1. A stranger cannot attach; a backend injected with the token is removed by the daemon.
    let evil = attacker();
    let attach = format!("{{\"address\":\"127.0.0.1:{evil}\"}}");
    let (status, _) = admin(&state, None, "PUT", "/backends/web-0badbeef", &attach);
    assert_eq!(status, 401, "unauthenticated attach");
    let (status, body) = admin(&state, Some(token), "PUT", "/backends/web-0badbeef", &attach);
    assert_eq!(status, 200, "{body}");
    wait_until("the daemon to remove the unknown backend", &daemon, || {
        let (_, body) = admin(&state, Some(token), "GET", "/backends", "");
        !body.contains("web-0badbeef")
    });
    for _ in 0..10 {
        assert_eq!(get(old_port), Some(200));
    }

    // 2. A commit moving the port to a busy one: a recorded failure naming the port; the fleet
    //    keeps serving on the old port, from the same process.
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind busy");
    let busy_port = busy.local_addr().expect("addr").port();
    let to_busy = repo.commit("move the LB to a busy port", &[("kiln.yaml", &manifest(busy_port))]);
    let log = daemon.wait_log("the failed port change to be recorded", WAIT, |log| {
        log.iter().any(|e| {
            e["state"] == "failed" && e.to_string().contains(&format!("127.0.0.1:{busy_port}"))
        })
    });
    assert!(!for_commit(&log, &to_busy).is_empty(), "the failure names the commit");
    for _ in 0..10 {
        assert_eq!(get(old_port), Some(200), "the old port still serves");
    }
    assert_eq!(lb::read_state(&dir).expect("lb.json").process, state.process, "LB not restarted");
    drop(busy);

    // 3. A commit moving it to a free port: the new port serves, the old one stops, and no
    //    request in between finds neither serving.
    let new_port = free_port();
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let ok = [old_port, new_port].into_iter().find_map(get) == Some(200);
                    let counter = if ok { &served } else { &failed };
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    repo.commit("move the LB to a free port", &[("kiln.yaml", &manifest(new_port))]);
    wait_until("the new port to serve", &daemon, || get(new_port) == Some(200));
    wait_until("the old port to close", &daemon, || {
        TcpStream::connect(("127.0.0.1", old_port)).is_err()
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().expect("client");
    }
    let (served, failed) = (served.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!("port move: {served} requests served, {failed} failed");
    assert_eq!(failed, 0, "requests found no port serving during the move");
    assert!(served > 10);
    let moved = lb::read_state(&dir).expect("lb.json");
    assert_eq!((moved.port, moved.process), (new_port, state.process));
}
