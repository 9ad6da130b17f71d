//! `kiln run`: wires the store, the source watcher, the operator and the HTTP server together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::model::{Revision, SystemClock};
use crate::operator::{Operator, OperatorConfig, OperatorHandle, TIP_KEY};
use crate::rollout::driver::DriverEnv;
use crate::server::{AppState, ServerConfig};
use crate::source::{self, SourceConfig};
use crate::store::Store;

/// Everything `kiln run` needs, resolved from flags and environment by the CLI.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Remote URL or local path of the infra repo.
    pub repo: String,
    /// Tracked branch.
    pub branch: String,
    /// Data dir (store, mirror, work trees, local provider state).
    pub data_dir: PathBuf,
    /// API / webhook listen address.
    pub listen: SocketAddr,
    /// Poll interval.
    pub poll: Duration,
    /// How many rollouts the store keeps (0 = all).
    pub retention: usize,
    /// Garbage collection keeps the images of this many successful rollouts per fleet.
    pub keep_images: usize,
    /// Names of daemon environment variables passed through to hooks.
    pub hook_env: Vec<String>,
    /// The kiln executable (the local provider starts `kiln lb` from it).
    pub kiln_exe: PathBuf,
    /// Webhook secrets.
    pub secrets: crate::server::WebhookSecrets,
}

/// What `<data-dir>/daemon.json` holds while the daemon runs: how the CLI finds the API.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DaemonInfo {
    /// The daemon's pid.
    pub pid: u32,
    /// Base URL of the API.
    pub api: String,
}

/// The file the CLI reads to find the running daemon.
pub const INFO_FILE: &str = "daemon.json";
/// The API bearer token file (mode 0600).
pub const TOKEN_FILE: &str = "token";

/// Removes the `*.lock` files git leaves in `mirror` (a bare repository) when a process is
/// killed while updating a ref, the packed refs, the config or `HEAD`. Only call it while no
/// other process can use the mirror. Returns the files removed.
pub fn clear_stale_git_locks(mirror: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, recurse: bool, removed: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                if recurse {
                    walk(&path, true, removed);
                }
            } else if path.extension().is_some_and(|ext| ext == "lock")
                && std::fs::remove_file(&path).is_ok()
            {
                removed.push(path);
            }
        }
    }
    let mut removed = Vec::new();
    // Lock files live next to what they guard: top-level files (`HEAD`, `config`,
    // `packed-refs`, `FETCH_HEAD`, `shallow`) and loose refs and their logs.
    walk(mirror, false, &mut removed);
    walk(&mirror.join("refs"), true, &mut removed);
    walk(&mirror.join("logs"), true, &mut removed);
    removed
}

/// Reads the API token from the data dir, creating a random one on first start.
pub fn ensure_token(data_dir: &Path) -> anyhow::Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = data_dir.join(TOKEN_FILE);
    if let Ok(token) = std::fs::read_to_string(&path) {
        let token = token.trim().to_owned();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("failed to read /dev/urandom for the API token")?;
    let token = hex::encode(bytes);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("failed to write {}", path.display()))?;
    file.write_all(token.as_bytes())?;
    Ok(token)
}

/// Runs the daemon until SIGINT/SIGTERM (or `shutdown` fires).
pub async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("Shutting down.");
        signals.cancel();
    });
    run_until(config, shutdown).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// [`run`] with an explicit shutdown token (for in-process tests).
