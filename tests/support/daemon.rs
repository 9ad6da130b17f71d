//! Test support: the real `kiln` binary run as a daemon on a temp data dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The kiln binary under test.
pub fn kiln_exe() -> &'static str {
    env!("CARGO_BIN_EXE_kiln")
}

/// Runs `kiln ARGS` against `data_dir` and returns (exit code, stdout, stderr).
pub fn kiln(data_dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(kiln_exe())
        .args(args)
        .env("KILN_DATA_DIR", data_dir)
        .env_remove("KILN_API")
        .output()
        .expect("run kiln");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `kiln run` child process.
pub struct Daemon {
    pub data_dir: PathBuf,
    pub repo: String,
    child: Option<Child>,
    args: Vec<String>,
    /// Extra environment variables of the daemon process.
    env: Vec<(String, String)>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `kiln run --repo REPO --data-dir DATA_DIR --listen 127.0.0.1:0 EXTRA...` and waits
    /// until its API answers.
    pub fn start(repo: &str, data_dir: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_with_env(repo, data_dir, extra, &[])
    }

    /// [`Daemon::start`] with extra environment variables (kept across restarts).
    pub fn start_with_env(
        repo: &str,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut daemon = Daemon {
            data_dir: data_dir.to_owned(),
            repo: repo.to_owned(),
            child: None,
            args: extra.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            log: data_dir.with_extension("daemon.log"),
        };
        daemon.spawn();
        daemon
    }

    /// Starts the `kiln run` child with `extra_env` added for this run only; does not wait.
    fn spawn_child(&mut self, extra_env: &[(&str, &str)]) {
        std::fs::create_dir_all(&self.data_dir).unwrap();
        let _ = std::fs::remove_file(self.data_dir.join("daemon.json"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(kiln_exe())
            .args(["run", "--repo", &self.repo, "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(&self.args)
            .env("KILN_LOG", "kiln=debug,info")
            .env_remove("KILN_API")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start kiln run");
        self.child = Some(child);
    }

    /// Starts it again after a `kill9` with `env` added for this run only (e.g. a `KILN_FAULT`
    /// that makes it abort itself), without waiting for its API: it may die before that.
    /// [`Daemon::try_exited`] tells when it did.
    pub fn start_again_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none());
        self.spawn_child(env);
    }

    /// The exit status of the daemon if it exited by itself (it is reaped, and may be started
    /// again), `None` while it runs.
    pub fn try_exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap()?;
        self.child = None;
        Some(status)
    }

    fn spawn(&mut self) {
        self.spawn_child(&[]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.data_dir.join("daemon.json").exists() && self.api_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("kiln run exited early with {status}:\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "kiln run did not come up in 30 s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's API base URL (`http://127.0.0.1:PORT`), from `daemon.json`.
    pub fn api_url(&self) -> Option<String> {
        let info = std::fs::read(self.data_dir.join("daemon.json")).ok()?;
        let info: Value = serde_json::from_slice(&info).ok()?;
        info["api"].as_str().map(str::to_owned)
    }

    fn api_ok(&self) -> bool {
        kiln(&self.data_dir, &["log", "--json", "--limit", "1"]).0 != 2
    }

    /// The daemon's log so far (for failure messages).
    pub fn logs(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let skip = text.chars().count().saturating_sub(20_000);
        text.chars().skip(skip).collect()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    /// `kill -9` the daemon (no cleanup runs) and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
    }

    /// Starts the daemon again on the same data dir.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts it again after a `kill9`.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        self.spawn();
    }

    /// `kiln log --json` as parsed entries, newest first.
    pub fn log(&self) -> Vec<Value> {
        let (code, out, err) = kiln(&self.data_dir, &["log", "--json", "--limit", "1000"]);
        assert!(code == 0 || code == 1, "kiln log failed ({code}): {err}");
        if out.trim().is_empty() {
            return vec![];
        }
        let value: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("kiln log --json is not JSON ({e}): {out}"));
        value
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("kiln log --json is not an array: {out}"))
    }

    /// Waits until `cond` holds for the log, or fails naming `what`.
    pub fn wait_log(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if cond(&log) {
                return log;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\nlog: {}\ndaemon:\n{}",
                    serde_json::to_string_pretty(&log).unwrap(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        kill_leftovers(&self.data_dir);
    }
}

/// Kills every process started under `dir` (instances and load balancers of the local provider
/// outlive the daemon by design; a test must not leave them behind). Returns how many it found.
pub fn kill_leftovers(dir: &Path) -> usize {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let needle = dir.to_string_lossy().into_owned();
    let mut found = 0;
    for pid in leftover_pids(&needle) {
        // Signal by syscall, never through a `kill` binary: argument parsing of negative ids
        // differs between implementations, and a misparse can signal every process.
        let Ok(raw) = i32::try_from(pid) else { continue };
        if raw <= 1 {
            continue;
        }
        let target = nix::unistd::Pid::from_raw(raw);
        if nix::unistd::getpgid(Some(target)) == Ok(target) {
            let _ = nix::sys::signal::killpg(target, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL);
        found += 1;
    }
    found
}

/// Pids whose command line or working directory mentions `needle`.
pub fn leftover_pids(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return pids };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true);
        if !zombie && (cmdline.contains(needle) || cwd.starts_with(needle)) {
            pids.push(pid);
        }
    }
    pids
}

/// Entries of `log` for commit `sha`.
pub fn for_commit<'a>(log: &'a [Value], sha: &str) -> Vec<&'a Value> {
    log.iter().filter(|e| e["commit"].as_str() == Some(sha)).collect()
}
