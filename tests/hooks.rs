//! The hook runner on real scripts and real processes, and the Packer parser on real
//! `-machine-readable` output (tests/fixtures/packer, see its SOURCE).

mod support;

use std::sync::Mutex;
use std::time::Duration;

use kiln::error::{Classify, ErrorClass};
use kiln::hooks::{self, HookError, HookSpec, Stream, packer};
use support::hooks::*;
use tokio_util::sync::CancellationToken;

/// A spec running `program` in `dir` with a short timeout.
fn spec(dir: &std::path::Path, program: std::path::PathBuf, timeout: Duration) -> HookSpec {
    HookSpec {
        name: "test hook".to_owned(),
        program,
        args: Vec::new(),
        workdir: dir.to_owned(),
        env: vec![("KILN_FLEET".to_owned(), "web".to_owned())],
        timeout,
        stdin: None,
    }
}

/// Collects what the runner hands to the sink.
#[derive(Default)]
struct Lines(Mutex<Vec<(Stream, String)>>);

impl Lines {
    fn push(&self, stream: Stream, line: &str) {
        self.0.lock().expect("lines lock").push((stream, line.to_owned()));
    }
    fn of(&self, stream: Stream) -> Vec<String> {
        self.0
            .lock()
            .expect("lines lock")
            .iter()
            .filter(|(s, _)| *s == stream)
            .map(|(_, l)| l.clone())
            .collect()
    }
}

#[tokio::test]
async fn success_streams_lines_and_reads_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(
        dir.path(),
        "hook",
        r##"#!/bin/bash
set -euo pipefail
echo "building for $KILN_FLEET in $PWD"
echo "a warning" >&2
echo "image=img-42" >> "$KILN_OUTPUT"
printf 'notes<<EOF\nline one\nline two\nEOF\n' >> "$KILN_OUTPUT"
echo "# comment" >> "$KILN_OUTPUT"
printf 'no newline at the end'
"##,
    );
    let lines = Lines::default();
    let sink = |s: Stream, l: &str| lines.push(s, l);
    let outcome = hooks::run(
        &spec(dir.path(), script, Duration::from_secs(20)),
        &sink,
        &CancellationToken::new(),
    )
    .await
    .expect("hook succeeds");
    assert_eq!(outcome.outputs.get("image").map(String::as_str), Some("img-42"));
    assert_eq!(outcome.outputs.get("notes").map(String::as_str), Some("line one\nline two"));
    let workdir = dir.path().display().to_string();
    assert_eq!(
        lines.of(Stream::Stdout),
        [format!("building for web in {workdir}"), "no newline at the end".to_owned()]
    );
    assert_eq!(lines.of(Stream::Stderr), ["a warning"]);
    assert_eq!(outcome.lines, 3);
    assert!(!outcome.truncated);
    assert!(outcome.stdout.contains("no newline at the end"));
}

#[tokio::test]
async fn failure_carries_exit_code_and_stderr_tail() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(
        dir.path(),
        "hook",
        "#!/bin/bash\necho progress\necho 'boom: disk full' >&2\nexit 3\n",
    );
    let err = hooks::run(
        &spec(dir.path(), script, Duration::from_secs(20)),
        &|_, _| {},
        &CancellationToken::new(),
    )
    .await
    .expect_err("exit 3 fails");
    match &err {
        HookError::Exited { code: 3, stderr_tail, .. } => {
            assert!(stderr_tail.contains("boom: disk full"))
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert_eq!(err.class(), ErrorClass::Stalled);
    assert!(err.to_string().contains("hook `test hook` exited with status 3"), "{err}");
}

#[tokio::test]
async fn missing_program_is_a_spawn_error_naming_the_hook() {
    let dir = tempfile::tempdir().unwrap();
    let err = hooks::run(
        &spec(dir.path(), dir.path().join("nope"), Duration::from_secs(5)),
        &|_, _| {},
        &CancellationToken::new(),
    )
    .await
    .expect_err("cannot start");
    assert!(matches!(err, HookError::Spawn { .. }), "{err:?}");
    assert!(err.to_string().contains("test hook"), "{err}");
}

#[tokio::test]
async fn junk_in_kiln_output_is_bad_output() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(
        dir.path(),
        "hook",
        "#!/bin/bash\necho 'image=x' >> \"$KILN_OUTPUT\"\necho junk >> \"$KILN_OUTPUT\"\n",
    );
    let err = hooks::run(
        &spec(dir.path(), script, Duration::from_secs(20)),
        &|_, _| {},
        &CancellationToken::new(),
    )
    .await
    .expect_err("junk output");
    assert!(matches!(err, HookError::BadOutput { .. }), "{err:?}");
    assert!(err.to_string().contains("line 2"), "{err}");
}

