//! Property tests of the frame codec: every frame type round-trips, and any byte string
//! fed to any decoder yields a value or an error — never a panic, never an allocation
//! beyond the bounded payload.

use proptest::prelude::*;
use vmotion_proto::message::pages::{MAX_PAGE_SHIFT, MIN_PAGE_SHIFT, PAGES_TRAILER_LEN};
use vmotion_proto::message::{
    Abort, CipherSet, Commit, Complete, DeviceStateChunk, EndOfStream, Hello, HelloAck,
    IterationMarker, KeyConfirm, MAX_STREAMS, MarkerKind, Message, MigrationKind, PagesBuilder,
    PagesView, Ready, StreamBind, StreamTotals,
};
use vmotion_proto::{
    AbortCode, CipherSuite, Decision, DestinationCapability, EncryptionPolicy, EpochLimits,
    FrameSplitter, FrameType, Header, MAX_PAYLOAD, MigrationId, PlaintextReason, Refusal,
};

fn limits() -> impl Strategy<Value = EpochLimits> {
    (1u64.., 1u64..).prop_map(|(f, b)| EpochLimits::new(f, b).unwrap())
}

fn policy() -> impl Strategy<Value = EncryptionPolicy> {
    prop_oneof![
        Just(EncryptionPolicy::Disabled),
        Just(EncryptionPolicy::Opportunistic),
        Just(EncryptionPolicy::Required)
    ]
}

fn authority() -> impl Strategy<Value = DestinationCapability> {
    prop_oneof![
        Just(DestinationCapability::Encrypts),
        Just(DestinationCapability::DoesNotEncrypt),
        Just(DestinationCapability::Unregistered)
    ]
}

fn decision() -> impl Strategy<Value = Decision> {
    prop_oneof![
        Just(Decision::Encrypted),
        prop_oneof![
            Just(PlaintextReason::PolicyDisabled),
            Just(PlaintextReason::DestinationCannotEncrypt),
            Just(PlaintextReason::DestinationUnregistered)
        ]
        .prop_map(Decision::Plaintext),
        prop_oneof![
            Just(Refusal::PolicyRequiresEncryption),
            Just(Refusal::ReceiverRequiresEncryption),
            Just(Refusal::DowngradeDetected),
            Just(Refusal::NoCommonVersion),
            Just(Refusal::NoCommonCipher),
            Just(Refusal::PageSizeUnsupported),
            Just(Refusal::TooManyStreams)
        ]
        .prop_map(Decision::Refused),
    ]
}

fn abort_code() -> impl Strategy<Value = AbortCode> {
    (1u16..=25).prop_map(|v| AbortCode::from_u16(v).unwrap())
}

/// Owned versions of every message, so proptest can generate them.
#[derive(Debug, Clone)]
enum Owned {
    Hello(Hello),
    HelloAck(HelloAck),
    KeyConfirm(KeyConfirm),
    StreamBind(StreamBind),
    Pages(u8, Vec<(u64, Option<u8>)>),
    IterationMarker(IterationMarker),
    DeviceState(u64, u64, Vec<u8>),
    EndOfStream(EndOfStream),
    Complete(Complete),
    Ready(Ready),
    Commit(Commit),
    Abort(Abort),
    TunnelData(Vec<u8>),
    TunnelShutdown,
    Claimed,
}

