//! Test support: git. Real repositories made with the `git` CLI, and real servers for them
//! (`git daemon` for `git://`, `git http-backend` behind a tiny CGI bridge for `http://`).
//!
//! ```ignore
//! mod support;
//! use support::git::*;
//!
//! let repo = TestRepo::new();
//! let sha = repo.commit("add manifest", &[("kiln.yaml", "fleets: []\n")]);
//! let daemon = repo.serve_git();            // git://127.0.0.1:<port>/repo.git
//! let http = repo.serve_http();             // http://127.0.0.1:<port>/repo.git
//! ```
//!
//! Every git command runs with `GIT_CONFIG_NOSYSTEM=1` and `HOME` inside the temp dir, so the
//! user's and the machine's git config never leak in. Helpers panic with the command's stderr
//! on failure: they are test code.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The branch every test repository uses.
pub const BRANCH: &str = "main";

/// Whether the `git` CLI (with `git daemon` and `git http-backend`) is usable here. When it is
/// not, prints a loud SKIP line and returns false, except under `CI=true`, where it panics:
/// CI must never skip silently.
pub fn require_git(test: &str) -> bool {
    let ok = Command::new("git")
        .arg("--exec-path")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            dir.join("git-daemon").exists() && dir.join("git-http-backend").exists()
        })
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: git, git-daemon or git-http-backend is missing (required under CI)");
        }
        eprintln!("SKIP: {test}: git, git-daemon or git-http-backend is missing");
    }
    ok
}

/// A `git` command isolated from the user's configuration.
pub fn git_command(home: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("GIT_AUTHOR_NAME", "Kiln Test")
        .env("GIT_AUTHOR_EMAIL", "test@kiln.invalid")
        .env("GIT_COMMITTER_NAME", "Kiln Test")
        .env("GIT_COMMITTER_EMAIL", "test@kiln.invalid")
        .env("GIT_TERMINAL_PROMPT", "0")
        // A test running inside a git hook (or `git rebase --exec`) must not act on that repo.
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .env_remove("GIT_OBJECT_DIRECTORY")
        .args(["-c", "init.defaultBranch=main", "-c", "protocol.file.allow=always"])
        .stdin(Stdio::null());
    cmd
}

fn run(mut cmd: Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Sleeps a little between polls. Test support only; never on a path the daemon runs.
#[allow(clippy::disallowed_methods)] // Polling a child process from sync test code.
fn nap() {
    std::thread::sleep(Duration::from_millis(10));
}

/// A file to commit.
#[derive(Debug, Clone)]
pub enum Entry<'a> {
    /// A regular file (mode 644).
    File(&'a str, &'a str),
    /// An executable file (mode 755).
    Exec(&'a str, &'a str),
    /// A symlink `path → target`.
    Symlink(&'a str, &'a str),
}

/// A bare "remote" repository plus a working clone that commits and pushes to it, all in one
/// temp dir. `url()` is the bare repository's path.
pub struct TestRepo {
    dir: tempfile::TempDir,
    home: PathBuf,
    root: PathBuf,
    bare: PathBuf,
    work: PathBuf,
}

impl TestRepo {
    /// An empty bare repository (HEAD → `main`, no commits yet) and a working clone.
    pub fn new() -> TestRepo {
        let dir = tempfile::tempdir().expect("temp dir");
        let home = dir.path().join("home");
        let root = dir.path().join("remote");
        let bare = root.join("repo.git");
        let work = dir.path().join("work");
        std::fs::create_dir_all(&home).expect("home");
        std::fs::create_dir_all(&root).expect("remote root");
        let repo = TestRepo { dir, home, root, bare, work };
        let mut init = repo.git_in(repo.dir.path());
        init.args(["init", "--bare", "--initial-branch", BRANCH]).arg(&repo.bare);
        run(init);
        // Tests delete the branch HEAD points at (a remote outage of a different kind).
        repo.git_bare(&["config", "receive.denyDeleteCurrent", "ignore"]);
        let mut init = repo.git_in(repo.dir.path());
        init.args(["init", "--initial-branch", BRANCH]).arg(&repo.work);
        run(init);
        repo.git(&["remote", "add", "origin", repo.bare.to_str().expect("utf-8 temp path")]);
        repo
    }

    /// The remote as a local path (what `kiln run --repo` takes).
    pub fn url(&self) -> String {
        self.bare.to_string_lossy().into_owned()
    }

    /// The bare repository.
    pub fn bare_path(&self) -> &Path {
        &self.bare
    }

    /// The working clone.
    pub fn work_path(&self) -> &Path {
        &self.work
    }

    /// The directory holding the bare repository (what the servers export).
    pub fn served_root(&self) -> &Path {
        &self.root
    }

