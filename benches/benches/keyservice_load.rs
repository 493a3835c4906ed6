//! Load benchmark of the key service: concurrent clients, each keeping its TLS session
//! open, issue create-migration + fetch-key pairs (the source creates, the destination
//! fetches) for a fixed time. Reports pairs per second and the latency of a pair
//! (p50 / p99 / max) at several concurrency levels, for each store in one run:
//!
//! - `journal`: one replica on the local fsynced journal (the default store);
//! - `etcd x1` and `etcd x3`: one and three replicas on a real 3-member etcd cluster on
//!   loopback (Debian's `etcd-server`; skipped, saying why, without it), clients spread
//!   over the replicas;
//!
//! then the failover time: two etcd replicas under load, one of them stopped, and how long
//! the clients that used it wait until they are served again by the other; and, for
//! scale, one replica on a single-member etcd.
//!
//! Goals: the journal at least 5,000 pairs/s with p99 under 10 ms (key-service issue);
//! etcd at least 2,000 pairs/s with p99 under 20 ms, failover under 2 s (HA issue), on the
//! project's 2-core machine.
//!
//! Run: `cargo bench -p vmotion-benches --bench keyservice_load`
//! (`VMOTION_BENCH_SECS=N` sets the seconds per level, default 5).
//!
//! The replicas run in this process, each on its own 1-thread runtime, the clients on a
//! 2-thread runtime, etcd in its own processes: all share the machine's two cores.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmotion_keyservice::config::{EtcdConfig, StoreConfig};
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

/// One replica: its runtime (dropping it stops the replica like a crash) and its URL.
struct Replica {
    runtime: Option<tokio::runtime::Runtime>,
    url: String,
}

fn start_replica(config: &Config) -> Replica {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(Server::bind(config)).expect("bind");
    let url = format!("https://{}", server.local_addr().unwrap());
    runtime.spawn(server.run(std::future::pending()));
    Replica {
        runtime: Some(runtime),
        url,
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn base_config(files: &pki::PkiFiles) -> Config {
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
    config
}

/// What one level measured.
struct Level {
    pairs: usize,
    latencies: Vec<Duration>,
    errors: u64,
    elapsed: Duration,
}

/// Clients `0..clients` loop pairs until `deadline`; client `i` lists the replicas
/// starting at `i % urls.len()`. `on_success` sees each finished pair's client and time.
async fn run_pairs(
    files: &pki::PkiFiles,
    urls: &[String],
    clients: usize,
    secs: u64,
    tag: &str,
    on_success: Option<Arc<dyn Fn(usize, Instant) + Send + Sync>>,
) -> Level {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let order: Vec<String> = (0..urls.len())
            .map(|k| urls[(client + k) % urls.len()].clone())
            .collect();
        let list = order.join(",");
        let src = Arc::new(KeyServiceClient::new(&list, &identity(files, "src")).unwrap());
        let dst = Arc::new(KeyServiceClient::new(&list, &identity(files, "dst")).unwrap());
        let tag = tag.to_owned();
        let on_success = on_success.clone();
        tasks.push(tokio::spawn(async move {
            // Warm the TLS sessions outside the measurement.
            let _ = src.host("dst").await;
            let _ = dst.host("src").await;
            let mut lat = Vec::new();
            let (mut errors, mut n) = (0u64, 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                n += 1;
                let vm = format!("vm-{tag}-{clients}-{client}-{n}");
                let ok = match src.create_migration(&vm, "dst").await {
                    Ok(m) => dst.fetch_key(m.id).await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    lat.push(t.elapsed());
                    if let Some(f) = &on_success {
                        f(client, Instant::now());
                    }
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.unwrap();
        latencies.extend(lat);
        errors += e;
    }
    latencies.sort();
    Level {
        pairs: latencies.len(),
        latencies,
        errors,
        elapsed: start.elapsed(),
    }
}

fn print_level(store: &str, clients: usize, l: &Level) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "| {store} | {clients} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
        l.pairs as f64 / l.elapsed.as_secs_f64(),
        ms(percentile(&l.latencies, 0.50)),
        ms(percentile(&l.latencies, 0.99)),
        ms(l.latencies.last().copied().unwrap_or_default()),
        l.errors,
    );
}

/// An etcd store configuration on `cluster`, under `prefix`.
fn etcd_config(
    files: &pki::PkiFiles,
    cluster: &vmotion_testbed::EtcdCluster,
    prefix: &str,
) -> Config {
    let kek = files.dir.join("kek");
    if !kek.exists() {
        vmotion_keyservice::kek::generate(&kek).expect("kek");
    }
    let mut config = base_config(files);
    config.audit_log = files
        .dir
        .join(format!("audit-{}.jsonl", prefix.trim_matches('/')));
    config.store = StoreConfig::Etcd(EtcdConfig {
        endpoints: cluster.endpoints(),
        prefix: prefix.to_owned(),
        kek,
        previous_keks: Vec::new(),
        tls: None,
        request_timeout: Duration::from_secs(3),
    });
    config
}

/// Two replicas under load; replica 0 stops after 2 s. The failover time is, over the
/// clients that listed replica 0 first, the longest wait from the stop to their next
/// finished pair.
fn failover(
    files: &pki::PkiFiles,
    cluster: &vmotion_testbed::EtcdCluster,
    client_rt: &tokio::runtime::Runtime,
    clients: usize,
) {
    let config = etcd_config(files, cluster, "/failover/");
    let replicas = [start_replica(&config), start_replica(&config)];
    let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
    let stopped_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let served_after: Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; clients]));
    let record = {
        let (stopped_at, served_after) = (stopped_at.clone(), served_after.clone());
        Arc::new(move |client: usize, at: Instant| {
            if let Some(stop) = *stopped_at.lock().unwrap()
                && at > stop
            {
                let mut v = served_after.lock().unwrap();
                v[client].get_or_insert(at);
            }
        }) as Arc<dyn Fn(usize, Instant) + Send + Sync>
    };
    let [first, second] = replicas;
    let killer = {
        let stopped_at = stopped_at.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            *stopped_at.lock().unwrap() = Some(Instant::now());
            drop(first); // its runtime shuts down: connections reset, like a crash
        })
    };
    let level = client_rt.block_on(run_pairs(
        files,
        &urls,
        clients,
        6,
        "failover",
        Some(record),
    ));
    killer.join().unwrap();
    let stop = stopped_at.lock().unwrap().expect("stopped");
    let waits: Vec<Duration> = served_after
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(c, _)| c % 2 == 0) // replica 0 first in their list
        .map(|(_, at)| at.map_or(Duration::MAX, |t| t - stop))
        .collect();
    let worst = waits.iter().max().copied().unwrap_or_default();
    println!(
        "failover: {clients} clients on 2 etcd replicas, replica 0 stopped after 2 s: \
         the clients that used it were served again within {:.0} ms (worst of {}); \
         {} pairs, {} failed (pairs cut by the stop)",
        worst.as_secs_f64() * 1e3,
        waits.len(),
        level.pairs,
        level.errors
    );
    assert!(worst < Duration::from_secs(10), "failover took {worst:?}");
    drop(second);
}