fn owned() -> impl Strategy<Value = Owned> {
    let hello = (
        1u8..=255,
        0u8..=254,
        policy(),
        authority(),
        any::<u8>(),
        any::<[u8; 16]>(),
        12u32..=20,
        0..=MAX_STREAMS,
        any::<u64>(),
        limits(),
        "[a-z0-9.-]{1,64}",
        (any::<[u8; 32]>(), any::<bool>(), 0u8..3),
    )
        .prop_map(
            |(
                min,
                extra,
                policy,
                authority,
                c,
                id,
                shift,
                streams,
                gp,
                limits,
                name,
                (random, tunnel, device),
            )| {
                Owned::Hello(Hello {
                    versions: min..=min.saturating_add(extra),
                    policy,
                    authority,
                    ciphers: CipherSet(c),
                    migration_id: MigrationId(id),
                    random,
                    page_size: 1 << shift,
                    streams,
                    // A tunnel carries no guest memory: its size must be 0.
                    guest_pages: if tunnel { 0 } else { gp },
                    limits,
                    vm_name: name,
                    kind: if tunnel {
                        MigrationKind::Tunnel
                    } else {
                        MigrationKind::Memory
                    },
                    device: vmotion_proto::DeviceModel::from_u8(device).expect("0..3"),
                })
            },
        );
    let ack = (
        any::<u8>(),
        decision(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<u32>(),
        limits(),
        any::<[u8; 32]>(),
    )
        .prop_map(
            |(version, decision, c, can, req, max_payload, limits, random)| {
                Owned::HelloAck(HelloAck {
                    version,
                    decision,
                    cipher: c.then_some(CipherSuite::Aes256Gcm),
                    can_encrypt: can,
                    requires_encryption: req,
                    max_payload,
                    limits,
                    random,
                })
            },
        );
    prop_oneof![
        hello,
        ack,
        any::<[u8; 32]>().prop_map(|mac| Owned::KeyConfirm(KeyConfirm { mac })),
        (any::<[u8; 16]>(), 1u16.., any::<[u8; 32]>()).prop_map(|(id, stream, mac)| {
            Owned::StreamBind(StreamBind {
                migration_id: MigrationId(id),
                stream,
                mac,
            })
        }),
        (
            MIN_PAGE_SHIFT..=13,
            proptest::collection::vec((0u64..(1 << 63), proptest::option::of(any::<u8>())), 0..6)
        )
            .prop_map(|(s, p)| Owned::Pages(s, p)),
        (any::<u32>(), any::<bool>(), any::<u64>()).prop_map(|(iteration, end, pages)| {
            Owned::IterationMarker(IterationMarker {
                iteration,
                kind: if end {
                    MarkerKind::End
                } else {
                    MarkerKind::Start
                },
                pages,
            })
        }),
        (
            0u64..1000,
            proptest::collection::vec(any::<u8>(), 0..300),
            0u64..1000
        )
            .prop_map(|(offset, data, slack)| {
                let total = offset + data.len() as u64 + slack;
                Owned::DeviceState(offset, total, data)
            }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(frames, bytes)| Owned::EndOfStream(EndOfStream { frames, bytes })),
        (
            any::<u32>(),
            any::<u64>(),
            0..=vmotion_proto::message::MAX_DEVICE_STATE,
            proptest::collection::vec((any::<u64>(), any::<u64>()), 0..8)
        )
            .prop_map(|(iterations, pages, dsl, s)| Owned::Complete(Complete {
                iterations,
                pages,
                device_state_len: dsl,
                streams: s
                    .into_iter()
                    .map(|(frames, bytes)| StreamTotals { frames, bytes })
                    .collect(),
            })),
        (any::<u64>(), any::<u64>()).prop_map(|(pages, device_state_len)| Owned::Ready(Ready {
            pages,
            device_state_len
        })),
        any::<bool>().prop_map(|claim_at_arbiter| Owned::Commit(Commit { claim_at_arbiter })),
        (abort_code(), "\\PC{0,200}")
            .prop_map(|(code, message)| Owned::Abort(Abort { code, message })),
        proptest::collection::vec(any::<u8>(), 0..500).prop_map(Owned::TunnelData),
        Just(Owned::TunnelShutdown),
        Just(Owned::Claimed),
    ]
}

/// Builds a `Pages` payload: `Some(b)` is a page filled with `b` (b = 0 sent as data),
/// `None` a zero page.
fn pages_payload(shift: u8, pages: &[(u64, Option<u8>)]) -> Vec<u8> {
    let ps = 1usize << shift;
    let mut b = PagesBuilder::new(ps, (pages.len() + 1) * (ps + 8) + PAGES_TRAILER_LEN);
    for (i, fill) in pages {
        assert!(match fill {
            Some(f) => b.push_data(*i, &vec![*f; ps]),
            None => b.push_zero(*i),
        });
    }
    b.finish().to_vec()
}

fn encode(m: &Owned) -> (FrameType, Vec<u8>) {
    match m {
        Owned::Hello(h) => (FrameType::Hello, h.encode().unwrap()),
        Owned::HelloAck(a) => (FrameType::HelloAck, a.encode()),
        Owned::KeyConfirm(k) => (FrameType::KeyConfirm, k.encode()),
        Owned::StreamBind(b) => (FrameType::StreamBind, b.encode()),
        Owned::Pages(s, p) => (FrameType::Pages, pages_payload(*s, p)),
        Owned::IterationMarker(i) => (FrameType::IterationMarker, i.encode()),
        Owned::DeviceState(offset, total_len, data) => (
            FrameType::DeviceState,
            DeviceStateChunk {
                offset: *offset,
                total_len: *total_len,
                data,
            }
            .encode(),
        ),
        Owned::EndOfStream(e) => (FrameType::EndOfStream, e.encode()),
        Owned::Complete(c) => (FrameType::Complete, c.encode().unwrap()),
        Owned::Ready(r) => (FrameType::Ready, r.encode()),
        Owned::Commit(c) => (FrameType::Commit, c.encode()),
        Owned::Abort(a) => (FrameType::Abort, a.encode()),
        Owned::TunnelData(d) => (FrameType::TunnelData, d.clone()),
        Owned::TunnelShutdown => (FrameType::TunnelShutdown, vec![]),
        Owned::Claimed => (FrameType::Claimed, vec![]),
    }
}

/// Checks that what was decoded equals what was encoded, field by field.
fn check_decoded(m: &Owned, d: &Message<'_>) -> Result<(), TestCaseError> {
    match (m, d) {
        (Owned::Hello(a), Message::Hello(b)) => prop_assert_eq!(a, b),
        (Owned::HelloAck(a), Message::HelloAck(b)) => prop_assert_eq!(a, b),
        (Owned::KeyConfirm(a), Message::KeyConfirm(b)) => prop_assert_eq!(a, b),
        (Owned::StreamBind(a), Message::StreamBind(b)) => prop_assert_eq!(a, b),
        (Owned::Pages(shift, pages), Message::Pages(view)) => {
            prop_assert_eq!(view.page_size(), 1usize << shift);
            prop_assert_eq!(view.len(), pages.len());
            for (e, (index, fill)) in view.iter().zip(pages) {
                prop_assert_eq!(e.index, *index);
                match (e.data, fill) {
                    (None, None) => {}
                    (Some(d), Some(f)) => prop_assert!(d.iter().all(|b| b == f)),
                    _ => prop_assert!(false, "zero flag lost"),
                }
            }
        }
        (Owned::IterationMarker(a), Message::IterationMarker(b)) => prop_assert_eq!(a, b),
        (Owned::DeviceState(o, t, data), Message::DeviceState(c)) => {
            prop_assert_eq!((*o, *t, data.as_slice()), (c.offset, c.total_len, c.data));
        }
        (Owned::EndOfStream(a), Message::EndOfStream(b)) => prop_assert_eq!(a, b),
        (Owned::Complete(a), Message::Complete(b)) => prop_assert_eq!(a, b),
        (Owned::Ready(a), Message::Ready(b)) => prop_assert_eq!(a, b),
        (Owned::Commit(a), Message::Commit(b)) => prop_assert_eq!(a, b),
        (Owned::TunnelShutdown, Message::TunnelShutdown) | (Owned::Claimed, Message::Claimed) => {}
        (Owned::Abort(a), Message::Abort(b)) => prop_assert_eq!(a, b),
        (Owned::TunnelData(a), Message::TunnelData(b)) => prop_assert_eq!(a.as_slice(), *b),
        (m, d) => prop_assert!(false, "decoded {d:?} from {m:?}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Every frame type round-trips through encode → decode, and through the generic
    /// `Message` encode as well.
    #[test]
    fn every_message_round_trips(m in owned()) {
        let (t, payload) = encode(&m);
        let decoded = Message::decode(t, &payload).unwrap();
        prop_assert_eq!(decoded.frame_type(), t);
        check_decoded(&m, &decoded)?;
        prop_assert_eq!(decoded.encode().unwrap(), payload);
    }

    /// Any byte string, as any frame type's payload: a value or an error, never a panic.
    /// A decoded Pages view never claims more than the payload holds.
    #[test]
    fn decoders_never_panic(t in 1u8..=14, payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let t = FrameType::from_u8(t).unwrap();
        if let Ok(Message::Pages(view)) = Message::decode(t, &payload) {
            prop_assert_eq!(
                view.data_pages() * view.page_size() + view.len() * 8 + PAGES_TRAILER_LEN,
                payload.len()
            );
            prop_assert_eq!(view.iter().filter(|e| e.data.is_some()).count(), view.data_pages());
        }
    }

    /// Mutating one byte of a valid payload also never panics.
    #[test]
    fn mutated_payloads_never_panic(m in owned(), at in any::<usize>(), v in any::<u8>()) {
        let (t, mut payload) = encode(&m);
        if !payload.is_empty() {
            let i = at % payload.len();
            payload[i] = v;
        }
        let _ = Message::decode(t, &payload);
    }

    /// Truncating a valid payload is always an error for fixed-size and length-checked
    /// messages (never a silently shorter value).
    #[test]
    fn truncated_payloads_are_rejected(m in owned(), cut in 1usize..64) {
        let (t, payload) = encode(&m);
        if matches!(t, FrameType::TunnelData | FrameType::DeviceState) || payload.is_empty() {
            return Ok(()); // opaque or open-ended by design; their bounds are tested elsewhere
        }
        let short = &payload[..payload.len().saturating_sub(cut)];
        prop_assert!(Message::decode(t, short).is_err());
    }

    /// A byte stream cut into frames: every split frame's payload is within the maximum,
    /// and the splitter never reads past what it was given.
    #[test]
    fn splitter_handles_any_stream(bytes in proptest::collection::vec(any::<u8>(), 0..4096), max in 0u32..=MAX_PAYLOAD) {
        let s = FrameSplitter::new(max);
        let mut rest = bytes.as_slice();
        while let Ok(Some((f, used))) = s.split(rest) {
            prop_assert!(f.payload.len() <= max as usize);
            let whole = f.to_bytes();
            prop_assert_eq!(whole.as_slice(), &rest[..used]);
            rest = &rest[used..];
        }
    }
}

#[test]
fn pages_layout_keeps_page_data_aligned_and_first() {
    let mut b = PagesBuilder::new(4096, 256 * 1024);
    let page = |v: u8| vec![v; 4096];
    assert!(b.push(10, &page(1)));
    assert!(b.push(11, &page(0)));
    assert!(b.push(12, &page(2)));
    let payload = b.finish();
    // The payload buffer is page-aligned and page data starts at offset 0.
    assert_eq!(payload.as_ptr() as usize % 4096, 0);
    assert_eq!(payload.len(), 2 * 4096 + 3 * 8 + PAGES_TRAILER_LEN);
    assert!(payload[..4096].iter().all(|b| *b == 1));
    assert!(payload[4096..8192].iter().all(|b| *b == 2));
    let view = PagesView::decode(payload).unwrap();
    let got: Vec<_> = view
        .iter()
        .map(|e| (e.index, e.data.map(|d| d[0])))
        .collect();
    assert_eq!(got, [(10, Some(1)), (11, None), (12, Some(2))]);
    // Data pages in the view point at aligned offsets of the payload.
    for e in view.iter().filter_map(|e| e.data) {
        assert_eq!(e.as_ptr() as usize % 4096, 0);
    }
}

#[test]
fn pages_builder_stops_at_the_maximum() {
    let max = 4 * 4096 + 4 * 8 + PAGES_TRAILER_LEN;
    let mut b = PagesBuilder::new(4096, max);
    for i in 0..4 {
        assert!(b.push(i, &[1; 4096]));
    }
    assert!(!b.push(4, &[1; 4096]), "a fifth data page does not fit");
    assert!(!b.push_zero(4), "nor does a fifth entry");
    assert_eq!(b.finish().len(), max);
    // After finish the builder starts a new batch.
    assert!(b.push(9, &[3; 4096]));
    let p = b.finish().to_vec();
    let v = PagesView::decode(&p).unwrap();
    assert_eq!(v.iter().map(|e| e.index).collect::<Vec<_>>(), [9]);
}

#[test]
fn pages_decoder_rejects_inconsistent_payloads() {
    let mut b = PagesBuilder::new(4096, 64 * 1024);
    b.push(1, &[7; 4096]);
    let good = b.finish().to_vec();
    // Entry count larger than the payload.
    let mut p = good.clone();
    let n = p.len() - 8;
    p[n..n + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(PagesView::decode(&p).is_err());
    // Page shift out of range, below and above.
    for shift in [MIN_PAGE_SHIFT - 1, MAX_PAGE_SHIFT + 1] {
        let mut p = good.clone();
        let n = p.len() - 4;
        p[n] = shift;
        assert!(PagesView::decode(&p).is_err(), "shift {shift}");
    }
    // Zero flag set on a page that has data: the data length no longer matches.
    let mut p = good.clone();
    let e = p.len() - 16;
    p[e] |= 0x80;
    assert!(PagesView::decode(&p).is_err());
    // One byte of page data missing.
    assert!(PagesView::decode(&good[1..]).is_err());
}

#[test]
fn header_rejects_every_oversized_length_before_allocation() {
    let h = Header {
        version: 1,
        frame_type: FrameType::Pages,
        stream: 1,
        epoch: 0,
        payload_len: u32::MAX,
        sequence: 0,
    };
    // Only the 24 header bytes exist: the decision is made from them alone.
    assert!(Header::decode(&h.encode(), MAX_PAYLOAD).is_err());
    assert!(FrameSplitter::new(MAX_PAYLOAD).split(&h.encode()).is_err());
}

#[test]
fn encoders_refuse_what_does_not_fit() {
    let mut hello = Hello {
        versions: 1..=1,
        policy: EncryptionPolicy::Required,
        authority: DestinationCapability::Encrypts,
        ciphers: CipherSet::SUPPORTED,
        migration_id: MigrationId([0; 16]),
        random: [0; 32],
        page_size: 4096,
        streams: 1,
        guest_pages: 1,
        limits: EpochLimits::default(),
        vm_name: "x".repeat(256),
        kind: MigrationKind::Memory,
        device: Default::default(),
    };
    assert!(hello.encode().is_err());
    hello.vm_name = String::new();
    assert!(hello.encode().is_err());
    let c = Complete {
        iterations: 0,
        pages: 0,
        device_state_len: 0,
        streams: vec![
            StreamTotals {
                frames: 0,
                bytes: 0
            };
            usize::from(MAX_STREAMS) + 1
        ],
    };
    assert!(c.encode().is_err());
    // An over-long abort message is shortened at a char boundary, not refused.
    let a = Abort {
        code: AbortCode::Cancelled,
        message: "é".repeat(1000),
    };
    let decoded = Abort::decode(&a.encode()).unwrap();
    assert!(decoded.message.len() <= 1024);
    assert!(a.message.starts_with(&decoded.message));
}

#[test]
fn device_state_lengths_beyond_the_maximum_are_rejected() {
    use vmotion_proto::message::MAX_DEVICE_STATE;
    let chunk = DeviceStateChunk {
        offset: 0,
        total_len: MAX_DEVICE_STATE + 1,
        data: &[1, 2, 3],
    };
    assert!(DeviceStateChunk::decode(&chunk.encode()).is_err());
    let complete = Complete {
        iterations: 1,
        pages: 1,
        device_state_len: MAX_DEVICE_STATE,
        streams: vec![],
    };
    let mut payload = complete.encode().unwrap();
    assert!(
        Complete::decode(&payload).is_ok(),
        "the maximum itself is fine"
    );
    payload[16..24].copy_from_slice(&(MAX_DEVICE_STATE + 1).to_be_bytes());
    assert!(Complete::decode(&payload).is_err());
    assert!(
        Complete {
            device_state_len: MAX_DEVICE_STATE + 1,
            ..complete
        }
        .encode()
        .is_err()
    );
}

#[test]
fn hello_kind_byte_is_checked() {
    let hello = Hello {
        versions: 1..=1,
        policy: EncryptionPolicy::Required,
        authority: DestinationCapability::Encrypts,
        ciphers: CipherSet::SUPPORTED,
        migration_id: MigrationId([0; 16]),
        random: [0; 32],
        page_size: 4096,
        streams: 3,
        guest_pages: 0,
        limits: EpochLimits::default(),
        vm_name: "qemu-vm".into(),
        kind: MigrationKind::Tunnel,
        device: Default::default(),
    };
    let bytes = hello.encode().unwrap();
    assert_eq!(bytes[5], 1, "byte 5 carries the kind");
    assert_eq!(Hello::decode(&bytes).unwrap(), hello);
    // An unknown kind, and a tunnel that claims guest memory, are malformed.
    let mut unknown = bytes.clone();
    unknown[5] = 2;
    assert!(Hello::decode(&unknown).is_err());
    let mut sized = bytes.clone();
    sized[64..72].copy_from_slice(&1u64.to_be_bytes());
    assert!(Hello::decode(&sized).is_err());
    // Byte 6 carries the device model (known values only); byte 7 stays reserved.
    let mut device = bytes.clone();
    device[6] = 2;
    assert_eq!(
        Hello::decode(&device).unwrap().device,
        vmotion_proto::DeviceModel::MicroVm
    );
    device[6] = 3;
    assert!(Hello::decode(&device).is_err());
    let mut reserved = bytes;
    reserved[7] = 1;
    assert!(Hello::decode(&reserved).is_err());
}
