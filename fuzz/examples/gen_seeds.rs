//! Writes the seed inputs of both fuzz targets to `fuzz/seeds/<target>/` and checks, by
//! running each one through the target's own code, that it gets as deep as intended.
//!
//! ```sh
//! cd fuzz && cargo run --example gen_seeds
//! ```
//!
//! Deterministic: every frame comes from a real in-memory handshake
//! (`vmotion_proto::testing::run_handshake`) and real sealers, with fixed keys, so the
//! files come out byte-identical on every run. The seeds are committed; the corpora
//! libFuzzer grows from them (`fuzz/corpus/`) are not.
//!
//! `handshake` seeds carry every frame as its plaintext payload, in the kind the target
//! re-protects (checksum, or AES-GCM with the migration key the fuzzer holds) into exactly
//! the real frame, so mutations of a payload keep the frame valid: `auto` (the position the
//! opener expects) for frames of key epoch 0, `header` for later epochs. One seed also
//! carries a `raw` frame.

use std::fs;
use std::path::Path;

use vmotion_fuzz::script::{Role, Script};
use vmotion_fuzz::{frames, handshake};
use vmotion_proto::frame::{FrameType, MAX_PAYLOAD, WireFrame};
use vmotion_proto::handshake::{ReceiverConfig, SenderConfig};
use vmotion_proto::message::pages::PagesBuilder;
use vmotion_proto::message::{
    Abort, Complete, DeviceStateChunk, EndOfStream, IterationMarker, MarkerKind, Ready,
    StreamTotals,
};
use vmotion_proto::policy::{DestinationCapability, EncryptionPolicy, PlaintextReason};
use vmotion_proto::record::{EpochLimits, Sealer};
use vmotion_proto::testing::{self, Flight};
use vmotion_proto::{AbortCode, CipherSuite, Mode, ReceiverSession, SenderSession};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for (target, seeds) in [
        ("frame_decoder", frame_decoder_seeds()),
        ("handshake", handshake_seeds()),
    ] {
        let dir = root.join(target);
        fs::create_dir_all(&dir).expect("create the seed directory");
        for (name, bytes) in seeds {
            let path = dir.join(name);
            fs::write(&path, &bytes).expect("write a seed");
            println!("{:>6} bytes  {}", bytes.len(), path.display());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Payloads
// ---------------------------------------------------------------------------------------

/// A `Pages` batch of 4 KiB pages: `data` pages of data, then `zero` zero pages.
fn pages(data: u64, zero: u64) -> Vec<u8> {
    let mut b = PagesBuilder::new(4096, 256 * 1024);
    for i in 0..data {
        let fill = u8::try_from(i + 1).expect("few pages");
        assert!(b.push(i, &[fill; 4096]));
    }
    for i in data..data + zero {
        assert!(b.push(i, &[0; 4096]));
    }
    b.finish().to_vec()
}

fn iteration_marker(kind: MarkerKind, pages: u64) -> Vec<u8> {
    IterationMarker {
        iteration: 0,
        kind,
        pages,
    }
    .encode()
}

fn device_state() -> Vec<u8> {
    DeviceStateChunk {
        offset: 0,
        total_len: 5,
        data: b"state",
    }
    .encode()
}

fn complete(frames: u64, bytes: u64) -> Vec<u8> {
    Complete {
        iterations: 1,
        pages: 3,
        device_state_len: 5,
        streams: vec![StreamTotals { frames, bytes }],
    }
    .encode()
    .expect("one stream")
}

fn ready() -> Vec<u8> {
    Ready {
        pages: 3,
        device_state_len: 5,
    }
    .encode()
}

fn abort() -> Vec<u8> {
    Abort {
        code: AbortCode::Cancelled,
        message: "cancelled by the operator".into(),
    }
    .encode()
}

/// A frame as sent, with its payload before sealing.
struct Sent {
    frame: WireFrame,
    plaintext: Vec<u8>,
}

/// A checksummed frame (its payload is its plaintext).
fn sent(frame: &WireFrame) -> Sent {
    Sent {
        frame: frame.clone(),
        plaintext: frame.payload.clone(),
    }
}

/// Seals `payloads`, then the stream's `EndOfStream` with its totals, with `sealer`
/// (which has sealed nothing before).
fn seal_all(sealer: &mut Sealer, payloads: &[(FrameType, Vec<u8>)]) -> Vec<Sent> {
    let totals = EndOfStream {
        frames: payloads.len() as u64,
        bytes: payloads.iter().map(|(_, p)| p.len() as u64).sum(),
    };
    payloads
        .iter()
        .cloned()
        .chain([(FrameType::EndOfStream, totals.encode())])
        .map(|(t, plaintext)| Sent {
            frame: sealer.seal(t, plaintext.clone()).expect("seal"),
            plaintext,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// frame_decoder
// ---------------------------------------------------------------------------------------

fn frame_decoder_seeds() -> Vec<(&'static str, Vec<u8>)> {
    // Real handshake frames for the handshake types, checksummed frames for the rest.
    let outcome = testing::run_handshake(
        testing::sender_config(),
        ReceiverConfig::default(),
        |_| Some(testing::key(1)),
        |_, _| {},
    );
    let mut wire: Vec<WireFrame> = outcome.wire.iter().map(|(_, f)| f.clone()).collect();
    let (mut sender, _) = outcome.established();
    let (bind, _) = sender.open_data_stream(1).expect("stream 1");
    wire.push(bind);
    let others = [
        (FrameType::Pages, pages(0, 3)),
        (
            FrameType::IterationMarker,
            iteration_marker(MarkerKind::End, 3),
        ),
        (FrameType::DeviceState, device_state()),
        (FrameType::Complete, complete(4, 100)),
        (FrameType::Ready, ready()),
        (FrameType::Commit, vec![1]),
        (FrameType::Abort, abort()),
        (FrameType::TunnelData, b"QEVM".to_vec()),
        (FrameType::TunnelShutdown, Vec::new()),
        (FrameType::Claimed, Vec::new()),
    ];
    wire.extend(
        seal_all(&mut checksum_sealer(), &others)
            .into_iter()
            .map(|s| s.frame),
    );

    let stream = |frames: &[WireFrame]| {
        let mut v = MAX_PAYLOAD.to_be_bytes().to_vec();
        frames.iter().for_each(|f| v.extend(f.to_bytes()));
        v
    };
    let all_types = stream(&wire);
    let types: std::collections::BTreeSet<_> = wire
        .iter()
        .map(|f| testing::header_of(f).frame_type)
        .collect();
    assert_eq!(
        types.len(),
        FrameType::ALL.len(),
        "every frame type is in the stream"
    );
    let n = wire.len();
    check_frames(&all_types, n, n, 3);

    let pages_frame = checksum_sealer()
        .seal(FrameType::Pages, pages(2, 2))
        .expect("seal");
    let pages_4k = stream(std::slice::from_ref(&pages_frame));
    check_frames(&pages_4k, 1, 1, 4);

    // A frame and a half: the splitter must ask for more bytes.
    let mut truncated = stream(&wire[..2]);
    truncated.truncate(truncated.len() - 10);
    check_frames(&truncated, 1, 1, 0);

    vec![
        ("all_types", all_types),
        ("pages_4k", pages_4k),
        ("truncated", truncated),
    ]
}

/// A checksum sealer for stream 1 (what `testing::checksum_frame` uses, kept running).
fn checksum_sealer() -> Sealer {
    // Plaintext sessions' data sealers are exactly that: take one from a real session.
    let (mut sender, _) = plaintext_pair(EpochLimits::default());
    sender.open_data_stream(1).expect("stream 1").1.sealer
}

fn check_frames(seed: &[u8], frames: usize, messages: usize, pages: usize) {
    assert_eq!(
        frames::run(seed),
        frames::Report {
            frames,
            messages,
            pages
        }
    );
}

// ---------------------------------------------------------------------------------------
// handshake
// ---------------------------------------------------------------------------------------

/// A sender whose policy disables encryption (so the migration is plaintext), with the
/// given key-update budgets.
fn plaintext_sender(limits: EpochLimits) -> SenderConfig {
    SenderConfig {
        limits,
        ..Role::sender_config(
            EncryptionPolicy::Disabled,
            DestinationCapability::Encrypts,
            true,
        )
    }
}

fn plaintext_pair(limits: EpochLimits) -> (SenderSession, ReceiverSession) {
    testing::run_handshake(
        plaintext_sender(limits),
        ReceiverConfig::default(),
        |_| None,
        |_, _| {},
    )
    .established()
}

/// The frames that crossed the wire in `flight`'s direction during the handshake.
fn flight(outcome: &testing::Outcome, flight: Flight) -> Vec<Sent> {
    outcome
        .wire
        .iter()
        .filter(|(f, _)| *f == flight)
        .map(|(_, frame)| sent(frame))
        .collect()
}

/// Adds a frame on `channel`: `auto` in key epoch 0, else `header`; the target protects
/// it again (the depth checks prove it comes out as the real frame).
fn push(script: Script, channel: u8, sent: &Sent) -> Script {
    let h = testing::header_of(&sent.frame);
    if h.epoch == 0 && h.version == 1 {
        script.auto(channel, h.frame_type, &sent.plaintext)
    } else {
        script.header(channel, &sent.frame.header, &sent.plaintext)
    }
}

fn push_all(script: Script, channel: u8, frames: &[Sent]) -> Script {
    frames.iter().fold(script, |s, f| push(s, channel, f))
}

fn check_handshake(seed: &[u8], expected: &handshake::Report) {
    let report = handshake::run(seed);
    // Payload decoding counts are incidental; the depth is what matters.
    let depth = |r: &handshake::Report| {
        (
            r.established,
            r.refused,
            r.data_streams,
            r.frames_opened,
            r.streams_ended,
        )
    };
    assert_eq!(depth(&report), depth(expected), "{report:#?}");
}

fn reached(
    mode: Option<Mode>,
    data_streams: usize,
    frames_opened: usize,
    streams_ended: usize,
) -> handshake::Report {
    handshake::Report {
        established: mode,
        data_streams,
        frames_opened,
        streams_ended,
        ..handshake::Report::default()
    }
}

/// The data-stream frames a sender sends after its `StreamBind`.
fn data_payloads() -> Vec<(FrameType, Vec<u8>)> {
    vec![
        (
            FrameType::IterationMarker,
            iteration_marker(MarkerKind::Start, 0),
        ),
        (FrameType::Pages, pages(0, 3)),
        (
            FrameType::IterationMarker,
            iteration_marker(MarkerKind::End, 3),
        ),
        (FrameType::DeviceState, device_state()),
    ]
}

fn handshake_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let encrypted = Some(Mode::Encrypted(CipherSuite::Aes256Gcm));
    let plaintext = Some(Mode::Plaintext(PlaintextReason::PolicyDisabled));
    let mut seeds = Vec::new();

    // The fuzzer as the sender of an encrypted migration, replaying a real one: handshake,
    // one data stream and the control channel, both ended properly.
    {
        let outcome = testing::run_handshake(
            testing::sender_config(),
            ReceiverConfig::default(),
            |_| Some(testing::key(1)),
            |_, _| {},
        );
        let to_receiver = flight(&outcome, Flight::ToReceiver);
        let (mut sender, _) = outcome.established();
        let (bind, mut data) = sender.open_data_stream(1).expect("stream 1");
        let mut control = sender.take_control().expect("control");
        let data_frames = seal_all(&mut data.sealer, &data_payloads());
        let control_frames = seal_all(
            &mut control.sealer,
            &[(FrameType::Complete, complete(4, 200))],
        );
        let mut s = push_all(Script::new(Role::DEFAULT_RECEIVER), 0, &to_receiver);
        s = push(s, 1, &sent(&bind));
        s = push_all(s, 1, &data_frames);
        s = push_all(s, 0, &control_frames);
        let seed = s.finish();
        check_handshake(&seed, &reached(encrypted, 1, 7, 2));
        seeds.push(("receiver_encrypted", seed));
    }

    // The same in plaintext: every frame is an `auto` frame the fuzzer can rewrite at will.
    {
        let outcome = testing::run_handshake(
            plaintext_sender(EpochLimits::default()),
            ReceiverConfig::default(),
            |_| None,
            |_, _| {},
        );
        let to_receiver = flight(&outcome, Flight::ToReceiver);
        let (mut sender, _) = outcome.established();
        let (bind, mut data) = sender.open_data_stream(2).expect("stream 2");
        let mut control = sender.take_control().expect("control");
        let data_frames = seal_all(&mut data.sealer, &data_payloads());
        let control_frames = seal_all(
            &mut control.sealer,
            &[
                (FrameType::Complete, complete(4, 200)),
                (FrameType::Commit, vec![1]),
            ],
        );
        let mut s = push_all(Script::new(Role::DEFAULT_RECEIVER), 0, &to_receiver);
        s = push(s, 2, &sent(&bind));
        s = push_all(s, 2, &data_frames);
        s = push_all(s, 0, &control_frames);
        let seed = s.finish();
        check_handshake(&seed, &reached(plaintext, 1, 8, 2));
        seeds.push(("receiver_plaintext", seed));
    }

    // A two-frame key-update budget, plaintext and encrypted: frames of key epochs 1 and
    // 2 (`header` frames, which keep their epoch).
    for (name, config, mode) in [
        (
            "receiver_key_update",
            plaintext_sender(EpochLimits::default()),
            plaintext,
        ),
        (
            "receiver_encrypted_key_update",
            testing::sender_config(),
            encrypted,
        ),
    ] {
        let limits = EpochLimits::new(2, 1 << 20).expect("non-zero");
        let outcome = testing::run_handshake(
            SenderConfig { limits, ..config },
            ReceiverConfig::default(),
            |_| Some(testing::key(1)),
            |_, _| {},
        );
        let to_receiver = flight(&outcome, Flight::ToReceiver);
        let (mut sender, _) = outcome.established();
        let (bind, mut data) = sender.open_data_stream(1).expect("stream 1");
        let data_frames = seal_all(&mut data.sealer, &data_payloads());
        assert_eq!(testing::header_of(&data_frames[4].frame).epoch, 2);
        let mut s = push_all(Script::new(Role::DEFAULT_RECEIVER), 0, &to_receiver);
        s = push(s, 1, &sent(&bind));
        s = push_all(s, 1, &data_frames);
        let seed = s.finish();
        check_handshake(&seed, &reached(mode, 1, 5, 1));
        seeds.push((name, seed));
    }

    // A receiver that cannot encrypt, offered a destination the authority says encrypts:
    // the downgrade is refused.
    {
        let role = Role::Receiver {
            can_encrypt: false,
            require_encryption: false,
        };
        let outcome = testing::run_handshake(
            testing::sender_config(),
            ReceiverConfig::default(),
            |_| Some(testing::key(1)),
            |_, _| {},
        );
        let hello = &flight(&outcome, Flight::ToReceiver)[0];
        let seed = push(Script::new(role), 0, hello).finish();
        let mut expected = reached(None, 0, 0, 0);
        expected.refused = true;
        check_handshake(&seed, &expected);
        seeds.push(("receiver_refuses_downgrade", seed));
    }

    // The fuzzer as the receiver of an encrypted migration: HelloAck, KeyConfirm, then
    // sealed control and data frames from the real receiver's sealers.
    {
        let outcome = testing::run_handshake(
            testing::sender_config(),
            ReceiverConfig::default(),
            |_| Some(testing::key(1)),
            |_, _| {},
        );
        let to_sender = flight(&outcome, Flight::ToSender);
        let (mut sender, mut receiver) = outcome.established();
        let (bind, _) = sender.open_data_stream(1).expect("stream 1");
        let (_, mut data) = receiver.accept_data_stream(bind).expect("bind");
        let mut control = receiver.take_control().expect("control");
        let control_frames = seal_all(
            &mut control.sealer,
            &[(FrameType::Ready, ready()), (FrameType::Abort, abort())],
        );
        let data_frames = seal_all(&mut data.sealer, &[]);
        let mut s = push_all(Script::new(Role::DEFAULT_SENDER), 0, &to_sender);
        s = push_all(s, 0, &control_frames);
        // As sealed by the real receiver, byte for byte.
        s = s.raw(1, &data_frames[0].frame);
        let seed = s.finish();
        check_handshake(&seed, &reached(encrypted, 1, 4, 2));
        seeds.push(("sender_encrypted", seed));
    }

    // The same in plaintext (`auto` frames throughout).
    {
        let role = Role::Sender {
            policy: EncryptionPolicy::Disabled,
            destination: DestinationCapability::Encrypts,
            with_key: true,
        };
        let outcome = testing::run_handshake(
            plaintext_sender(EpochLimits::default()),
            ReceiverConfig::default(),
            |_| None,
            |_, _| {},
        );
        let to_sender = flight(&outcome, Flight::ToSender);
        let (mut sender, mut receiver) = outcome.established();
        let (bind, _) = sender.open_data_stream(2).expect("stream 2");
        let (_, mut data) = receiver.accept_data_stream(bind).expect("bind");
        let mut control = receiver.take_control().expect("control");
        let control_frames = seal_all(&mut control.sealer, &[(FrameType::Ready, ready())]);
        let data_frames = seal_all(&mut data.sealer, &[]);
        let mut s = push_all(Script::new(role), 0, &to_sender);
        s = push_all(s, 0, &control_frames);
        s = push_all(s, 2, &data_frames);
        let seed = s.finish();
        check_handshake(&seed, &reached(plaintext, 1, 3, 2));
        seeds.push(("sender_plaintext", seed));
    }

    // A receiver that answers the Hello with an Abort.
    {
        let seed = Script::new(Role::DEFAULT_SENDER)
            .auto(0, FrameType::Abort, &abort())
            .finish();
        check_handshake(&seed, &reached(None, 0, 0, 0));
        seeds.push(("sender_gets_abort", seed));
    }

    seeds
}
