//! How the CLI (and `kiln quickstart`) reach kiln: the running daemon's API when there is one,
//! else the store on disk (read-only commands only). Shared by `cli` and `quickstart`, so neither
//! imports the other's internals.
//!
//! Discovery order: `--api`/`$KILN_API` (token from `$KILN_TOKEN`, else `<data-dir>/token`);
//! else `<data-dir>/daemon.json` whose pid is alive (its `api` and `<data-dir>/token`); else the
//! store in the data dir, opened directly. sled locks the database, so the store can only be
//! opened when no daemon runs; that case gets its own error message.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use serde::de::DeserializeOwned;

use crate::server::api::Accepted;
use crate::store::Store;

/// What `<data-dir>/daemon.json` holds while a daemon runs.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct DaemonFile {
    /// The daemon's pid.
    pub pid: u32,
    /// Its API base URL (`http://127.0.0.1:7878`).
    pub api: String,
}

/// Where the CLI's answers come from.
#[derive(Debug)]
pub enum Target {
    /// A running daemon.
    Api(ApiClient),
    /// No daemon: the store, opened directly.
    Offline(Store),
}

/// An HTTP client for one daemon.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    /// Where the URL came from, for error messages.
    origin: String,
    http: reqwest::Client,
}

/// Finds the daemon, or opens the store when none runs.
pub fn connect(api: Option<&str>, data_dir: &Path) -> anyhow::Result<Target> {
    if let Some(client) = find_daemon(api, data_dir)? {
        return Ok(Target::Api(client));
    }
    open_store(data_dir).map(Target::Offline)
}

/// Finds the daemon; `None` when none runs for this data dir.
pub fn find_daemon(api: Option<&str>, data_dir: &Path) -> anyhow::Result<Option<ApiClient>> {
    let token = || -> anyhow::Result<Option<String>> {
        if let Ok(token) = std::env::var("KILN_TOKEN") {
            if !token.trim().is_empty() {
                return Ok(Some(token.trim().to_owned()));
            }
        }
        let path = data_dir.join("token");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text.trim().to_owned())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(anyhow!(error).context(format!("cannot read {}", path.display()))),
        }
    };
    if let Some(api) = api.filter(|a| !a.trim().is_empty()) {
        return Ok(Some(ApiClient::new(api, token()?, "KILN_API".into())?));
    }
    let file = data_dir.join("daemon.json");
    let text = match std::fs::read(&file) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(anyhow!(error).context(format!("cannot read {}", file.display()))),
    };
    let daemon: DaemonFile = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a daemon file", file.display()))?;
    if !Path::new(&format!("/proc/{}", daemon.pid)).exists() {
        // A daemon killed with -9 leaves its file behind; the store is free again.
        return Ok(None);
    }
    let origin = format!("the kiln daemon (pid {}) from {}", daemon.pid, file.display());
    Ok(Some(ApiClient::new(&daemon.api, token()?, origin)?))
}

/// Opens the store in `data_dir` for reading when no daemon runs.
pub fn open_store(data_dir: &Path) -> anyhow::Result<Store> {
    if !data_dir.join("db").exists() {
        bail!(
            "no kiln daemon runs for {dir} and it holds no store (start one with `kiln run --data-dir {dir}`, or set KILN_API)",
            dir = data_dir.display()
        );
    }
    Store::open(data_dir, 0).with_context(|| {
        format!(
            "cannot open the store in {}: it is locked by another process (a daemon whose API cannot be found?)",
            data_dir.display()
        )
    })
}

impl ApiClient {
    /// A client for the API at `base`.
    pub fn new(base: &str, token: Option<String>, origin: String) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("cannot build an HTTP client")?;
        Ok(ApiClient { base: base.trim_end_matches('/').to_owned(), token, origin, http })
    }

    /// The API base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    fn unreachable(&self, error: reqwest::Error) -> anyhow::Error {
        anyhow!(error).context(format!("{} is not reachable at {}", self.origin, self.base))
    }

    /// Sends a request and turns a non-2xx answer into an error carrying the API's message.
    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = request.send().await.map_err(|e| self.unreachable(e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or(text);
        Err(ApiFailure { status: status.as_u16(), message }.into())
    }

    /// `GET /api/v1{path}` as JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let request = self.http.get(self.url(path)).timeout(Duration::from_secs(30));
        let response = self.send(request).await?;
        response.json().await.with_context(|| format!("unexpected answer from GET {path}"))
    }

    /// `POST /api/v1{path}` with the bearer token.
    pub async fn post(
        &self,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<Accepted> {
        let Some(token) = &self.token else {
            bail!("no API token: set KILN_TOKEN or run where <data-dir>/token is readable");
        };
        let mut request =
            self.http.post(self.url(path)).bearer_auth(token).timeout(Duration::from_secs(30));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = self.send(request).await?;
        response.json().await.with_context(|| format!("unexpected answer from POST {path}"))
    }

    /// Opens the SSE stream of a rollout's events (no overall timeout: it lasts the rollout).
    pub async fn stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let request = self.http.get(self.url(path)).header("accept", "text/event-stream");
        self.send(request).await
    }

    /// Opens an SSE stream resuming after event `seq` (`Last-Event-ID`).
    pub async fn stream_after(&self, path: &str, seq: u64) -> anyhow::Result<reqwest::Response> {
        let request = self
            .http
            .get(self.url(path))
            .header("accept", "text/event-stream")
            .header("last-event-id", seq.to_string());
        self.send(request).await
    }
}

/// A non-2xx answer from the API.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiFailure {
    /// HTTP status.
    pub status: u16,
    /// The API's `error` text.
    pub message: String,
}
