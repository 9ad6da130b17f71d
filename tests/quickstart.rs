//! Issue "A newcomer's first ten minutes": `kiln quickstart` as a newcomer runs it.
//!
//! Starts the real binary, waits for the demo fleet to come up behind the load balancer, edits
//! the demo as the printed instructions say (edit, commit, push), sees the page change, stops
//! kiln with Ctrl-C and tears the demo down with `--down`, leaving no process behind.

// Synchronous tests driving child processes: blocking sleeps between polls are the point.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::daemon::{kiln_exe, leftover_pids};
use support::git::{free_port, git_command, require_git};

/// Kills the quickstart and everything it started if the test fails half-way.
struct Cleanup {
    child: i32,
    dir: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child),
                nix::sys::signal::Signal::SIGKILL,
            );
            support::daemon::kill_leftovers(&self.dir);
        }
    }
}

fn get(url: &str) -> Option<String> {
    let out = Command::new("curl").args(["-fsS", "--max-time", "5", url]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn quickstart_runs_the_demo_rolls_an_edit_and_tears_down() {
    let name = "quickstart_runs_the_demo_rolls_an_edit_and_tears_down";
    if !require_git(name) {
        return;
    }
    let python =
        Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success());
    let curl = Command::new("curl").arg("--version").output().is_ok_and(|o| o.status.success());
    if !(python && curl) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name}: python3 and curl are required under CI"
        );
        eprintln!("SKIP: {name}: python3 or curl is missing");
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("demo");
    let home = temp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    // The newcomer stands in the directory holding `target/` (the repo root after
    // `cargo run`), so the printed kiln path is relative to it, as in the README.
    let cwd = std::path::Path::new(kiln_exe()).ancestors().nth(3).unwrap().to_path_buf();
    let (lb_port, api_port) = (free_port(), free_port());
    let mut child = Command::new(kiln_exe())
        .args(["quickstart", "--dir"])
        .arg(&dir)
        .args(["--port", &lb_port.to_string(), "--listen", &format!("127.0.0.1:{api_port}")])
        .current_dir(&cwd)
        .env_remove("KILN_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _guard = Cleanup { child: child.id() as i32, dir: dir.clone() };
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    // Read until the last line of the instructions.
    while !printed.iter().any(|l: &String| l.contains("Ctrl-C stops kiln")) {
        assert!(
            Instant::now() < deadline,
            "the demo never came up; printed:\n{}",
            printed.join("\n")
        );
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            printed.push(line);
        }
    }
    let lb = format!("http://127.0.0.1:{lb_port}/");
    let page = get(&lb).expect("the load balancer serves the demo");
    assert!(page.contains("Hello from kiln"), "{page}");
    let text = printed.join("\n");
    assert!(text.contains("is up behind the load balancer"), "{text}");
    let api = format!("http://127.0.0.1:{api_port}/");
    assert!(text.contains(&format!("The dashboard: {api}")), "the dashboard is advertised: {text}");
    assert!(get(&api).is_some_and(|p| p.contains("<html")), "the dashboard serves");
    assert!(
        text.contains(&lb) && text.contains("image/app/message.txt") && text.contains("log"),
        "{text}"
    );

    // Do what the printed instructions say, literally, in one shell standing where the user
    // stands (a `cd` in one step would break the relative paths of the next ones).
    let steps: Vec<&str> = printed
        .iter()
        .skip_while(|l| !l.starts_with("Next"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.rsplit_once("  # ").map_or(l.as_str(), |(cmd, _)| cmd).trim())
        .collect();
    assert_eq!(steps.len(), 5, "{text}");
    let script = format!("set -e\n{}\n", steps.join("\n"));
    // The user's environment, with git isolated from this machine's configuration.
    let mut shell = Command::new("sh");
    for (key, value) in git_command(&home).get_envs() {
        match value {
            Some(value) => shell.env(key, value),
            None => shell.env_remove(key),
        };
    }
    let out = shell
        .args(["-c", &script])
        .current_dir(&cwd)
        .env_remove("KILN_DATA_DIR")
        .env_remove("KILN_API")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the printed steps fail when run from {}:\n{script}\nstdout:\n{}\nstderr:\n{}",
        cwd.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if get(&lb).is_some_and(|p| p.contains("Hello, immutable world")) {
            break;
        }
        assert!(Instant::now() < deadline, "the edit never rolled out");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every instance serves the new page once the rollout is done.
    let data = dir.join("data");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(kiln_exe())
            .args(["log", "--json", "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        let log: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if log[0]["summary"] == "New greeting" && log[0]["state"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < deadline, "the rollout did not succeed: {log}");
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..6 {
        assert!(get(&lb).is_some_and(|p| p.contains("Hello, immutable world")));
    }

    // Ctrl-C stops kiln; the fleet keeps serving, as servers outlive their control plane.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "quickstart exits cleanly on Ctrl-C: {status}");
    assert!(get(&lb).is_some(), "instances outlive kiln");
    // Without a daemon, `status --json` reads provider and capacity from what kiln recorded
    // (the manifest at the deployed commit), not placeholders.
    let out = Command::new(kiln_exe())
        .args(["status", "--json", "--data-dir"])
        .arg(&data)
        .env_remove("KILN_API")
        .output()
        .unwrap();
    let fleets: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(fleets[0]["name"], "web", "{fleets}");
    assert_eq!(fleets[0]["provider"], "local", "{fleets}");
    assert_eq!(fleets[0]["capacity"], 3, "{fleets}");

    let out = Command::new(kiln_exe())
        .args(["quickstart", "--down", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = std::fs::canonicalize(&dir).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = leftover_pids(&dir.to_string_lossy());
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes left after --down: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(get(&lb).is_none(), "the load balancer is gone");
}

/// A quickstart whose daemon cannot start ends with the reason and a non-zero status, having
/// never claimed to be running.
fn quickstart_fails_with(name: &str, dir: &std::path::Path, listen: &str, reason: &[&str]) {
    let started = Instant::now();
    let mut child = Command::new(kiln_exe())
        .args(["quickstart", "--dir"])
        .arg(dir)
        .args(["--port", &free_port().to_string(), "--listen", listen])
        .env_remove("KILN_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _guard = Cleanup { child: child.id() as i32, dir: dir.to_owned() };
    // A generous bound: the old quickstart never ended at all.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{name}: quickstart still runs after 60 s; printed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = started.elapsed();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{name}: quickstart ended with {status} after {took:?}");
    assert_eq!(status.code(), Some(2), "{stdout}{stderr}");
    assert!(!stdout.contains("running"), "it never said it runs:\n{stdout}");
    for needle in reason {
        assert!(stderr.contains(needle), "the reason `{needle}` is given:\n{stderr}");
    }
    assert!(!stderr.contains("Os {"), "no Rust debug text:\n{stderr}");
}

#[test]
fn a_quickstart_on_a_taken_api_port_fails_with_the_reason() {
    let temp = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    quickstart_fails_with(
        "a_quickstart_on_a_taken_api_port_fails_with_the_reason",
        &temp.path().join("demo"),
        &listen,
        &["kiln could not start", &format!("failed to listen on {listen}"), "in use"],
    );
}

#[test]
fn a_quickstart_on_a_data_dir_another_kiln_runs_on_fails_with_the_reason() {
    let name = "a_quickstart_on_a_data_dir_another_kiln_runs_on_fails_with_the_reason";
    if !require_git(name) {
        return;
    }
    let repo = support::git::TestRepo::new();
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("demo");
    let data = dir.join("data");
    let mut other = support::daemon::Daemon::start(&repo.url(), &data, &[]);
    let data = std::fs::canonicalize(&data).unwrap();
    quickstart_fails_with(
        name,
        &dir,
        &format!("127.0.0.1:{}", free_port()),
        &[&format!("the data dir {} is in use by another kiln process", data.display())],
    );
    other.stop();
}
