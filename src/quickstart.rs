//! `kiln quickstart`: turns the demo infra repo into a fresh git repository, starts kiln on it
//! with the local provider, and tells the user what to do next.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::daemon::{self, DaemonConfig};
use crate::rollout::state::RolloutState;
use crate::server::api::RolloutPage;

/// Options of `kiln quickstart`.
#[derive(Debug, Clone, clap::Args)]
pub struct QuickstartArgs {
    /// Where to create the demo (a bare repo `infra.git`, a clone `work/` and kiln's `data/`).
    #[arg(long, default_value = "kiln-demo")]
    pub dir: PathBuf,
    /// The load balancer's port on 127.0.0.1.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The API and webhook address.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,
    /// Tear the demo down instead: terminate its instances and stop its load balancer (they
    /// outlive kiln, as servers do). Stop `kiln quickstart` first.
    #[arg(long)]
    pub down: bool,
}

/// One file of the demo repo.
struct DemoFile {
    path: &'static str,
    contents: &'static str,
    executable: bool,
}

macro_rules! demo {
    ($path:literal, $exec:literal) => {
        DemoFile {
            path: $path,
            contents: include_str!(concat!("../examples/demo-infra/", $path)),
            executable: $exec,
        }
    };
}

const DEMO: &[DemoFile] = &[
    demo!("kiln.yaml", false),
    demo!("README.md", false),
    demo!(".gitignore", false),
    demo!("image/base/run", true),
    demo!("image/base/server.py", true),
    demo!("image/app/message.txt", false),
    demo!("infra/main.tf", false),
    demo!("hooks/bake-dir", true),
    demo!("hooks/reconcile", true),
    demo!("hooks/reconcile-terraform", true),
];

/// Runs the quickstart until Ctrl-C (or tears it down with `--down`).
pub async fn run(args: QuickstartArgs, kiln_exe: PathBuf) -> anyhow::Result<()> {
    if args.down {
        return down(&args.dir, kiln_exe).await;
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("failed to create {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let bare = dir.join("infra.git");
    let work = dir.join("work");
    let data = dir.join("data");
    if bare.exists() {
        println!("Reusing the demo in {} (delete it to start over).", dir.display());
    } else {
        let files: Vec<(String, Vec<u8>, bool)> = DEMO
            .iter()
            .map(|f| {
                let contents = if f.path == "kiln.yaml" {
                    f.contents.replace("port: 8080", &format!("port: {}", args.port))
                } else {
                    f.contents.to_owned()
                };
                (f.path.to_owned(), contents.into_bytes(), f.executable)
            })
            .collect();
        let (bare2, work2) = (bare.clone(), work.clone());
        tokio::task::spawn_blocking(move || {
            crate::source::git::create_demo_repo(
                &bare2,
                &work2,
                &files,
                "Demo fleet from kiln quickstart",
            )
        })
        .await??;
        println!(
            "Created the demo infra repo: {} (your clone: {})",
            bare.display(),
            work.display()
        );
    }
    let lb = format!("http://127.0.0.1:{}/", args.port);
    let shutdown = CancellationToken::new();
    let config = DaemonConfig {
        repo: bare.to_string_lossy().into_owned(),
        branch: "main".into(),
        data_dir: data.clone(),
        listen: args.listen,
        // A local path: notify sees pushes at once, the poll is a slow safety net.
        poll: crate::source::default_poll(&bare.to_string_lossy()),
        retention: 1000,
        keep_images: crate::gc::DEFAULT_KEEP_IMAGES,
        compact_after: None,
        hook_env: vec![],
        kiln_exe: kiln_exe.clone(),
        secrets: Default::default(),
        instance_ports: None,
        jobs: crate::pipeline::DEFAULT_JOBS,
        verify: None,
        public_url: None,
    };
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut daemon = tokio::spawn(daemon::run_until_ready(config, shutdown.clone(), ready_tx));
    let signals = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        signals.cancel();
    });
    // "Running" only once the daemon listens: a daemon that cannot start (its API port taken,
    // the data dir in use by another kiln) ends the quickstart with its reason.
    let api = tokio::select! {
        ready = ready_rx => match ready {
            Ok(api) => api,
            Err(_) => return Err(daemon_ended(daemon.await)),
        },
        res = &mut daemon => return Err(daemon_ended(res)),
    };
    println!("kiln is running (API {api}, dashboard {api}/, data dir {}).", data.display());
    let exe = shown_exe(&kiln_exe);
    let data_arg = shell_quote(&shown_path(&data));
    println!(
        "Baking the first image and starting 3 instances: watch with `{exe} --data-dir {data_arg} log`."
    );
    let token = std::fs::read_to_string(data.join(daemon::TOKEN_FILE))
        .with_context(|| format!("cannot read the API token in {}", data.display()))?;
    let client = crate::client::ApiClient::new(
        &api,
        Some(token.trim().to_owned()),
        "the quickstart's daemon".into(),
    )?;
    let reported = tokio::select! {
        state = follow_first_rollout(&client, &shutdown) => state,
        res = &mut daemon => return finished(res),
    };
    if let Some(state) = reported {
        println!();
        if state == RolloutState::Succeeded {
            println!("The fleet `web` is up behind the load balancer: {lb}");
        } else {
            println!(
                "The first rollout ended `{state}`: `{exe} --data-dir {data_arg} log` lists it, `{exe} --data-dir {data_arg} show ID` tells why."
            );
        }
        println!("The dashboard: {api}/");
        println!();
        println!("Next (each command works from this directory):");
        let steps = next_steps(&exe, &lb, &shown_path(&work), &shown_path(&data));
        let width = steps.iter().map(|(cmd, _)| cmd.len()).max().unwrap_or(0);
        for (cmd, why) in steps {
            println!("  {cmd:<width$}  # {why}");
        }
        println!(
            "Ctrl-C stops kiln; the instances and the load balancer keep running, as servers do."
        );
        println!(
            "`{exe} quickstart --dir {} --down` removes them.",
            shell_quote(&shown_path(&dir))
        );
    }
    finished(daemon.await)
}

