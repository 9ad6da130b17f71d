//! The standby that keeps the load balancer's sockets alive when the serving process dies.
//!
//! ```text
//!  kiln lb (serving) ──handover.sock: "L" + [traffic fd, admin fd]──▶ kiln lb --standby
//!        │  kill -9                                                        │ EOF without "Q"
//!        ▼                                                                 ▼
//!  connections accepted by it are lost;            promotes itself: serves on the same sockets,
//!  new ones queue in the shared backlog            rewrites lb.json, starts its own standby
//! ```
//!
//! The serving LB passes duplicates of its listening sockets (traffic and admin) to a standby
//! process over a unix socket in the state dir (mode 0600) with `SCM_RIGHTS`. The kernel keeps
//! a listening socket, and the connections queued in its backlog, open while any process holds
//! it, so when the serving process is killed no connection is refused or reset before it is
//! accepted: it waits in the backlog until the standby, which notices the death at once (its
//! end of the unix socket reads EOF), serves the same sockets. The promoted process then starts
//! a standby of its own. A graceful stop (SIGTERM) sends "Q" first, so the standby exits with
//! it. A standby that dies is replaced by the serving process.
//!
//! What this guarantees: a `kill -9` of either process refuses no connection and resets none
//! that was not yet accepted. Connections the killed process had accepted are closed by the
//! kernel: a request in flight on one fails at the client (an idempotent request may be
//! retried by the client, as RFC 9110 §9.2.2 allows and browsers do), and an idle keep-alive
//! connection is closed (clients open a new one).

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::Interest;
use tokio_util::sync::CancellationToken;

use crate::hooks::process::{self, ProcessRef};

/// The unix socket in the state dir the standby fetches the listening sockets from.
pub const SOCKET_FILE: &str = "handover.sock";

/// Duplicates of the serving LB's listening sockets, as handed to the standby.
pub struct Sockets {
    /// The traffic listener.
    pub traffic: OwnedFd,
    /// The admin listener.
    pub admin: OwnedFd,
}

impl Sockets {
    /// Duplicates of `traffic` and `admin` (the originals keep serving).
    pub fn dup(
        traffic: &tokio::net::TcpListener,
        admin: &tokio::net::TcpListener,
    ) -> std::io::Result<Sockets> {
        Ok(Sockets {
            traffic: traffic.as_fd().try_clone_to_owned()?,
            admin: admin.as_fd().try_clone_to_owned()?,
        })
    }

    /// The listeners, ready for tokio.
    pub fn into_listeners(
        self,
    ) -> std::io::Result<(tokio::net::TcpListener, tokio::net::TcpListener)> {
        let traffic = std::net::TcpListener::from(self.traffic);
        let admin = std::net::TcpListener::from(self.admin);
        traffic.set_nonblocking(true)?;
        admin.set_nonblocking(true)?;
        Ok((tokio::net::TcpListener::from_std(traffic)?, tokio::net::TcpListener::from_std(admin)?))
    }
}

/// What the serving LB shares with the task that keeps its standby.
pub struct Keeper {
    /// The sockets to hand over (replaced when the traffic listener moves).
    pub sockets: Mutex<Sockets>,
    /// Tells the task to send the sockets again.
    pub changed: tokio::sync::Notify,
}