#[tokio::test]
async fn exit_75_is_retried_until_success() {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("attempts");
    let script = write_script(
        dir.path(),
        "hook",
        &format!(
            r#"#!/bin/bash
n=$(( $(cat {c} 2>/dev/null || echo 0) + 1 ))
echo $n > {c}
if [ $n -lt 3 ]; then echo "attempt $n: registry busy" >&2; exit 75; fi
echo "image=img-after-$n" >> "$KILN_OUTPUT"
"#,
            c = counter.display()
        ),
    );
    let retries = Mutex::new(Vec::new());
    let on_retry = |e: &HookError, wait: Duration| retries.lock().unwrap().push((e.class(), wait));
    let out_dir = dir.path().join("out");
    let outcome = hooks::run_with_retry_in(
        &spec(dir.path(), script, Duration::from_secs(60)),
        &out_dir,
        &|_, _| {},
        &CancellationToken::new(),
        &on_retry,
    )
    .await
    .expect("third attempt succeeds");
    assert_eq!(outcome.outputs["image"], "img-after-3");
    assert_eq!(std::fs::read_to_string(&counter).unwrap().trim(), "3");
    let retries = retries.lock().unwrap();
    assert_eq!(retries.len(), 2);
    assert!(retries.iter().all(|(class, _)| *class == ErrorClass::Transient));
}

#[tokio::test]
async fn other_failures_are_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("attempts");
    let script = write_script(
        dir.path(),
        "hook",
        &format!("#!/bin/bash\necho x >> {}\nexit 1\n", counter.display()),
    );
    let err = hooks::run_with_retry(
        &spec(dir.path(), script, Duration::from_secs(30)),
        &|_, _| {},
        &CancellationToken::new(),
    )
    .await
    .expect_err("fails");
    assert!(matches!(err, HookError::Exited { code: 1, .. }));
    assert_eq!(std::fs::read_to_string(&counter).unwrap().lines().count(), 1);
}

/// A hook that starts a grandchild and waits forever.
fn hanging_hook(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let pidfile = dir.join("grandchild.pid");
    let script = write_script(
        dir,
        "hang",
        &format!(
            "#!/bin/bash\nsleep 1000 &\necho $! > {}\necho started\nwait\n",
            pidfile.display()
        ),
    );
    (script, pidfile)
}

fn read_pid(pidfile: &std::path::Path) -> i32 {
    std::fs::read_to_string(pidfile).expect("pidfile").trim().parse().expect("a pid")
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let (script, pidfile) = hanging_hook(dir.path());
    let started = tokio::time::Instant::now();
    let err = hooks::run(
        &spec(dir.path(), script, Duration::from_secs(1)),
        &|_, _| {},
        &CancellationToken::new(),
    )
    .await
    .expect_err("times out");
    assert!(matches!(err, HookError::TimedOut { .. }), "{err:?}");
    assert!(err.to_string().contains("timed out after 1s"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1) + hooks::KILL_GRACE + Duration::from_secs(5)
    );
    let grandchild = read_pid(&pidfile);
    wait_until_async("the grandchild `sleep 1000` to be killed", Duration::from_secs(10), || {
        !alive(grandchild)
    })
    .await;
}

#[tokio::test]
async fn cancellation_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let (script, pidfile) = hanging_hook(dir.path());
    let cancel = CancellationToken::new();
    let spec = spec(dir.path(), script, Duration::from_secs(600));
    let run = hooks::run(&spec, &|_, _| {}, &cancel);
    let trigger = async {
        wait_until_async("the hook to start its grandchild", Duration::from_secs(20), || {
            std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
        })
        .await;
        cancel.cancel();
    };
    let (res, ()) = tokio::join!(run, trigger);
    assert!(matches!(res, Err(HookError::Cancelled { .. })), "{res:?}");
    let grandchild = read_pid(&pidfile);
    wait_until_async("the grandchild `sleep 1000` to be killed", Duration::from_secs(10), || {
        !alive(grandchild)
    })
    .await;
}

