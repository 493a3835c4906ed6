//! A WAN link between two network namespaces, emulated in user space: this kernel has
//! no `netem` qdisc (`CONFIG_NET_SCH_NETEM` is not set), so the link is a pair of TUN
//! devices and this process between them, delaying, rate-limiting and dropping packets
//! as `tc qdisc … netem delay D rate R loss L` would.
//!
//! ```text
//! vmotion-wan --dev-a NAME --dev-b NAME --ns-a NETNS --ns-b NETNS --addr-a IP --addr-b IP
//!             [--delay-ms 75] [--rate-mbit 1000] [--loss 0.001] [--mtu 9000]
//!             [--queue-ms 100] [--seed 1]
//! ```
//!
//! Device A is moved into `--ns-a` with `--addr-a`/30, device B into `--ns-b` with
//! `--addr-b`/30. Each direction: a packet is serialized at `--rate-mbit`
//! behind those before it, dropped if that queue already holds more than `--queue-ms` of
//! sending (a router's tail drop), dropped at random with probability `--loss`, and
//! delivered `--delay-ms` after its last bit left (one way: the round trip is twice
//! that). Order is kept. It prints `ready` once both devices are up, and runs until
//! killed; the devices vanish with it. A cut is `ip link set DEV down` from outside.

use std::collections::VecDeque;
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmotion_testbed::ip;

