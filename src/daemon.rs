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
    /// Event streams of rollouts that ended longer ago than this are compacted (`None`: never).
    pub compact_after: Option<Duration>,
    /// Names of daemon environment variables passed through to hooks.
    pub hook_env: Vec<String>,
    /// The kiln executable (the local provider starts `kiln lb` from it).
    pub kiln_exe: PathBuf,
    /// Webhook secrets.
    pub secrets: crate::server::WebhookSecrets,
    /// The ports the local provider's instances listen on (`None`: any free port).
    pub instance_ports: Option<crate::provider::local::PortRange>,
    /// How many bake/reconcile steps run at once across fleets.
    pub jobs: usize,
    /// Signature verification imposed by flags (`None`: `verify:` in the manifest decides).
    pub verify: Option<crate::verify::DaemonPolicy>,
    /// Base URL of links in notifications and commit statuses (`None`: the API's address).
    pub public_url: Option<String>,
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

/// Reads the API token from the data dir, creating a random one on first start. An existing
/// token file that other users could read (any group/other bit) has been exposed: its mode is
/// set to 0600 and a warning says so, loudly, since the token may already have been copied.
pub fn ensure_token(data_dir: &Path) -> anyhow::Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let path = data_dir.join(TOKEN_FILE);
    if let Ok(token) = std::fs::read_to_string(&path) {
        let token = token.trim().to_owned();
        if !token.is_empty() {
            let mode = std::fs::metadata(&path)
                .with_context(|| format!("failed to stat {}", path.display()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| {
                        format!(
                            "{} is readable by other users (mode {:o}) and its mode cannot be \
                             set to 0600",
                            path.display(),
                            mode & 0o777
                        )
                    })?;
                tracing::warn!(
                    file = %path.display(),
                    was = format!("{:o}", mode & 0o777),
                    "The API token file was readable by other users; its mode is now 0600. \
                     Anyone who read it can call the API: delete the file and restart kiln \
                     to get a new token."
                );
            }
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
    // `mode` applies only when the file is created; an empty file left with another mode
    // is fixed here.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(token.as_bytes())?;
    Ok(token)
}

/// Process-wide hardening of `kiln run`, done once at start:
///
/// * the process is made non-dumpable (`PR_SET_DUMPABLE` 0), so processes of the same user,
///   hooks included, cannot read `/proc/<pid>/environ` (the webhook secrets), its memory or
///   its open files (root still can);
/// * the soft open-file limit is raised to the hard limit, so a flood of connections meets
///   the server's connection cap before `EMFILE`.
///
/// Returns the open-file limit now in force (`None` if it could not be read).
pub fn harden_process() -> Option<u64> {
    if let Err(error) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %error, "Could not make the daemon non-dumpable; processes of the same user can read its environment.");
    }
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => return Some(hard),
            Err(error) => {
                tracing::warn!(error = %error, soft, hard, "Could not raise the open-file limit.");
            }
        }
    }
    Some(soft)
}

/// The connection cap for an open-file limit: at most three quarters of the limit, leaving
/// the rest for the store, the mirror, hook pipes and files (and never under 16).
pub fn connection_cap(nofile: Option<u64>, configured: usize) -> usize {
    match nofile {
        Some(limit) => {
            let room = usize::try_from(limit.saturating_mul(3) / 4).unwrap_or(usize::MAX);
            configured.min(room.max(16))
        }
        None => configured,
    }
}

/// Runs the daemon until SIGINT/SIGTERM (or `shutdown` fires).
pub async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let nofile = harden_process();
    tracing::debug!(?nofile, "Open-file limit.");
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signals.cancel();
        tracing::info!("Shutting down.");
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
    run_until_ready(config, shutdown, tokio::sync::oneshot::channel().0).await
}

/// [`run_until`] that sends the API's base URL on `ready` once the daemon listens and its
/// `daemon.json` is written (`kiln quickstart` says "running" only then). A daemon that fails
/// before that drops `ready` and returns the reason.
pub async fn run_until_ready(
    config: DaemonConfig,
    shutdown: CancellationToken,
    ready: tokio::sync::oneshot::Sender<String>,
) -> anyhow::Result<()> {
    if let Some(path) = source::missing_local_repo(&config.repo) {
        anyhow::bail!("no repository at {}", path.display());
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("failed to create data dir {}", config.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&config.data_dir)?;
    let store = Store::open(&data_dir, config.retention).context("failed to open the store")?;
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
    // Likewise a hook run record: its hook (and what it started) outlived a killed daemon.
    let leftovers = crate::hooks::kill_all_leftovers(&data_dir).await;
    if leftovers > 0 {
        tracing::warn!(processes = leftovers, "Killed hook processes a previous run left behind.");
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
        slots: crate::pipeline::Slots::new(config.jobs),
    };
    let (commands_tx, commands_rx) = mpsc::channel(16);
    let view = crate::operator::FleetView::default();
    let operator = Operator::new(
        OperatorConfig {
            data_dir: data_dir.clone(),
            branch: config.branch.clone(),
            kiln_exe: config.kiln_exe.clone(),
            keep_images: config.keep_images,
            compact_after: config.compact_after,
            instance_ports: config.instance_ports,
            verify: config.verify.clone(),
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
            max_body: crate::server::DEFAULT_MAX_BODY,
            limits: crate::server::ServerLimits {
                max_connections: connection_cap(
                    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                        .ok()
                        .map(|(soft, _)| soft),
                    crate::server::ServerLimits::default().max_connections,
                ),
                ..crate::server::ServerLimits::default()
            },
        }),
    };
    let info = DaemonInfo { pid: std::process::id(), api: api.clone() };
    let info_path = data_dir.join(INFO_FILE);
    std::fs::write(&info_path, serde_json::to_vec_pretty(&info)?)?;
    tracing::info!(api = %api, repo = %crate::error::redact(&config.repo), branch = %config.branch, data_dir = %data_dir.display(), "kiln is running.");
    let _ = ready.send(api.clone());

    let server = tokio::spawn(crate::server::serve(listener, state, shutdown.clone()));
    // Notifications and commit statuses: their own tasks, fed by the event feed.
    let notifier = crate::notify::spawn(
        store.clone(),
        crate::notify::NotifyConfig {
            public_url: config.public_url.clone().unwrap_or_else(|| api.clone()),
            mirror: data_dir.join("mirror.git"),
        },
        shutdown.clone(),
    );
    operator.run(source_rx, commands_rx, shutdown.clone()).await;
    shutdown.cancel();
    let _ = server.await;
    for task in notifier {
        task.abort();
    }
    let _ = std::fs::remove_file(&info_path);
    store.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_readable_by_others_is_fixed_to_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().expect("temp dir");
        let path = tmp.path().join(TOKEN_FILE);
        std::fs::write(&path, "0123456789abcdef\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(ensure_token(tmp.path()).expect("token"), "0123456789abcdef");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the exposed token file must be made private");

        // A fresh token is created 0600, and an empty file of another mode is fixed too.
        std::fs::write(&path, "").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let fresh = ensure_token(tmp.path()).expect("token");
        assert_eq!(fresh.len(), 64);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn the_connection_cap_leaves_room_under_the_open_file_limit() {
        assert_eq!(connection_cap(Some(1024), 512), 512);
        assert_eq!(connection_cap(Some(256), 512), 192);
        assert_eq!(connection_cap(Some(8), 512), 16);
        assert_eq!(connection_cap(None, 512), 512);
    }

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
