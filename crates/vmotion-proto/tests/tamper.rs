//! Attacks on sealed data streams through the deterministic in-memory harness. Each attack
//! must be rejected, and with its own precise error.

use vmotion_proto::testing::{Link, encrypted_pair, key, run_handshake, sender_config};
use vmotion_proto::{
    EpochLimits, Error, FrameSplitter, FrameType, HEADER_LEN, MigrationId, Opener, PeerMisbehaved,
    ReceiverConfig, ReceiverSession, SenderConfig, SenderSession, TRAILER_LEN,
};

fn pair() -> (SenderSession, ReceiverSession) {
    encrypted_pair(EpochLimits::default())
}

fn link() -> Link {
    let (mut s, mut r) = pair();
    Link::open(&mut s, &mut r, 1)
}

fn payload(i: u8) -> Vec<u8> {
    (0..100u8).map(|b| b.wrapping_mul(i)).collect()
}

fn peer(e: Error) -> PeerMisbehaved {
    match e {
        Error::PeerMisbehaved(p) => p,
        other => panic!("expected a peer error, got {other:?}"),
    }
}

#[test]
fn untampered_stream_round_trips_and_ends_cleanly() {
    let mut l = link();
    for i in 0..5 {
        l.send(FrameType::Pages, &payload(i))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // Sealed frames do not carry the plaintext.
    assert_ne!(l.in_flight[2].payload, payload(2));
    let eos = l.sender.sealer.seal_end_of_stream().unwrap();
    l.in_flight.push_back(eos);
    for i in 0..5 {
        let (h, p) = l.deliver().unwrap().unwrap();
        assert_eq!((h.sequence, p), (u64::from(i) + 1, payload(i)));
    }
    let (h, _) = l.deliver().unwrap().unwrap();
    assert_eq!(h.frame_type, FrameType::EndOfStream);
    l.receiver.opener.finish().unwrap();
}

/// Every single-bit flip anywhere in a sealed frame (header, payload, tag), on a byte
/// stream of three frames, is rejected — and the error names the part that was hit.
#[test]
fn every_bit_flip_is_rejected_with_the_error_of_its_field() {
    let (mut s, mut r) = pair();
    let (bind, mut tx) = s.open_data_stream(1).unwrap();
    let (_, rx) = r.accept_data_stream(bind).unwrap();
    let mut bytes = Vec::new();
    for i in 0..2 {
        bytes.extend(
            tx.sealer
                .seal(FrameType::Pages, payload(i))
                .unwrap()
                .to_bytes(),
        );
    }
    bytes.extend(tx.sealer.seal_end_of_stream().unwrap().to_bytes());
    let first_len = HEADER_LEN + 100 + TRAILER_LEN;
    let max = rx.opener.max_payload();
    drop(rx);

    // Each flip needs a fresh receiver at the same position: rebuild the pair per flip is
    // slow, so keep a template opener by re-running the same deterministic handshake.
    let fresh_opener = || {
        let (mut s, mut r) = pair();
        let (bind, _) = s.open_data_stream(1).unwrap();
        r.accept_data_stream(bind).unwrap().1.opener
    };
    let run = |bytes: &[u8], mut opener: Opener| -> Result<(), Error> {
        let splitter = FrameSplitter::new(max);
        let mut rest = bytes;
        while let Some((mut f, used)) = splitter.split(rest)? {
            opener.open(&mut f)?;
            rest = &rest[used..];
        }
        opener.finish()
    };
    assert_eq!(
        run(&bytes, fresh_opener()),
        Ok(()),
        "the untouched stream is fine"
    );

    for bit in 0..first_len * 8 {
        let mut b = bytes.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        let err = peer(run(&b, fresh_opener()).expect_err(&format!("bit {bit} went unnoticed")));
        let byte = bit / 8;
        let ok = match byte {
            0..=1 => matches!(err, PeerMisbehaved::BadMagic { .. }),
            2 => matches!(err, PeerMisbehaved::WrongFrameVersion { expected: 1, .. }),
            // The type is authenticated: a valid other type fails the tag.
            3 => matches!(
                err,
                PeerMisbehaved::UnknownFrameType(_) | PeerMisbehaved::AuthenticationFailed { .. }
            ),
            4..=5 => matches!(err, PeerMisbehaved::WrongStream { expected: 1, .. }),
            6..=7 => matches!(err, PeerMisbehaved::ReservedBitsSet),
            8..=11 => matches!(err, PeerMisbehaved::EpochAhead { expected: 0, .. }),
            // A changed length: too large, or the frame boundary moves so the tag fails,
            // or the stream ends inside the frame.
            12..=15 => matches!(
                err,
                PeerMisbehaved::PayloadTooLarge { .. }
                    | PeerMisbehaved::AuthenticationFailed { .. }
                    | PeerMisbehaved::Truncated { .. }
            ),
            16..=23 => matches!(
                err,
                PeerMisbehaved::FrameOutOfOrder { .. } | PeerMisbehaved::ReplayedFrame { .. }
            ),
            // Payload and tag.
            _ => matches!(
                err,
                PeerMisbehaved::AuthenticationFailed {
                    stream: 1,
                    epoch: 0,
                    sequence: 1
                }
            ),
        };
        assert!(ok, "bit {bit} (byte {byte}) gave {err:?}");
    }
}

#[test]
fn replayed_frame_is_rejected() {
    let mut l = link();
    l.send(FrameType::Pages, &payload(1)).unwrap();
    let copy = l.in_flight[0].clone();
    l.deliver().unwrap().unwrap();
    l.in_flight.push_back(copy);
    assert_eq!(
        peer(l.deliver().unwrap().unwrap_err()),
        PeerMisbehaved::ReplayedFrame {
            stream: 1,
            expected: 2,
            found: 1
        }
    );
}

#[test]
fn swapped_frames_are_rejected() {
    let mut l = link();
    l.send(FrameType::Pages, &payload(1)).unwrap();
    l.send(FrameType::Pages, &payload(2)).unwrap();
    l.in_flight.swap(0, 1);
    assert_eq!(
        peer(l.deliver().unwrap().unwrap_err()),
        PeerMisbehaved::FrameOutOfOrder {
            stream: 1,
            expected: 1,
            found: 2
        }
    );
}

#[test]
fn frame_moved_to_another_stream_is_rejected() {
    let (mut s, mut r) = pair();
    let mut l1 = Link::open(&mut s, &mut r, 1);
    let mut l2 = Link::open(&mut s, &mut r, 2);
    l1.send(FrameType::Pages, &payload(1)).unwrap();
    let mut f = l1.in_flight.pop_front().unwrap();
    // As is: the header names stream 1, the connection is stream 2.
    assert_eq!(
        peer(l2.receiver.opener.open(&mut f.clone()).unwrap_err()),
        PeerMisbehaved::WrongStream {
            expected: 2,
            found: 1
        }
    );
    // With the header rewritten to stream 2: the stream is in the AAD and the key.
    f.header[5] = 2;
    assert_eq!(
        peer(l2.receiver.opener.open(&mut f).unwrap_err()),
        PeerMisbehaved::AuthenticationFailed {
            stream: 2,
            epoch: 0,
            sequence: 1
        }
    );
    // One forgery attempt per stream: after it, even an honest frame is refused.
    assert_stream_dead(&mut l2, 2);
}

/// After an authentication failure the opener refuses everything.
fn assert_stream_dead(l: &mut Link, stream: u16) {
    l.send(FrameType::Pages, &payload(2)).unwrap();
    assert_eq!(
        l.deliver().unwrap().unwrap_err(),
        Error::ApiMisuse(vmotion_proto::ApiMisuse::StreamFailed { stream })
    );
}

#[test]
fn frame_from_another_migration_with_the_same_key_is_rejected() {
    let (mut s_a, mut r_a) = pair();
    let other = run_handshake(
        SenderConfig {
            migration_id: MigrationId([0x43; 16]),
            ..sender_config()
        },
        ReceiverConfig::default(),
        |_| Some(key(1)),
        |_, _| {},
    );
    let (mut s_b, mut r_b) = other.established();
    let mut a = Link::open(&mut s_a, &mut r_a, 1);
    let mut b = Link::open(&mut s_b, &mut r_b, 1);
    b.send(FrameType::Pages, &payload(9)).unwrap();
    // Same stream, same sequence, same epoch, same key material: only the migration id
    // (and so the derived keys) differ.
    let mut spliced = b.in_flight.pop_front().unwrap();
    assert_eq!(
        peer(a.receiver.opener.open(&mut spliced).unwrap_err()),
        PeerMisbehaved::AuthenticationFailed {
            stream: 1,
            epoch: 0,
            sequence: 1
        }
    );
    assert_stream_dead(&mut a, 1);
}

#[test]
fn dropped_final_frame_is_detected() {
    // The end-of-stream frame itself is dropped: the stream is truncated.
    let mut l = link();
    l.send(FrameType::Pages, &payload(1)).unwrap();
    let eos = l.sender.sealer.seal_end_of_stream().unwrap();
    drop(eos);
    l.deliver().unwrap().unwrap();
    assert_eq!(
        peer(l.receiver.opener.finish().unwrap_err()),
        PeerMisbehaved::Truncated {
            stream: 1,
            frames: 1
        }
    );
    // The last data frame is dropped and the end-of-stream arrives: a gap.
    let mut l = link();
    l.send(FrameType::Pages, &payload(1)).unwrap();
    l.send(FrameType::Pages, &payload(2)).unwrap();
    let eos = l.sender.sealer.seal_end_of_stream().unwrap();
    l.in_flight.pop_back();
    l.in_flight.push_back(eos);
    l.deliver().unwrap().unwrap();
    assert_eq!(
        peer(l.deliver().unwrap().unwrap_err()),
        PeerMisbehaved::FrameOutOfOrder {
            stream: 1,
            expected: 2,
            found: 3
        }
    );
}

#[test]
fn nothing_is_accepted_after_end_of_stream() {
    let mut l = link();
    let eos = l.sender.sealer.seal_end_of_stream().unwrap();
    l.in_flight.push_back(eos);
    l.deliver().unwrap().unwrap();
    assert!(matches!(
        l.sender.sealer.seal(FrameType::Pages, vec![1]),
        Err(Error::ApiMisuse(_))
    ));
    let mut late =
        vmotion_proto::testing::checksum_frame(1, 1, 2, FrameType::Pages, vec![]).unwrap();
    assert_eq!(
        peer(l.receiver.opener.open(&mut late).unwrap_err()),
        PeerMisbehaved::FrameAfterEnd { stream: 1 }
    );
}

#[test]
fn wrong_key_is_rejected_on_the_data_path() {
    // Two migrations with the same id and transcript inputs but different keys.
    let mut good = link();
    let (mut s, mut r) = {
        let out = run_handshake(
            SenderConfig {
                key: Some(key(5)),
                ..sender_config()
            },
            ReceiverConfig::default(),
            |_| Some(key(5)),
            |_, _| {},
        );
        out.established()
    };
    let mut wrong = Link::open(&mut s, &mut r, 1);
    wrong.send(FrameType::Pages, &payload(1)).unwrap();
    let mut f = wrong.in_flight.pop_front().unwrap();
    assert_eq!(
        peer(good.receiver.opener.open(&mut f).unwrap_err()),
        PeerMisbehaved::AuthenticationFailed {
            stream: 1,
            epoch: 0,
            sequence: 1
        }
    );
    assert_stream_dead(&mut good, 1);
}

#[test]
fn control_channel_is_sealed_in_both_directions() {
    let (mut s, mut r) = pair();
    let mut sc = s.take_control().unwrap();
    let mut rc = r.take_control().unwrap();
    let mut f = sc.sealer.seal(FrameType::Commit, vec![]).unwrap();
    assert_eq!(
        rc.opener.open(&mut f).unwrap().sequence,
        2,
        "after Hello and KeyConfirm"
    );
    let mut f = rc.sealer.seal(FrameType::Ready, vec![0; 16]).unwrap();
    sc.opener.open(&mut f).unwrap();
    // A frame sealed for one direction does not open in the other.
    let mut f = sc.sealer.seal(FrameType::Abort, vec![0, 1, 0, 0]).unwrap();
    assert!(matches!(
        peer(sc.opener.open(&mut f).unwrap_err()),
        PeerMisbehaved::ReplayedFrame { .. } | PeerMisbehaved::AuthenticationFailed { .. }
    ));
}

/// With budgets of 3 frames / 1000 bytes, 500 frames of mixed sizes cross well over a
/// hundred epochs, every one opened intact, on both ends of the same rule.
#[test]
fn key_update_crosses_many_epochs() {
    let limits = EpochLimits::new(3, 1000).unwrap();
    let (mut s, mut r) = encrypted_pair(limits);
    assert_eq!(s.negotiated().limits, limits);
    let mut l = Link::open(&mut s, &mut r, 1);
    let mut last_epoch = 0;
    let mut switches = 0;
    for i in 0..500u32 {
        let len = [10usize, 400, 999, 1, 1500][i as usize % 5];
        let body: Vec<u8> = (0..len).map(|j| (j as u32 ^ i) as u8).collect();
        l.send(FrameType::Pages, &body).unwrap();
        let (h, p) = l.deliver().unwrap().unwrap();
        assert_eq!(p, body, "frame {i}");
        assert!(
            h.epoch == last_epoch || h.epoch == last_epoch + 1,
            "epochs move one at a time"
        );
        switches += u32::from(h.epoch != last_epoch);
        last_epoch = h.epoch;
    }
    assert!(switches >= 150, "only {switches} key updates");
    assert_eq!(l.sender.sealer.epoch(), l.receiver.opener.epoch());
    // A frame claiming the previous epoch after the switch is rejected before decryption.
    l.send(FrameType::Pages, &[1; 10]).unwrap();
    let mut f = l.in_flight.pop_front().unwrap();
    let epoch = u32::from_be_bytes(f.header[8..12].try_into().unwrap());
    f.header[8..12].copy_from_slice(&(epoch - 1).to_be_bytes());
    assert!(matches!(
        peer(l.receiver.opener.open(&mut f).unwrap_err()),
        PeerMisbehaved::StaleEpoch { stream: 1, .. }
    ));
}

/// With the default (64 GiB) budgets a session still updates its key early: epoch 0 ends
/// after 1024 to 2047 frames, picked from the transcript, the same on both ends.
#[test]
fn first_key_update_comes_early_with_default_budgets() {
    let mut l = link();
    let mut switched_at = None;
    for i in 0..2100u32 {
        l.send(FrameType::Pages, &i.to_be_bytes()).unwrap();
        let (h, p) = l.deliver().unwrap().unwrap();
        assert_eq!(p, i.to_be_bytes());
        if h.epoch == 1 && switched_at.is_none() {
            switched_at = Some(i);
        }
        assert!(h.epoch <= 1, "later epochs use the 2^24-frame budget");
    }
    let at = switched_at.expect("a key update within 2048 frames");
    assert!((1024..2048).contains(&at), "switched after {at} frames");
}

/// No secret reaches `Debug` output: the derived traffic keys, IVs and the migration key
/// appear neither as hex nor as the byte lists `{:?}` prints for arrays.
#[test]
fn debug_output_holds_no_key_material() {
    let (mut s, mut r) = pair();
    let th = *s.transcript_hash();
    let control = s.take_control().unwrap();
    let (bind, data) = s.open_data_stream(1).unwrap();
    let rx = r.accept_data_stream(bind).unwrap();
    let printed = format!(
        "{s:?} {r:?} {control:?} {data:?} {rx:?} {:?} {:?}",
        sender_config(),
        key(1)
    );
    let mut secrets = vec![key(1).key.expose_secret().to_vec()];
    for dir in [
        vmotion_proto::Direction::SenderToReceiver,
        vmotion_proto::Direction::ReceiverToSender,
    ] {
        for stream in [0, 1] {
            let (k, iv) = vmotion_proto::testing::traffic_key_iv(
                &key(1),
                vmotion_proto::testing::TEST_ID,
                &th,
                dir,
                stream,
                0,
            );
            secrets.push(k.to_vec());
            secrets.push(iv.to_vec());
        }
    }
    for secret in secrets {
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let list = format!("{:?}", &secret[..4]);
        let list = &list[1..list.len() - 1]; // "a, b, c, d"
        assert!(!printed.contains(&hex), "hex of a secret in {printed}");
        assert!(!printed.contains(list), "bytes of a secret in {printed}");
    }
    assert!(printed.contains("redacted"));
}