#[derive(Debug, Clone)]
struct Opts {
    dev_a: String,
    dev_b: String,
    ns_a: String,
    ns_b: String,
    addr_a: String,
    addr_b: String,
    delay: Duration,
    rate_bps: f64,
    loss: f64,
    mtu: u16,
    queue: Duration,
    seed: u64,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        dev_a: String::new(),
        dev_b: String::new(),
        ns_a: String::new(),
        ns_b: String::new(),
        addr_a: String::new(),
        addr_b: String::new(),
        delay: Duration::from_millis(75),
        rate_bps: 1e9,
        loss: 0.0,
        mtu: 9000,
        queue: Duration::from_millis(100),
        seed: 1,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = || {
            v.parse::<f64>()
                .map_err(|_| format!("{flag} {v}: not a number"))
        };
        match flag.as_str() {
            "--dev-a" => o.dev_a = v.clone(),
            "--dev-b" => o.dev_b = v.clone(),
            "--ns-a" => o.ns_a = v.clone(),
            "--ns-b" => o.ns_b = v.clone(),
            "--addr-a" => o.addr_a = v.clone(),
            "--addr-b" => o.addr_b = v.clone(),
            "--delay-ms" => o.delay = Duration::from_secs_f64(num()? / 1e3),
            "--rate-mbit" => o.rate_bps = num()? * 1e6,
            "--loss" => o.loss = num()?,
            "--mtu" => o.mtu = v.parse().map_err(|_| format!("--mtu {v}"))?,
            "--queue-ms" => o.queue = Duration::from_secs_f64(num()? / 1e3),
            "--seed" => o.seed = v.parse().map_err(|_| format!("--seed {v}"))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    for (name, v) in [
        ("--dev-a", &o.dev_a),
        ("--dev-b", &o.dev_b),
        ("--ns-a", &o.ns_a),
        ("--ns-b", &o.ns_b),
        ("--addr-a", &o.addr_a),
        ("--addr-b", &o.addr_b),
    ] {
        if v.is_empty() {
            return Err(format!("{name} is required"));
        }
    }
    if !(0.0..1.0).contains(&o.loss) || o.rate_bps <= 0.0 {
        return Err("--loss must be in [0, 1) and --rate-mbit above 0".into());
    }
    Ok(o)
}

fn tun(name: &str, mtu: u16) -> Result<tun::Device, String> {
    let mut c = tun::Configuration::default();
    // Raw IP packets: no packet-information header.
    c.tun_name(name).mtu(mtu);
    tun::create(&c).map_err(|e| format!("TUN device {name}: {e}"))
}

/// Packets on their way, each with the instant it is due at the far end.
#[derive(Default)]
struct Wire {
    queue: Mutex<VecDeque<(Instant, Vec<u8>)>>,
    ready: Condvar,
}

/// One direction's state at the sending end.
struct Sending {
    /// When the last accepted packet's last bit leaves.
    busy_until: Instant,
    rng: u64,
}

impl Sending {
    fn random(&mut self) -> f64 {
        // xorshift64*: enough for drop decisions.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// When a packet of `len` bytes arriving `now` is due at the far end, or `None` if
    /// it is dropped.
    fn admit(&mut self, o: &Opts, now: Instant, len: usize) -> Option<Instant> {
        let start = self.busy_until.max(now);
        if start.saturating_duration_since(now) > o.queue {
            return None;
        }
        let done = start + Duration::from_secs_f64(len as f64 * 8.0 / o.rate_bps);
        self.busy_until = done;
        if self.random() < o.loss {
            return None;
        }
        Some(done + o.delay)
    }
}

fn direction(from: &tun::Device, to: Arc<tun::Device>, o: &Opts, seed: u64) {
    let wire = Arc::new(Wire::default());
    let out = wire.clone();
    std::thread::spawn(move || {
        loop {
            let (due, packet) = {
                let mut q = out.queue.lock().unwrap_or_else(|e| e.into_inner());
                while q.is_empty() {
                    q = out.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                q.pop_front().expect("not empty")
            };
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            // A device that is down refuses the write: the packet is lost, as on a cut.
            let _ = to.send(&packet);
        }
    });
    let mut sending = Sending {
        busy_until: Instant::now(),
        rng: seed | 1,
    };
    let mut buf = vec![0u8; usize::from(o.mtu) + 64];
    loop {
        let n = match from.recv(&mut buf) {
            Ok(n) => n,
            // A device set down returns errors until it is up again.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        if let Some(due) = sending.admit(o, Instant::now(), n) {
            wire.queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back((due, buf[..n].to_vec()));
            wire.ready.notify_one();
        }
    }
}

fn run(o: &Opts) -> Result<(), String> {
    let a = Arc::new(tun(&o.dev_a, o.mtu)?);
    let b = Arc::new(tun(&o.dev_b, o.mtu)?);
    for (dev, ns, addr) in [
        (&o.dev_a, &o.ns_a, &o.addr_a),
        (&o.dev_b, &o.ns_b, &o.addr_b),
    ] {
        ip(&["link", "set", dev, "netns", ns])?;
        let addr = format!("{addr}/30");
        ip(&["netns", "exec", ns, "ip", "addr", "add", &addr, "dev", dev])?;
        ip(&["netns", "exec", ns, "ip", "link", "set", dev, "up"])?;
    }
    let (ab, ba) = (o.clone(), o.clone());
    let (a2, b2) = (a.clone(), b.clone());
    let (s1, s2) = (seed(o, 1), seed(o, 2));
    std::thread::spawn(move || direction(&a, b, &ab, s1));
    std::thread::spawn(move || direction(&b2, a2, &ba, s2));
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    loop {
        std::thread::park();
    }
}

/// Each direction's own random sequence.
fn seed(o: &Opts, direction: u64) -> u64 {
    o.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ direction
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(&args).and_then(|o| run(&o)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmotion-wan: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(loss: f64) -> Opts {
        let mut o = parse(
            &[
                "--dev-a",
                "a",
                "--dev-b",
                "b",
                "--ns-a",
                "x",
                "--ns-b",
                "y",
                "--addr-a",
                "1",
                "--addr-b",
                "2",
                "--delay-ms",
                "10",
                "--rate-mbit",
                "8",
                "--queue-ms",
                "100",
            ]
            .map(String::from),
        )
        .unwrap();
        o.loss = loss;
        o
    }

    /// At 8 Mbit/s a 1000-byte packet takes 1 ms to send: a burst leaves 1 ms apart, each
    /// arriving 10 ms after its last bit, until 100 ms of queue is full; then tail drop.
    #[test]
    fn a_burst_is_serialized_delayed_and_tail_dropped() {
        let o = opts(0.0);
        let now = Instant::now();
        let mut s = Sending {
            busy_until: now,
            rng: 1,
        };
        let due: Vec<Option<Instant>> = (0..110).map(|_| s.admit(&o, now, 1000)).collect();
        assert_eq!(due[0], Some(now + Duration::from_millis(11)));
        assert_eq!(due[9], Some(now + Duration::from_millis(20)));
        let kept = due.iter().filter(|d| d.is_some()).count();
        assert_eq!(kept, 101, "100 ms of queue, then drops");
    }

    #[test]
    fn loss_drops_about_that_share() {
        let o = opts(0.25);
        let mut s = Sending {
            busy_until: Instant::now(),
            rng: 7,
        };
        // Spaced out, so the queue never fills.
        let start = Instant::now();
        let lost = (0..10_000u64)
            .filter(|i| {
                let at = start + Duration::from_millis(2 * i);
                s.admit(&o, at, 1000).is_none()
            })
            .count();
        assert!(
            (2_200..2_800).contains(&lost),
            "{lost} of 10000 lost at 25 %"
        );
    }
}
