//! Cross-implementation checks: what `ring` seals, RustCrypto's `aes-gcm` opens, and the
//! reverse — for the raw primitive and for whole vmotion frames — plus published
//! AES-256-GCM known-answer vectors through both.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use proptest::prelude::*;
use ring::aead;
use vmotion_proto::testing::{Link, TEST_ID, encrypted_pair, key, traffic_key_iv};
use vmotion_proto::{Direction, EpochLimits, FrameType, HEADER_LEN, Header, MAX_PAYLOAD};

fn ring_seal(key: &[u8; 32], nonce: [u8; 12], aad: &[u8], data: &mut [u8]) -> [u8; 16] {
    let k = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, key).unwrap());
    let tag = k
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(aad),
            data,
        )
        .unwrap();
    tag.as_ref().try_into().unwrap()
}

fn ring_open(key: &[u8; 32], nonce: [u8; 12], aad: &[u8], data: &mut [u8], tag: [u8; 16]) -> bool {
    let k = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, key).unwrap());
    k.open_in_place_separate_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::from(aad),
        aead::Tag::from(tag),
        data,
        0..,
    )
    .is_ok()
}

fn rc_seal(key: &[u8; 32], nonce: [u8; 12], aad: &[u8], data: &mut [u8]) -> [u8; 16] {
    let c = Aes256Gcm::new_from_slice(key).unwrap();
    c.encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, data)
        .unwrap()
        .into()
}

fn rc_open(key: &[u8; 32], nonce: [u8; 12], aad: &[u8], data: &mut [u8], tag: [u8; 16]) -> bool {
    let c = Aes256Gcm::new_from_slice(key).unwrap();
    c.decrypt_in_place_detached(Nonce::from_slice(&nonce), aad, data, &tag.into())
        .is_ok()
}

