//! The accept loop: hyper's HTTP/1 connection builder with a header timeout, a connection cap
//! that sheds the oldest idle connection when full, and accept errors (EMFILE) that back off
//! instead of spinning or ending the loop.
//!
//! "Idle" means no request is being served on the connection: it is waiting for a request head
//! (a fresh connection, a kept-alive one, or a slowloris trickling its headers). A request
//! counts as served until its response body has been sent or dropped, so an SSE follower is
//! busy, not idle.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio_util::sync::CancellationToken;

use super::ServerLimits;

/// How long open connections get to finish their request at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// One open connection as the cap sees it.
#[derive(Debug)]
struct Conn {
    /// Requests in progress (until their response body is done).
    active: AtomicUsize,
    /// When the connection last became idle (accept time at first).
    idle_since: Mutex<Instant>,
    /// Cancelling it drops the connection (closes the socket).
    shed: CancellationToken,
}

/// The open connections, for the cap.
#[derive(Debug, Default)]
pub(crate) struct Conns {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        // A poisoned map only means a connection task panicked while holding it; the map
        // itself is still consistent (every operation is one insert or remove).
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn insert(&self) -> (u64, Arc<Conn>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            shed: CancellationToken::new(),
        });
        self.lock().insert(id, conn.clone());
        (id, conn)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Closes the connection that has been idle longest; false if every one is busy.
    fn shed_oldest_idle(&self) -> bool {
        let open = self.lock();
        let oldest = open
            .iter()
            .filter(|(_, c)| c.active.load(Ordering::Acquire) == 0 && !c.shed.is_cancelled())
            .min_by_key(|(_, c)| *c.idle_since.lock().unwrap_or_else(|e| e.into_inner()));
        match oldest {
            Some((_, conn)) => {
                conn.shed.cancel();
                true
            }
            None => false,
        }
    }

    fn shed_all(&self) {
        for conn in self.lock().values() {
            conn.shed.cancel();
        }
    }
}

/// Marks a connection busy while it lives (from request to the end of its response body).
struct Busy(Arc<Conn>);

impl Busy {
    fn new(conn: Arc<Conn>) -> Self {
        conn.active.fetch_add(1, Ordering::AcqRel);
        Busy(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether an accept error is about this one connection (retry at once) rather than the
/// process (out of file descriptors or memory: back off).
fn per_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(error.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted)
}

/// Serves `app` on `listener` with `limits` until `shutdown` fires; then lets open requests
/// finish for a few seconds and closes what is left.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: ServerLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let conns = Arc::new(Conns::default());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    let max = limits.max_connections.max(1);
    let mut backoff = Duration::ZERO;
    let mut refused_logged = false;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => {
                backoff = Duration::ZERO;
                stream
            }
            Err(error) if per_connection(&error) => continue,
            Err(error) => {
                // EMFILE, ENFILE, ENOBUFS, ENOMEM: free a descriptor if an idle connection
                // holds one, and wait a little instead of spinning on the same error.
                conns.shed_oldest_idle();
                if backoff.is_zero() {
                    // Once per streak of failures, not once per retry.
                    tracing::warn!(error = %error, open = conns.len(), "Cannot accept connections; backing off.");
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => continue,
                }
            }
        };
        let full = conns.len() >= max;
        if full && conns.shed_oldest_idle() {
            // Let the shed connection's task run and close its socket before taking another.
            tokio::task::yield_now().await;
        } else if full {
            // Every connection is serving a request (each bounded by the body timeout): this
            // one is closed at once rather than queued.
            if !refused_logged {
                tracing::warn!(max, "Connection cap reached with no idle connection; refusing.");
                refused_logged = true;
            }
            drop(stream);
            continue;
        }
        refused_logged = false;
        let _ = stream.set_nodelay(true);
        let (id, conn) = conns.insert();
        let service = {
            let app = TowerToHyperService::new(app.clone());
            let conn = conn.clone();
            hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let busy = Busy::new(conn.clone());
                let response = hyper::service::Service::call(&app, request);
                async move {
                    let response = response.await?;
                    // The connection stays busy until the response body is done or dropped.
                    let response = response.map(|body| {
                        Body::new(body.map_frame(move |frame| {
                            let _busy = &busy;
                            frame
                        }))
                    });
                    Ok::<_, Infallible>(response)
                }
            })
        };
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let conns_task = conns.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                // Shed: dropping the connection closes the socket.
                _ = conn.shed.cancelled() => {}
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        _ = connection.as_mut() => {}
                        _ = conn.shed.cancelled() => {}
                    }
                }
            }
            conns_task.remove(id);
        });
    }
    drop(listener);
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while conns.len() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    conns.shed_all();
    Ok(())
}