fn main() {
    let (smoke, secs) = vmotion_benches::run_mode();
    let dir = tempfile::tempdir().expect("temp dir");
    let files = pki::init(dir.path(), &["src".into(), "dst".into()], &[]).expect("pki");
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let levels: &[usize] = if smoke { &[4] } else { &[1, 4, 16, 64] };
    println!("key service load: create + fetch pairs, {secs} s per level");
    println!("| store | concurrent pairs | pairs/s | p50 ms | p99 ms | max ms | errors |");
    println!("|---|---|---|---|---|---|---|");

    let journal = start_replica(&base_config(&files));
    for &clients in levels {
        let urls = [journal.url.clone()];
        let l = client_rt.block_on(run_pairs(&files, &urls, clients, secs, "journal", None));
        print_level("journal", clients, &l);
        assert_eq!(l.errors, 0, "every pair must succeed");
    }
    drop(journal);

    let cluster = match vmotion_testbed::EtcdCluster::start(3) {
        Ok(c) => c,
        Err(why) => {
            println!("etcd store: skipped ({why})");
            return;
        }
    };
    for replicas in [1, 3] {
        let store = format!("etcd x{replicas}");
        let config = etcd_config(&files, &cluster, &format!("/x{replicas}/"));
        let running: Vec<Replica> = (0..replicas).map(|_| start_replica(&config)).collect();
        let urls: Vec<String> = running.iter().map(|r| r.url.clone()).collect();
        for &clients in levels {
            let tag = format!("x{replicas}");
            let l = client_rt.block_on(run_pairs(&files, &urls, clients, secs, &tag, None));
            print_level(&store, clients, &l);
            assert_eq!(l.errors, 0, "every pair must succeed");
        }
    }
    failover(&files, &cluster, &client_rt, if smoke { 4 } else { 16 });
    drop(cluster);
    // For scale: one replica on a single-member etcd (no replication behind it).
    let single = vmotion_testbed::EtcdCluster::start(1).expect("one etcd member");
    let config = etcd_config(&files, &single, "/single/");
    let replica = start_replica(&config);
    for &clients in levels {
        let urls = [replica.url.clone()];
        let l = client_rt.block_on(run_pairs(&files, &urls, clients, secs, "single", None));
        print_level("etcd x1, 1-member etcd", clients, &l);
    }
}
