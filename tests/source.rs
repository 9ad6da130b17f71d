//! The git source against real repositories: a local bare repo (noticed through notify), a
//! `git daemon` (git://) and `git http-backend` (http://) on 127.0.0.1.

mod support;

use std::time::Duration;

use kiln::model::Revision;
use kiln::source::{self, SourceConfig, SourceEvent, SourceHandle};
use kiln::store::{CommitKind, CommitRecord};
use support::git::*;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

/// Generous: only a wedged watcher takes this long.
const PATIENCE: Duration = Duration::from_secs(15);

struct Watch {
    handle: SourceHandle,
    events: mpsc::Receiver<SourceEvent>,
    shutdown: CancellationToken,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn start(repo: &TestRepo, url: String, poll: Duration, last_tip: Option<&str>) -> Watch {
    let config =
        SourceConfig { url, branch: BRANCH.to_owned(), mirror: repo.scratch("mirror.git"), poll };
    let (tx, events) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let handle = source::spawn(config, last_tip.map(Revision::from), tx, shutdown.clone());
    Watch { handle, events, shutdown }
}

impl Watch {
    /// Stops the watcher and waits until its task has ended (its event sender is dropped), so
    /// a following watcher on the same mirror never races it.
    async fn stop(mut self) {
        self.shutdown.cancel();
        let ended = timeout(PATIENCE, async { while self.events.recv().await.is_some() {} }).await;
        assert!(ended.is_ok(), "the watcher did not stop within {PATIENCE:?} of shutdown");
    }

    async fn next(&mut self, waiting_for: &str) -> SourceEvent {
        match timeout(PATIENCE, self.events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("the watcher stopped while waiting for {waiting_for}"),
            Err(_) => panic!("no source event within {PATIENCE:?} while waiting for {waiting_for}"),
        }
    }

    /// The next `Commits` event; any other event is a failure.
    async fn commits(&mut self, waiting_for: &str) -> Vec<CommitRecord> {
        match self.next(waiting_for).await {
            SourceEvent::Commits(records) => records,
            other => panic!("expected commits ({waiting_for}), got {other:?}"),
        }
    }

    /// The next `Commits` event, skipping fetch failures (for outage tests).
    async fn commits_after_failures(&mut self, waiting_for: &str) -> Vec<CommitRecord> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, self.events.recv()).await {
                Ok(Some(SourceEvent::Commits(records))) => return records,
                Ok(Some(SourceEvent::FetchFailed { .. })) => continue,
                Ok(Some(other)) => panic!("expected commits ({waiting_for}), got {other:?}"),
                Ok(None) => panic!("the watcher stopped while waiting for {waiting_for}"),
                Err(_) => panic!("no commits within {PATIENCE:?} while waiting for {waiting_for}"),
            }
        }
    }

    /// Waits until the watcher has checked the remote `n` more times, then asserts that no
    /// event was emitted meanwhile.
    async fn assert_quiet_for_checks(&mut self, n: u64, what: &str) {
        let target = self.handle.checks() + n;
        let deadline = Instant::now() + PATIENCE;
        while self.handle.checks() < target {
            assert!(Instant::now() < deadline, "the watcher stopped checking ({what})");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Ok(event) = self.events.try_recv() {
            panic!("unexpected event ({what}): {event:?}");
        }
    }

    /// Waits until the check counter stops moving for `quiet`, returns its value.
    async fn settled_checks(&self, quiet: Duration) -> u64 {
        let deadline = Instant::now() + PATIENCE;
        let mut last = self.handle.checks();
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.handle.checks();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return now;
            }
            assert!(Instant::now() < deadline, "the check counter never settled");
        }
    }
}

fn revisions(records: &[CommitRecord]) -> Vec<String> {
    records.iter().map(|r| r.revision.to_string()).collect()
}