#[tokio::test]
async fn background_leftovers_are_killed_when_the_hook_exits() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("bg.pid");
    // The background job keeps stdout open: the run must still end promptly.
    let script = write_script(
        dir.path(),
        "hook",
        &format!("#!/bin/bash\nsleep 1000 &\necho $! > {}\necho done\n", pidfile.display()),
    );
    let started = tokio::time::Instant::now();
    hooks::run(
        &spec(dir.path(), script, Duration::from_secs(60)),
        &|_, _| {},
        &CancellationToken::new(),
    )
    .await
    .expect("hook succeeds");
    assert!(started.elapsed() < Duration::from_secs(30), "run waited on the leftover");
    let leftover = read_pid(&pidfile);
    wait_until_async("the leftover `sleep 1000` to be killed", Duration::from_secs(10), || {
        !alive(leftover)
    })
    .await;
}

#[tokio::test]
async fn ten_megabytes_of_output_are_capped_and_the_run_completes() {
    let dir = tempfile::tempdir().unwrap();
    // 100,000 lines of 100 bytes, one 1 MB line without newline breaks, then the result.
    let script = write_script(
        dir.path(),
        "noisy",
        r#"#!/bin/bash
set -euo pipefail
head -c 10000000 /dev/zero | tr '\0' 'x' | fold -w 99
head -c 1000000 /dev/zero | tr '\0' 'y' >&2
echo >&2
echo "LAST LINE"
echo "image=big" >> "$KILN_OUTPUT"
"#,
    );
    let bytes = Mutex::new((0usize, 0usize, 0usize)); // (bytes, lines, notices)
    let sink = |_: Stream, line: &str| {
        let mut b = bytes.lock().unwrap();
        if line == hooks::TRUNCATED_NOTICE {
            b.2 += 1;
        } else {
            b.0 += line.len() + 1;
            b.1 += 1;
        }
    };
    let outcome = hooks::run(
        &spec(dir.path(), script, Duration::from_secs(120)),
        &sink,
        &CancellationToken::new(),
    )
    .await
    .expect("the noisy hook completes");
    let (n_bytes, n_lines, notices) = *bytes.lock().unwrap();
    assert!(n_bytes <= hooks::OUTPUT_CAP, "{n_bytes} bytes reached the sink");
    assert!(n_lines <= hooks::OUTPUT_CAP / 100 + 1, "{n_lines} lines reached the sink");
    assert_eq!(notices, 1, "exactly one truncation notice");
    assert!(outcome.truncated);
    assert_eq!(outcome.outputs["image"], "big");
    assert!(outcome.lines >= 101_010, "every line was read: {}", outcome.lines);
    assert!(outcome.stdout.len() <= hooks::OUTPUT_CAP + 300 * 1024);
    assert!(outcome.stdout.trim_end().ends_with("LAST LINE"), "the stdout tail is kept");
}

