//! The handshake through the in-memory harness: both roles agree on every cell of the
//! policy table, and every attack on the handshake is refused with its own error.

use vmotion_proto::message::{Hello, HelloAck};
use vmotion_proto::testing::{
    Flight, RECEIVER_RANDOM, TEST_ID, checksum_frame, header_of, key, run_handshake, sender_config,
};
use vmotion_proto::{
    AbortCode, Decision, DestinationCapability, EncryptionPolicy, Error, FrameType, Mode,
    PeerMisbehaved, PlaintextReason, ReceiverConfig, ReceiverHandshake, Refusal, SenderConfig,
    SenderHandshake, WireFrame, decide,
};

/// Rewrites a handshake frame's payload as an on-path attacker would: decode, change,
/// re-encode, recompute the checksum (it is not a MAC).
fn rewrite(frame: &mut WireFrame, payload: Vec<u8>) {
    let h = header_of(frame);
    *frame = checksum_frame(h.version, h.stream, h.sequence, h.frame_type, payload).unwrap();
}

fn rewrite_ack(frame: &mut WireFrame, f: impl FnOnce(&mut HelloAck)) {
    if header_of(frame).frame_type == FrameType::HelloAck {
        let mut ack = HelloAck::decode(&frame.payload).unwrap();
        f(&mut ack);
        rewrite(frame, ack.encode());
    }
}

fn rewrite_hello(frame: &mut WireFrame, f: impl FnOnce(&mut Hello)) {
    if header_of(frame).frame_type == FrameType::Hello {
        let mut hello = Hello::decode(&frame.payload).unwrap();
        f(&mut hello);
        rewrite(frame, hello.encode().unwrap());
    }
}

#[test]
fn encrypted_handshake_establishes_matching_sessions() {
    let out = run_handshake(
        sender_config(),
        ReceiverConfig::default(),
        |h| {
            assert_eq!(
                h.migration_id, TEST_ID,
                "the receiver fetches the key by id"
            );
            Some(key(1))
        },
        |_, _| {},
    );
    let wire: Vec<_> = out
        .wire
        .iter()
        .map(|(d, f)| (*d, header_of(f).frame_type))
        .collect();
    assert_eq!(
        wire,
        [
            (Flight::ToReceiver, FrameType::Hello),
            (Flight::ToSender, FrameType::HelloAck),
            (Flight::ToSender, FrameType::KeyConfirm),
            (Flight::ToReceiver, FrameType::KeyConfirm),
        ]
    );
    let (s, r) = out.established();
    assert_eq!(s.negotiated(), r.negotiated());
    assert_eq!(s.transcript_hash(), r.transcript_hash());
    assert!(matches!(s.negotiated().mode, Mode::Encrypted(_)));
}

