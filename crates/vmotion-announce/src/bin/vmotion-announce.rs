//! `vmotion-announce`: send a VM's announcements by hand, or capture them (for tests).
//!
//! ```text
//! vmotion-announce send --interface eth0 --mac 52:54:00:12:34:56 [--ip 192.0.2.10] [--rounds 5]
//! vmotion-announce capture --interface eth1 --count 10 [--timeout-secs 5]
//! ```

use std::process::ExitCode;
use std::time::{Duration, Instant};

use vmotion_announce::{
    Announcement, ETHERTYPE_ARP, ETHERTYPE_RARP, Schedule, announce, parse_mac,
};

fn usage() -> ExitCode {
    eprintln!(
        "usage: vmotion-announce send --interface IF --mac MAC [--ip IPV4]... [--rounds N]\n       vmotion-announce capture --interface IF --count N [--timeout-secs S]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let values = |name: &str| -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == name)
            .map(|w| w[1].clone())
            .collect()
    };
    let Some(interface) = value("--interface") else {
        return usage();
    };
    match args.first().map(String::as_str) {
        Some("send") => {
            let macs: Option<Vec<[u8; 6]>> = values("--mac").iter().map(|m| parse_mac(m)).collect();
            let Some(macs) = macs.filter(|m| !m.is_empty()) else {
                eprintln!("vmotion-announce: give at least one valid --mac aa:bb:cc:dd:ee:ff");
                return ExitCode::from(2);
            };
            let ips: Result<Vec<std::net::Ipv4Addr>, _> =
                values("--ip").iter().map(|i| i.parse()).collect();
            let Ok(ips) = ips else {
                eprintln!("vmotion-announce: --ip takes an IPv4 address");
                return ExitCode::from(2);
            };
            let rounds = value("--rounds").and_then(|r| r.parse().ok()).unwrap_or(5);
            let what = Announcement {
                ips: ips.into_iter().map(|ip| (macs[0], ip)).collect(),
                macs,
            };
            match announce(
                &interface,
                &what,
                Schedule {
                    rounds,
                    ..Schedule::default()
                },
            ) {
                Ok(n) => {
                    println!("sent {n} frames on {interface}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vmotion-announce: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("capture") => {
            let count: usize = value("--count").and_then(|c| c.parse().ok()).unwrap_or(1);
            let timeout = Duration::from_secs(
                value("--timeout-secs")
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(5),
            );
            let Some(iface) = pnet_datalink::interfaces()
                .into_iter()
                .find(|i| i.name == interface)
            else {
                eprintln!("vmotion-announce: no interface {interface}");
                return ExitCode::FAILURE;
            };
            let config = pnet_datalink::Config {
                read_timeout: Some(Duration::from_millis(100)),
                ..Default::default()
            };
            let mut rx = match pnet_datalink::channel(&iface, config) {
                Ok(pnet_datalink::Channel::Ethernet(_, rx)) => rx,
                Ok(_) => return ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("vmotion-announce: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // Ready: the sender may start now.
            println!("capturing");
            let started = Instant::now();
            let mut seen = 0;
            while seen < count && started.elapsed() < timeout {
                let Ok(frame) = rx.next() else { continue };
                if frame.len() < 14 {
                    continue;
                }
                let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
                let kind = match ethertype {
                    ETHERTYPE_RARP => "rarp",
                    ETHERTYPE_ARP => "arp",
                    _ => continue,
                };
                let hex: String = frame.iter().take(60).map(|b| format!("{b:02x}")).collect();
                println!("{kind} {:.3} {hex}", started.elapsed().as_secs_f64());
                seen += 1;
            }
            if seen < count {
                eprintln!("vmotion-announce: captured {seen} of {count} frames");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        _ => usage(),
    }
}