/// Proves a secret in the daemon's environment never reaches a hook: the test binary re-runs
/// itself with secrets set via `Command::env` (no `set_var`), and the child runs `/usr/bin/env`
/// as a hook.
#[test]
fn daemon_secrets_do_not_reach_hooks() {
    const MARK: &str = "KILN_TEST_DAEMON_SECRET";
    if std::env::var(MARK).is_err() {
        // Cargo sets these for the test process: they must not leak either.
        assert!(std::env::var("CARGO_PKG_NAME").is_ok(), "cargo sets CARGO_PKG_NAME for tests");
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "daemon_secrets_do_not_reach_hooks",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(MARK, "s3cr3t-value")
            .env("KILN_GITLAB_TOKEN", "glpat-secret")
            .env("AWS_SECRET_ACCESS_KEY", "aws-secret")
            .env("ALLOWED_BY_OPERATOR", "visible")
            .status()
            .expect("re-run the test binary");
        assert!(status.success(), "child test failed: {status}");
        return;
    }
    // Child: the "daemon" with secrets in its environment.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec(dir.path(), "/usr/bin/env".into(), Duration::from_secs(20));
    // What `--hook-env ALLOWED_BY_OPERATOR` would pass.
    spec.env
        .push(("ALLOWED_BY_OPERATOR".to_owned(), std::env::var("ALLOWED_BY_OPERATOR").unwrap()));
    let lines = Lines::default();
    let sink = |s: Stream, l: &str| lines.push(s, l);
    runtime.block_on(hooks::run(&spec, &sink, &CancellationToken::new())).expect("env runs");
    let env = lines.of(Stream::Stdout);
    let names: Vec<&str> = env.iter().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
    for line in &env {
        assert!(
            !line.contains("s3cr3t") && !line.contains("glpat") && !line.contains("aws-secret"),
            "leaked: {line}"
        );
    }
    for name in &names {
        let allowed = kiln::hooks::contract::BASE_ENV.contains(name)
            || name.starts_with("KILN_")
            || *name == "ALLOWED_BY_OPERATOR";
        assert!(allowed, "unexpected variable {name} reached the hook");
    }
    assert!(!names.contains(&"CARGO_PKG_NAME") && !names.contains(&"CARGO_MANIFEST_DIR"));
    assert!(
        names.contains(&"PATH") && names.contains(&"KILN_OUTPUT") && names.contains(&"KILN_FLEET")
    );
    assert!(env.contains(&"ALLOWED_BY_OPERATOR=visible".to_owned()));
}

// --- Packer output, from real builds ---

#[test]
fn packer_single_region_artifact() {
    let out = packer::parse(&fixture("packer/single-region.txt"));
    assert_eq!(out.image_id(), Some("us-west-1:ami-df79909b"));
    assert_eq!(out.artifacts[0].target, "amazon-ebs");
    assert_eq!(out.artifacts[0].builder_id.as_deref(), Some("mitchellh.amazonebs"));
    assert!(out.errors.is_empty());
}

#[test]
fn packer_multi_region_artifact_unescapes_commas() {
    let out = packer::parse(&fixture("packer/multi-region.txt"));
    let id = out.image_id().expect("an id");
    assert_eq!(id, "us-east-1:ami-dc4410b6,us-west-1:ami-e098f380,us-west-2:ami-8c8f90ed");
    assert_eq!(
        packer::regions(id),
        [
            ("us-east-1".to_owned(), "ami-dc4410b6".to_owned()),
            ("us-west-1".to_owned(), "ami-e098f380".to_owned()),
            ("us-west-2".to_owned(), "ami-8c8f90ed".to_owned()),
        ]
    );
}

#[test]
fn packer_two_artifacts_take_the_last() {
    let out = packer::parse(&fixture("packer/two-artifacts.txt"));
    assert_eq!(out.artifacts.len(), 2);
    assert_eq!(out.image_id(), Some("us-west-2:ami-df79909c"));
}

#[test]
fn packer_failed_build_has_errors_and_no_image() {
    let out = packer::parse(&fixture("packer/failed.txt"));
    assert_eq!(out.image_id(), None);
    assert_eq!(
        out.errors,
        [
            "Error executing Chef: Non-zero exit status: 1",
            "Error executing Chef: Non-zero exit status: 2"
        ]
    );
}

#[test]
fn packer_manifest_last_build() {
    let id = packer::manifest_artifact_id(fixture("packer/packer-manifest.json").as_bytes());
    assert_eq!(id.as_deref(), Ok("us-east-2:ami-e8a4948d"));
    assert!(packer::manifest_artifact_id(b"{\"builds\": []}").is_err());
    assert!(packer::manifest_artifact_id(b"not json").is_err());
}

#[tokio::test]
async fn stdin_bytes_reach_the_hook_and_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    // `cat` only exits once stdin is closed: a hung run would show the runner never closed it.
    let program = write_script(
        dir.path(),
        "echo-stdin",
        "#!/bin/sh\nprintf 'got=' >> \"$KILN_OUTPUT\"\ncat >> \"$KILN_OUTPUT\"\n",
    );
    let mut spec = spec(dir.path(), program, Duration::from_secs(10));
    spec.stdin = Some(b"{\"op\":\"launch\"}\n".to_vec());
    let lines = Lines::default();
    let sink = |s: Stream, l: &str| lines.push(s, l);
    let outcome = hooks::run(&spec, &sink, &CancellationToken::new()).await.unwrap();
    assert_eq!(outcome.outputs.get("got").map(String::as_str), Some("{\"op\":\"launch\"}"));
}

