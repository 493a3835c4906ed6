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
//! - [`client::KeyServiceClient`]: what `vmotion-send` and `vmotion-recv` use.
//! - [`api`]: the JSON types both share (documented for operators in
//!   `docs/keyservice-api.md`).
//! - [`pki`]: a development PKI (`vmotion-keyservice pki init`).
//!
//! Host identity is the DNS name in the client certificate; a connection without a
//! certificate from the configured CA never reaches the API.

#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod config;
pub mod pki;
pub mod server;
pub mod tls;

pub use client::{ClientError, FetchedKey, IssuedMigration, KeyServiceClient};
pub use config::Config;
pub use server::Server;
pub use tls::ClientIdentity;
