//! Issue 11, item 6: events a machine can follow. A consumer of the store-wide event feed
//! (`GET /api/v1/events/stream`, Server-Sent Events) that loses its connection mid-rollout, and
//! one whose daemon is `kill -9`ed mid-rollout, resume with `Last-Event-ID` and end up with
//! every event exactly once, in order: the same list `GET /api/v1/events?after=0` pages
//! through. Real daemon, real git repo, real bake hook, real instances behind the real load
//! balancer; the consumer is a raw HTTP/1.1 client on a `TcpStream`.

// The test is synchronous: it blocks on a socket and between polls of real processes.
#![allow(clippy::disallowed_methods)]

mod support;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::{Daemon, for_commit, kiln};
use support::fleet::have_python3;
use support::git::{Entry, TestRepo, require_git};

/// Generous deadline for anything a loaded 2-core machine does in a few seconds.
const WAIT: Duration = Duration::from_secs(90);

/// The app: answers every path with 200; exits when its working directory disappears.
const APP: &str = r#"
import os, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORK = os.getcwd()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

def watchdog():
    while os.path.isdir(WORK):
        time.sleep(1)
    os._exit(0)

threading.Thread(target=watchdog, daemon=True).start()
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

const RUN: &str = "#!/bin/sh\nexec python3 \"$(dirname \"$0\")/app.py\"\n";

const MANIFEST: &str = "fleets:
  - name: web
    paths: [image/, hooks/]
    image:
      stages:
        - { name: app, path: image/app, bake: hooks/bake-dir }
      timeout: 1m
    rollout:
      provider: local
      capacity: 2
      maxSurge: 1
      maxUnavailable: 0
      healthCheck: { http: /healthz, interval: 200ms, healthyThreshold: 2, timeout: 30s }
      minHealthy: 300ms
      drain: 200ms
      progressDeadline: 2m
      onFailure: rollback
      loadBalancer: { port: 0 }
";

const TERMINAL: [&str; 6] =
    ["succeeded", "failed", "rolled_back", "superseded", "aborted", "skipped"];

/// One SSE message as the consumer received it.
#[derive(Debug, Clone)]
struct Received {
    /// The `id:` line.
    id: u64,
    /// The `data:` line, parsed.
    event: Value,
}

/// A raw SSE client: one HTTP/1.1 request, a chunked body decoded by hand, messages parsed by
/// the rules of the EventSource spec (fields up to a blank line, comments ignored).
struct Consumer {
    reader: BufReader<TcpStream>,
    /// Decoded body bytes not yet parsed into messages.
    pending: Vec<u8>,
    /// Bytes left in the current chunk.
    chunk_left: usize,
}

/// What ended a read.
#[derive(Debug)]
enum Ended {
    /// The server closed the connection (a killed daemon).
    Closed,
}

impl Consumer {
    /// Opens the stream at `api` (`http://127.0.0.1:PORT`) with an optional `Last-Event-ID`
    /// and query.
    fn open(api: &str, last_event_id: Option<u64>, query: &str) -> Consumer {
        let address = api.strip_prefix("http://").expect("http URL");
        let stream = TcpStream::connect(address).expect("connect to the API");
        stream.set_read_timeout(Some(WAIT)).expect("read timeout");
        let mut request = format!(
            "GET /api/v1/events/stream{query} HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\n"
        );
        if let Some(id) = last_event_id {
            request.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        request.push_str("\r\n");
        (&stream).write_all(request.as_bytes()).expect("send request");
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status).expect("status line");
        assert!(status.starts_with("HTTP/1.1 200"), "stream refused: {status}");
        let mut chunked = false;
        let mut event_stream = false;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("header line");
            let line = line.trim_end().to_ascii_lowercase();
            if line.is_empty() {
                break;
            }
            chunked |= line == "transfer-encoding: chunked";
            event_stream |= line.starts_with("content-type: text/event-stream");
        }
        assert!(chunked && event_stream, "an SSE stream, chunked");
        Consumer { reader, pending: Vec::new(), chunk_left: 0 }
    }

    /// More decoded body bytes, or `Err(Closed)` at the end of the connection.
    fn fill(&mut self) -> Result<(), Ended> {
        if self.chunk_left == 0 {
            let mut size = String::new();
            match self.reader.read_line(&mut size) {
                Ok(0) | Err(_) => return Err(Ended::Closed),
                Ok(_) => {}
            }
            let size = size.trim();
            if size.is_empty() {
                // The CRLF after the previous chunk's data.
                return Ok(());
            }
            let size = usize::from_str_radix(size.split(';').next().unwrap_or(""), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
            if size == 0 {
                return Err(Ended::Closed);
            }
            self.chunk_left = size;
        }
        let mut buf = vec![0; self.chunk_left.min(8192)];
        match self.reader.read(&mut buf) {
            Ok(0) | Err(_) => Err(Ended::Closed),
            Ok(n) => {
                self.chunk_left -= n;
                self.pending.extend_from_slice(&buf[..n]);
                Ok(())
            }
        }
    }

    /// The next message (keep-alive comments skipped).
    fn next(&mut self) -> Result<Received, Ended> {
        loop {
            if let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.pending.drain(..end + 2).collect();
                let frame = String::from_utf8(frame).expect("utf-8 frame");
                let mut id = None;
                let mut data = String::new();
                let mut name = String::from("message");
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().parse::<u64>().expect("numeric id"));
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    }
                }
                if data.is_empty() {
                    continue;
                }
                assert_eq!(name, "event", "{frame}");
                let id = id.unwrap_or_else(|| panic!("every message carries an id: {frame}"));
                let event: Value = serde_json::from_str(&data).expect("JSON data");
                assert_eq!(event["seq"], id, "id: is the seq");
                return Ok(Received { id, event });
            }
            self.fill()?;
        }
    }
}

