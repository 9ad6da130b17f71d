//! Issue "The first hour": what a newcomer and an operator meet first. The daemon's start-up
//! errors, its logs (colour, JSON, a closed stderr) and the CLI's everyday answers.

// Synchronous tests driving child processes: blocking sleeps between polls are the point.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::daemon::kiln_exe;
use support::git::{TestRepo, require_git};

/// Waits (boundedly) for `child` to exit; kills it and fails after `limit`.
fn wait_exit(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `kiln run` on `repo` with stderr into `log`, waits for its API, stops it with SIGTERM
/// and returns what it logged.
fn run_daemon_briefly(repo: &str, data: &Path, extra_env: &[(&str, &str)]) -> String {
    let log = data.with_extension("log");
    let mut child = Command::new(kiln_exe())
        .args(["run", "--repo", repo, "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env_remove("KILN_API")
        .env_remove("KILN_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .env("KILN_LOG", "info")
        .envs(extra_env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for_api(&mut child, data);
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(30), "kiln run after SIGTERM");
    assert!(status.success(), "{status}");
    std::fs::read_to_string(&log).unwrap()
}

fn wait_for_api(child: &mut Child, data: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !data.join("daemon.json").exists() {
        assert!(child.try_wait().unwrap().is_none(), "kiln run exited early");
        assert!(Instant::now() < deadline, "kiln run never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm(child: &Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

#[test]
fn a_repo_path_with_no_repository_fails_at_start_naming_it_once() {
    let temp = tempfile::tempdir().unwrap();
    let nowhere = temp.path().join("infra-typo.git");
    let mut child = Command::new(kiln_exe())
        .args(["run", "--listen", "127.0.0.1:0", "--repo"])
        .arg(&nowhere)
        .arg("--data-dir")
        .arg(temp.path().join("data"))
        .env_remove("KILN_API")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The old daemon retried the fetch forever ("unsupported URL protocol", logged twice).
    let status = wait_exit(&mut child, Duration::from_secs(30), "kiln run on a missing repo");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    let reason = format!("no repository at {}", nowhere.display());
    assert_eq!(stderr.matches(&reason).count(), 1, "named once: {stderr}");
    assert!(!stderr.contains("unsupported URL protocol"), "{stderr}");
}

#[test]
fn logs_have_no_colour_off_a_terminal_and_json_on_request() {
    if !require_git("logs_have_no_colour_off_a_terminal_and_json_on_request") {
        return;
    }
    let repo = TestRepo::new();
    repo.commit("first", &[("README", "hello\n")]);
    let text = run_daemon_briefly(&repo.url(), &repo.scratch("text"), &[]);
    assert!(text.contains("kiln is running."), "{text}");
    assert!(!text.contains('\u{1b}'), "no ANSI escapes when stderr is a file:\n{text:?}");

    let json =
        run_daemon_briefly(&repo.url(), &repo.scratch("json"), &[("KILN_LOG_FORMAT", "json")]);
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let running = lines
        .iter()
        .find(|l| l["fields"]["message"] == "kiln is running.")
        .unwrap_or_else(|| panic!("{json}"));
    assert_eq!(running["level"], "INFO", "{running}");
    assert!(running["fields"]["api"].as_str().is_some_and(|a| a.starts_with("http://")));
}

#[test]
fn a_daemon_whose_stderr_is_a_closed_pipe_stops_on_sigterm() {
    if !require_git("a_daemon_whose_stderr_is_a_closed_pipe_stops_on_sigterm") {
        return;
    }
    let repo = TestRepo::new();
    repo.commit("first", &[("README", "hello\n")]);
    let data = repo.scratch("data");
    let mut child = Command::new(kiln_exe())
        .args(["run", "--listen", "127.0.0.1:0", "--repo", &repo.url(), "--data-dir"])
        .arg(&data)
        .env_remove("KILN_API")
        .env("KILN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_api(&mut child, &data);
    // The reader goes away (a `kiln run 2>&1 | head` that ended, a dead log shipper).
    drop(child.stderr.take());
    drop(child.stdout.take());
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(30), "kiln run after SIGTERM");
    assert!(status.success(), "{status}");
}

fn kiln_out(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(kiln_exe()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn completions_are_printed_for_bash_zsh_and_fish() {
    for (shell, marker) in
        [("bash", "complete -F _kiln"), ("zsh", "#compdef kiln"), ("fish", "complete -c kiln")]
    {
        let (code, out, err) = kiln_out(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(out.contains(marker), "{shell}: {out}");
        assert!(out.contains("quickstart") && out.contains("data-dir"), "{shell}: {out}");
    }
    let (code, _, err) = kiln_out(&["completions", "tcsh"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn version_names_the_commit_built() {
    let (code, out, err) = kiln_out(&["--version"]);
    assert_eq!(code, 0, "{err}");
    let commit = out
        .trim()
        .strip_prefix(&format!("kiln {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{out}"));
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match head {
        Some(head) => assert_eq!(commit, head, "{out}"),
        None => assert_eq!(commit, "unknown", "{out}"),
    }
}

#[test]
fn global_options_are_listed_apart_from_a_commands_own() {
    let (code, out, _) = kiln_out(&["log", "--help"]);
    assert_eq!(code, 0);
    let (own, global) = out.split_once("Global options:").unwrap_or_else(|| panic!("{out}"));
    assert!(own.contains("--fleet") && !own.contains("--data-dir"), "{out}");
    assert!(global.contains("--data-dir") && global.contains("--log-format"), "{out}");
}

/// The reference tables of `docs/manifest.md`: one per object of the manifest's JSON Schema,
/// one row per field with whether it is required, its type, its default and its description.
fn manifest_reference(schema: &serde_json::Value) -> String {
    use serde_json::Value;
    fn type_of(v: &Value) -> String {
        if let Some(r) = v["$ref"].as_str() {
            let name = r.rsplit('/').next().unwrap_or(r);
            return format!("[{name}](#{})", name.to_lowercase());
        }
        if let Some(all) = v["allOf"].as_array().filter(|a| a.len() == 1) {
            return type_of(&all[0]);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(alts) = v[key].as_array() {
                let alts: Vec<String> = alts
                    .iter()
                    .map(type_of)
                    .filter(|t| t != "null")
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                return alts.join(" or ");
            }
        }
        if let Some(values) = v["enum"].as_array() {
            let values: Vec<String> =
                values.iter().map(|v| format!("`{}`", v.as_str().unwrap_or("?"))).collect();
            return values.join(" or ");
        }
        if let Some(c) = v.get("const") {
            return format!("`{}`", c.as_str().map_or_else(|| c.to_string(), str::to_owned));
        }
        match &v["type"] {
            Value::String(t) if t == "array" => format!("list of {}", type_of(&v["items"])),
            Value::String(t) if t == "object" && v.get("additionalProperties").is_some() => {
                format!("map of {}", type_of(&v["additionalProperties"]))
            }
            Value::String(t) => t.clone(),
            Value::Array(ts) => ts
                .iter()
                .filter_map(Value::as_str)
                .filter(|t| *t != "null")
                .collect::<Vec<_>>()
                .join(" or "),
            _ => "any".into(),
        }
    }
    fn table(out: &mut String, name: &str, def: &Value) {
        let Some(props) = def["properties"].as_object() else { return };
        let required: Vec<&str> =
            def["required"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        out.push_str(&format!("### {name}\n\n"));
        if let Some(text) = def["description"].as_str() {
            out.push_str(&format!("{}\n\n", text.replace('\n', " ")));
        }
        out.push_str("| field | required | type | default | description |\n");
        out.push_str("| --- | --- | --- | --- | --- |\n");
        for (key, prop) in props {
            let default = prop.get("default").map_or_else(String::new, |d| format!("`{d}`"));
            let text =
                prop["description"].as_str().unwrap_or("").replace('\n', " ").replace('|', "\\|");
            out.push_str(&format!(
                "| `{key}` | {} | {} | {default} | {text} |\n",
                if required.contains(&key.as_str()) { "yes" } else { "no" },
                type_of(prop).replace('|', "\\|"),
            ));
        }
        out.push('\n');
    }
    let mut out = String::new();
    table(&mut out, "Manifest", schema);
    if let Some(defs) = schema["$defs"].as_object() {
        for (name, def) in defs {
            table(&mut out, name, def);
        }
    }
    out
}

#[test]
fn the_manifest_reference_is_generated_from_the_schema() {
    const BEGIN: &str = "<!-- BEGIN GENERATED: kiln schema -->\n";
    const END: &str = "<!-- END GENERATED -->";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/manifest.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let (head, rest) = doc.split_once(BEGIN).expect("the generated section's start marker");
    let (current, tail) = rest.split_once(END).expect("the generated section's end marker");
    let generated = manifest_reference(&kiln::manifest::json_schema());
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(&path, format!("{head}{BEGIN}{generated}{END}{tail}")).unwrap();
        return;
    }
    assert!(
        current == generated,
        "docs/manifest.md is out of date with the manifest schema: run \
         `KILN_BLESS=1 cargo test --test first_hour the_manifest_reference` and commit it"
    );
    // Every field the schema knows is in the reference (a guard on the generator itself).
    for field in ["loadBalancer", "port", "capacity", "healthCheck", "drift", "rebake", "env"] {
        assert!(generated.contains(&format!("| `{field}` |")), "{field}");
    }
}
