//! The dashboard in a real headless Chromium, driven over W3C WebDriver (`chromedriver` on
//! 127.0.0.1, plain HTTP calls through reqwest): the real `kiln` daemon deploys a real fleet
//! (directory images, python instances, `kiln lb`); the browser logs in with the API token,
//! promotes a canary waiting at its manual gate, pauses the live rollout and resumes it, deploys
//! an earlier commit and aborts it at its canary, and rolls back to a chosen earlier rollout, each
//! through the page's confirmation dialog; the test checks the page and `kiln log`.
//! It also takes the screenshots at 1280×800 and at phone width (375 px), and checks that the
//! page does not overflow a phone's width.
//!
//! Needs Debian `chromium` and `chromium-driver` (`.ci/run` installs them). Without them the
//! test skips loudly, and fails under `CI=true`. The screenshots land in the cargo target's
//! tmp dir; `KILN_BLESS=1` also writes `docs/dashboard.png` (the README's picture).

// Synchronous test driving child processes: blocking sleeps between polls are the point.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use support::daemon::{Daemon, for_commit, kiln};
use support::fleet::{APP_RUN, IMAGE_APP, have_python3};
use support::git::{Entry, TestRepo, free_port, require_git};

const WAIT: Duration = Duration::from_secs(90);
/// The W3C name of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Three instances behind kiln's load balancer, a manual canary of one, and replacements slow
/// enough (5 s healthy before each attach) that a pause lands while the rollout is live.
const MANIFEST: &str = "fleets:
  - name: web
    paths: [web/, hooks/]
    image:
      stages:
        - { name: app, path: web, bake: hooks/bake }
      timeout: 1m
    rollout:
      provider: local
      capacity: 3
      maxSurge: 1
      maxUnavailable: 0
      healthCheck: { http: /healthz, interval: 200ms, healthyThreshold: 1, timeout: 5s }
      minHealthy: 5s
      drain: 500ms
      progressDeadline: 3m
      onFailure: rollback
      loadBalancer: { port: 0 }
      canary: { count: 1, manual: true }
";

/// The browser and its driver, or `None` (skipped loudly; a failure under `CI=true`).
fn browser_peers() -> Option<(PathBuf, PathBuf)> {
    let find = |names: &[&str]| {
        names.iter().find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|p| p.is_file())
            })
        })
    };
    let chromium = find(&["chromium", "chromium-browser", "google-chrome"]);
    let driver = find(&["chromedriver"]);
    match (chromium, driver) {
        (Some(chromium), Some(driver)) => Some((chromium, driver)),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the dashboard's browser test needs chromium and chromedriver on CI \
                 (apt-get install chromium chromium-driver)"
            );
            eprintln!(
                "SKIP: chromium or chromedriver not found; the dashboard's browser test did not run \
                 (apt-get install chromium chromium-driver)"
            );
            None
        }
    }
}

/// A WebDriver session on a chromedriver child.
struct Browser {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    base: String,
    session: String,
    driver: Child,
}