/// GET `url` over a raw connection; the JSON body.
fn get_json(url: &str) -> Value {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (address, path) = rest.split_once('/').expect("path");
    let mut stream = TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {address}\r\n\r\n").expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("response");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"), "{head}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The whole feed, paged through with `after=` and a small `limit`.
fn whole_feed(api: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = get_json(&format!("{api}/api/v1/events?after={after}&limit=7"));
        let events = page["events"].as_array().expect("events").clone();
        if events.is_empty() {
            assert_eq!(page["next_after"], after);
            return out;
        }
        assert!(events.len() <= 7, "the limit is honoured");
        after = page["next_after"].as_u64().expect("next_after");
        assert_eq!(events.last().map(|e| &e["seq"]), Some(&page["next_after"]));
        out.extend(events);
    }
}

/// The fleet's rollout of `sha` from `kiln log`.
fn rollout_of(daemon: &Daemon, sha: &str) -> u64 {
    let log = daemon.wait_log(&format!("a rollout of {sha}"), WAIT, |log| {
        for_commit(log, sha).iter().any(|e| e["fleet"] == "web")
    });
    for_commit(&log, sha)
        .into_iter()
        .find(|e| e["fleet"] == "web")
        .and_then(|e| e["id"].as_u64())
        .expect("rollout id")
}

/// Whether `event` ends rollout `id` (a `state` event into a terminal state).
fn ends(event: &Value, id: u64) -> bool {
    event["rollout"] == id
        && event["kind"] == "state"
        && TERMINAL.contains(&event["change"]["to"].as_str().unwrap_or(""))
}

fn repo_with_app(test: &str) -> Option<(TestRepo, String)> {
    if !require_git(test) || !have_python3() {
        return None;
    }
    let repo = TestRepo::new();
    let hook_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/bake-dir");
    let hook = std::fs::read_to_string(&hook_path).expect("hooks/bake-dir");
    let sha = repo.commit_entries(
        "first image",
        &[
            Entry::File("kiln.yaml", MANIFEST),
            Entry::Exec("hooks/bake-dir", &hook),
            Entry::Exec("image/app/run", RUN),
            Entry::File("image/app/app.py", APP),
            Entry::File("image/app/version", "1\n"),
        ],
    );
    Some((repo, sha))
}