/// McGrew & Viega, "The Galois/Counter Mode of Operation", test cases 13-16 (the
/// AES-256 cases of the NIST GCM submission).
#[test]
fn aes_256_gcm_published_vectors() {
    let tc15_p = "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255";
    let k15 = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308";
    let cases: [(&str, &str, &str, String, &str, &str); 4] = [
        (
            "0".repeat(64).leak(),
            "000000000000000000000000",
            "",
            String::new(),
            "",
            "530f8afbc74536b9a963b4f1c4cb738b",
        ),
        (
            "0".repeat(64).leak(),
            "000000000000000000000000",
            "",
            "0".repeat(32),
            "cea7403d4d606b6e074ec5d3baf39d18",
            "d0d1c8a799996bf0265b98b5d48ab919",
        ),
        (
            k15,
            "cafebabefacedbaddecaf888",
            "",
            tc15_p.to_string(),
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
            "b094dac5d93471bdec1a502270e3cc6c",
        ),
        (
            k15,
            "cafebabefacedbaddecaf888",
            "feedfacedeadbeeffeedfacedeadbeefabaddad2",
            tc15_p[..120].to_string(),
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
            "76fc6ece0f4e1768cddf8853bb2d551b",
        ),
    ];
    for (i, (k, iv, aad, p, c, t)) in cases.iter().enumerate() {
        let k: [u8; 32] = hex::decode(k).unwrap().try_into().unwrap();
        let iv: [u8; 12] = hex::decode(iv).unwrap().try_into().unwrap();
        let aad = hex::decode(aad).unwrap();
        let p = hex::decode(p).unwrap();
        for (name, seal) in [
            ("ring", ring_seal as fn(&_, _, &_, &mut _) -> _),
            ("aes-gcm", rc_seal),
        ] {
            let mut buf = p.clone();
            let tag = seal(&k, iv, &aad, &mut buf);
            assert_eq!(hex::encode(&buf), *c, "{name} ciphertext, case {}", 13 + i);
            assert_eq!(hex::encode(tag), *t, "{name} tag, case {}", 13 + i);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Random keys, nonces, AAD and lengths: ring → aes-gcm and aes-gcm → ring.
    #[test]
    fn ring_and_aes_gcm_agree(
        key: [u8; 32], nonce: [u8; 12],
        aad in proptest::collection::vec(any::<u8>(), 0..64),
        data in proptest::collection::vec(any::<u8>(), 0..5000),
        flip in any::<prop::sample::Index>(),
    ) {
        let mut a = data.clone();
        let tag = ring_seal(&key, nonce, &aad, &mut a);
        let mut b = a.clone();
        prop_assert!(rc_open(&key, nonce, &aad, &mut b, tag));
        prop_assert_eq!(&b, &data);

        let mut c = data.clone();
        let tag2 = rc_seal(&key, nonce, &aad, &mut c);
        prop_assert_eq!(&c, &a, "same key and nonce: same ciphertext");
        prop_assert_eq!(tag2, tag);
        prop_assert!(ring_open(&key, nonce, &aad, &mut c, tag2));
        prop_assert_eq!(&c, &data);

        // And both reject the same altered tag.
        let mut bad = tag;
        bad[flip.index(16)] ^= 1;
        let mut d = a.clone();
        prop_assert!(!rc_open(&key, nonce, &aad, &mut d, bad));
        let mut e = a.clone();
        prop_assert!(!ring_open(&key, nonce, &aad, &mut e, bad));
    }
}

fn nonce(iv: [u8; 12], seq: u64) -> [u8; 12] {
    let mut n = iv;
    for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
        *b ^= s;
    }
    n
}

/// Whole vmotion frames across epochs: the record layer (ring) seals, aes-gcm opens with
/// the key and nonce the spec gives; aes-gcm seals frames the record layer then opens.
#[test]
fn vmotion_frames_cross_implementations() {
    let limits = EpochLimits::new(4, 1 << 20).unwrap();
    let (mut s, mut r) = encrypted_pair(limits);
    let th = *s.transcript_hash();
    let mut link = Link::open(&mut s, &mut r, 1);
    let material = key(1);
    for i in 0..20u64 {
        let body: Vec<u8> = (0..(i * 37 % 300)).map(|b| (b ^ i) as u8).collect();
        link.send(FrameType::Pages, &body).unwrap();
        let f = link.in_flight.pop_front().unwrap();
        let h = Header::decode(&f.header, MAX_PAYLOAD).unwrap();
        let (k, iv) = traffic_key_iv(
            &material,
            TEST_ID,
            &th,
            Direction::SenderToReceiver,
            1,
            h.epoch,
        );
        let mut ct = f.payload.clone();
        assert!(
            rc_open(&k, nonce(iv, h.sequence), &f.header, &mut ct, f.trailer),
            "frame {i}"
        );
        assert_eq!(ct, body);
        // Deliver the original so the receiver stays in step.
        link.in_flight.push_back(f);
        link.deliver().unwrap().unwrap();
    }
    assert_eq!(link.receiver.opener.epoch(), 4, "20 frames / 4 per epoch");

    // The other way: aes-gcm seals what the receiver's opener expects next.
    for _ in 0..8 {
        let seq = link.sender.sealer.next_sequence();
        // The epoch as the spec's rule gives it: 4 small frames per epoch, and the record
        // layer's sequence starts at 1 on a data stream (0 is the bind).
        let epoch = u32::try_from((seq - 1) / 4).unwrap();
        let body = vec![0x5a; 123];
        let header = Header {
            version: 1,
            frame_type: FrameType::Pages,
            stream: 1,
            epoch,
            payload_len: 123,
            sequence: seq,
        }
        .encode();
        assert_eq!(header.len(), HEADER_LEN);
        let (k, iv) = traffic_key_iv(
            &material,
            TEST_ID,
            &th,
            Direction::SenderToReceiver,
            1,
            epoch,
        );
        let mut ct = body.clone();
        let tag = rc_seal(&k, nonce(iv, seq), &header, &mut ct);
        let mut pt = ct.clone();
        link.receiver
            .opener
            .open_in_place(&header, &mut pt, &tag)
            .unwrap();
        assert_eq!(pt, body);
        // Keep the real sealer in step (its frame is discarded).
        link.sender.sealer.seal(FrameType::Pages, body).unwrap();
    }
}
