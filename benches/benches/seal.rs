//! Seal and open throughput of the record layer against raw `ring` AES-256-GCM at the same
//! frame sizes, in the same run. The goal (DESIGN.md §7): the record layer reaches at
//! least 0.9 of raw `ring` at 64 KiB and above.
//!
//! Run: `cargo bench -p vmotion-benches --bench seal`, then
//! `python3 benches/ratios.py` prints the ratios from criterion's estimates.
//!
//! Both sides work on the same page-aligned buffers; "open" times only the opening of
//! frames sealed beforehand (sequence numbers are strict, so each frame opens once).

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ring::aead;
use vmotion_proto::testing::{Link, encrypted_pair};
use vmotion_proto::{AlignedBuf, EpochLimits, FrameType, HEADER_LEN, TRAILER_LEN};

const SIZES: [usize; 3] = [4 << 10, 64 << 10, 256 << 10];
/// Frames sealed ahead per timed batch of opens (bounds memory at 64 MiB for 256 KiB).
const BATCH: u64 = 256;

fn ring_key() -> aead::LessSafeKey {
    aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &[7; 32]).unwrap())
}

fn nonce(i: u64) -> aead::Nonce {
    let mut n = [9u8; 12];
    n[4..].copy_from_slice(&i.to_be_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

fn buffer(size: usize) -> AlignedBuf {
    let mut b = AlignedBuf::page_aligned(size);
    for (i, x) in b.resize(size).iter_mut().enumerate() {
        *x = (i * 31 % 251) as u8;
    }
    b
}

fn seal(c: &mut Criterion) {
    let mut g = c.benchmark_group("seal");
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let key = ring_key();
        let mut buf = buffer(size);
        let header = [0u8; HEADER_LEN];
        let mut i = 0u64;
        g.bench_with_input(BenchmarkId::new("ring", size), &size, |b, _| {
            b.iter(|| {
                i += 1;
                key.seal_in_place_separate_tag(
                    nonce(i),
                    aead::Aad::from(&header),
                    buf.as_mut_slice(),
                )
                .unwrap()
            })
        });
        let (mut s, mut r) = encrypted_pair(EpochLimits::default());
        let mut link = Link::open(&mut s, &mut r, 1);
        let mut buf = buffer(size);
        g.bench_with_input(BenchmarkId::new("vmotion", size), &size, |b, _| {
            b.iter(|| {
                link.sender
                    .sealer
                    .seal_in_place(FrameType::Pages, buf.as_mut_slice())
                    .unwrap()
            })
        });
    }
    g.finish();
}

/// Times `open` over `iters` frames, sealing them in untimed batches first.
fn timed_batches(iters: u64, mut batch: impl FnMut(u64) -> Duration) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(BATCH);
        total += batch(n);
        left -= n;
    }
    total
}

fn open(c: &mut Criterion) {
    let mut g = c.benchmark_group("open");
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let key = ring_key();
        let header = [0u8; HEADER_LEN];
        g.bench_with_input(BenchmarkId::new("ring", size), &size, |b, _| {
            b.iter_custom(|iters| {
                timed_batches(iters, |n| {
                    let mut frames: Vec<(AlignedBuf, aead::Tag)> = (0..n)
                        .map(|i| {
                            let mut buf = buffer(size);
                            let tag = key
                                .seal_in_place_separate_tag(
                                    nonce(i),
                                    aead::Aad::from(&header),
                                    buf.as_mut_slice(),
                                )
                                .unwrap();
                            (buf, tag)
                        })
                        .collect();
                    let start = Instant::now();
                    for (i, (buf, tag)) in frames.iter_mut().enumerate() {
                        key.open_in_place_separate_tag(
                            nonce(i as u64),
                            aead::Aad::from(&header),
                            *tag,
                            buf.as_mut_slice(),
                            0..,
                        )
                        .unwrap();
                    }
                    start.elapsed()
                })
            })
        });
        g.bench_with_input(BenchmarkId::new("vmotion", size), &size, |b, _| {
            b.iter_custom(|iters| {
                timed_batches(iters, |n| {
                    let (mut s, mut r) = encrypted_pair(EpochLimits::default());
                    let mut link = Link::open(&mut s, &mut r, 1);
                    let mut frames: Vec<([u8; HEADER_LEN], AlignedBuf, [u8; TRAILER_LEN])> = (0..n)
                        .map(|_| {
                            let mut buf = buffer(size);
                            let (h, t) = link
                                .sender
                                .sealer
                                .seal_in_place(FrameType::Pages, buf.as_mut_slice())
                                .unwrap();
                            (h, buf, t)
                        })
                        .collect();
                    let opener = &mut link.receiver.opener;
                    let start = Instant::now();
                    for (h, buf, t) in &mut frames {
                        opener.open_in_place(h, buf.as_mut_slice(), t).unwrap();
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
}

// criterion's macro generates an undocumented function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = seal, open
    }
}
criterion_main!(group::benches);
