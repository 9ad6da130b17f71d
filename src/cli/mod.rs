//! The command line: `kiln run` starts the daemon; every other verb talks to it over the API
//! (or reads the store directly when no daemon runs, for `log`, `show` and `status`).
//!
//! Exit status: 0 ok, 1 nothing to show (no rollouts, unknown rollout), 2 error (one line
//! `kiln: error: ...` on stderr with the whole cause chain).

mod render;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::client;
pub use crate::client::{ApiClient, ApiFailure, DaemonFile, Target, find_daemon};

use crate::model::RolloutId;
use crate::rollout::state::RolloutState;
use crate::server::api::{
    CommitDto, EventDto, EventPage, FleetDto, MAX_LIMIT, RolloutDto, RolloutPage,
};
use crate::server::{Secret, WebhookSecrets};
use crate::store::RolloutFilter;

/// The heading of the flags every command takes (shown apart from the command's own).
const GLOBAL: &str = "Global options";

/// kiln: a GitOps operator for immutable servers (bake, reconcile, roll).
#[derive(Debug, Parser)]
#[command(name = "kiln", version = crate::VERSION, about, propagate_version = true)]
pub struct Cli {
    /// Data dir of the daemon (store, mirror, token, daemon.json).
    #[arg(long, global = true, env = "KILN_DATA_DIR", default_value = ".kiln", help_heading = GLOBAL)]
    pub data_dir: PathBuf,
    /// API base URL of a running daemon (default: found through the data dir's daemon.json).
    #[arg(long, global = true, env = "KILN_API", help_heading = GLOBAL)]
    pub api: Option<String>,
    /// Log format on stderr of `kiln run`, `kiln quickstart` and `kiln lb`: `text` (coloured
    /// only on a terminal, never with NO_COLOR) or `json` (one object per line, for journald and
    /// `kubectl logs`). The level comes from KILN_LOG (`info`, `kiln=debug`, ...).
    #[arg(long, global = true, env = "KILN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, help_heading = GLOBAL)]
    pub log_format: LogFormat,
    /// Colour output (set by `main` when stdout is a terminal and NO_COLOR is unset).
    #[arg(skip)]
    pub color: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: watch the repo, bake, reconcile and roll fleets, serve the API.
    Run(Box<RunArgs>),
    /// Rollouts, newest first (like `git log`); with `--commits`, every commit seen and what
    /// became of it.
    Log {
        /// Only this fleet.
        #[arg(long, conflicts_with = "commits")]
        fleet: Option<String>,
        /// List every commit seen (newest first) with its outcome: the rollouts it produced,
        /// or why it produced none (skipped, failed, branch deleted).
        #[arg(long)]
        commits: bool,
        /// At most this many.
        #[arg(long, short = 'n', default_value_t = 20)]
        limit: usize,
        /// Print one JSON document (an array of rollouts, or of commits with `--commits`).
        #[arg(long)]
        json: bool,
    },
    /// One rollout: commit, image, plan and every event.
    Show {
        /// Rollout id (`12` or `#12`).
        rollout: String,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
        /// Stream new events until the rollout ends (needs the daemon). Exit status: 0 when it
        /// succeeded, 1 when it ended otherwise (failed, rolled back, aborted, superseded).
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Wait until a rollout ends, for CI (like `kubectl rollout status`). Exit status: 0 when
    /// it succeeded; 1 when it ended otherwise (failed, rolled back, aborted, superseded,
    /// skipped); 2 when `--timeout` passed first. With `--commit`, waits for the rollout(s) of
    /// that commit (of `--fleet`, or of every fleet it concerns) to appear and end.
    Wait {
        /// Rollout id (`12` or `#12`).
        #[arg(required_unless_present = "commit", conflicts_with = "commit")]
        rollout: Option<String>,
        /// A commit (prefix of at least 7 hex digits) whose rollouts to wait for.
        #[arg(long)]
        commit: Option<String>,
        /// With `--commit`: only this fleet's rollout.
        #[arg(long, requires = "commit")]
        fleet: Option<String>,
        /// Give up after this long (exit status 2).
        #[arg(long, default_value = "30m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// The event feed of every rollout, oldest first, from a sequence number on (for scripts:
    /// store the last `seq` you handled and pass it as `--after` next time).
    Events {
        /// Only events with a larger sequence number.
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        after: u64,
        /// Keep streaming new events (needs the daemon); reconnects after a daemon restart and
        /// resumes after the last event printed.
        #[arg(long, short = 'f')]
        follow: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Compacts the event streams of old finished rollouts now: each keeps its record (commit,
    /// image, outcome), its state changes and errors, and one summary of the rest. The daemon
    /// does this by itself (`kiln run --compact-after`); with it running, this shows its last
    /// garbage collection instead.
    Gc {
        /// Rollouts that ended longer ago than this are compacted.
        #[arg(long, value_name = "AGE", value_parser = parse_duration, default_value = crate::gc::DEFAULT_COMPACT_AFTER)]
        compact_after: Duration,
        /// Print one JSON document (the run's report).
        #[arg(long)]
        json: bool,
    },
    /// Fleets, their endpoint and instances (image, health, attached).
    Status {
        /// Print one JSON document (an array of fleets).
        #[arg(long)]
        json: bool,
    },
    /// Check a repo's kiln.yaml without running anything.
    Validate {
        /// The repo checkout (or the kiln.yaml file itself).
        #[arg(default_value = ".")]
        path: PathBuf,
    },
    /// Pause the fleet's running rollout at the next safe point.
    Pause {
        /// Fleet.
        fleet: String,
    },
    /// Continue a paused rollout (also promotes a manual canary).
    Resume {
        /// Fleet.
        fleet: String,
    },
    /// Stop the fleet's rollout for good and return its instances to the stable image (the one
    /// it ran before the rollout); a paused canary's instances are replaced too.
    Abort {
        /// Fleet.
        fleet: String,
    },
    /// Put the fleet back on its last successful image at once (no canary gate, window or
    /// delay). A second rollback goes one good release further back.
    Rollback {
        /// Fleet.
        fleet: String,
        /// Restore the image of this commit (prefix) instead of the previous one.
        #[arg(long)]
        to: Option<String>,
    },
    /// Run the fleet's last rollout again (it failed, rolled back or was aborted, e.g. on a
    /// cloud outage): same commit, same image once baked, through the usual gates.
    Retry {
        /// Fleet.
        fleet: String,
    },
    /// Retire a fleet removed from kiln.yaml: drain and terminate its instances and stop its
    /// load balancer (recorded as a `prune` rollout in `kiln log`).
    Down {
        /// Fleet.
        fleet: String,
    },
    /// Deploy a commit of the tracked branch's history to the fleet (bake, reconcile, roll
    /// through the usual gates).
    Deploy {
        /// Fleet.
        fleet: String,
        /// The commit: a full id or a prefix of at least 7 hex digits.
        commit: String,
    },
    /// Check fleets for drift now and print what differs from what kiln deployed (instances,
    /// load balancer backends, infra through the reconcile hook in plan mode). Exit status 0: no
    /// drift; 2: drift found; 1: a check could not be done.
    Drift {
        /// The fleet (default: every deployed fleet).
        fleet: Option<String>,
        /// Print one JSON document (an array of reports).
        #[arg(long)]
        json: bool,
        /// How long to wait for the checks.
        #[arg(long, default_value = "20m", value_parser = crate::manifest::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Ask the daemon to fetch the repo now.
    Trigger,
    /// Create a demo infra repo and run kiln on it with the local provider.
    Quickstart(crate::quickstart::QuickstartArgs),
    /// Print the JSON Schema of kiln.yaml (for editors).
    Schema,
    /// Print a shell completion script: `kiln completions bash > /etc/bash_completion.d/kiln`,
    /// `kiln completions zsh > "${fpath[1]}/_kiln"`, `kiln completions fish >
    /// ~/.config/fish/completions/kiln.fish`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// kiln's own load balancer process (started by the local provider).
    #[command(hide = true)]
    Lb(crate::provider::local::lb::LbArgs),
}

/// Flags of `kiln run`. Webhook secrets come from the environment or files, never from flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Remote URL or local path of the infra repo.
    #[arg(long)]
    pub repo: String,
    /// Branch to track.
    #[arg(long, default_value = "main")]
    pub branch: String,
    /// API and webhook listen address.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,
    /// Poll interval (`30s`, `5m`), jittered ±10%. Default: 60s for a network remote; 5m for a
    /// local path, whose ref changes are seen at once through inotify (the poll is a safety
    /// net; set it shorter for a path on NFS).
    #[arg(long, value_parser = parse_duration)]
    pub poll: Option<Duration>,
    /// How many rollouts to keep (0 keeps all).
    #[arg(long, default_value_t = 0)]
    pub retention: usize,
    /// Garbage collection keeps the images of this many successful rollouts per fleet (plus
    /// every image in use); older images, terminated instance dirs and stale repo copies go.
    #[arg(long, value_name = "N", default_value_t = crate::gc::DEFAULT_KEEP_IMAGES)]
    pub keep_images: usize,
    /// Finished rollouts older than this keep their record (commit, image, outcome) and a
    /// summary of their events instead of every event (`0s` keeps every event).
    #[arg(long, value_name = "AGE", value_parser = parse_duration, default_value = crate::gc::DEFAULT_COMPACT_AFTER)]
    pub compact_after: Duration,
    /// Ports the local provider's instances listen on, on 127.0.0.1 (`20000-20999`), for a
    /// firewall or a shared host. Default: any free port the kernel picks.
    #[arg(long, env = "KILN_INSTANCE_PORTS", value_name = "LOW-HIGH")]
    pub instance_ports: Option<crate::provider::local::PortRange>,
    /// How many bake/reconcile steps (an export of the commit and a hook each) run at once
    /// across all fleets; the others wait, recorded, for a slot.
    #[arg(long, value_name = "N", default_value_t = crate::pipeline::DEFAULT_JOBS)]
    pub jobs: usize,
    /// The URL people reach kiln's dashboard at, for links in notifications and commit
    /// statuses (default: the API's listen address).
    #[arg(long, env = "KILN_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,
    /// Name of a daemon environment variable to pass through to hooks (repeatable).
    #[arg(long = "hook-env", value_name = "NAME")]
    pub hook_env: Vec<String>,
    /// File holding the GitLab `X-Gitlab-Token` (else $KILN_GITLAB_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub gitlab_token_file: Option<PathBuf>,
    /// File holding the GitLab signing token (else $KILN_GITLAB_SIGNING_SECRET).
    #[arg(long, value_name = "FILE")]
    pub gitlab_signing_secret_file: Option<PathBuf>,
    /// File holding the GitHub webhook secret (else $KILN_GITHUB_SECRET).
    #[arg(long, value_name = "FILE")]
    pub github_secret_file: Option<PathBuf>,
    /// File holding the Gitea webhook secret (else $KILN_GITEA_SECRET).
    #[arg(long, value_name = "FILE")]
    pub gitea_secret_file: Option<PathBuf>,
    /// File holding the generic receiver's HMAC secret (else $KILN_GENERIC_SECRET).
    #[arg(long, value_name = "FILE")]
    pub generic_secret_file: Option<PathBuf>,
    /// Deploy only signed commits, whatever the repo's `verify:` says: `head` (the tip) or
    /// `range` (every commit since the last deployed one). Needs a trust file below.
    #[arg(long, value_name = "MODE", value_parser = ["head", "range"])]
    pub verify_mode: Option<String>,
    /// OpenSSH allowed_signers file (outside the repo) naming the trusted SSH keys.
    #[arg(long, value_name = "FILE", requires = "verify_mode")]
    pub verify_ssh_allowed_signers: Option<PathBuf>,
    /// OpenPGP keyring (outside the repo) holding the trusted keys.
    #[arg(long, value_name = "FILE", requires = "verify_mode")]
    pub verify_gpg_keyring: Option<PathBuf>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::manifest::parse_duration(text)
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // A terminal, unless NO_COLOR; CLICOLOR=0 turns it off and CLICOLOR_FORCE on (anstream
    // reads the conventions clap's own help follows).
    cli.color = anstream::AutoStream::choice(&std::io::stdout()) != anstream::ColorChoice::Never;
    match cli.command {
        Command::Run(_) | Command::Lb(_) => init_tracing("info", cli.log_format),
        // The quickstart prints what to do; only problems are logged.
        Command::Quickstart(_) => init_tracing("warn", cli.log_format),
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("kiln: error: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let mut stdout = std::io::stdout().lock();
    let res = runtime.block_on(run(cli, &mut stdout));
    let _ = stdout.flush();
    match res {
        Ok(code) => code,
        // `kiln log | head` closes the pipe early: that is not an error (as ripgrep does).
        Err(error)
            if error.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(error) => {
            let text = crate::error::redact(&format!("{error:#}"));
            eprintln!("kiln: error: {}", text.replace('\n', " "));
            ExitCode::from(2)
        }
    }
}

/// The kiln executable, as a path that can be started again: after an upgrade replaced the
/// binary on disk, Linux reports the running one as `<path> (deleted)`, and the new binary at
/// `<path>` is the one to start (the local provider starts `kiln lb` from it).
fn kiln_exe() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the kiln executable")?;
    let text = exe.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    })
}

fn init_tracing(default: &str, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KILN_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr is a closed pipe) is dropped: reporting it
        // on that same stderr would panic the task that logged, e.g. the one that stops the
        // daemon on SIGTERM.
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
        LogFormat::Text => builder.with_ansi(colour_on_stderr()).try_init(),
    };
}

/// Colour in log lines only on a terminal, and never with NO_COLOR set (<https://no-color.org>)
/// or CLICOLOR=0; CLICOLOR_FORCE forces it.
fn colour_on_stderr() -> bool {
    anstream::AutoStream::choice(&std::io::stderr()) != anstream::ColorChoice::Never
}

/// Runs one parsed command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let data_dir = cli.data_dir.clone();
    let api = cli.api.clone();
    let color = cli.color;
    match cli.command {
        Command::Run(args) => run_daemon(*args, data_dir).await,
        Command::Lb(args) => {
            crate::provider::local::lb::run(args).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Validate { path } => validate(&path, out),
        Command::Quickstart(args) => {
            let exe = kiln_exe()?;
            crate::quickstart::run(args, exe).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "kiln", out);
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema => {
            let schema = crate::manifest::json_schema();
            writeln!(out, "{}", serde_json::to_string_pretty(&schema)?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Log { commits: true, limit, json, .. } => {
            commit_log(client::connect(api.as_deref(), &data_dir)?, limit, json, out).await
        }
        Command::Log { fleet, limit, json, .. } => {
            log(client::connect(api.as_deref(), &data_dir)?, fleet, limit, json, color, out).await
        }
        Command::Show { rollout, json, follow } => {
            let id: RolloutId =
                rollout.parse().map_err(|_| anyhow!("`{rollout}` is not a rollout id"))?;
            show(client::connect(api.as_deref(), &data_dir)?, id, json, follow, color, out).await
        }
        Command::Wait { rollout, commit, fleet, timeout } => {
            let client = need_daemon(api, &data_dir, "wait")?;
            let what = match (rollout, commit) {
                (Some(rollout), _) => WaitFor::Rollout(
                    rollout.parse().map_err(|_| anyhow!("`{rollout}` is not a rollout id"))?,
                ),
                (None, Some(commit)) => WaitFor::Commit { commit, fleet },
                (None, None) => bail!("give a rollout id or --commit"),
            };
            wait(&client, what, timeout, out).await
        }
        Command::Events { after, follow, json } => {
            events(api, &data_dir, after, follow, json, out).await
        }
        Command::Gc { compact_after, json } => {
            gc(client::connect(api.as_deref(), &data_dir)?, compact_after, json, out).await
        }
        Command::Status { json } => {
            status(client::connect(api.as_deref(), &data_dir)?, json, color, out).await
        }
        Command::Pause { fleet } => verb(api, &data_dir, &fleet, "pause", None, out).await,
        Command::Resume { fleet } => verb(api, &data_dir, &fleet, "resume", None, out).await,
        Command::Abort { fleet } => verb(api, &data_dir, &fleet, "abort", None, out).await,
        Command::Retry { fleet } => verb(api, &data_dir, &fleet, "retry", None, out).await,
        Command::Down { fleet } => verb(api, &data_dir, &fleet, "down", None, out).await,
        Command::Deploy { fleet, commit } => {
            let body = serde_json::json!({ "commit": commit });
            verb(api, &data_dir, &fleet, "deploy", Some(body), out).await
        }
        Command::Rollback { fleet, to } => {
            let body = serde_json::json!({ "to": to });
            verb(api, &data_dir, &fleet, "rollback", Some(body), out).await
        }
        Command::Drift { fleet, json, timeout } => {
            let client = need_daemon(api, &data_dir, "drift")?;
            drift(client, fleet, json, timeout, out).await
        }
        Command::Trigger => {
            let client = need_daemon(api, &data_dir, "trigger")?;
            client.post("/trigger", None).await?;
            writeln!(out, "fetch requested")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn read_secret(file: Option<&Path>, env: &str) -> anyhow::Result<Option<Secret>> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read secret file {}", path.display()))?,
        None => match std::env::var(env) {
            Ok(value) => value,
            Err(_) => return Ok(None),
        },
    };
    let text = text.trim_end_matches(['\n', '\r']).to_owned();
    if text.is_empty() {
        match file {
            Some(path) => bail!("secret file {} is empty", path.display()),
            // An empty variable is treated as unset.
            None => return Ok(None),
        }
    }
    Ok(Some(Secret(text)))
}

async fn run_daemon(args: RunArgs, data_dir: PathBuf) -> anyhow::Result<ExitCode> {
    let secrets = WebhookSecrets {
        gitlab_token: read_secret(args.gitlab_token_file.as_deref(), "KILN_GITLAB_TOKEN")?,
        gitlab_signing: read_secret(
            args.gitlab_signing_secret_file.as_deref(),
            "KILN_GITLAB_SIGNING_SECRET",
        )?,
        github: read_secret(args.github_secret_file.as_deref(), "KILN_GITHUB_SECRET")?,
        gitea: read_secret(args.gitea_secret_file.as_deref(), "KILN_GITEA_SECRET")?,
        generic: read_secret(args.generic_secret_file.as_deref(), "KILN_GENERIC_SECRET")?,
    };
    let poll = args.poll.unwrap_or_else(|| crate::source::default_poll(&args.repo));
    let verify = match args.verify_mode.as_deref() {
        None => None,
        Some(mode) => {
            let mode = if mode == "head" {
                crate::manifest::VerifyMode::Head
            } else {
                crate::manifest::VerifyMode::Range
            };
            if args.verify_ssh_allowed_signers.is_none() && args.verify_gpg_keyring.is_none() {
                anyhow::bail!(
                    "--verify-mode needs --verify-ssh-allowed-signers, --verify-gpg-keyring or both"
                );
            }
            for path in
                [&args.verify_ssh_allowed_signers, &args.verify_gpg_keyring].into_iter().flatten()
            {
                std::fs::metadata(path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            }
            Some(crate::verify::DaemonPolicy {
                mode,
                ssh_allowed_signers: args.verify_ssh_allowed_signers.clone(),
                gpg_keyring: args.verify_gpg_keyring.clone(),
            })
        }
    };
    let config = crate::daemon::DaemonConfig {
        repo: args.repo,
        branch: args.branch,
        data_dir,
        listen: args.listen,
        poll,
        retention: args.retention,
        keep_images: args.keep_images,
        compact_after: Some(args.compact_after).filter(|d| !d.is_zero()),
        hook_env: args.hook_env,
        kiln_exe: kiln_exe()?,
        secrets,
        instance_ports: args.instance_ports,
        jobs: args.jobs,
        verify,
        public_url: args.public_url,
    };
    crate::daemon::run(config).await?;
    Ok(ExitCode::SUCCESS)
}

fn validate(path: &Path, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let (dir, file) = if path.is_file() {
        (path.parent().unwrap_or(Path::new(".")).to_path_buf(), path.to_path_buf())
    } else {
        (path.to_path_buf(), path.join(crate::manifest::MANIFEST_FILE))
    };
    let name = crate::manifest::MANIFEST_FILE;
    let loaded = match read_manifest(&file, name)? {
        Ok(text) => crate::manifest::load(&text, name, &crate::manifest::DirFiles(&dir)),
        Err(error) => Err(error),
    };
    match loaded {
        Ok(manifest) => {
            let n = manifest.fleets.len();
            writeln!(out, "{name}: ok ({n} fleet{})", if n == 1 { "" } else { "s" })?;
            Ok(ExitCode::SUCCESS)
        }
        // Problems go to stderr (stdout stays for the verdict of a good manifest).
        Err(error) => {
            let mut err = std::io::stderr().lock();
            for problem in &error.problems {
                writeln!(err, "{problem}")?;
            }
            let n = error.problems.len();
            writeln!(err, "{name}: {n} problem{}", if n == 1 { "" } else { "s" })?;
            Ok(ExitCode::from(2))
        }
    }
}

/// Reads a checkout's manifest as the daemon reads it from git: a symlink is refused, never
/// followed (its target's content is not read, let alone printed), and a file over
/// [`crate::manifest::MAX_MANIFEST_BYTES`] is refused from its size, unread.
fn read_manifest(
    file: &Path,
    name: &str,
) -> anyhow::Result<Result<String, crate::manifest::ManifestError>> {
    use crate::manifest::{MAX_MANIFEST_BYTES, ManifestError};
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let meta = std::fs::symlink_metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    if meta.file_type().is_symlink() {
        return Ok(Err(ManifestError::symlink(name)));
    }
    // O_NOFOLLOW: a symlink swapped in after the check above is refused too.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(file);
    let opened = match opened {
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) => {
            return Ok(Err(ManifestError::symlink(name)));
        }
        other => other.with_context(|| format!("cannot read {}", file.display()))?,
    };
    let meta = opened.metadata().with_context(|| format!("cannot read {}", file.display()))?;
    if !meta.is_file() {
        anyhow::bail!("{} is not a regular file", file.display());
    }
    if meta.len() > MAX_MANIFEST_BYTES {
        return Ok(Err(ManifestError::too_large(name, meta.len())));
    }
    let mut bytes = Vec::new();
    opened
        .take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let size = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if size > MAX_MANIFEST_BYTES {
        return Ok(Err(ManifestError::too_large(name, size)));
    }
    Ok(String::from_utf8(bytes).map_err(|_| ManifestError::whole_file(name, "not valid UTF-8")))
}

async fn log(
    target: Target,
    fleet: Option<String>,
    limit: usize,
    json: bool,
    color: bool,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let fleet_name = fleet.clone();
    let rollouts = match &target {
        Target::Api(client) => {
            let mut path = format!("/rollouts?limit={limit}");
            if let Some(fleet) = &fleet {
                path.push_str(&format!("&fleet={}", encode(fleet)));
            }
            client.get::<RolloutPage>(&path).await?.rollouts
        }
        Target::Offline(store) => {
            let filter = RolloutFilter {
                fleet: fleet.clone(),
                limit: Some(limit),
                ..RolloutFilter::default()
            };
            store.rollouts(&filter)?.iter().map(RolloutDto::from_rollout).collect()
        }
    };
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rollouts)?)?;
    } else if rollouts.is_empty() {
        match fleet_name {
            Some(name) => match known_fleets(&target).await? {
                known if known.iter().any(|k| k == &name) => {
                    eprintln!("kiln: no rollouts of fleet `{name}` yet");
                }
                known if known.is_empty() => eprintln!("kiln: no fleet `{name}` (no fleets yet)"),
                known => eprintln!("kiln: no fleet `{name}` (fleets: {})", known.join(", ")),
            },
            None => eprintln!("kiln: no rollouts yet"),
        }
    } else {
        render::log_table(out, &rollouts, crate::model::now(), color)?;
    }
    Ok(if rollouts.is_empty() { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// `kiln gc`: compacts old event streams offline; with the daemon running, shows its last run.
async fn gc(
    target: Target,
    compact_after: Duration,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let report = match target {
        Target::Api(client) => {
            let dto: serde_json::Value = client.get("/gc").await?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&dto)?)?;
                return Ok(ExitCode::SUCCESS);
            }
            writeln!(
                out,
                "The daemon collects by itself (every 10 minutes, `kiln run --compact-after`); its last run:"
            )?;
            match serde_json::from_value::<crate::gc::Report>(dto["last"].clone()) {
                Ok(report) => report,
                Err(_) => {
                    writeln!(out, "none yet")?;
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        Target::Offline(store) => {
            tokio::task::spawn_blocking(move || crate::gc::compact_only(&store, compact_after))
                .await??
        }
    };
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        writeln!(
            out,
            "compacted the events of {} rollout(s): {} event(s) replaced by summaries",
            report.compacted.rollouts, report.compacted.events
        )?;
        if !report.removed.is_empty() {
            writeln!(
                out,
                "removed {} file(s), {} freed",
                report.removed.len(),
                crate::gc::human_bytes(report.bytes)
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The fleets kiln knows: the daemon's (those of the tip's manifest and any with rollouts),
/// or without one those named by rollouts in the store.
async fn known_fleets(target: &Target) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = match target {
        Target::Api(client) => {
            client.get::<Vec<FleetDto>>("/fleets").await?.into_iter().map(|f| f.name).collect()
        }
        Target::Offline(store) => store.rollout_fleets()?,
    };
    names.sort();
    names.dedup();
    Ok(names)
}

/// `kiln log --commits`: every commit seen, newest first, with what became of it.
async fn commit_log(
    target: Target,
    limit: usize,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let commits = match &target {
        Target::Api(client) => {
            client.get::<Vec<CommitDto>>(&format!("/commits?limit={limit}")).await?
        }
        Target::Offline(store) => crate::server::api::commit_log(store, limit)?,
    };
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&commits)?)?;
    } else if commits.is_empty() {
        eprintln!("kiln: no commits yet");
    } else {
        render::commit_table(out, &commits, crate::model::now())?;
    }
    Ok(if commits.is_empty() { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// Percent-encodes a query value (fleet names are simple, but be safe).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn show(
    target: Target,
    id: RolloutId,
    json: bool,
    follow: bool,
    color: bool,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let found = match &target {
        Target::Api(client) => match client.get::<RolloutDto>(&format!("/rollouts/{id}")).await {
            Ok(dto) => Some(dto),
            Err(error) if error.downcast_ref::<ApiFailure>().is_some_and(|f| f.status == 404) => {
                None
            }
            Err(error) => return Err(error),
        },
        Target::Offline(store) => match store.rollout(id) {
            Ok(rollout) => {
                let mut dto = RolloutDto::from_rollout(&rollout);
                dto.events = Some(store.events(id, 0)?.iter().map(EventDto::from).collect());
                Some(dto)
            }
            Err(crate::store::StoreError::NotFound { .. }) => None,
            Err(error) => return Err(error.into()),
        },
    };
    let Some(rollout) = found else {
        eprintln!("kiln: no rollout #{id}");
        return Ok(ExitCode::from(1));
    };
    if json && !follow {
        writeln!(out, "{}", serde_json::to_string_pretty(&rollout)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if !json {
        render::rollout_header(out, &rollout, crate::model::now(), color)?;
        writeln!(out)?;
    }
    if !follow {
        for event in rollout.events.iter().flatten() {
            render::event_line(out, event)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Target::Api(client) = target else {
        bail!("--follow needs a running daemon (none found for this data dir; set KILN_API?)");
    };
    let state = follow_events(&client, id, json, out).await?;
    Ok(exit_for(state))
}

/// 0 for a rollout that succeeded, 1 for one that ended otherwise (the CI gate of `--follow`
/// and `wait`).
fn exit_for(state: RolloutState) -> ExitCode {
    if state == RolloutState::Succeeded { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// What `kiln wait` waits for.
enum WaitFor {
    Rollout(RolloutId),
    Commit { commit: String, fleet: Option<String> },
}

/// How often `kiln wait` looks at the rollout.
const WAIT_POLL: Duration = Duration::from_millis(500);

/// `kiln wait`: polls the API until the rollout(s) end or `timeout` passes. A daemon that
/// restarts meanwhile is waited for too (its rollouts resume).
async fn wait(
    client: &ApiClient,
    what: WaitFor,
    timeout: Duration,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let deadline = tokio::time::Instant::now() + timeout;
    let (label, path) = match &what {
        WaitFor::Rollout(id) => (format!("rollout #{id}"), format!("/rollouts/{id}")),
        WaitFor::Commit { commit, fleet } => {
            let commit = commit.trim().to_ascii_lowercase();
            if commit.len() < crate::operator::MIN_COMMIT_PREFIX
                || !commit.chars().all(|c| c.is_ascii_hexdigit())
            {
                bail!(
                    "`{commit}` is not a commit id: give at least {} hex digits",
                    crate::operator::MIN_COMMIT_PREFIX
                );
            }
            let mut path = format!("/rollouts?commit={commit}&limit=100");
            if let Some(fleet) = fleet {
                path.push_str(&format!("&fleet={}", encode(fleet)));
            }
            let label = match fleet {
                Some(fleet) => format!("the rollout of commit {commit} for fleet `{fleet}`"),
                None => format!("the rollouts of commit {commit}"),
            };
            (label, path)
        }
    };
    let mut last_error: Option<String>;
    loop {
        let seen: anyhow::Result<Vec<RolloutDto>> = match &what {
            WaitFor::Rollout(_) => client.get::<RolloutDto>(&path).await.map(|r| vec![r]),
            WaitFor::Commit { .. } => client
                .get::<RolloutPage>(&path)
                .await
                // Drift records are reports, not rollouts to wait for.
                .map(|page| page.rollouts.into_iter().filter(|r| r.origin != "drift").collect()),
        };
        match seen {
            Ok(rollouts)
                if !rollouts.is_empty() && rollouts.iter().all(|r| r.state.is_terminal()) =>
            {
                let mut state = RolloutState::Succeeded;
                for r in &rollouts {
                    let fleet = r.fleet.as_deref().unwrap_or("-");
                    let reason = r
                        .reason
                        .as_deref()
                        .map(|r| format!(": {}", render::escape_control(r, false)))
                        .unwrap_or_default();
                    writeln!(out, "rollout #{} ({fleet}) {}{reason}", r.id, r.state)?;
                    if r.state != RolloutState::Succeeded {
                        state = r.state;
                    }
                }
                return Ok(exit_for(state));
            }
            Ok(_) => last_error = None,
            Err(error) => {
                if let Some(failure) = error.downcast_ref::<ApiFailure>() {
                    if failure.status == 404 {
                        bail!("no {label}");
                    }
                }
                last_error = Some(format!("{error:#}"));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let why = last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default();
            eprintln!(
                "kiln: timed out after {} waiting for {label}{why}",
                crate::manifest::format_duration(timeout)
            );
            return Ok(ExitCode::from(2));
        }
        tokio::time::sleep(WAIT_POLL.min(deadline - tokio::time::Instant::now())).await;
    }
}

/// Streams the SSE follow endpoint: prints every event (a JSON line each with `--json`) and,
/// on a terminal, a progress bar on stderr while instances are replaced.
async fn follow_events(
    client: &ApiClient,
    id: RolloutId,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<RolloutState> {
    let mut response = client.stream(&format!("/rollouts/{id}/events")).await?;
    // Progress on stderr when it is a terminal (indicatif hides the bar otherwise); event lines
    // go to `out` with the bar lifted while they print.
    let bar = (!json).then(|| {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("[{bar:30}] {pos}/{len} instances replaced")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("#>-"),
        )
    });
    let mut buffer = String::new();
    loop {
        let chunk = response.chunk().await.context("the event stream broke")?;
        let Some(chunk) = chunk else {
            bail!("the daemon closed the event stream before rollout #{id} ended");
        };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let (mut kind, mut data) = ("message", String::new());
            for line in frame.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    kind = if value.trim() == "end" { "end" } else { "event" };
                } else if let Some(value) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(value.strip_prefix(' ').unwrap_or(value));
                }
            }
            if data.is_empty() {
                continue;
            }
            match kind {
                "end" => {
                    let rollout: RolloutDto = serde_json::from_str(&data)
                        .context("unreadable end of the event stream")?;
                    if let Some(bar) = &bar {
                        bar.finish_and_clear();
                    }
                    if json {
                        writeln!(out, "{}", serde_json::to_string(&rollout)?)?;
                    } else {
                        writeln!(out, "rollout #{id} ended: {}", rollout.state)?;
                    }
                    return Ok(rollout.state);
                }
                _ => {
                    let event: EventDto =
                        serde_json::from_str(&data).context("unreadable event in the stream")?;
                    match &bar {
                        None => writeln!(out, "{}", serde_json::to_string(&event)?)?,
                        Some(bar) => bar.suspend(|| render::event_line(out, &event))?,
                    }
                    out.flush()?;
                    let moved = event.kind == "state" || event.kind.starts_with("instance");
                    if let Some(bar) = bar.as_ref().filter(|b| moved && !b.is_hidden()) {
                        if let Ok(now) = client.get::<RolloutDto>(&format!("/rollouts/{id}")).await
                        {
                            match now.progress.filter(|_| now.state.as_str() == "rolling") {
                                // A first deployment replaces nothing: say what is in service.
                                Some(p) if p.total == 0 => {
                                    bar.set_style(ProgressStyle::default_spinner());
                                    bar.set_message(render::progress_text(p));
                                    bar.tick();
                                }
                                Some(p) => {
                                    bar.set_length(p.total as u64);
                                    bar.set_position(p.replaced as u64);
                                }
                                None => {}
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `kiln events`: pages through the feed (the API, or the store without a daemon), then with
/// `--follow` streams it, reconnecting (and finding a restarted daemon again) with
/// `Last-Event-ID` so no event is printed twice or missed.
async fn events(
    api: Option<String>,
    data_dir: &Path,
    after: u64,
    follow: bool,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let print = |out: &mut dyn Write, event: &EventDto| -> anyhow::Result<()> {
        if json {
            writeln!(out, "{}", serde_json::to_string(event)?)?;
        } else {
            render::feed_line(out, event)?;
        }
        Ok(())
    };
    if !follow {
        let mut last = after;
        match client::connect(api.as_deref(), data_dir)? {
            Target::Api(client) => loop {
                let page: EventPage =
                    client.get(&format!("/events?after={last}&limit={MAX_LIMIT}")).await?;
                for event in &page.events {
                    print(out, event)?;
                }
                if page.events.is_empty() || page.next_after >= page.latest {
                    break;
                }
                last = page.next_after;
            },
            Target::Offline(store) => loop {
                let page = store.events_after(last, crate::store::MAX_FEED_PAGE)?;
                let Some(end) = page.last().map(|e| e.seq) else { break };
                for event in &page {
                    print(out, &EventDto::from(event))?;
                }
                last = end;
            },
        }
        return Ok(ExitCode::SUCCESS);
    }
    // The first connection needs a daemon; later ones wait for a restarting one. The store is
    // never opened here: that would lock a restarting daemon out of it.
    let mut client = Some(need_daemon(api.clone(), data_dir, "events --follow")?);
    let mut last = after;
    let mut broken: Option<anyhow::Error> = None;
    loop {
        if let Some(error) = broken.take() {
            eprintln!("kiln: the event stream broke ({error:#}); reconnecting after #{last}");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let client = match client
            .take()
            .map_or_else(|| client::find_daemon(api.as_deref(), data_dir), |c| Ok(Some(c)))
        {
            Ok(Some(client)) => client,
            // The daemon is restarting: its daemon.json is not there yet.
            Ok(None) => {
                broken = Some(anyhow!("no daemon runs for {}", data_dir.display()));
                continue;
            }
            Err(error) => {
                broken = Some(error);
                continue;
            }
        };
        let mut response = match client.stream_after("/events/stream", last).await {
            Ok(response) => response,
            Err(error) if error.downcast_ref::<ApiFailure>().is_some() => return Err(error),
            Err(error) => {
                broken = Some(error);
                continue;
            }
        };
        let mut buffer = String::new();
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    broken = Some(anyhow!("the daemon closed it"));
                    break;
                }
                Err(error) => {
                    broken = Some(error.into());
                    break;
                }
            };
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let frame: String = buffer.drain(..end + 2).collect();
                let data: String = frame
                    .lines()
                    .filter_map(|line| line.strip_prefix("data:"))
                    .map(|v| v.strip_prefix(' ').unwrap_or(v))
                    .collect::<Vec<_>>()
                    .join("\n");
                if data.is_empty() {
                    continue;
                }
                let event: EventDto =
                    serde_json::from_str(&data).context("unreadable event in the stream")?;
                // The server never repeats one; a stale reconnect must not either.
                if event.seq <= last {
                    continue;
                }
                last = event.seq;
                print(out, &event)?;
                out.flush()?;
            }
        }
    }
}

async fn status(
    target: Target,
    json: bool,
    color: bool,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let (fleets, live) = match &target {
        Target::Api(client) => (client.get::<Vec<FleetDto>>("/fleets").await?, true),
        Target::Offline(store) => {
            let store = store.clone();
            (tokio::task::spawn_blocking(move || fleets_from_store(&store)).await??, false)
        }
    };
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&fleets)?)?;
    } else if fleets.is_empty() {
        eprintln!("kiln: no fleets yet");
    } else {
        render::status(out, &fleets, live, color)?;
    }
    if !json {
        // The notification outbox (`GET /notify`; an older daemon without it shows nothing).
        let outbox = match &target {
            Target::Api(client) => client.get::<crate::notify::OutboxStatus>("/notify").await.ok(),
            Target::Offline(store) => {
                let store = store.clone();
                tokio::task::spawn_blocking(move || crate::notify::status(&store).ok()).await?
            }
        };
        if let Some(outbox) = outbox {
            render::notifications(out, &outbox)?;
        }
    }
    Ok(if fleets.is_empty() { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// `kiln drift`: starts a check per fleet (`POST /fleets/{name}/drift`), then waits for each
/// fleet's report to be newer than the one it had, and prints them.
async fn drift(
    client: ApiClient,
    fleet: Option<String>,
    json: bool,
    timeout: std::time::Duration,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    use crate::server::api::DriftDto;
    let before: Vec<FleetDto> = client.get("/fleets").await?;
    let names: Vec<String> = match fleet {
        Some(name) => vec![name],
        None => before.iter().filter(|f| f.revision.is_some()).map(|f| f.name.clone()).collect(),
    };
    if names.is_empty() {
        bail!("no deployed fleet to check");
    }
    let previous = |name: &str| {
        before.iter().find(|f| f.name == name).and_then(|f| f.drift.as_ref()).map(|d| d.checked_at)
    };
    let mut failed = false;
    let mut waiting: Vec<(String, Option<crate::model::Timestamp>)> = Vec::new();
    for name in names {
        match client.post(&format!("/fleets/{}/drift", encode(&name)), None).await {
            Ok(_) => {
                let since = previous(&name);
                waiting.push((name, since));
            }
            Err(error) => {
                eprintln!("kiln: drift {name}: {error:#}");
                failed = true;
            }
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut reports: Vec<DriftDto> = Vec::new();
    while !waiting.is_empty() {
        let fleets: Vec<FleetDto> = client.get("/fleets").await?;
        waiting.retain(|(name, since)| {
            let report = fleets.iter().find(|f| &f.name == name).and_then(|f| f.drift.clone());
            match report.filter(|r| since.is_none_or(|since| r.checked_at > since)) {
                Some(report) => {
                    reports.push(report);
                    false
                }
                None => true,
            }
        });
        if waiting.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            for (name, _) in &waiting {
                eprintln!(
                    "kiln: drift {name}: no report within {}",
                    crate::manifest::format_duration(timeout)
                );
            }
            failed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    reports.sort_by(|a, b| a.fleet.cmp(&b.fleet));
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&reports)?)?;
    } else {
        for report in &reports {
            render::drift_report(out, report)?;
        }
    }
    let drifted = reports.iter().any(|r| !r.findings.is_empty());
    failed |= reports.iter().any(|r| !r.errors.is_empty());
    Ok(if failed {
        ExitCode::FAILURE
    } else if drifted {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// Without a daemon: the fleets named by rollouts in the store, with what they run. Provider
/// and capacity come from the manifest at the fleet's deployed (else newest) commit in the
/// daemon's mirror, as the daemon reads them (blocking: git).
fn fleets_from_store(store: &crate::store::Store) -> anyhow::Result<Vec<FleetDto>> {
    let mirror = store.dir().join("mirror.git");
    // From the indexes: the fleets, and per fleet its unfinished and newest rollouts.
    let names = store.rollout_fleets()?;
    let active_all = store.active_rollouts()?;
    let mut fleets = Vec::new();
    for name in names {
        let deployed = store.deployed(&name)?;
        // Newest first, so the first one is the active rollout.
        let active = active_all.iter().rev().find(|r| r.fleet.as_deref() == Some(name.as_str()));
        let newest = store
            .rollouts(&RolloutFilter {
                fleet: Some(name.clone()),
                limit: Some(1),
                ..RolloutFilter::default()
            })?
            .into_iter()
            .next();
        let newest = newest.as_ref();
        let spec =
            deployed.as_ref().map(|d| &d.revision).or(newest.map(|r| &r.revision)).and_then(
                |revision| crate::planner::fleet_at(&mirror, revision, &name).ok().flatten(),
            );
        fleets.push(FleetDto {
            provider: spec
                .as_ref()
                .map_or_else(|| "unknown".into(), |f| f.rollout.provider.kind().to_string()),
            capacity: spec.as_ref().map_or(0, |f| f.rollout.capacity.min()),
            revision: deployed.as_ref().map(|d| d.revision.0.clone()),
            image: deployed.as_ref().map(|d| d.image.0.clone()),
            active_rollout: active.map(|r| r.id.0),
            active_state: active.map(|r| r.state),
            drift: crate::drift::last_report(store, &name)?
                .as_ref()
                .map(crate::server::api::DriftDto::from),
            name,
            ..FleetDto::default()
        });
    }
    Ok(fleets)
}

fn need_daemon(api: Option<String>, data_dir: &Path, verb: &str) -> anyhow::Result<ApiClient> {
    client::find_daemon(api.as_deref(), data_dir)?.ok_or_else(|| {
        anyhow!(
            "`kiln {verb}` needs a running daemon, and none runs for {} (start one with `kiln run`, or set KILN_API)",
            data_dir.display()
        )
    })
}

async fn verb(
    api: Option<String>,
    data_dir: &Path,
    fleet: &str,
    verb: &str,
    body: Option<serde_json::Value>,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let client = need_daemon(api, data_dir, verb)?;
    let accepted = client
        .post(&format!("/fleets/{}/{verb}", encode(fleet)), body)
        .await
        .with_context(|| format!("{verb} {fleet}"))?;
    match accepted.rollout {
        Some(id) => writeln!(out, "{verb} {fleet}: accepted (rollout #{id})")?,
        None => writeln!(out, "{verb} {fleet}: accepted")?,
    }
    Ok(ExitCode::SUCCESS)
}
