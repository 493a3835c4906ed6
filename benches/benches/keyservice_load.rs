//! Load benchmark of the key service: concurrent clients, each keeping its TLS session
//! open, issue create-migration + fetch-key pairs (the source creates, the destination
//! fetches) for a fixed time. Reports pairs per second and the latency of a pair
//! (p50 / p99 / max) at several concurrency levels.
//!
//! Goal (key-service issue): at least 5,000 pairs per second with p99 under 10 ms on the
//! project's 2-core machine.
//!
//! Run: `cargo bench -p vmotion-benches --bench keyservice_load`
//! (`VMOTION_BENCH_SECS=N` sets the seconds per level, default 5).
//!
//! The service runs in this process on its own 2-thread runtime, the clients on another:
//! both share the machine's two cores, as a service and its clients on one host would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmotion_keyservice::{Config, Server, pki};
use vmotion_keyservice_client::{ClientIdentity, KeyServiceClient};

fn identity(files: &pki::PkiFiles, host: &str) -> ClientIdentity {
    ClientIdentity {
        ca: files.ca(),
        cert: files.host_cert(host),
        key: files.host_key(host),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful: run a
    // short smoke pass then, so the harness stays exercised.
    let args: Vec<String> = std::env::args().collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let secs: u64 = std::env::var("VMOTION_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if smoke { 1 } else { 5 });

    let dir = tempfile::tempdir().expect("temp dir");
    let files = pki::init(dir.path(), &["src".into(), "dst".into()], &[]).expect("pki");
    let mut config = Config::load(&files.config()).expect("config");
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.key_ttl = Duration::from_secs(600);
    // Up to 64 concurrent clients share one host identity here: the per-host connection
    // and rate limits would refuse many of them, and they are not what is measured.
    config.connections_per_host = 0;
    config.requests_per_second_per_host = 0;
    // Every create holds its VM and an admission slot until an outcome; the benchmark
    // never records one, so the limits are off and every VM name is new.
    config.limits.outbound_per_host = 0;
    config.limits.inbound_per_host = 0;
    config.limits.cluster = 0;

    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = server_rt.block_on(Server::bind(&config)).expect("bind");
    let url = format!("https://{}", server.local_addr().unwrap());
    let server_task = server_rt.spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let levels: &[usize] = if smoke { &[4] } else { &[1, 4, 16, 64] };
    println!("key service load: create + fetch pairs, {secs} s per level");
    println!("| concurrent pairs | pairs/s | p50 ms | p99 ms | max ms | errors |");
    println!("|---|---|---|---|---|---|");
    for &clients in levels {
        let url = url.clone();
        let (src_id, dst_id) = (identity(&files, "src"), identity(&files, "dst"));
        let (pairs, mut latencies, errors, elapsed) = client_rt.block_on(async move {
            let deadline = Instant::now() + Duration::from_secs(secs);
            let start = Instant::now();
            let mut tasks = Vec::new();
            for client in 0..clients {
                let src = Arc::new(KeyServiceClient::new(&url, &src_id).unwrap());
                let dst = Arc::new(KeyServiceClient::new(&url, &dst_id).unwrap());
                tasks.push(tokio::spawn(async move {
                    // Warm the TLS sessions outside the measurement.
                    let _ = src.host("dst").await;
                    let _ = dst.host("src").await;
                    let mut lat = Vec::new();
                    let mut errors = 0u64;
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        n += 1;
                        let vm = format!("vm-{clients}-{client}-{n}");
                        let ok = match src.create_migration(&vm, "dst").await {
                            Ok(m) => dst.fetch_key(m.id).await.is_ok(),
                            Err(_) => false,
                        };
                        if ok {
                            lat.push(t.elapsed());
                        } else {
                            errors += 1;
                        }
                    }
                    (lat, errors)
                }));
            }
            let mut all = Vec::new();
            let mut errors = 0;
            for t in tasks {
                let (lat, e) = t.await.unwrap();
                all.extend(lat);
                errors += e;
            }
            (all.len(), all, errors, start.elapsed())
        });
        latencies.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "| {clients} | {:.0} | {:.2} | {:.2} | {:.2} | {errors} |",
            pairs as f64 / elapsed.as_secs_f64(),
            ms(percentile(&latencies, 0.50)),
            ms(percentile(&latencies, 0.99)),
            ms(latencies.last().copied().unwrap_or_default()),
        );
        assert_eq!(errors, 0, "every pair must succeed");
    }
    let _ = stop_tx.send(());
    server_rt.block_on(server_task).unwrap();
}
