//! Load balancer benchmark: throughput and added latency of `kiln lb` against requests sent
//! straight to one backend.
//!
//! A small hyper backend runs in this process; the LB is the real `kiln lb` process started by
//! the local provider, with the backend attached through its admin endpoint. For each
//! concurrency level, keep-alive clients send GETs for a fixed time, first directly, then
//! through the LB. Run with `cargo bench --bench lb` (`LB_BENCH_SECS` sets the time per run).

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use kiln::provider::Provider as _;
use kiln::provider::local::{LocalConfig, LocalProvider};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A backend answering every request with a short fixed body.
async fn start_backend() -> Result<std::net::SocketAddr, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"hello from the backend\n",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(address)
}

/// One keep-alive client: GETs `/` until `stop`; returns the latencies of successful requests
/// and the number of failures.
async fn client(
    address: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
) -> Result<(Vec<Duration>, u64), BoxError> {
    let stream = tokio::net::TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut latencies = Vec::new();
    let mut failures = 0;
    while !stop.load(Ordering::Relaxed) {
        let request =
            hyper::Request::get("/").header("host", "bench").body(Empty::<Bytes>::new())?;
        let started = Instant::now();
        match sender.send_request(request).await {
            Ok(response) if response.status().is_success() => {
                response.into_body().collect().await?;
                latencies.push(started.elapsed());
            }
            _ => failures += 1,
        }
    }
    Ok((latencies, failures))
}

struct Figures {
    rps: f64,
    p50: Duration,
    p99: Duration,
    failures: u64,
}

async fn measure(
    address: std::net::SocketAddr,
    concurrency: usize,
    time: Duration,
) -> Result<Figures, BoxError> {
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> =
        (0..concurrency).map(|_| tokio::spawn(client(address, stop.clone()))).collect();
    tokio::time::sleep(time).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut failures = 0;
    for handle in clients {
        let (mut l, f) = handle.await??;
        latencies.append(&mut l);
        failures += f;
    }
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(Figures {
        rps: latencies.len() as f64 / time.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        failures,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let secs: u64 = std::env::var("LB_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let time = Duration::from_secs(secs);
    let tmp = tempfile::tempdir()?;
    let backend = start_backend().await?;
    let provider = LocalProvider::open(LocalConfig {
        fleet: "bench".to_owned(),
        dir: tmp.path().join("fleet"),
        lb_port: 0,
        kiln_exe: PathBuf::from(env!("CARGO_BIN_EXE_kiln")),
    })
    .await?;
    let admin = provider.admin_endpoint().await?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    http.put(format!("{admin}/backends/bench-00000001"))
        .bearer_auth(provider.admin_token())
        .json(&serde_json::json!({ "address": backend.to_string() }))
        .send()
        .await?
        .error_for_status()?;
    let endpoint = provider.endpoint().ok_or("no endpoint")?;
    let lb: std::net::SocketAddr = endpoint.trim_start_matches("http://").parse()?;

    println!("kiln lb benchmark: {secs}s per run, keep-alive GET /, 2 worker threads, one backend");
    println!(
        "{:>6}  {:>10} {:>9} {:>9}   {:>10} {:>9} {:>9}   {:>9}",
        "conns", "direct/s", "p50", "p99", "via lb/s", "p50", "p99", "added p50"
    );
    for concurrency in [1, 8, 32] {
        let direct = measure(backend, concurrency, time).await?;
        let proxied = measure(lb, concurrency, time).await?;
        println!(
            "{:>6}  {:>10.0} {:>9.3?} {:>9.3?}   {:>10.0} {:>9.3?} {:>9.3?}   {:>9.3?}",
            concurrency,
            direct.rps,
            direct.p50,
            direct.p99,
            proxied.rps,
            proxied.p50,
            proxied.p99,
            proxied.p50.saturating_sub(direct.p50),
        );
        if direct.failures + proxied.failures > 0 {
            println!("        failures: {} direct, {} via lb", direct.failures, proxied.failures);
        }
    }
    provider.stop_load_balancer().await;
    Ok(())
}