/// Keeps one standby process alive while the LB serves: starts it, hands it the sockets (again
/// after every change), replaces it when it dies, and tells it to quit on shutdown. `on_standby`
/// is told each new standby's process.
pub async fn keep_standby(
    dir: PathBuf,
    exe: PathBuf,
    args: Vec<String>,
    keeper: Arc<Keeper>,
    shutdown: CancellationToken,
    on_standby: impl Fn(Option<ProcessRef>) + Send + 'static,
) {
    let path = dir.join(SOCKET_FILE);
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(path = %path.display(), %error, "Cannot offer the sockets to a standby; running without one.");
            return;
        }
    };
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Err(error) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        {
            tracing::error!(path = %path.display(), %error, "Cannot restrict the handover socket; running without a standby.");
            let _ = std::fs::remove_file(&path);
            return;
        }
    }
    let mut env: Vec<(String, String)> = ["PATH", "HOME", "LANG", "RUST_LOG", "KILN_LOG"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
        .collect();
    env.sort();
    let log = dir.join("log");
    // Failures to start one back off (a replaced kiln binary, a full process table), up to a
    // minute between attempts.
    let mut backoff = Duration::from_millis(200);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let standby = match process::spawn_detached(&exe, &args, &env, &dir, &log) {
            Ok(standby) => standby,
            Err(error) => {
                tracing::error!(%error, exe = %exe.display(), retry_in = ?backoff, "Cannot start a standby.");
                if pause(&shutdown, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
                continue;
            }
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => {
                process::stop(standby, Duration::from_secs(2)).await;
                return;
            }
            accepted = tokio::time::timeout(Duration::from_secs(10), listener.accept()) => accepted,
        };
        let Ok(Ok((stream, _))) = accepted else {
            tracing::warn!(pid = standby.pid, retry_in = ?backoff, "The standby did not connect; replacing it.");
            process::stop(standby, Duration::from_secs(2)).await;
            if pause(&shutdown, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(60));
            continue;
        };
        if let Err(error) = send_sockets(&stream, &keeper).await {
            tracing::warn!(%error, retry_in = ?backoff, "Cannot hand the sockets to the standby; replacing it.");
            process::stop(standby, Duration::from_secs(2)).await;
            if pause(&shutdown, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(60));
            continue;
        }
        tracing::info!(pid = standby.pid, "Standby ready.");
        let ready_at = tokio::time::Instant::now();
        on_standby(Some(standby));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = send(&stream, b"Q", None).await;
                    return;
                }
                _ = keeper.changed.notified() => {
                    if let Err(error) = send_sockets(&stream, &keeper).await {
                        tracing::warn!(%error, "Cannot hand the new sockets to the standby; replacing it.");
                        process::stop(standby, Duration::from_secs(2)).await;
                        break;
                    }
                }
                readable = stream.readable() => {
                    let mut byte = [0u8; 1];
                    let gone = match readable.and_then(|()| stream.try_read(&mut byte)) {
                        Ok(0) => true,
                        Ok(_) => false,
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => false,
                        Err(_) => true,
                    };
                    if gone {
                        tracing::warn!(pid = standby.pid, "The standby died; starting another.");
                        break;
                    }
                }
            }
        }
        on_standby(None);
        if ready_at.elapsed() > Duration::from_secs(10) {
            // It served its time: not a crash loop.
            backoff = Duration::from_millis(200);
        }
        if pause(&shutdown, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// Sleeps `time` unless `shutdown` fires first (then returns true).
async fn pause(shutdown: &CancellationToken, time: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(time) => false,
    }
}

async fn send_sockets(stream: &tokio::net::UnixStream, keeper: &Keeper) -> std::io::Result<()> {
    // Duplicated under the lock, sent without it.
    let sockets = {
        let sockets = keeper.sockets.lock().map_err(|_| std::io::Error::other("lock poisoned"))?;
        Sockets { traffic: sockets.traffic.try_clone()?, admin: sockets.admin.try_clone()? }
    };
    send(stream, b"L", Some(&sockets)).await
}

async fn send(
    stream: &tokio::net::UnixStream,
    tag: &[u8],
    sockets: Option<&Sockets>,
) -> std::io::Result<()> {
    loop {
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            let fds;
            if let Some(sockets) = sockets {
                fds = [sockets.traffic.as_fd(), sockets.admin.as_fd()];
                control.push(SendAncillaryMessage::ScmRights(&fds));
            }
            rustix::net::sendmsg(stream, &[IoSlice::new(tag)], &mut control, SendFlags::empty())
                .map_err(std::io::Error::from)
        });
        match sent {
            Ok(_) => return Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        }
    }
}

/// What ended a standby's wait.
pub enum Wake {
    /// The serving LB stopped gracefully (or the state dir is gone, or SIGTERM): exit.
    Quit,
    /// The serving LB died: serve on these sockets.
    Promote(Sockets),
}

/// Runs in the standby: fetches the sockets from the serving LB and waits until it quits or
/// dies. Blocking (run it on a blocking thread).
pub fn wait(dir: &Path, shutdown: &CancellationToken) -> std::io::Result<Wake> {
    let path = dir.join(SOCKET_FILE);
    let stream = std::os::unix::net::UnixStream::connect(&path)?;
    // Wake up now and then to notice a SIGTERM or a removed state dir.
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut held: Option<Sockets> = None;
    loop {
        if shutdown.is_cancelled() || !dir.join(super::STATE_FILE).exists() {
            return Ok(Wake::Quit);
        }
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut tag = [0u8; 1];
        let received = rustix::net::recvmsg(
            &stream,
            &mut [IoSliceMut::new(&mut tag)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        );
        let message = match received {
            Ok(message) => message,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => continue,
            Err(_) => {
                return Ok(held.map_or(Wake::Quit, Wake::Promote));
            }
        };
        if message.bytes == 0 {
            // EOF without "Q": the serving process died.
            return Ok(held.map_or(Wake::Quit, Wake::Promote));
        }
        let mut fds: Vec<OwnedFd> = Vec::new();
        for ancillary in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = ancillary {
                fds.extend(received);
            }
        }
        match tag[0] {
            b'Q' => return Ok(Wake::Quit),
            b'L' => {
                let mut fds = fds.into_iter();
                if let (Some(traffic), Some(admin)) = (fds.next(), fds.next()) {
                    // The old sockets (a moved traffic port) are closed here.
                    held = Some(Sockets { traffic, admin });
                }
            }
            _ => {}
        }
    }
}
