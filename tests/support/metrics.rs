//! Test support: plain HTTP GETs to the running daemon (found through `<data-dir>/daemon.json`)
//! and its `/metrics` counters. std only, so benches can use it without a runtime.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

/// `GET path` on the daemon's API address, with its bearer token when there is one. Returns
/// (status, body); panics if the daemon cannot be reached (a test failure).
pub fn get(data_dir: &Path, path: &str) -> (u16, String) {
    let info = std::fs::read_to_string(data_dir.join("daemon.json")).expect("daemon.json");
    let info: serde_json::Value = serde_json::from_str(&info).expect("daemon.json is JSON");
    let api = info["api"].as_str().expect("daemon.json names the API");
    let addr = api.trim_start_matches("http://").trim_end_matches('/');
    let token = std::fs::read_to_string(data_dir.join("token")).unwrap_or_default();
    let mut stream = TcpStream::connect(addr).expect("connect to the daemon");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let auth = if token.trim().is_empty() {
        String::new()
    } else {
        format!("Authorization: Bearer {}\r\n", token.trim())
    };
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
        .expect("send the request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the answer");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    (status, if chunked { dechunk(body) } else { body.to_owned() })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of the unlabelled metric `name` in Prometheus text, if present.
pub fn value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Scrapes the daemon's `/metrics` and returns the counter `name` (0 when absent).
pub fn counter(data_dir: &Path, name: &str) -> u64 {
    let (status, text) = get(data_dir, "/metrics");
    assert_eq!(status, 200, "/metrics answered {status}: {text}");
    value(&text, name).unwrap_or(0.0) as u64
}
