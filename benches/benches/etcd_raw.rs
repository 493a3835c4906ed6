//! The ceiling under the key service's etcd store: raw etcd writes from this process, as
//! many concurrent writers as the store has clients, each a compare-and-put transaction
//! the size of a migration record, against the same 3-member etcd on loopback that
//! `keyservice_load` uses (Debian's `etcd-server`; skipped, saying why, without it).
//!
//! Run: `cargo bench -p vmotion-benches --bench etcd_raw` (`VMOTION_BENCH_SECS=N`, default 5).

use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};

fn main() {
    let (smoke, secs) = vmotion_benches::run_mode();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("raw etcd: compare-and-put transactions of 200 bytes, {secs} s per level");
    println!("| etcd members | concurrent writers | txns/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    for members in [3, 1] {
        let cluster = match vmotion_testbed::EtcdCluster::start(members) {
            Ok(c) => c,
            Err(why) => {
                println!("skipped ({why})");
                return;
            }
        };
        let levels: &[usize] = if smoke { &[4] } else { &[1, 4, 16, 64] };
        for &writers in levels {
            let endpoints = cluster.endpoints();
            let (n, mut lat, elapsed) = rt.block_on(async move {
                let client = Client::connect(&endpoints, None).await.unwrap();
                let deadline = Instant::now() + Duration::from_secs(secs);
                let start = Instant::now();
                let tasks: Vec<_> = (0..writers)
                    .map(|w| {
                        let mut c = client.clone();
                        tokio::spawn(async move {
                            let mut lat = Vec::new();
                            let mut i = 0u64;
                            while Instant::now() < deadline {
                                i += 1;
                                let key = format!("/raw/{writers}/{w}/{i}");
                                let t = Instant::now();
                                let txn = Txn::new()
                                    .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                                    .and_then([TxnOp::put(key, vec![b'x'; 200], None)]);
                                c.txn(txn).await.unwrap();
                                lat.push(t.elapsed());
                            }
                            lat
                        })
                    })
                    .collect();
                let mut all = Vec::new();
                for t in tasks {
                    all.extend(t.await.unwrap());
                }
                (all.len(), all, start.elapsed())
            });
            lat.sort();
            let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e3;
            println!(
                "| {members} | {writers} | {:.0} | {:.2} | {:.2} |",
                n as f64 / elapsed.as_secs_f64(),
                p(0.5),
                p(0.99)
            );
        }
    }
}
