//! # vmotion-keyservice-client: the key service, from a host
//!
//! What `vmotion-send`, `vmotion-recv` and the demo use to reach the key service
//! (`vmotion-keyservice`, the top-level `keyservice/` crate) over HTTPS with mutual TLS:
//!
//! - [`KeyServiceClient`]: one host's client, authenticated by its certificate
//!   ([`ClientIdentity`]); it registers the host, creates migrations, fetches keys and
//!   moves outcome records. It is a `vmotion_authority::Authority` (a
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
pub mod tls;

pub use client::{ClientError, IssuedMigration, KeyServiceClient};
pub use tls::ClientIdentity;
pub use vmotion_authority::FetchedKey;