/// Every cell of the decision table, run through the real handshake: both ends reach the
/// same result, which is the table's.
#[test]
fn both_ends_agree_on_every_policy_cell() {
    use DestinationCapability::*;
    use EncryptionPolicy::*;
    for policy in [Disabled, Opportunistic, Required] {
        for authority in [Encrypts, DoesNotEncrypt, Unregistered] {
            for can_encrypt in [true, false] {
                for require in [true, false] {
                    let expected = decide(vmotion_proto::DecisionInputs {
                        policy,
                        authority,
                        wire_can_encrypt: can_encrypt,
                        receiver_requires_encryption: require,
                    });
                    let sender = SenderConfig {
                        policy,
                        destination: authority,
                        ..sender_config()
                    };
                    let receiver = ReceiverConfig {
                        can_encrypt,
                        require_encryption: require,
                        ..ReceiverConfig::default()
                    };
                    let out = run_handshake(sender, receiver, |_| Some(key(1)), |_, _| {});
                    let case = format!("{policy:?} {authority:?} can={can_encrypt} req={require}");
                    match expected {
                        Decision::Refused(Refusal::PolicyRequiresEncryption) => {
                            // Refused before connecting: the receiver never sees a byte.
                            assert_eq!(
                                out.sender_error(),
                                &Error::Refused(Refusal::PolicyRequiresEncryption),
                                "{case}"
                            );
                            assert!(out.receiver.is_none() && out.wire.is_empty(), "{case}");
                        }
                        Decision::Refused(r) => {
                            assert_eq!(out.sender_error(), &Error::Refused(r), "{case}");
                            assert_eq!(out.receiver_error(), &Error::Refused(r), "{case}");
                        }
                        Decision::Encrypted | Decision::Plaintext(_) => {
                            let (s, r) = out.established();
                            let mode = s.negotiated().mode;
                            assert_eq!(mode, r.negotiated().mode, "{case}");
                            let want = match expected {
                                Decision::Encrypted => {
                                    Mode::Encrypted(vmotion_proto::CipherSuite::Aes256Gcm)
                                }
                                Decision::Plaintext(p) => Mode::Plaintext(p),
                                Decision::Refused(_) => unreachable!(),
                            };
                            assert_eq!(mode, want, "{case}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn plaintext_handshake_sends_no_key_confirmation() {
    let sender = SenderConfig {
        policy: EncryptionPolicy::Disabled,
        key: None,
        ..sender_config()
    };
    let out = run_handshake(
        sender,
        ReceiverConfig::default(),
        |_| panic!("no key is needed"),
        |_, _| {},
    );
    assert_eq!(out.wire.len(), 2);
    let (s, _) = out.established();
    assert_eq!(
        s.negotiated().mode,
        Mode::Plaintext(PlaintextReason::PolicyDisabled)
    );
}

/// The key service says the destination encrypts; an attacker rewrites the HelloAck to
/// say it cannot (and to choose plaintext). The sender refuses.
#[test]
fn downgrade_of_the_ack_is_refused() {
    for policy in [
        EncryptionPolicy::Opportunistic,
        EncryptionPolicy::Required,
        EncryptionPolicy::Disabled,
    ] {
        let sender = SenderConfig {
            policy,
            ..sender_config()
        };
        let out = run_handshake(
            sender,
            ReceiverConfig::default(),
            |_| Some(key(1)),
            |d, f| {
                if d == Flight::ToSender {
                    rewrite_ack(f, |ack| {
                        ack.can_encrypt = false;
                        ack.cipher = None;
                        ack.decision =
                            Decision::Plaintext(PlaintextReason::DestinationCannotEncrypt);
                    });
                }
            },
        );
        assert_eq!(
            out.sender_error(),
            &Error::Refused(Refusal::DowngradeDetected),
            "{policy:?}"
        );
    }
}

/// The attacker rewrites the Hello instead, claiming the VM's policy is disabled so the
/// receiver agrees to plaintext. The sender's own evaluation disagrees: refused.
#[test]
fn downgrade_of_the_hello_is_refused() {
    let out = run_handshake(
        sender_config(),
        ReceiverConfig::default(),
        |_| Some(key(1)),
        |d, f| {
            if d == Flight::ToReceiver {
                rewrite_hello(f, |h| h.policy = EncryptionPolicy::Disabled);
            }
        },
    );
    assert!(
        matches!(
            out.sender_error(),
            Error::PeerMisbehaved(PeerMisbehaved::DecisionMismatch { .. })
        ),
        "{:?}",
        out.sender_error()
    );
}

/// Rewrites that keep both decisions "encrypted" are caught by the key confirmation:
/// the transcripts differ, so the MACs do.
#[test]
fn any_other_handshake_rewrite_fails_key_confirmation() {
    // Lower the key-update budgets in the Hello (the receiver would accept them).
    let out = run_handshake(
        sender_config(),
        ReceiverConfig::default(),
        |_| Some(key(1)),
        |d, f| {
            if d == Flight::ToReceiver {
                rewrite_hello(f, |h| {
                    h.limits = vmotion_proto::EpochLimits::new(1, 1).unwrap()
                });
            }
        },
    );
    assert_eq!(
        out.sender_error(),
        &Error::PeerMisbehaved(PeerMisbehaved::KeyConfirmationFailed)
    );
    // Change the maximum payload in the ack.
    let out = run_handshake(
        sender_config(),
        ReceiverConfig::default(),
        |_| Some(key(1)),
        |d, f| {
            if d == Flight::ToSender {
                rewrite_ack(f, |a| a.max_payload = 100_000);
            }
        },
    );
    assert_eq!(
        out.sender_error(),
        &Error::PeerMisbehaved(PeerMisbehaved::KeyConfirmationFailed)
    );
}

#[test]
fn wrong_key_fails_key_confirmation() {
    let out = run_handshake(
        sender_config(),
        ReceiverConfig::default(),
        |_| Some(key(2)),
        |_, _| {},
    );
    assert_eq!(
        out.sender_error(),
        &Error::PeerMisbehaved(PeerMisbehaved::KeyConfirmationFailed)
    );
}

/// Same key material, another migration id: the receiver's schedule (bound to the id it
/// saw) differs from the sender's.
#[test]
fn same_key_other_migration_fails_key_confirmation() {
    let out = run_handshake(
        sender_config(),
        ReceiverConfig::default(),
        |_| Some(key(1)),
        |d, f| {
            if d == Flight::ToReceiver {
                rewrite_hello(f, |h| h.migration_id.0[0] ^= 1);
            }
        },
    );
    assert_eq!(
        out.sender_error(),
        &Error::PeerMisbehaved(PeerMisbehaved::KeyConfirmationFailed)
    );
}

/// A confirmation reflected back to its sender does not verify (direction is in the key).
#[test]
fn reflected_key_confirmation_fails() {
    let (expect_ack, hello) = SenderHandshake::start(sender_config()).unwrap();
    let received = ReceiverHandshake::start(ReceiverConfig::default(), RECEIVER_RANDOM)
        .handle(hello)
        .unwrap();
    let (next, frames) = received.accept(Some(key(1))).unwrap();
    let [ack, kc]: [WireFrame; 2] = frames.try_into().unwrap();
    let vmotion_proto::SenderNext::ExpectKeyConfirm(state) = expect_ack.handle(ack).unwrap() else {
        panic!("encrypted");
    };
    let (_, sender_kc) = state.handle(kc.clone()).unwrap();
    let vmotion_proto::ReceiverNext::ExpectKeyConfirm(rstate) = next else {
        panic!()
    };
    // Give the receiver its own confirmation back, numbered as the sender's would be.
    let h = header_of(&sender_kc);
    let reflected = checksum_frame(
        h.version,
        h.stream,
        h.sequence,
        FrameType::KeyConfirm,
        kc.payload,
    )
    .unwrap();
    assert_eq!(
        rstate.handle(reflected).unwrap_err(),
        Error::PeerMisbehaved(PeerMisbehaved::KeyConfirmationFailed)
    );
}

#[test]
fn no_common_version_is_refused_by_both() {
    let receiver = ReceiverConfig {
        versions: 2..=3,
        ..ReceiverConfig::default()
    };
    let out = run_handshake(sender_config(), receiver, |_| Some(key(1)), |_, _| {});
    assert_eq!(
        out.receiver_error(),
        &Error::Refused(Refusal::NoCommonVersion)
    );
    assert_eq!(
        out.sender_error(),
        &Error::Refused(Refusal::NoCommonVersion)
    );
}

#[test]
fn receiver_limits_are_refused_with_their_reason() {
    let out = run_handshake(
        SenderConfig {
            streams: 9,
            kind: vmotion_proto::MigrationKind::Memory,
            device: Default::default(),
            ..sender_config()
        },
        ReceiverConfig {
            max_streams: 8,
            ..ReceiverConfig::default()
        },
        |_| Some(key(1)),
        |_, _| {},
    );
    assert_eq!(out.sender_error(), &Error::Refused(Refusal::TooManyStreams));
    let out = run_handshake(
        SenderConfig {
            page_size: 65536,
            ..sender_config()
        },
        ReceiverConfig {
            max_page_size: 4096,
            ..ReceiverConfig::default()
        },
        |_| Some(key(1)),
        |_, _| {},
    );
    assert_eq!(
        out.sender_error(),
        &Error::Refused(Refusal::PageSizeUnsupported)
    );
}

#[test]
fn receiver_choosing_outside_the_offer_is_caught() {
    // A version the sender did not offer.
    let out = run_handshake(
        sender_config(),
        ReceiverConfig::default(),
        |_| Some(key(1)),
        |d, f| {
            if d == Flight::ToSender {
                rewrite_ack(f, |a| a.version = 7);
            }
        },
    );
    assert_eq!(
        out.sender_error(),
        &Error::PeerMisbehaved(PeerMisbehaved::IllegalChoice { what: "version" })
    );
    // Budgets above the proposal.
    let out = run_handshake(
        sender_config(),
        ReceiverConfig::default(),
        |_| Some(key(1)),
        |d, f| {
            if d == Flight::ToSender {
                rewrite_ack(f, |a| {
                    a.limits = vmotion_proto::EpochLimits::new(u64::MAX, u64::MAX).unwrap()
                });
            }
        },
    );
    assert_eq!(
        out.sender_error(),
        &Error::PeerMisbehaved(PeerMisbehaved::IllegalChoice {
            what: "key-update budgets"
        })
    );
}

#[test]
fn unexpected_frames_name_the_state() {
    let (expect_ack, _) = SenderHandshake::start(sender_config()).unwrap();
    let bogus = checksum_frame(1, 0, 0, FrameType::Pages, vec![]).unwrap();
    assert_eq!(
        expect_ack.handle(bogus).unwrap_err(),
        Error::PeerMisbehaved(PeerMisbehaved::UnexpectedFrame {
            state: "expecting HelloAck",
            frame_type: FrameType::Pages
        })
    );
    let bogus = checksum_frame(1, 0, 0, FrameType::Commit, vec![]).unwrap();
    assert_eq!(
        ReceiverHandshake::start(ReceiverConfig::default(), RECEIVER_RANDOM)
            .handle(bogus)
            .unwrap_err(),
        Error::PeerMisbehaved(PeerMisbehaved::UnexpectedFrame {
            state: "expecting Hello",
            frame_type: FrameType::Commit
        })
    );
}

#[test]
fn receiver_abort_reaches_the_sender_with_its_code() {
    let (expect_ack, hello) = SenderHandshake::start(sender_config()).unwrap();
    let received = ReceiverHandshake::start(ReceiverConfig::default(), RECEIVER_RANDOM)
        .handle(hello)
        .unwrap();
    let abort = received
        .reject(
            AbortCode::KeyUnavailable,
            "the key service refused the fetch",
        )
        .unwrap();
    assert_eq!(
        expect_ack.handle(abort).unwrap_err(),
        Error::PeerAborted {
            code: AbortCode::KeyUnavailable,
            message: "the key service refused the fetch".into()
        }
    );
}

#[test]
fn sender_without_a_key_for_an_encrypting_destination_is_api_misuse() {
    let err = SenderHandshake::start(SenderConfig {
        key: None,
        ..sender_config()
    })
    .unwrap_err();
    assert!(matches!(err, Error::ApiMisuse(_)), "{err:?}");
    // The receiver insisting on a key it was not given is misuse too.
    let (_, hello) = SenderHandshake::start(sender_config()).unwrap();
    let received = ReceiverHandshake::start(ReceiverConfig::default(), RECEIVER_RANDOM)
        .handle(hello)
        .unwrap();
    assert!(received.needs_key());
    assert!(matches!(received.accept(None), Err(Error::ApiMisuse(_))));
}

#[test]
fn handshake_frames_are_size_limited_from_the_header() {
    let big = checksum_frame(1, 0, 0, FrameType::Hello, vec![0; 4096]).unwrap();
    let failure = ReceiverHandshake::start(ReceiverConfig::default(), RECEIVER_RANDOM)
        .handle(big)
        .unwrap_err();
    assert!(matches!(
        failure.error,
        Error::PeerMisbehaved(PeerMisbehaved::PayloadTooLarge { len: 4096, .. })
    ));
    // The receiver answers with an Abort carrying the decode-error code.
    let abort = failure.abort.expect("an abort to send");
    let msg = vmotion_proto::message::Abort::decode(&abort.payload).unwrap();
    assert_eq!(msg.code, AbortCode::DecodeError);
}

#[test]
fn session_hands_out_each_channel_once() {
    let (mut s, mut r) = vmotion_proto::testing::encrypted_pair(Default::default());
    s.take_control().unwrap();
    assert!(s.take_control().is_err());
    r.take_control().unwrap();
    assert!(r.take_control().is_err());
    let (bind, _) = s.open_data_stream(1).unwrap();
    assert!(s.open_data_stream(1).is_err(), "stream 1 twice");
    assert!(
        s.open_data_stream(3).is_err(),
        "only 2 streams were negotiated"
    );
    assert!(
        s.open_data_stream(0).is_err(),
        "stream 0 is the control connection"
    );
    r.accept_data_stream(bind.clone()).unwrap();
    assert_eq!(
        r.accept_data_stream(bind).unwrap_err(),
        Error::PeerMisbehaved(PeerMisbehaved::StreamBindFailed { stream: 1 }),
        "a replayed bind"
    );
}

#[test]
fn forged_stream_bind_is_refused() {
    let (mut s, mut r) = vmotion_proto::testing::encrypted_pair(Default::default());
    let (bind, _) = s.open_data_stream(2).unwrap();
    // An attacker without the keys fills in another MAC.
    let mut b = vmotion_proto::message::StreamBind::decode(&bind.payload).unwrap();
    b.mac[0] ^= 1;
    let forged = checksum_frame(1, 2, 0, FrameType::StreamBind, b.encode()).unwrap();
    assert_eq!(
        r.accept_data_stream(forged).unwrap_err(),
        Error::PeerMisbehaved(PeerMisbehaved::StreamBindFailed { stream: 2 })
    );
    // A bind from another migration with the same key material.
    let other = run_handshake(
        SenderConfig {
            migration_id: vmotion_proto::MigrationId([7; 16]),
            ..sender_config()
        },
        ReceiverConfig::default(),
        |_| Some(key(1)),
        |_, _| {},
    );
    let (mut s2, _) = other.established();
    let (bind2, _) = s2.open_data_stream(2).unwrap();
    assert_eq!(
        r.accept_data_stream(bind2).unwrap_err(),
        Error::PeerMisbehaved(PeerMisbehaved::StreamBindFailed { stream: 2 })
    );
}

/// Fresh randomness on both sides makes every handshake's transcript, and so every key,
/// unique: a retried migration with the same key material never reuses a nonce.
#[test]
fn same_key_material_twice_gives_different_keys() {
    let run = |random: [u8; 32]| {
        let out = run_handshake(
            SenderConfig {
                random,
                ..sender_config()
            },
            ReceiverConfig::default(),
            |_| Some(key(1)),
            |_, _| {},
        );
        let (s, _) = out.established();
        *s.transcript_hash()
    };
    assert_eq!(
        run([1; 32]),
        run([1; 32]),
        "deterministic for the same inputs"
    );
    assert_ne!(run([1; 32]), run([2; 32]));
}

/// An attacker replays a recorded sender side (Hello, then KeyConfirm) to a receiver that
/// can obtain the same key again: the receiver's fresh random changes the transcript, so
/// the replayed confirmation does not verify.
#[test]
fn replayed_sender_handshake_fails_against_a_fresh_receiver() {
    let recorded = run_handshake(
        sender_config(),
        ReceiverConfig::default(),
        |_| Some(key(1)),
        |_, _| {},
    );
    let sender_frames: Vec<WireFrame> = recorded
        .wire
        .iter()
        .filter(|(d, _)| *d == Flight::ToReceiver)
        .map(|(_, f)| f.clone())
        .collect();
    let [hello, kc]: [WireFrame; 2] = sender_frames.try_into().unwrap();
    let received = ReceiverHandshake::start(ReceiverConfig::default(), [0x33; 32])
        .handle(hello)
        .unwrap();
    let (next, _) = received.accept(Some(key(1))).unwrap();
    let vmotion_proto::ReceiverNext::ExpectKeyConfirm(state) = next else {
        panic!("encrypted")
    };
    assert_eq!(
        state.handle(kc).unwrap_err(),
        Error::PeerMisbehaved(PeerMisbehaved::KeyConfirmationFailed)
    );
}

#[test]
fn receiver_choosing_a_cipher_or_payload_outside_the_offer_is_caught() {
    // Plaintext decision but a cipher chosen (or encrypted without one).
    let out = run_handshake(
        sender_config(),
        ReceiverConfig::default(),
        |_| Some(key(1)),
        |d, f| {
            if d == Flight::ToSender {
                rewrite_ack(f, |a| a.cipher = None);
            }
        },
    );
    assert_eq!(
        out.sender_error(),
        &Error::PeerMisbehaved(PeerMisbehaved::IllegalChoice {
            what: "cipher suite"
        })
    );
    for bad in [1000, vmotion_proto::MAX_PAYLOAD + 1] {
        let out = run_handshake(
            sender_config(),
            ReceiverConfig::default(),
            |_| Some(key(1)),
            |d, f| {
                if d == Flight::ToSender {
                    rewrite_ack(f, |a| a.max_payload = bad);
                }
            },
        );
        assert_eq!(
            out.sender_error(),
            &Error::PeerMisbehaved(PeerMisbehaved::IllegalChoice {
                what: "maximum payload"
            }),
            "{bad}"
        );
    }
}

/// A refusing sender tells the receiver why, with the refusal's own abort code.
#[test]
fn sender_refusal_sends_an_abort_with_its_code() {
    let out = run_handshake(
        sender_config(),
        ReceiverConfig::default(),
        |_| Some(key(1)),
        |d, f| {
            if d == Flight::ToSender {
                rewrite_ack(f, |ack| {
                    ack.can_encrypt = false;
                    ack.cipher = None;
                    ack.decision = Decision::Plaintext(PlaintextReason::DestinationCannotEncrypt);
                });
            }
        },
    );
    let (flight, last) = out.wire.last().unwrap();
    assert_eq!(*flight, Flight::ToReceiver);
    assert_eq!(header_of(last).frame_type, FrameType::Abort);
    let abort = vmotion_proto::message::Abort::decode(&last.payload).unwrap();
    assert_eq!(abort.code, AbortCode::DowngradeDetected);
    assert!(abort.message.contains("downgrade"), "{}", abort.message);
}

/// The receiver caps page sizes at what a Pages frame can carry, whatever it is configured
/// with.
#[test]
fn page_sizes_beyond_64_kib_are_refused() {
    let (_, hello) = SenderHandshake::start(sender_config()).unwrap();
    let mut h = Hello::decode(&hello.payload).unwrap();
    h.page_size = 1 << 17;
    let forged = checksum_frame(1, 0, 0, FrameType::Hello, h.encode().unwrap()).unwrap();
    let receiver = ReceiverConfig {
        max_page_size: 1 << 20,
        ..ReceiverConfig::default()
    };
    let received = ReceiverHandshake::start(receiver, RECEIVER_RANDOM)
        .handle(forged)
        .unwrap();
    assert_eq!(
        received.decision(),
        Decision::Refused(Refusal::PageSizeUnsupported)
    );
}

/// The other direction of replay: a recorded receiver side (HelloAck and its KeyConfirm)
/// offered to a new sender, whose fresh random changes the Hello and so the transcript.
#[test]
fn replayed_receiver_handshake_fails_against_a_fresh_sender() {
    let recorded = run_handshake(
        sender_config(),
        ReceiverConfig::default(),
        |_| Some(key(1)),
        |_, _| {},
    );
    let receiver_frames: Vec<WireFrame> = recorded
        .wire
        .iter()
        .filter(|(d, _)| *d == Flight::ToSender)
        .map(|(_, f)| f.clone())
        .collect();
    let [ack, kc]: [WireFrame; 2] = receiver_frames.try_into().unwrap();
    let (expect_ack, _) = SenderHandshake::start(SenderConfig {
        random: [0x44; 32],
        ..sender_config()
    })
    .unwrap();
    let vmotion_proto::SenderNext::ExpectKeyConfirm(state) = expect_ack.handle(ack).unwrap() else {
        panic!("encrypted")
    };
    let failure = state.handle(kc).unwrap_err();
    assert_eq!(
        failure,
        Error::PeerMisbehaved(PeerMisbehaved::KeyConfirmationFailed)
    );
    assert!(failure.abort.is_some(), "the sender tells the receiver");
}