#[test]
fn a_consumer_resumes_with_last_event_id_and_gets_every_event_once_in_order() {
    let Some((repo, first)) = repo_with_app("events: resume") else { return };
    let data = repo.scratch("data");
    let mut daemon = Daemon::start(&repo.url(), &data, &["--poll", "1s"]);
    let api = daemon.api_url().expect("api url");
    let mut received: Vec<Received> = Vec::new();

    // Session 1 (`?after=0`): the first rollout from its start; the connection is dropped as
    // soon as an instance is launched, in the middle of the roll.
    let one = rollout_of(&daemon, &first);
    {
        let mut consumer = Consumer::open(&api, None, "?after=0");
        loop {
            let message = consumer.next().expect("session 1 reads");
            let launched =
                message.event["rollout"] == one && message.event["kind"] == "instance.launched";
            received.push(message);
            if launched {
                break;
            }
        }
    } // dropped: the consumer "dies" mid-rollout

    // Session 2 (`Last-Event-ID`): the rest of the first rollout; a second commit starts a
    // second rollout, and the daemon is killed (-9) under the consumer mid-roll.
    let last = received.last().map(|m| m.id);
    let mut consumer = Consumer::open(&api, last, "?after=0");
    let mut second = None;
    let mut two = None;
    loop {
        let message = match consumer.next() {
            Ok(message) => message,
            Err(Ended::Closed) => panic!("the daemon closed the stream before it was killed"),
        };
        let event = message.event.clone();
        received.push(message);
        if ends(&event, one) && second.is_none() {
            assert_eq!(event["change"]["to"], "succeeded", "{event}\n{}", daemon.logs());
            second = Some(repo.commit("second image", &[("image/app/version", "2\n")]));
        }
        if let Some(sha) = &second {
            if two.is_none() && event["commit"] == sha.as_str() {
                two = event["rollout"].as_u64();
            }
        }
        if two.is_some_and(|two| event["rollout"] == two && event["kind"] == "instance.launched") {
            daemon.kill9();
            break;
        }
    }
    // The killed daemon's stream ends; nothing more arrives on it.
    assert!(consumer.next().is_err(), "the stream of a killed daemon ends");
    drop(consumer);
    let two = two.expect("the second rollout");

    // Session 3: a restarted daemon (new port); resume after the last event seen, until the
    // second rollout (resumed by the daemon) ends.
    daemon.start_again();
    let api = daemon.api_url().expect("api url after restart");
    let last = received.last().map(|m| m.id);
    let mut consumer = Consumer::open(&api, last, "");
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "rollout #{two} did not end:\n{}", daemon.logs());
        let message = consumer.next().expect("session 3 reads");
        let done = ends(&message.event, two);
        received.push(message);
        if done {
            break;
        }
    }
    drop(consumer);

    // Exactly once, in order: the seqs received are 1..=N with nothing missing or repeated,
    // and every message equals the stored event the JSON feed returns for it.
    let ids: Vec<u64> = received.iter().map(|m| m.id).collect();
    let expected: Vec<u64> = (1..=ids.len() as u64).collect();
    assert_eq!(ids, expected, "every event exactly once, in order");
    let feed = whole_feed(&api);
    assert!(feed.len() >= received.len());
    for (message, stored) in received.iter().zip(&feed) {
        assert_eq!(&message.event, stored, "the stream and the JSON feed agree");
    }
    let last_received = received.last().map_or(0, |m| m.id);
    let feed_seqs: Vec<u64> = feed.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(
        feed_seqs.iter().copied().take_while(|s| *s <= last_received).collect::<Vec<_>>(),
        expected,
        "the JSON feed is contiguous too"
    );

    // Each event names its rollout, fleet and commit; state changes carry {from, to}.
    for message in &received {
        let event = &message.event;
        assert!(event["rollout"].as_u64().is_some(), "{event}");
        assert!(event["kind"].as_str().is_some_and(|k| !k.is_empty()), "{event}");
        if event["rollout"] == one || event["rollout"] == two {
            assert_eq!(event["fleet"], "web", "{event}");
            assert!(event["commit"].as_str().is_some_and(|c| c.len() == 40), "{event}");
        }
    }
    let changes: Vec<(u64, String, String)> = received
        .iter()
        .filter(|m| m.event["kind"] == "state")
        .map(|m| {
            let change = &m.event["change"];
            assert!(change["from"].is_string() && change["to"].is_string(), "{}", m.event);
            (
                m.event["rollout"].as_u64().unwrap_or(0),
                change["from"].as_str().unwrap_or("").to_owned(),
                change["to"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    // Each rollout's state changes chain: one's `to` is the next one's `from`.
    for id in [one, two] {
        let chain: Vec<&(u64, String, String)> = changes.iter().filter(|c| c.0 == id).collect();
        assert!(chain.len() >= 3, "rollout #{id} changed state several times: {chain:?}");
        assert_eq!(chain[0].1, "pending", "{chain:?}");
        for pair in chain.windows(2) {
            assert_eq!(pair[0].2, pair[1].1, "states chain: {chain:?}");
        }
        assert_eq!(chain.last().map(|c| c.2.as_str()), Some("succeeded"), "{chain:?}");
    }
    assert!(
        received.iter().any(|m| m.event["rollout"] == two && m.event["kind"] == "resume"),
        "the restarted daemon's resume is in the feed"
    );

    // `kiln events --json` prints the same feed, through the API and, with the daemon
    // stopped, from the store.
    // (Garbage collection may still append events meanwhile: compare prefixes.)
    let before = whole_feed(&api);
    let (code, out, err) = kiln(&data, &["events", "--json"]);
    assert_eq!(code, 0, "{err}");
    let printed = json_lines(&out);
    let feed = whole_feed(&api);
    assert!(printed.len() >= before.len() && feed.starts_with(&printed), "kiln events: {out}");
    let after = feed.len() as u64 - 2;
    let (code, out, err) = kiln(&data, &["events", "--json", "--after", &after.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(json_lines(&out).starts_with(&feed[feed.len() - 2..]), "--after: {out}");

    // `kiln events --follow` survives a daemon restart: it prints the events of a rollout that
    // starts after the restart, continuing right after the last one it printed.
    let latest = feed.last().and_then(|e| e["seq"].as_u64()).expect("latest seq");
    let mut follower = Command::new(support::daemon::kiln_exe())
        .args(["events", "--follow", "--json", "--after", &(latest - 1).to_string()])
        .env("KILN_DATA_DIR", &data)
        .env_remove("KILN_API")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kiln events --follow");
    let lines = follower_lines(&mut follower);
    let first = lines.recv_timeout(WAIT).expect("the follower prints the last event");
    assert_eq!(first["seq"], latest);
    daemon.kill9();
    daemon.start_again();
    let third = repo.commit("third image", &[("image/app/version", "3\n")]);
    let mut seqs = vec![latest];
    loop {
        let event = lines
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("the follower stopped after #{seqs:?}:\n{}", daemon.logs()));
        seqs.push(event["seq"].as_u64().expect("seq"));
        if event["commit"] == third.as_str() && ends(&event, event["rollout"].as_u64().unwrap_or(0))
        {
            break;
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    let expected: Vec<u64> = (latest..latest + seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "the follower printed every event once, across the restart");

    daemon.stop();
    let offline: Vec<u64> =
        whole_feed_offline(&data).iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(offline, (1..=offline.len() as u64).collect::<Vec<_>>(), "offline: contiguous");
    assert!(offline.len() as u64 >= seqs.last().copied().unwrap_or(0), "offline: everything");
}

/// `kiln events --json` with the daemon stopped (read from the store).
fn whole_feed_offline(data: &Path) -> Vec<Value> {
    let (code, out, err) = kiln(data, &["events", "--json"]);
    assert_eq!(code, 0, "{err}");
    json_lines(&out)
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

/// The follower's stdout, one parsed JSON line at a time, read on a thread.
fn follower_lines(child: &mut Child) -> std::sync::mpsc::Receiver<Value> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let Ok(value) = serde_json::from_str::<Value>(&line) else { return };
            if tx.send(value).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn the_feed_refuses_a_bad_resume_point_and_bounds_its_pages() {
    let Some((repo, first)) = repo_with_app("events: bad input") else { return };
    let data = repo.scratch("data");
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "1s"]);
    let api = daemon.api_url().expect("api url");
    rollout_of(&daemon, &first);

    // A Last-Event-ID that is not a sequence number is a 400 naming it, not a stream from 0.
    let address = api.strip_prefix("http://").expect("http URL");
    let mut stream = TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(
        stream,
        "GET /api/v1/events/stream HTTP/1.0\r\nHost: {address}\r\nLast-Event-ID: yesterday\r\n\r\n"
    )
    .expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("response");
    assert!(text.starts_with("HTTP/1.1 400") || text.starts_with("HTTP/1.0 400"), "{text}");
    assert!(text.contains("yesterday"), "{text}");

    // A page is bounded whatever the limit asked for, and ascending.
    let page = get_json(&format!("{api}/api/v1/events?after=0&limit=100000000"));
    let events = page["events"].as_array().expect("events");
    assert!(events.len() <= 1000);
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(page["latest"].as_u64() >= seqs.last().copied());
    // Past the end: an empty page that says where to continue.
    let latest = page["latest"].as_u64().expect("latest");
    let past = get_json(&format!("{api}/api/v1/events?after={}", latest + 1000));
    assert_eq!(past["events"], serde_json::json!([]));
    assert_eq!(past["next_after"], latest + 1000);
}
