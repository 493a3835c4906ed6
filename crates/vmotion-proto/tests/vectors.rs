//! The whole encrypted handshake against an independent implementation: the frames
//! Python computed from docs/protocol.md (`testdata/gen_vectors.py`, with `cryptography`
//! and `xxhash`) must be exactly the frames our state machines produce — Hello, HelloAck,
//! both key confirmations, the first stream bind, their XXH3-128 trailers — and the key
//! update must come after exactly the frame count the transcript hash gives.

use std::collections::HashMap;

use vmotion_proto::testing::Link;
use vmotion_proto::{
    DestinationCapability, EncryptionPolicy, EpochLimits, FrameType, KeyMaterial, MigrationId,
    MigrationKey, MigrationNonce, ReceiverConfig, ReceiverHandshake, ReceiverNext, SenderConfig,
    SenderHandshake, SenderNext,
};

fn vectors() -> HashMap<String, String> {
    include_str!("../testdata/handshake.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn material(v: &HashMap<String, String>) -> KeyMaterial {
    KeyMaterial {
        key: MigrationKey::from_slice(&hex::decode(&v["key"]).unwrap()).unwrap(),
        nonce: MigrationNonce(hex::decode(&v["nonce"]).unwrap().try_into().unwrap()),
    }
}

#[test]
fn handshake_matches_the_independent_implementation() {
    let v = vectors();
    let arr32 = |k: &str| -> [u8; 32] { hex::decode(&v[k]).unwrap().try_into().unwrap() };
    let num = |k: &str| -> u64 { v[k].parse().unwrap() };
    let config = SenderConfig {
        migration_id: MigrationId(hex::decode(&v["migration_id"]).unwrap().try_into().unwrap()),
        vm_name: v["vm_name"].clone(),
        policy: EncryptionPolicy::Opportunistic,
        destination: DestinationCapability::Encrypts,
        key: Some(material(&v)),
        versions: 1..=1,
        page_size: u32::try_from(num("page_size")).unwrap(),
        guest_pages: num("guest_pages"),
        streams: u16::try_from(num("streams")).unwrap(),
        kind: vmotion_proto::MigrationKind::Memory,
        device: Default::default(),
        limits: EpochLimits::new(num("max_frames"), num("max_bytes")).unwrap(),
        random: arr32("sender_random"),
    };
    let (expect_ack, hello) = SenderHandshake::start(config).unwrap();
    assert_eq!(hex::encode(hello.to_bytes()), v["hello"], "Hello");

    let received = ReceiverHandshake::start(ReceiverConfig::default(), arr32("receiver_random"))
        .handle(hello)
        .unwrap();
    let (next, frames) = received.accept(Some(material(&v))).unwrap();
    let [ack, receiver_kc]: [_; 2] = frames.try_into().unwrap();
    assert_eq!(hex::encode(ack.to_bytes()), v["hello_ack"], "HelloAck");
    assert_eq!(
        hex::encode(receiver_kc.to_bytes()),
        v["receiver_key_confirm"],
        "receiver KeyConfirm"
    );

    let SenderNext::ExpectKeyConfirm(state) = expect_ack.handle(ack).unwrap() else {
        panic!("encrypted")
    };
    let (mut sender, sender_kc) = state.handle(receiver_kc).unwrap();
    assert_eq!(hex::encode(sender.transcript_hash()), v["transcript_hash"]);
    assert_eq!(
        hex::encode(sender_kc.to_bytes()),
        v["sender_key_confirm"],
        "sender KeyConfirm"
    );

    let ReceiverNext::ExpectKeyConfirm(rstate) = next else {
        panic!("encrypted")
    };
    let mut receiver = rstate.handle(sender_kc).unwrap();
    let (bind, _) = sender.open_data_stream(1).unwrap();
    assert_eq!(
        hex::encode(bind.to_bytes()),
        v["stream_bind_1"],
        "StreamBind 1"
    );

    // The first key update comes after exactly first_epoch_frames frames.
    let mut l = Link::open(&mut sender, &mut receiver, 2);
    let first = num("first_epoch_frames");
    for i in 0..=first {
        l.send(FrameType::Pages, &[1]).unwrap();
        let (h, _) = l.deliver().unwrap().unwrap();
        assert_eq!(h.epoch, u32::from(i == first), "frame {i} of {first}");
    }
}