/// Issue 9: a child started with `setsid` leaves the hook's process group; it must still be
/// killed when the hook exits (here: it holds no pipe, so only the marker sweep finds it).
#[tokio::test]
async fn setsid_children_are_killed_when_the_hook_exits() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("escaped.pid");
    let script = write_script(
        dir.path(),
        "hook",
        &format!(
            "#!/bin/bash\nsetsid sh -c 'echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 1000' \
             </dev/null >/dev/null 2>&1 &\nwhile [ ! -s {p} ]; do sleep 0.02; done\necho done\n",
            p = pidfile.display()
        ),
    );
    hooks::run(
        &spec(dir.path(), script, Duration::from_secs(60)),
        &|_, _| {},
        &CancellationToken::new(),
    )
    .await
    .expect("hook succeeds");
    let escaped = read_pid(&pidfile);
    let own_group = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(escaped)));
    // It did leave the hook's group: it leads its own session and group.
    assert!(own_group.is_err() || own_group == Ok(nix::unistd::Pid::from_raw(escaped)));
    wait_until_async("the setsid child to be killed", Duration::from_secs(10), || !alive(escaped))
        .await;
}

/// The same when the hook times out.
#[tokio::test]
async fn setsid_children_are_killed_when_the_hook_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("escaped.pid");
    let script = write_script(
        dir.path(),
        "hook",
        &format!(
            "#!/bin/bash\nsetsid sh -c 'echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 1000' &\n\
             sleep 1000\n",
            p = pidfile.display()
        ),
    );
    let err = hooks::run(
        &spec(dir.path(), script, Duration::from_secs(2)),
        &|_, _| {},
        &CancellationToken::new(),
    )
    .await
    .expect_err("times out");
    assert!(matches!(err, HookError::TimedOut { .. }), "{err:?}");
    let escaped = read_pid(&pidfile);
    wait_until_async("the setsid child to be killed", Duration::from_secs(10), || !alive(escaped))
        .await;
}

/// Issue 9: `$KILN_OUTPUT` was read whole (300 MB of output → 327 MB RSS). A file over the cap
/// fails the run with an error naming the size and the limit (valid `key=value` lines, so the
/// old code parsed and accepted all of it).
#[tokio::test]
async fn an_oversized_kiln_output_is_refused_without_reading_it_all() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * hooks::contract::OUTPUT_FILE_CAP;
    let script = write_script(
        dir.path(),
        "hook",
        &format!("#!/bin/bash\nyes 'key=value' | head -c {size} > \"$KILN_OUTPUT\"\n"),
    );
    let err = hooks::run(
        &spec(dir.path(), script, Duration::from_secs(60)),
        &|_, _| {},
        &CancellationToken::new(),
    )
    .await
    .expect_err("an output over the cap fails the run");
    let message = err.to_string();
    assert!(matches!(err, HookError::BadOutput { .. }), "{err:?}");
    assert!(
        message.contains(&format!("wrote {size} bytes to $KILN_OUTPUT"))
            && message.contains(&format!("limit of {} bytes", hooks::contract::OUTPUT_FILE_CAP)),
        "{message}"
    );

    // Exactly the cap is still read.
    let script = write_script(
        dir.path(),
        "fits",
        &format!(
            "#!/bin/bash\n{{ yes 'key=value' | head -c {} ; echo; echo 'last=1'; }} > \"$KILN_OUTPUT\"\n",
            hooks::contract::OUTPUT_FILE_CAP - 8
        ),
    );
    let outcome = hooks::run(
        &spec(dir.path(), script, Duration::from_secs(60)),
        &|_, _| {},
        &CancellationToken::new(),
    )
    .await
    .expect("an output at the cap is read");
    assert_eq!(outcome.outputs.get("last").map(String::as_str), Some("1"));
}