/// What to try once the demo serves: shell commands that each work from the directory the
/// quickstart was started in (no `cd`, so a step never depends on the one before).
fn next_steps(exe: &str, lb: &str, work: &str, data: &str) -> Vec<(String, &'static str)> {
    let work = shell_quote(work);
    let data = shell_quote(data);
    vec![
        (format!("curl {lb}"), "the page names the image and the commit"),
        (
            format!("echo 'Hello, immutable world' > {work}/image/app/message.txt"),
            "edit the app layer",
        ),
        (
            format!("git -C {work} commit -qam 'New greeting' && git -C {work} push -q"),
            "kiln bakes, reconciles, rolls",
        ),
        (format!("{exe} --data-dir {data} log"), "the rollout history"),
        (format!("{exe} --data-dir {data} status"), "instances and their images"),
    ]
}

/// `text` as one shell word (quoted only when it needs to be).
fn shell_quote(text: &str) -> String {
    if !text.is_empty()
        && text.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '-' | '_' | '~' | '+' | ':' | '=')
        })
    {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The error of a daemon that ended before it listened.
fn daemon_ended(res: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match res {
        Ok(Err(error)) => error.context("kiln could not start"),
        Ok(Ok(())) => anyhow::anyhow!("kiln stopped before it was running"),
        Err(error) => anyhow::anyhow!("kiln could not start: {error}"),
    }
}

/// The quickstart's result once its daemon has ended.
fn finished(res: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match res {
        Ok(res) => res.context("kiln stopped"),
        Err(error) => Err(anyhow::anyhow!("kiln stopped: {error}")),
    }
}

/// Waits for the daemon's first fleet rollout to end, printing each state it passes through.
/// Returns `None` when kiln stops first.
async fn follow_first_rollout(
    api: &crate::client::ApiClient,
    shutdown: &CancellationToken,
) -> Option<RolloutState> {
    let mut last: Option<(u64, RolloutState)> = None;
    loop {
        if shutdown.is_cancelled() {
            return None;
        }
        let page: Option<RolloutPage> = api.get("/rollouts?fleet=web&limit=1").await.ok();
        if let Some(rollout) = page.and_then(|p| p.rollouts.into_iter().next()) {
            if last != Some((rollout.id, rollout.state)) {
                println!(
                    "  rollout #{} of {}: {}",
                    rollout.id,
                    &rollout.commit[..rollout.commit.len().min(8)],
                    rollout.state
                );
                last = Some((rollout.id, rollout.state));
            }
            if rollout.state.is_terminal() || rollout.state == RolloutState::Paused {
                return Some(rollout.state);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Terminates every instance and load balancer the demo's local provider started.
async fn down(dir: &Path, kiln_exe: PathBuf) -> anyhow::Result<()> {
    use crate::provider::Provider as _;
    use crate::provider::local::{LocalConfig, LocalProvider};
    let data = dir.join("data");
    if crate::client::find_daemon(None, &data)?.is_some() {
        anyhow::bail!("kiln is still running on {}: stop it (Ctrl-C) first", data.display());
    }
    let fleets = data.join("fleets");
    let Ok(entries) = std::fs::read_dir(&fleets) else {
        println!("Nothing to tear down in {}.", dir.display());
        return Ok(());
    };
    for entry in entries.flatten() {
        let fleet = entry.file_name().to_string_lossy().into_owned();
        // Open it on the port its load balancer listens on, so the running one is adopted.
        let lb_port = crate::provider::local::lb::read_state(&entry.path().join("lb"))
            .map_or(0, |lb| lb.port);
        let provider = LocalProvider::open(LocalConfig {
            fleet: fleet.clone(),
            dir: entry.path(),
            lb_port,
            kiln_exe: kiln_exe.clone(),
        })
        .await?;
        let instances = provider.list().await?;
        for instance in &instances {
            provider.terminate(&instance.id).await?;
        }
        provider.stop_load_balancer().await;
        println!(
            "fleet {fleet}: terminated {} instance(s), stopped the load balancer",
            instances.len()
        );
    }
    println!("Done. Delete {} to start over.", dir.display());
    Ok(())
}

/// How to start the kiln executable from here: `kiln` when that name on the `PATH` is this
/// binary (`cargo install`), else its path (relative when inside the current directory).
fn shown_exe(exe: &Path) -> String {
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            let candidate = dir.join("kiln");
            candidate.is_file()
                && std::fs::canonicalize(&candidate).ok() == std::fs::canonicalize(exe).ok()
        })
    });
    if on_path { "kiln".to_owned() } else { shell_quote(&shown_path(exe)) }
}

/// `path` relative to the current directory when it is inside it (`./target/release/kiln`).
fn shown_path(path: &Path) -> String {
    let relative = std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf));
    match relative {
        Some(rel) if !rel.as_os_str().is_empty() => format!("./{}", rel.display()),
        _ => path.display().to_string(),
    }
}