pub async fn run_until(config: DaemonConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("failed to create data dir {}", config.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&config.data_dir)?;
    let store = Store::open(&data_dir, config.retention)
        .context("failed to open the store (is another kiln running on this data dir?)")?;
    let token = ensure_token(&data_dir)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("failed to listen on {}", config.listen))?;
    let api = format!("http://{}", listener.local_addr()?);

    let metrics = Arc::new(Metrics::default());
    let mirror = data_dir.join("mirror.git");
    // The store's lock makes this process the mirror's only user: a `*.lock` file there was
    // left by a daemon killed mid-fetch, and would make every fetch fail with "locked".
    for stale in clear_stale_git_locks(&mirror) {
        tracing::warn!(lock = %stale.display(), "Removed a git lock file left by a previous run.");
    }
    let (source_tx, source_rx) = mpsc::channel(64);
    let last_tip: Option<Revision> = store.get_meta(TIP_KEY)?;
    let source = source::spawn_with_metrics(
        SourceConfig {
            url: config.repo.clone(),
            branch: config.branch.clone(),
            mirror: mirror.clone(),
            poll: config.poll,
        },
        last_tip,
        source_tx,
        shutdown.clone(),
        Some(metrics.clone()),
    );
    let hook_env: Vec<(String, String)> = config
        .hook_env
        .iter()
        .filter_map(|name| std::env::var(name).ok().map(|v| (name.clone(), v)))
        .collect();
    let env = DriverEnv {
        store: store.clone(),
        mirror,
        data_dir: data_dir.clone(),
        hook_env,
        metrics: metrics.clone(),
        clock: Arc::new(SystemClock),
    };
    let (commands_tx, commands_rx) = mpsc::channel(16);
    let view = crate::operator::FleetView::default();
    let operator = Operator::new(
        OperatorConfig {
            data_dir: data_dir.clone(),
            branch: config.branch.clone(),
            kiln_exe: config.kiln_exe.clone(),
            keep_images: config.keep_images,
        },
        env,
        view.clone(),
    );
    let handle = OperatorHandle {
        store: store.clone(),
        source,
        commands: commands_tx,
        fleets: view,
        metrics,
    };
    let state = AppState {
        operator: handle,
        config: Arc::new(ServerConfig {
            api_token: crate::server::Secret(token),
            secrets: config.secrets.clone(),
            max_body: 25 * 1024 * 1024,
        }),
    };
    let info = DaemonInfo { pid: std::process::id(), api: api.clone() };
    let info_path = data_dir.join(INFO_FILE);
    std::fs::write(&info_path, serde_json::to_vec_pretty(&info)?)?;
    tracing::info!(api = %api, repo = %crate::error::redact(&config.repo), branch = %config.branch, data_dir = %data_dir.display(), "kiln is running.");

    let server = tokio::spawn(crate::server::serve(listener, state, shutdown.clone()));
    operator.run(source_rx, commands_rx, shutdown.clone()).await;
    shutdown.cancel();
    let _ = server.await;
    let _ = std::fs::remove_file(&info_path);
    store.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_git_locks_are_removed_and_nothing_else() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mirror = tmp.path().join("mirror.git");
        let heads = mirror.join("refs/heads/feature");
        std::fs::create_dir_all(&heads).expect("refs");
        std::fs::create_dir_all(mirror.join("objects/pack")).expect("objects");
        for file in
            ["HEAD", "packed-refs.lock", "config.lock", "refs/heads/main", "refs/heads/main.lock"]
        {
            std::fs::write(mirror.join(file), "x").expect("write");
        }
        std::fs::write(heads.join("x.lock"), "x").expect("write");
        std::fs::write(mirror.join("objects/pack/keep.lock"), "x").expect("write");
        let mut removed: Vec<String> = clear_stale_git_locks(&mirror)
            .iter()
            .map(|p| p.strip_prefix(&mirror).expect("inside").display().to_string())
            .collect();
        removed.sort();
        assert_eq!(
            removed,
            [
                "config.lock",
                "packed-refs.lock",
                "refs/heads/feature/x.lock",
                "refs/heads/main.lock"
            ]
        );
        assert!(mirror.join("HEAD").exists() && mirror.join("refs/heads/main").exists());
        assert!(mirror.join("objects/pack/keep.lock").exists(), "objects are not git's ref locks");
        assert!(clear_stale_git_locks(&tmp.path().join("missing")).is_empty());
    }
}