/// Issue 9: a hook exiting 75 forever was retried up to 8× its timeout. The timeout bounds the
/// whole step: it fails as timed out, naming the attempts it made, each one recorded.
#[tokio::test]
async fn a_hook_exiting_75_forever_is_bounded_by_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("attempts");
    let script = write_script(
        dir.path(),
        "hook",
        &format!("#!/bin/bash\necho x >> {}\necho busy >&2\nexit 75\n", counter.display()),
    );
    let retries = Mutex::new(0u32);
    let on_retry = |_: &HookError, _: Duration| *retries.lock().unwrap() += 1;
    let err = hooks::run_with_retry_in(
        &spec(dir.path(), script, Duration::from_secs(3)),
        &dir.path().join("out"),
        &|_, _| {},
        &CancellationToken::new(),
        &on_retry,
    )
    .await
    .expect_err("never succeeds");
    let HookError::TimedOut { attempts, timeout, .. } = &err else {
        panic!("expected a timeout, got {err:?}");
    };
    let ran = std::fs::read_to_string(&counter).unwrap().lines().count() as u32;
    assert_eq!(*attempts, ran, "every attempt is counted");
    assert!(ran >= 2, "retried within the timeout: {ran}");
    assert_eq!(*retries.lock().unwrap(), ran - 1, "each retry was announced");
    assert_eq!(*timeout, Duration::from_secs(3));
    assert!(err.to_string().contains(&format!("timed out after 3s ({ran} attempts")), "{err}");
}

/// Issue 10: after a `kill -9` of the daemon, the running hook kept running and the restarted
/// daemon ran it again beside it. The run is recorded before the hook starts; a daemon that
/// dies without any cleanup (here: the run future is leaked, never dropped) leaves the record,
/// and the restart path kills the leftover, its setsid child included, before running again.
#[tokio::test]
async fn a_hook_left_running_by_a_dead_daemon_is_killed_before_the_step_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let escaped = dir.path().join("escaped.pid");
    let script = write_script(
        dir.path(),
        "hook",
        &format!(
            "#!/bin/bash\nsetsid sh -c 'echo $$ > {e}; exec sleep 1000' </dev/null >/dev/null 2>&1 &\n\
             echo $$ >> {p}\nsleep 1000\n",
            p = pids.display(),
            e = escaped.display()
        ),
    );
    let data = dir.path().join("data");
    let record = hooks::run_record_path(&data, "reconcile web");
    let spec = spec(dir.path(), script, Duration::from_secs(600));
    let out_dir = dir.path().join("out");
    let cancel = CancellationToken::new();
    let sink = |_: Stream, _: &str| {};
    let on_retry = |_: &HookError, _: Duration| {};
    let mut run = Box::pin(hooks::run_with_retry_recorded(
        &spec,
        &out_dir,
        Some(&record),
        &sink,
        &cancel,
        &on_retry,
    ));
    // Drive the run until the hook and its escaped child are up, then "die": the future is
    // leaked, so no guard, no timeout and no cleanup of any kind runs.
    tokio::select! {
        _ = &mut run => panic!("the hook ended early"),
        () = wait_until_async("the hook to start", Duration::from_secs(20), || {
            std::fs::read_to_string(&pids).is_ok_and(|s| s.ends_with('\n'))
                && std::fs::read_to_string(&escaped).is_ok_and(|s| s.ends_with('\n'))
        }) => {}
    }
    std::mem::forget(run);
    let hook = read_pid(&pids);
    let child = read_pid(&escaped);
    assert!(alive(hook) && alive(child), "the hook outlives its daemon");
    let recorded: hooks::RunRecord =
        serde_json::from_slice(&std::fs::read(&record).expect("the run is recorded")).unwrap();
    assert_eq!(recorded.process.map(|p| p.pid), Some(hook));

    // The restart path.
    let killed = hooks::kill_all_leftovers(&data).await;
    assert!(killed >= 2, "the hook and its setsid child were found: {killed}");
    wait_until_async("the leftover hook and child to die", Duration::from_secs(10), || {
        !alive(hook) && !alive(child)
    })
    .await;
    assert!(!record.exists(), "the record is removed once its leftovers are gone");
    assert_eq!(hooks::kill_leftover(&record).await, 0, "nothing left to kill");
}
