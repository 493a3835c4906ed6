//! # vmotion-testbed: real parts for tests and benchmarks
//!
//! [`EtcdCluster`]: an etcd cluster of real `etcd` processes (Debian's `etcd-server`)
//! on loopback, each member with its own data directory and log, killed with SIGKILL and
//! restarted on demand. Nothing here is a mock; nothing listens beyond 127.0.0.1.

#![forbid(unsafe_code)]

mod etcd;

pub use etcd::{EtcdCluster, etcd_available};
