//! # vmotion-keyservice: per-migration keys over mutual TLS
//!
//! The key service plays vCenter's role in Encrypted vMotion. A source host asks it to
//! create a migration (VM, destination); it draws a fresh 256-bit key and 64-bit nonce
//! from the OS CSPRNG, binds them to a random migration id and the two host identities,
//! and answers with the key and what its host registry knows about the destination. The
//! destination fetches the key once, by id, with its own client certificate. The service
//! arbitrates the switchover: the source records `committed`, then either the destination
//! `claimed` or the source `reverted` (or either host `aborted` instead of `committed`),
//! each step a compare-and-set that survives restarts in an fsynced journal. Keys
//! live only in memory, in zeroizing types, and never in logs.
//!
//! - [`server::Server`]: the HTTPS service (`vmotion-keyservice serve`).
//! - [`api`]: the JSON types it shares with its client, re-exported from
//!   `vmotion-keyservice-client` (documented for operators in `docs/keyservice-api.md`).
//!   The client, `KeyServiceClient`, lives in that crate: what `vmotion-send` and
//!   `vmotion-recv` use, and what the driver sees only as a `vmotion_authority::Authority`.
//! - [`pki`]: a development PKI (`vmotion-keyservice pki init`).
//!
//! Host identity is the DNS name in the client certificate; a connection without a
//! certificate from the configured CA never reaches the API.

#![forbid(unsafe_code)]

pub use vmotion_keyservice_client::api;
pub mod config;
mod logfile;
mod metrics;
pub mod pki;
pub mod server;
mod store;
pub mod tls;

pub use config::Config;
pub use server::Server;
pub use store::{Limits, kek};
