//! # vmotion-proto: the wire protocol of vmotion, without I/O
//!
//! This crate holds everything two vmotion hosts must agree on, and nothing that touches
//! a socket, a clock or a thread: the frame codec, the per-VM policy and its decision
//! table, the handshake state machines, the key schedule and the record layer that seals
//! and opens frames. The `vmotion` driver crate feeds it bytes and writes out what it
//! returns; tests drive it in memory ([`testing`], behind the `testing` feature).
//!
//! ## How a driver uses it
//!
//! ```mermaid
//! sequenceDiagram
//!     participant SD as sender driver
//!     participant R as receiver driver
//!     SD->>SD: policy::preflight (refuse Required→non-encrypting before connecting)
//!     SD->>R: SenderHandshake::start → Hello
//!     R->>R: ReceiverHandshake::start → ExpectHello::handle → HelloReceived
//!     R->>R: fetch the key by migration id if needs_key()
//!     R->>SD: HelloReceived::accept → HelloAck (+ KeyConfirm)
//!     SD->>SD: ExpectHelloAck::handle → SenderExpectKeyConfirm::handle
//!     SD->>R: KeyConfirm, then sealed frames
//!     R->>R: ReceiverExpectKeyConfirm::handle → ReceiverSession
//!     SD->>R: per data connection: open_data_stream → StreamBind, sealed Pages…
//!     R->>R: accept_data_stream → Opener per stream
//! ```
//!
//! 1. Sender: [`policy::preflight`], then [`SenderHandshake::start`] gives the `Hello`
//!    frame to write. Feed each frame read from the control connection to the current
//!    state's `handle`; each call consumes the state and returns the next one (or an
//!    error naming the state and what went wrong).
//! 2. Receiver: [`ReceiverHandshake::start`], `handle` the `Hello`, then
//!    [`HelloReceived::accept`] with the key (fetched from the key service by
//!    [`Hello::migration_id`](message::Hello) when [`HelloReceived::needs_key`]) and write
//!    every returned frame.
//! 3. Both: the session's `take_control` gives the control [`Channel`]; data connections
//!    start with [`SenderSession::open_data_stream`] / [`ReceiverSession::accept_data_stream`].
//! 4. Data path: read the 24-byte header into an array, [`Opener::decode_header`] (the
//!    length is bounded before anything is read), read payload and trailer into a
//!    page-aligned [`AlignedBuf`], then [`Opener::open_in_place`]. Send with
//!    [`Sealer::seal_in_place`] over a [`PagesBuilder`](message::PagesBuilder) payload.
//! 5. End every stream direction with [`Sealer::seal_end_of_stream`]; on the other side,
//!    [`Opener::finish`] when the connection closes tells a complete stream from a cut one.
//!
//! Any error ends the migration. A failed handshake step returns a [`HandshakeFailure`]
//! that carries the `Abort` frame to send; after the handshake, seal an `Abort` with
//! [`Error::abort_code`] on the control channel if it still works. Nothing in this crate
//! panics on peer input.
//!
//! The byte-level specification is `docs/protocol.md`; the threat model is
//! `docs/threat-model.md`.

#![forbid(unsafe_code)]

pub mod buf;
mod codec;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod keyschedule;
pub mod message;
pub mod policy;
pub mod record;
pub mod secret;
#[cfg(feature = "testing")]
pub mod testing;

pub use buf::AlignedBuf;
pub use error::{AbortCode, ApiMisuse, Error, PeerMisbehaved, Refusal, Result};
pub use frame::{
    FrameSplitter, FrameType, HEADER_LEN, Header, MAX_PAYLOAD, TRAILER_LEN, WireFrame,
};
pub use handshake::{
    Channel, ExpectHello, ExpectHelloAck, HandshakeFailure, HelloReceived, Mode, Negotiated,
    ReceiverConfig, ReceiverExpectKeyConfirm, ReceiverHandshake, ReceiverNext, ReceiverSession,
    SenderConfig, SenderExpectKeyConfirm, SenderHandshake, SenderNext, SenderSession, StepResult,
};
pub use keyschedule::Direction;
pub use message::{DeviceModel, MigrationKind};
pub use policy::{
    Decision, DecisionInputs, DestinationCapability, EncryptionPolicy, PlaintextReason, VmPolicy,
    decide,
};
pub use record::{CipherSuite, EpochLimits, Opener, Sealer};
pub use secret::{KeyMaterial, MigrationId, MigrationKey, MigrationNonce, handshake_random};
