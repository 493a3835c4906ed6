//! # vmotion-keyservice-client: the key service, from a host
//!
//! What `vmotion-send`, `vmotion-recv` and the demo use to reach the key service
//! (`vmotion-keyservice`, the top-level `keyservice/` crate) over HTTPS with mutual TLS:
//!
//! - [`KeyServiceClient`]: one host's client, authenticated by its certificate
//!   ([`ClientIdentity`]); it registers the host, creates migrations, fetches keys and
//!   moves outcome records. It takes one or more replicas' URLs and fails over between
//!   them: a request that never left this host goes to the next replica for every call;
//!   one that may have reached a replica is sent again only if the call is idempotent,
//!   never a key fetch (the table is in the `failover` module's source, and in
//!   `docs/keyservice-api.md`). It is a `vmotion_authority::Authority` (a
//!   [`KeyAuthority`](vmotion_authority::KeyAuthority) and an
//!   [`Arbiter`](vmotion_authority::Arbiter)): the driver takes it as
//!   `Arc<dyn Authority>` and never names it.
//! - [`api`]: the JSON types the client and the service share (documented for operators
//!   in `docs/keyservice-api.md`).
//! - [`tls`]: the client's TLS configuration, and the PEM loading the service shares.
//!
//! Keys arrive in zeroizing types (`KeyMaterial`) and never reach logs or `Debug`.

#![forbid(unsafe_code)]

pub mod api;
mod authority;
mod client;
mod failover;
pub mod tls;

pub use client::{ClientError, IssuedMigration, KeyServiceClient};
pub use tls::ClientIdentity;
pub use vmotion_authority::{CreateOptions, FetchedKey};