    /// A scratch directory inside this repo's temp dir (for a mirror, a data dir, ...),
    /// created if needed.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join("scratch").join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("scratch");
        path
    }

    fn git_in(&self, dir: &Path) -> Command {
        let mut cmd = git_command(&self.home);
        cmd.current_dir(dir);
        cmd
    }

    /// Runs `git <args>` in the working clone and returns its trimmed stdout.
    pub fn git(&self, args: &[&str]) -> String {
        let mut cmd = self.git_in(&self.work);
        cmd.args(args);
        run(cmd)
    }

    /// Runs `git <args>` in the bare repository.
    pub fn git_bare(&self, args: &[&str]) -> String {
        let mut cmd = self.git_in(&self.bare);
        cmd.args(args);
        run(cmd)
    }

    /// Writes the entries into the working clone and commits them (no push).
    pub fn commit_local(&self, message: &str, entries: &[Entry<'_>]) -> String {
        for entry in entries {
            let (path, mode) = match entry {
                Entry::File(path, contents) | Entry::Exec(path, contents) => {
                    let full = self.write_path(path);
                    std::fs::write(&full, contents).expect("write file");
                    (full, if matches!(entry, Entry::Exec(..)) { 0o755 } else { 0o644 })
                }
                Entry::Symlink(path, target) => {
                    let full = self.write_path(path);
                    std::os::unix::fs::symlink(target, &full).expect("symlink");
                    continue;
                }
            };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        self.git(&["add", "--all"]);
        self.git(&["commit", "--quiet", "--allow-empty", "-m", message]);
        self.head()
    }

    /// Makes room for `path` in the work tree (parents, and no stale file or link).
    fn write_path(&self, path: &str) -> PathBuf {
        let full = self.work.join(path);
        std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
        if full.symlink_metadata().is_ok() {
            std::fs::remove_file(&full).expect("replace file");
        }
        full
    }

    /// Pushes the current branch to the bare repository (fast-forward only).
    pub fn push(&self) {
        self.git(&["push", "--quiet", "origin", &format!("HEAD:refs/heads/{BRANCH}")]);
    }

    /// Writes the files (mode 644), commits and pushes. Returns the new commit's sha.
    pub fn commit(&self, message: &str, files: &[(&str, &str)]) -> String {
        let entries: Vec<Entry<'_>> = files.iter().map(|(p, c)| Entry::File(p, c)).collect();
        self.commit_entries(message, &entries)
    }

    /// Like [`commit`](Self::commit) but every file is executable (mode 755).
    pub fn commit_exec(&self, message: &str, files: &[(&str, &str)]) -> String {
        let entries: Vec<Entry<'_>> = files.iter().map(|(p, c)| Entry::Exec(p, c)).collect();
        self.commit_entries(message, &entries)
    }

    /// Commits any mix of files, executables and symlinks, and pushes.
    pub fn commit_entries(&self, message: &str, entries: &[Entry<'_>]) -> String {
        let sha = self.commit_local(message, entries);
        self.push();
        sha
    }

    /// Removes `path` (file or directory), commits and pushes.
    pub fn remove(&self, path: &str) -> String {
        self.git(&["rm", "-r", "--quiet", path]);
        self.git(&["commit", "--quiet", "-m", &format!("remove {path}")]);
        self.push();
        self.head()
    }

    /// The working clone's HEAD.
    pub fn head(&self) -> String {
        self.git(&["rev-parse", "HEAD"])
    }

    /// The remote branch's tip, `None` if the branch does not exist there.
    pub fn remote_head(&self) -> Option<String> {
        let mut cmd = self.git_in(&self.bare);
        cmd.args(["rev-parse", "--verify", "--quiet", &format!("refs/heads/{BRANCH}")]);
        let out = cmd.output().expect("git rev-parse");
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Rewrites history: resets the branch `n_back` commits and force-pushes. Returns the new
    /// tip (an ancestor of the old one; commit on top of it to diverge).
    pub fn force_push_reset(&self, n_back: usize) -> String {
        self.git(&["reset", "--quiet", "--hard", &format!("HEAD~{n_back}")]);
        self.force_push();
        self.head()
    }

    /// Force-pushes the current branch.
    pub fn force_push(&self) {
        self.git(&["push", "--quiet", "--force", "origin", &format!("HEAD:refs/heads/{BRANCH}")]);
    }

    /// Deletes the branch on the remote (the working clone keeps it).
    pub fn delete_branch(&self) {
        self.git(&["push", "--quiet", "origin", "--delete", BRANCH]);
    }

    /// Pushes the working clone's branch again after [`delete_branch`](Self::delete_branch).
    /// Returns the tip.
    pub fn recreate_branch(&self) -> String {
        self.push();
        self.head()
    }

    /// Serves the bare repository over `git://` (see [`GitDaemon::url`]).
    pub fn serve_git(&self) -> GitDaemon {
        GitDaemon::start(&self.root)
    }

    /// Serves the bare repository over `http://` (see [`GitHttp::url`]).
    pub fn serve_http(&self) -> GitHttp {
        GitHttp::start(&self.root)
    }
}

/// A free TCP port on 127.0.0.1 (bound then released; the server binds it with reuseaddr).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Waits until `port` accepts connections, or panics naming `what`. `child` is checked so a
/// server that died at startup fails fast with its exit status.
fn wait_for_port(what: &str, port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before accepting connections on port {port}: {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not accept connections on {port} in 10s");
        nap();
    }
}

/// `git daemon` serving every repository under a directory on a `127.0.0.1` port. Killed on
/// drop; [`stop`](Self::stop) and [`restart`](Self::restart) simulate an outage on the same
/// port.
pub struct GitDaemon {
    base: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl GitDaemon {
    /// Starts serving `base` on a free port and waits until it accepts connections.
    pub fn start(base: &Path) -> GitDaemon {
        let mut daemon = GitDaemon { base: base.to_path_buf(), port: free_port(), child: None };
        daemon.restart();
        daemon
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `git://` URL of `repo` (a path relative to the served directory, e.g. `repo.git`).
    pub fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}", self.port)
    }

    /// Kills the daemon (and the connections it forked); the port stops answering.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
        }
    }

    /// Starts the daemon again on the same port (after [`stop`](Self::stop)).
    pub fn restart(&mut self) {
        self.stop();
        let home = self.base.join(".daemon-home");
        std::fs::create_dir_all(&home).expect("daemon home");
        let mut cmd = git_command(&home);
        cmd.arg("daemon")
            .arg("--export-all")
            .arg("--reuseaddr")
            .arg("--informative-errors")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={}", self.port))
            .arg(format!("--base-path={}", self.base.display()))
            .arg(&self.base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so stop() also ends the per-connection children.
            .process_group(0);
        let mut child = cmd.spawn().expect("spawn git daemon");
        wait_for_port("git daemon", self.port, &mut child);
        self.child = Some(child);
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn kill_group(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
}

/// `git http-backend` behind a small HTTP/1.1 CGI bridge on `127.0.0.1`: every request runs
/// the real backend with the CGI environment, so this is git's smart HTTP protocol as a web
/// server would serve it. Read-only (push through the local path, as [`TestRepo`] does).
/// Stopped on drop.
pub struct GitHttp {
    port: u16,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GitHttp {
    /// Starts serving every repository under `base`.
    pub fn start(base: &Path) -> GitHttp {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let base = base.to_path_buf();
        let home = base.join(".http-home");
        std::fs::create_dir_all(&home).expect("http home");
        let thread = {
            let stop = stop.clone();
            let requests = requests.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    requests.fetch_add(1, Ordering::SeqCst);
                    let (base, home) = (base.clone(), home.clone());
                    std::thread::spawn(move || {
                        if let Err(e) = serve_cgi(stream, &base, &home) {
                            eprintln!("git http bridge: {e}");
                        }
                    });
                }
            })
        };
        GitHttp { port, stop, requests, thread: Some(thread) }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `http://` URL of `repo` (relative to the served directory, e.g. `repo.git`).
    pub fn url(&self, repo: &str) -> String {
        format!("http://127.0.0.1:{}/{repo}", self.port)
    }

    /// How many HTTP requests were served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for GitHttp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request, runs `git http-backend`, writes its response, closes the connection.
fn serve_cgi(stream: TcpStream, base: &Path, home: &Path) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("GET").to_owned();
    let target = parts.next().unwrap_or("/").to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));

    let mut headers: Vec<(String, String)> = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            break;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());

    let mut body = Vec::new();
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            let mut chunk = vec![0; size + 2]; // data + CRLF
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    }

    let mut cmd = git_command(home);
    cmd.arg("http-backend")
        .env("GIT_PROJECT_ROOT", base)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("CONTENT_LENGTH", body.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(content_type) = header("content-type") {
        cmd.env("CONTENT_TYPE", content_type);
    }
    if let Some(protocol) = header("git-protocol") {
        cmd.env("GIT_PROTOCOL", protocol).env("HTTP_GIT_PROTOCOL", protocol);
    }
    if let Some(encoding) = header("content-encoding") {
        cmd.env("HTTP_CONTENT_ENCODING", encoding);
    }
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    // Feed stdin from a thread: the backend may start answering before it read everything.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let output = child.wait_with_output()?;
    let _ = feeder.join();

    let split = find(&output.stdout, b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| find(&output.stdout, b"\n\n").map(|i| (i, 2)));
    let (head, payload) = match split {
        Some((i, sep)) => (&output.stdout[..i], &output.stdout[i + sep..]),
        None => (&b""[..], &output.stdout[..]),
    };
    let head = String::from_utf8_lossy(head);
    let mut status = "200 OK".to_owned();
    let mut response = Vec::new();
    let mut response_headers = String::new();
    for line in head.lines() {
        match line.split_once(':') {
            Some((name, value)) if name.eq_ignore_ascii_case("status") => {
                status = value.trim().to_owned();
            }
            Some(_) => {
                response_headers.push_str(line);
                response_headers.push_str("\r\n");
            }
            None => {}
        }
    }
    write!(
        response,
        "HTTP/1.1 {status}\r\n{response_headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        payload.len()
    )?;
    response.extend_from_slice(payload);
    let mut stream = stream;
    stream.write_all(&response)?;
    stream.flush()?;
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}