fn assert_tip_last(records: &[CommitRecord]) {
    let tips: Vec<bool> = records.iter().map(|r| r.tip).collect();
    let mut expected = vec![false; records.len()];
    if let Some(last) = expected.last_mut() {
        *last = true;
    }
    assert_eq!(tips, expected, "only the last record is the tip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_reports_a_push_to_a_local_repo() {
    if !require_git("notify_reports_a_push_to_a_local_repo") {
        return;
    }
    let repo = TestRepo::new();
    let c1 = repo.commit("first", &[("kiln.yaml", "fleets: []\n")]);
    // A 60 s poll (at least 54 s with jitter): only notify can explain a quick report.
    let mut watch = start(&repo, repo.url(), Duration::from_secs(60), None);

    let initial = watch.commits("the initial tip").await;
    assert_eq!(revisions(&initial), vec![c1.clone()], "initial: just the tip");
    assert_eq!(initial[0].kind, CommitKind::Initial);
    assert_eq!(initial[0].trigger, "startup");
    assert!(initial[0].tip);

    let pushed_at = Instant::now();
    let c2 = repo.commit("second", &[("app.txt", "v2\n")]);
    let pushed = watch.commits("the pushed commit").await;
    let latency = pushed_at.elapsed();
    eprintln!("notify latency: push noticed after {latency:?}");
    assert_eq!(revisions(&pushed), vec![c2.clone()]);
    assert_eq!(pushed[0].kind, CommitKind::Push);
    assert_eq!(pushed[0].trigger, "notify");
    assert_eq!(pushed[0].summary, "second");
    assert_eq!(pushed[0].parents, vec![Revision::from(c1.as_str())]);
    assert!(latency < Duration::from_secs(50), "reported by the poll, not by notify");

    // The mirror now serves the reads the planner and bake make.
    let mirror = watch.handle.config().mirror.clone();
    let content = source::git::read_file(&mirror, &Revision::from(c2.as_str()), "app.txt")
        .expect("read from the mirror");
    assert_eq!(content.as_deref(), Some(&b"v2\n"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_watches_a_non_bare_repo_behind_a_file_url() {
    if !require_git("notify_watches_a_non_bare_repo_behind_a_file_url") {
        return;
    }
    let repo = TestRepo::new();
    let c1 = repo.commit_local("first", &[Entry::File("a", "1")]);
    let url = format!("file://{}", repo.work_path().display());
    let mut watch = start(&repo, url, Duration::from_secs(60), None);
    assert_eq!(revisions(&watch.commits("the initial tip").await), vec![c1]);

    // A commit in the working repository itself (no push): its .git/refs change.
    let c2 = repo.commit_local("second", &[Entry::File("a", "2")]);
    let records = watch.commits("the local commit").await;
    assert_eq!(revisions(&records), vec![c2.clone()]);
    assert_eq!(records[0].trigger, "notify");

    // Once packed, deleting the branch only rewrites .git/packed-refs: still noticed.
    repo.git(&["pack-refs", "--all"]);
    repo.git(&["update-ref", "-d", "refs/heads/main"]);
    match watch.next("the deletion of a packed ref").await {
        SourceEvent::BranchDeleted(record) => {
            assert_eq!(record.revision.as_str(), c2);
            assert_eq!(record.trigger, "notify");
        }
        other => panic!("expected BranchDeleted, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_commits_pushed_at_once_are_reported_oldest_first() {
    if !require_git("several_commits_pushed_at_once_are_reported_oldest_first") {
        return;
    }
    let repo = TestRepo::new();
    let c1 = repo.commit("first", &[("a", "1")]);
    let mut watch = start(&repo, repo.url(), Duration::from_secs(60), None);
    assert_eq!(revisions(&watch.commits("the initial tip").await), vec![c1]);

    let c2 = repo.commit_local("second", &[Entry::File("a", "2")]);
    let c3 = repo.commit_local("third", &[Entry::Exec("hooks/bake", "#!/bin/sh\n")]);
    let c4 = repo.commit_local("fourth", &[Entry::Symlink("current", "hooks")]);
    repo.push();

    let records = watch.commits("three pushed commits").await;
    assert_eq!(revisions(&records), vec![c2, c3, c4.clone()], "oldest first");
    assert!(records.iter().all(|r| r.kind == CommitKind::Push));
    assert_tip_last(&records);

    let mirror = watch.handle.config().mirror.clone();
    let rev = Revision::from(c4.as_str());
    assert_eq!(source::git::file_mode(&mirror, &rev, "hooks/bake").expect("mode"), Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_daemon_remote_is_polled() {
    if !require_git("git_daemon_remote_is_polled") {
        return;
    }
    let repo = TestRepo::new();
    let c1 = repo.commit("first", &[("a", "1")]);
    let daemon = repo.serve_git();
    let mut watch = start(&repo, daemon.url("repo.git"), Duration::from_millis(300), None);
    assert_eq!(revisions(&watch.commits("the initial tip over git://").await), vec![c1]);

    let c2 = repo.commit("second", &[("a", "2")]);
    let records = watch.commits("a commit over git://").await;
    assert_eq!(revisions(&records), vec![c2]);
    assert_eq!(records[0].trigger, "poll");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_remote_is_polled() {
    if !require_git("http_remote_is_polled") {
        return;
    }
    let repo = TestRepo::new();
    let c1 = repo.commit("first", &[("a", "1")]);
    let http = repo.serve_http();
    let mut watch = start(&repo, http.url("repo.git"), Duration::from_millis(300), None);
    assert_eq!(revisions(&watch.commits("the initial tip over http://").await), vec![c1]);

    let c2 = repo.commit("second", &[("a", "2")]);
    let c3 = repo.commit("third", &[("b", "3")]);
    let records = watch.commits("commits over http://").await;
    // The poll may fall between the two pushes; either way both are reported, in order.
    let mut seen = revisions(&records);
    if seen == vec![c2.clone()] {
        seen.extend(revisions(&watch.commits("the third commit over http://").await));
    }
    assert_eq!(seen, vec![c2, c3]);
    assert!(http.requests() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_push_reports_the_overwritten_tip() {
    if !require_git("force_push_reports_the_overwritten_tip") {
        return;
    }
    let repo = TestRepo::new();
    let c1 = repo.commit("one", &[("a", "1")]);
    repo.commit("two", &[("a", "2")]);
    let c3 = repo.commit("three", &[("a", "3")]);
    let mut watch = start(&repo, repo.url(), Duration::from_millis(500), None);
    assert_eq!(revisions(&watch.commits("the initial tip").await), vec![c3.clone()]);

    // Rewrite c2..c3 as d2..d3 on top of c1, pushed in one force push.
    repo.git(&["reset", "--quiet", "--hard", &c1]);
    let d2 = repo.commit_local("two, again", &[Entry::File("a", "2b")]);
    let d3 = repo.commit_local("three, again", &[Entry::File("a", "3b")]);
    repo.force_push();
    let records = watch.commits("the force push").await;
    assert_eq!(revisions(&records), vec![d2, d3.clone()], "from the merge base to the new tip");
    let forced = CommitKind::ForcePush { previous: Revision::from(c3.as_str()) };
    assert!(records.iter().all(|r| r.kind == forced), "{records:?}");
    assert_tip_last(&records);

    // A plain reset to an ancestor is a force push too: just the tip.
    let back = repo.force_push_reset(1);
    let records = watch.commits("the reset").await;
    assert_eq!(revisions(&records), vec![back]);
    assert_eq!(records[0].kind, CommitKind::ForcePush { previous: Revision::from(d3.as_str()) });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_branch_is_reported_once_and_its_return_too() {
    if !require_git("deleted_branch_is_reported_once_and_its_return_too") {
        return;
    }
    let repo = TestRepo::new();
    let c1 = repo.commit("one", &[("a", "1")]);
    let mut watch = start(&repo, repo.url(), Duration::from_millis(100), None);
    assert_eq!(revisions(&watch.commits("the initial tip").await), vec![c1.clone()]);

    repo.delete_branch();
    match watch.next("the branch deletion").await {
        SourceEvent::BranchDeleted(record) => {
            assert_eq!(record.revision.as_str(), c1);
            assert_eq!(record.kind, CommitKind::BranchDeleted);
            assert_eq!(record.summary, "one");
        }
        other => panic!("expected BranchDeleted, got {other:?}"),
    }
    watch.assert_quiet_for_checks(5, "the branch stays deleted").await;

    let c2 = repo.commit_local("two", &[Entry::File("a", "2")]);
    repo.recreate_branch();
    let records = watch.commits("the recreated branch").await;
    assert_eq!(revisions(&records), vec![c2]);
    assert!(records.iter().all(|r| r.kind == CommitKind::BranchCreated));
    assert_tip_last(&records);

    // Back to normal: the next push is a push.
    let c3 = repo.commit("three", &[("a", "3")]);
    let records = watch.commits("a push after the return").await;
    assert_eq!(revisions(&records), vec![c3]);
    assert_eq!(records[0].kind, CommitKind::Push);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_failures_are_reported_and_the_watcher_recovers() {
    if !require_git("fetch_failures_are_reported_and_the_watcher_recovers") {
        return;
    }
    let repo = TestRepo::new();
    let c1 = repo.commit("one", &[("a", "1")]);
    let mut daemon = repo.serve_git();
    let url = daemon.url("repo.git");
    let mut watch = start(&repo, url.clone(), Duration::from_millis(300), None);
    assert_eq!(revisions(&watch.commits("the initial tip").await), vec![c1]);

    daemon.stop();
    for n in 0..2 {
        match watch.next("a fetch failure while the daemon is down").await {
            SourceEvent::FetchFailed { message, trigger } => {
                assert!(message.contains("127.0.0.1"), "failure #{n} names the remote: {message}");
                assert_eq!(trigger, "poll");
            }
            other => panic!("expected FetchFailed, got {other:?}"),
        }
    }

    let c2 = repo.commit("two", &[("a", "2")]);
    daemon.restart();
    let records = watch.commits_after_failures("the commit after the outage").await;
    assert_eq!(revisions(&records), vec![c2]);
    assert_eq!(records[0].kind, CommitKind::Push);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reports_commits_made_while_down() {
    if !require_git("restart_reports_commits_made_while_down") {
        return;
    }
    let repo = TestRepo::new();
    let c1 = repo.commit("one", &[("a", "1")]);
    let mut watch = start(&repo, repo.url(), Duration::from_secs(60), None);
    assert_eq!(revisions(&watch.commits("the initial tip").await), vec![c1.clone()]);
    watch.stop().await; // The mirror stays.

    let c2 = repo.commit("two", &[("a", "2")]);
    let c3 = repo.commit("three", &[("a", "3")]);
    let c4 = repo.commit("four", &[("a", "4")]);
    let mut watch = start(&repo, repo.url(), Duration::from_secs(60), Some(&c1));
    let records = watch.commits("the commits made while down").await;
    assert_eq!(revisions(&records), vec![c2, c3, c4.clone()]);
    assert!(records.iter().all(|r| r.kind == CommitKind::Push && r.trigger == "startup"));
    assert_tip_last(&records);

    // Restarting at the current tip reports nothing.
    watch.stop().await;
    let mut watch = start(&repo, repo.url(), Duration::from_millis(100), Some(&c4));
    watch.assert_quiet_for_checks(3, "nothing new since the acknowledged tip").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_triggers_coalesces_into_few_checks() {
    if !require_git("a_burst_of_triggers_coalesces_into_few_checks") {
        return;
    }
    let repo = TestRepo::new();
    let c1 = repo.commit("one", &[("a", "1")]);
    // git:// so notify plays no part; a 60 s poll so only the triggers cause checks.
    let daemon = repo.serve_git();
    let mut watch = start(&repo, daemon.url("repo.git"), Duration::from_secs(60), None);
    assert_eq!(revisions(&watch.commits("the initial tip").await), vec![c1]);

    let before = watch.settled_checks(Duration::from_millis(200)).await;
    let c2 = repo.commit("two", &[("a", "2")]);
    for _ in 0..50 {
        watch.handle.trigger("webhook:gitlab");
    }
    let records = watch.commits("the commit announced by the webhooks").await;
    assert_eq!(revisions(&records), vec![c2]);
    assert_eq!(records[0].trigger, "webhook:gitlab");
    let after = watch.settled_checks(Duration::from_millis(300)).await;
    let n_checks = after - before;
    eprintln!("50 triggers caused {n_checks} check(s)");
    assert!((1..=2).contains(&n_checks), "50 triggers caused {n_checks} checks");
}

#[test]
fn support_servers_serve_the_git_cli() {
    if !require_git("support_servers_serve_the_git_cli") {
        return;
    }
    let repo = TestRepo::new();
    let sha = repo.commit_entries(
        "first",
        &[
            Entry::File("a.txt", "a\n"),
            Entry::Exec("run.sh", "#!/bin/sh\n"),
            Entry::Symlink("l", "a.txt"),
        ],
    );
    assert_eq!(repo.remote_head().as_deref(), Some(sha.as_str()));
    let daemon = repo.serve_git();
    let http = repo.serve_http();
    for url in [daemon.url("repo.git"), http.url("repo.git")] {
        let dest = repo.scratch(&format!("clone-{}", url.split(':').next().unwrap_or("x")));
        let mut clone = git_command(repo.work_path());
        clone.args(["clone", "--quiet", &url]).arg(&dest);
        let out = clone.output().expect("git clone");
        assert!(out.status.success(), "clone {url}: {}", String::from_utf8_lossy(&out.stderr));
        let mode = std::fs::metadata(dest.join("run.sh")).expect("run.sh").permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o111, 0o111, "{url}");
        assert_eq!(
            std::fs::read_link(dest.join("l")).expect("symlink"),
            std::path::Path::new("a.txt")
        );
    }
    assert!(http.requests() >= 2, "the clone went through the http bridge");
}

/// Issue 10 major 1: kiln's own fetch opens the local remote's ref files, and notify reported
/// the opens, so every check triggered the next (hundreds a second). An idle watcher on a
/// local repository makes no check after the initial one; a push costs one (or two).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_watcher_on_a_local_repo_does_not_check() {
    if !require_git("an_idle_watcher_on_a_local_repo_does_not_check") {
        return;
    }
    let repo = TestRepo::new();
    repo.commit("first", &[("kiln.yaml", "fleets: []\n")]);
    let mut watch = start(&repo, repo.url(), Duration::from_secs(60), None);
    watch.commits("the initial tip").await;
    let after_start = watch.handle.checks();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = watch.handle.checks() - after_start;
    assert_eq!(idle, 0, "{idle} checks in 2 s of idleness");

    let c2 = repo.commit("second", &[("app.txt", "v2\n")]);
    let pushed = watch.commits("the pushed commit").await;
    assert_eq!(revisions(&pushed), vec![c2]);
    assert_eq!(pushed[0].trigger, "notify");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let for_push = watch.handle.checks() - after_start;
    assert!((1..=2).contains(&for_push), "a push cost {for_push} checks");
}

/// Issue 10 major 1, failing half: a local remote whose fetches fail (its objects are gone,
/// its refs intact) was retried on every notify event the failed fetch itself caused. It is
/// retried with backoff: a handful of attempts in a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_local_remote_is_retried_with_backoff() {
    if !require_git("a_failing_local_remote_is_retried_with_backoff") {
        return;
    }
    let repo = TestRepo::new();
    repo.commit("first", &[("kiln.yaml", "fleets: []\n")]);
    let objects = repo.bare_path().join("objects");
    for entry in std::fs::read_dir(&objects).expect("objects").flatten() {
        if entry.file_name() != "info" {
            std::fs::remove_dir_all(entry.path()).expect("remove objects");
        }
    }
    let mut watch = start(&repo, repo.url(), Duration::from_secs(60), None);
    match watch.next("the first failure").await {
        SourceEvent::FetchFailed { trigger, .. } => assert_eq!(trigger, "startup"),
        other => panic!("expected a fetch failure, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Backoff 0.5 s, 1 s, 2 s (±20%) after the first: at most 4 attempts in ~3 s.
    let attempts = watch.handle.checks();
    assert!((2..=5).contains(&attempts), "{attempts} attempts in ~3 s");
}

/// Issue 10 minor: a local remote that does not exist was an "unsupported URL protocol".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_local_remote_is_named_as_missing() {
    if !require_git("a_missing_local_remote_is_named_as_missing") {
        return;
    }
    let repo = TestRepo::new();
    let missing = repo.scratch("gone.git");
    let url = missing.to_string_lossy().into_owned();
    let mut watch = start(&repo, url.clone(), Duration::from_secs(60), None);
    match watch.next("the failure").await {
        SourceEvent::FetchFailed { message, .. } => {
            assert!(
                message.contains(&format!("the local repository {url} does not exist")),
                "{message}"
            );
            assert!(!message.contains("unsupported URL protocol"), "{message}");
        }
        other => panic!("expected a fetch failure, got {other:?}"),
    }
    // Once it exists, the watcher finds it.
    let other = TestRepo::new();
    let c1 = other.commit("first", &[("kiln.yaml", "fleets: []\n")]);
    std::fs::rename(other.bare_path(), &missing).expect("move the repository into place");
    let records = watch.commits_after_failures("the repository appearing").await;
    assert_eq!(revisions(&records), vec![c1]);
    drop(other);
    watch.stop().await;
}