impl Browser {
    fn start(chromium: &Path, chromedriver: &Path, dir: &Path) -> Browser {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let port = free_port();
        std::fs::create_dir_all(dir).unwrap();
        let log = std::fs::File::create(dir.join("chromedriver.log")).unwrap();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Browser { rt, http, base, session: String::new(), driver };
        let deadline = Instant::now() + Duration::from_secs(30);
        while browser.call("GET", "/status", None).ok().and_then(|v| v["ready"].as_bool())
            != Some(true)
        {
            assert!(Instant::now() < deadline, "chromedriver did not become ready in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = dir.join("profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,800", "--hide-scrollbars", "--no-first-run",
                         format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let session = browser.call("POST", "/session", Some(caps)).expect("new WebDriver session");
        browser.session = session["sessionId"].as_str().expect("session id").to_owned();
        browser
    }

    /// One WebDriver call; `Err` carries the error the driver answered.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        self.rt.block_on(async {
            let request = match method {
                "GET" => self.http.get(&url),
                "DELETE" => self.http.delete(&url),
                _ => self.http.post(&url).json(&body.unwrap_or_else(|| json!({}))),
            };
            let response = request.send().await.map_err(|e| e.to_string())?;
            let ok = response.status().is_success();
            let value: Value = response.json().await.map_err(|e| e.to_string())?;
            if ok { Ok(value["value"].clone()) } else { Err(value["value"].to_string()) }
        })
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({ "url": url }))).unwrap();
    }

    fn find_all(&self, css: &str) -> Vec<String> {
        let found = self
            .session_call("POST", "/elements", Some(json!({"using": "css selector", "value": css})))
            .unwrap_or(Value::Null);
        found
            .as_array()
            .map(|all| all.iter().filter_map(|e| e[ELEMENT].as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    fn script(&self, script: &str) -> Value {
        self.session_call("POST", "/execute/sync", Some(json!({"script": script, "args": []})))
            .unwrap()
    }

    /// The text of the first element matching `css` ("" when there is none).
    fn text(&self, css: &str) -> String {
        self.find_all(css)
            .first()
            .and_then(|id| self.session_call("GET", &format!("/element/{id}/text"), None).ok())
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Clicks the first element matching `css`, finding it again if the live view replaced
    /// it between the find and the click.
    fn click(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let result = match self.find_all(css).first() {
                Some(id) => self.session_call("POST", &format!("/element/{id}/click"), None),
                None => Err(format!("no element matches {css}")),
            };
            match result {
                Ok(_) => return,
                Err(error) => {
                    assert!(Instant::now() < deadline, "cannot click {css}: {error}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.find_all(css).into_iter().next().unwrap_or_else(|| panic!("no {css}"));
        self.session_call("POST", &format!("/element/{id}/value"), Some(json!({ "text": text })))
            .unwrap();
    }

    /// Waits until `cond` holds, or fails naming `what` with the page's text.
    fn wait(&self, what: &str, cond: impl Fn(&Browser) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the page says:\n{}",
                self.text("body")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Clicks a verb button, checks the confirmation dialog asks `question`, and confirms.
    fn verb_confirmed(&self, button: &str, question: &str) {
        self.click(button);
        self.wait("the confirmation dialog", |b| !b.find_all("dialog#confirm[open]").is_empty());
        let asked = self.text("#confirm-text");
        assert!(asked.contains(question), "the dialog asks {asked:?}, not {question:?}");
        self.click("#confirm-yes");
        self.wait("the verb's answer", |b| b.text("#flash").contains("accepted"));
    }

    fn screenshot(&self) -> Vec<u8> {
        let shot = self.session_call("GET", "/screenshot", None).unwrap();
        base64::engine::general_purpose::STANDARD.decode(shot.as_str().unwrap()).unwrap()
    }

    /// Chrome DevTools through chromedriver (`goog/cdp/execute`).
    fn cdp(&self, cmd: &str, params: Value) {
        self.session_call("POST", "/goog/cdp/execute", Some(json!({"cmd": cmd, "params": params})))
            .unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.session_call("DELETE", "", None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 24, "not a PNG");
    let word = |at: usize| u32::from_be_bytes([png[at], png[at + 1], png[at + 2], png[at + 3]]);
    (word(16), word(20))
}

fn entry(daemon: &Daemon, sha: &str) -> Option<Value> {
    for_commit(&daemon.log(), sha).into_iter().find(|e| e["fleet"] == "web").cloned()
}

fn wait_state(daemon: &Daemon, sha: &str, what: &str, cond: impl Fn(&str) -> bool) -> Value {
    let log = daemon.wait_log(what, WAIT, |log| {
        for_commit(log, sha)
            .into_iter()
            .any(|e| e["fleet"] == "web" && cond(e["state"].as_str().unwrap_or("")))
    });
    for_commit(&log, sha).into_iter().find(|e| e["fleet"] == "web").cloned().unwrap()
}

#[test]
fn an_operator_logs_in_and_works_every_verb_on_a_live_rollout_in_chromium() {
    let test =
        "an_operator_logs_in_promotes_a_canary_pauses_and_resumes_a_live_rollout_in_chromium";
    if !require_git(test) || !have_python3() {
        return;
    }
    let Some((chromium, chromedriver)) = browser_peers() else { return };

    let repo = TestRepo::new();
    let bake =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/bake-dir"))
            .unwrap();
    let first = repo.commit_entries(
        "web: first image",
        &[
            Entry::File("kiln.yaml", MANIFEST),
            Entry::Exec("hooks/bake", &bake),
            Entry::Exec("web/run", APP_RUN),
            Entry::File("web/app.py", IMAGE_APP),
            Entry::File("web/v", "1"),
        ],
    );
    let data = repo.scratch("data");
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "1s"]);
    let done = wait_state(&daemon, &first, "the first deployment", |s| s == "succeeded");
    assert_eq!(done["state"], "succeeded", "{done}\n{}", daemon.logs());
    let api = daemon.api_url().unwrap();
    let token = std::fs::read_to_string(data.join("token")).unwrap();

    let browser = Browser::start(&chromium, &chromedriver, &repo.scratch("browser"));
    browser.goto(&format!("{api}/"));
    browser.wait("the fleet on the page", |b| {
        !b.find_all("article.fleet[data-fleet='web']").is_empty()
    });
    assert!(browser.find_all("button[data-verb]").is_empty(), "read-only before login");
    browser.wait("the live timeline", |b| b.text("#stream-state") == "live");

    // Log in with the API token.
    browser.type_into("#login input[name='token']", token.trim());
    browser.click("#login button[type='submit']");
    browser.wait("the session", |b| !b.find_all("#logout").is_empty());
    assert!(!browser.find_all("button[data-verb='deploy']").is_empty(), "verbs after login");
    let events_before = browser.find_all("#timeline li").len();

    // A push: the canary waits at its manual gate, and the page says so live.
    let sha = repo.commit("web: v2", &[("web/v", "2")]);
    let paused = wait_state(&daemon, &sha, "the canary gate", |s| s == "paused");
    let id = paused["id"].as_u64().unwrap();
    browser
        .wait("the promote button", |b| !b.find_all("button.promote[data-fleet='web']").is_empty());
    // The fleet view is swapped in whole every few seconds: read it until a read lands between
    // swaps (a read during one sees a stale element).
    browser.wait("the canary gate named on the fleet", |b| {
        b.text("article.fleet[data-fleet='web']").contains("canary waiting for promotion")
    });
    browser.wait("the timeline to show the push", |b| {
        b.find_all("#timeline li").len() > events_before
    });
    assert!(browser.text("#timeline").contains(&format!("#{id}")), "{}", browser.text("#timeline"));

    // The README's picture, at 1280×800 and at phone width.
    browser.cdp(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": false}),
    );
    browser.wait("the 1280×800 viewport", |b| b.script("return window.innerHeight") == json!(800));
    let wide = browser.screenshot();
    assert_eq!(png_size(&wide), (1280, 800), "the 1280×800 screenshot");
    let overflow = browser.script("return document.documentElement.scrollWidth");
    assert!(overflow.as_u64().unwrap() <= 1280, "the page is {overflow} px wide at 1280 px");
    browser.cdp(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 375, "height": 812, "deviceScaleFactor": 1, "mobile": true}),
    );
    browser.wait("the phone layout", |b| b.script("return window.innerWidth") == json!(375));
    let overflow = browser.script("return document.documentElement.scrollWidth");
    assert!(overflow.as_u64().unwrap() <= 375, "the page is {overflow} px wide at 375 px");
    let promote = browser.script(
        "const r = document.querySelector('button.promote').getBoundingClientRect(); return r.right",
    );
    assert!(promote.as_f64().unwrap() <= 375.0, "the promote button is off screen: {promote}");
    let phone = browser.screenshot();
    assert_eq!(png_size(&phone).0, 375, "the phone screenshot");
    browser.cdp("Emulation.clearDeviceMetricsOverride", json!({}));
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::write(shots.join("dashboard-1280x800.png"), &wide).unwrap();
    std::fs::write(shots.join("dashboard-375.png"), &phone).unwrap();
    if std::env::var("KILN_BLESS").as_deref() == Ok("1") {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::write(docs.join("dashboard.png"), &wide).unwrap();
        std::fs::write(docs.join("dashboard-phone.png"), &phone).unwrap();
    }
    eprintln!("screenshots: {}", shots.display());

    // Promote the canary (resume at the gate): the rollout rolls on.
    browser.verb_confirmed("button.promote[data-fleet='web']", "Promote the canary of web");
    wait_state(&daemon, &sha, "the promoted rollout to roll", |s| s != "paused");

    // Pause it while it replaces the other instances.
    browser.wait("the pause button", |b| !b.find_all("button[data-verb='pause']").is_empty());
    browser.verb_confirmed("button[data-verb='pause']", "Pause the rollout of web");
    let paused =
        wait_state(&daemon, &sha, "the operator's pause", |s| s == "paused" || s == "succeeded");
    assert_eq!(paused["state"], "paused", "the pause landed on a live rollout: {paused}");
    browser.wait("the page to show the pause", |b| {
        b.text("article.fleet[data-fleet='web'] .active").contains("paused")
            && !b.find_all("button.resume[data-fleet='web']").is_empty()
    });
    assert!(browser.find_all("button.promote").is_empty(), "the canary gate is behind us");

    // Resume: the rollout ends, and the page follows.
    browser.verb_confirmed("button.resume[data-fleet='web']", "Resume the paused rollout of web");
    let done = wait_state(&daemon, &sha, "the resumed rollout to end", |s| {
        ["succeeded", "failed", "rolled_back", "aborted"].contains(&s)
    });
    assert_eq!(done["state"], "succeeded", "{done}\n{}", daemon.logs());
    browser.wait("the page to show the fleet idle", |b| {
        b.find_all("button[data-verb='pause']").is_empty()
            && b.find_all("button.resume").is_empty()
            && b.text("#rollouts").contains("succeeded")
    });

    // `kiln show`: the rollout stopped twice (the gate, the operator) and went on twice.
    let (code, out, err) = kiln(&data, &["show", &id.to_string(), "--json"]);
    assert_eq!(code, 0, "kiln show: {err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    let changes: Vec<(String, String)> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "state")
        .map(|e| {
            let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
            (text(&e["change"]["from"]), text(&e["change"]["to"]))
        })
        .collect();
    let pauses = changes.iter().filter(|(_, to)| to == "paused").count();
    let resumes = changes.iter().filter(|(from, _)| from == "paused").count();
    assert_eq!((pauses, resumes), (2, 2), "state changes of #{id}: {changes:?}");
    assert_eq!(entry(&daemon, &sha).unwrap()["state"], "succeeded");

    // Deploy the first commit again from the menu: it stops at the canary gate; abort it.
    browser.click(&format!("select#deploy-0 option[value='{first}']"));
    browser.verb_confirmed("button[data-verb='deploy']", "Deploy to web the commit");
    let log = daemon.wait_log("the deploy to reach the canary gate", WAIT, |log| {
        for_commit(log, &first).iter().any(|e| e["origin"] == "deploy" && e["state"] == "paused")
    });
    let deploy = for_commit(&log, &first).into_iter().find(|e| e["origin"] == "deploy").unwrap();
    browser.wait("the deploy's canary on the page", |b| !b.find_all("button.promote").is_empty());
    browser.verb_confirmed("button[data-verb='abort']", "Abort the rollout of web");
    let log = daemon.wait_log("the abort", WAIT, |log| {
        log.iter().any(|e| e["id"] == deploy["id"] && e["state"] == "aborted")
    });
    assert!(log.iter().any(|e| e["id"] == deploy["id"] && e["state"] == "aborted"));
    browser
        .wait("the page to show the abort", |b| b.find_all("button[data-verb='abort']").is_empty());

    // Roll back to the first rollout, chosen in the menu (the fast path: no canary gate).
    browser.click(&format!("select#rollback-0 option[value='{first}']"));
    browser.verb_confirmed("button[data-verb='rollback']", "Roll web back");
    let log = daemon.wait_log("the rollback to end", WAIT, |log| {
        for_commit(log, &first).iter().any(|e| {
            e["origin"] == "rollback"
                && ["succeeded", "failed", "aborted"].contains(&e["state"].as_str().unwrap_or(""))
        })
    });
    let rollback =
        for_commit(&log, &first).into_iter().find(|e| e["origin"] == "rollback").unwrap();
    assert_eq!(rollback["state"], "succeeded", "{rollback}\n{}", daemon.logs());
    browser.wait("the page to show the fleet back on the first commit", |b| {
        b.text("article.fleet[data-fleet='web'] dl").contains(&first[..8])
    });
}
