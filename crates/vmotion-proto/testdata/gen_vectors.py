#!/usr/bin/env python3
"""Independent implementation of vmotion's key schedule, record sealing and handshake.

Written from docs/protocol.md only (Python's hmac/hashlib, the `cryptography`
package's AESGCM and the `xxhash` package's XXH3-128), never from the Rust code's
output. Needs `pip install cryptography xxhash`. Regenerate with

    python3 crates/vmotion-proto/testdata/gen_vectors.py

and commit the three output files. The Rust tests check the crate against them.
"""
import hashlib
import hmac
import os
import random
import struct

import xxhash
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HERE = os.path.dirname(os.path.abspath(__file__))
INFO_PREFIX = b"vmotion/1"


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def info(label: str, mig_id: bytes, th: bytes, direction: int, stream: int, epoch: int) -> bytes:
    lb = label.encode()
    return (INFO_PREFIX + bytes([len(lb)]) + lb + mig_id + th + bytes([direction])
            + struct.pack(">HI", stream, epoch))


def derive(key, nonce, mig_id, th, label, direction, stream, epoch, length):
    return hkdf_expand(hkdf_extract(nonce, key), info(label, mig_id, th, direction, stream, epoch), length)


def header(version, frame_type, stream, epoch, payload_len, seq):
    return b"VM" + struct.pack(">BBHHIIQ", version, frame_type, stream, 0, epoch, payload_len, seq)


def main():
    rng = random.Random(20261126)
    rb = lambda n: bytes(rng.getrandbits(8) for _ in range(n))

    lines = ["# key nonce migration_id transcript_hash label direction stream epoch length output"]
    # Coordinates as the protocol uses them: traffic keys and IVs on any direction, stream
    # and epoch (including the last epoch), confirm keys on stream 0 epoch 0 in both
    # directions, bind keys sender-to-receiver at epoch 0 on data streams.
    slots = [
        ("key", 32, 1, 0, 0), ("iv", 12, 1, 0, 0), ("key", 32, 2, 1, 1), ("iv", 12, 2, 1, 1),
        ("key", 32, 1, 7, 3), ("iv", 12, 1, 65535, 4294967295), ("key", 32, 2, 300, 4294967295),
        ("confirm", 32, 1, 0, 0), ("confirm", 32, 2, 0, 0),
        ("bind", 32, 1, 1, 0), ("bind", 32, 1, 2, 0), ("bind", 32, 1, 256, 0),
    ]
    for label, length, direction, stream, epoch in slots:
        key, nonce, mig_id, th = rb(32), rb(8), rb(16), rb(32)
        out = derive(key, nonce, mig_id, th, label, direction, stream, epoch, length)
        lines.append(" ".join([key.hex(), nonce.hex(), mig_id.hex(), th.hex(), label,
                               str(direction), str(stream), str(epoch), str(length), out.hex()]))
    with open(os.path.join(HERE, "keyschedule.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")

    lines = ["# key nonce migration_id transcript_hash direction stream epoch sequence frame_type "
             "payload | header ciphertext tag"]
    for i in range(8):
        key, nonce, mig_id, th = rb(32), rb(8), rb(16), rb(32)
        direction = 1 + (i % 2)
        stream = [0, 1, 2, 300][i % 4]
        epoch = [0, 0, 5, 17][i % 4]
        seq = [0, 1, 2**32 + 5, 2**63 - 3][(i // 2) % 4]
        frame_type = [5, 7, 9, 13][i % 4]
        payload = rb([0, 1, 100, 4096 + 17][i % 4])
        k = derive(key, nonce, mig_id, th, "key", direction, stream, epoch, 32)
        iv = derive(key, nonce, mig_id, th, "iv", direction, stream, epoch, 12)
        # nonce = IV XOR (4 zero bytes || big-endian 64-bit sequence)
        n = bytes(a ^ b for a, b in zip(iv, b"\0\0\0\0" + struct.pack(">Q", seq)))
        hdr = header(1, frame_type, stream, epoch, len(payload), seq)
        sealed = AESGCM(k).encrypt(n, payload, hdr)
        ct, tag = sealed[:-16], sealed[-16:]
        lines.append(" ".join([key.hex(), nonce.hex(), mig_id.hex(), th.hex(), str(direction),
                               str(stream), str(epoch), str(seq), str(frame_type),
                               payload.hex() or "-", "|", hdr.hex(), ct.hex() or "-", tag.hex()]))
    with open(os.path.join(HERE, "frames.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")

    with open(os.path.join(HERE, "handshake.txt"), "w") as f:
        f.write("\n".join(handshake(rb)) + "\n")


def checksum_frame(version, frame_type, stream, seq, payload):
    hdr = header(version, frame_type, stream, 0, len(payload), seq)
    return hdr, payload, xxhash.xxh3_128(hdr + payload).digest()


def handshake(rb):
    """One encrypted handshake and the first stream bind, byte for byte."""
    key, nonce, mig_id = rb(32), rb(8), rb(16)
    s_random, r_random = rb(32), rb(32)
    vm = b"vm-vector"
    page_size, guest_pages, streams = 4096, 262144, 2
    max_frames, max_bytes = 1 << 20, 1 << 30
    # Hello: versions 1..1, policy opportunistic (2), authority encrypts (1), ciphers
    # {AES-256-GCM} = bit 0.
    hello = (struct.pack(">BBBBB3x", 1, 1, 2, 1, 1) + mig_id + s_random
             + struct.pack(">IH2xQQQ", page_size, streams, guest_pages, max_frames, max_bytes)
             + struct.pack(">H", len(vm)) + vm)
    hello_f = checksum_frame(1, 1, 0, 0, hello)
    # HelloAck: version 1, decision encrypted (1, 0, refusal 0), cipher 1, can encrypt,
    # does not require, max payload 2 MiB, budgets = the sender's (below the defaults).
    ack = (struct.pack(">BBBBHBBI4xQQ", 1, 1, 0, 1, 0, 1, 0, 2 * 1024 * 1024, max_frames, max_bytes)
           + r_random)
    ack_f = checksum_frame(1, 2, 0, 0, ack)
    th = hashlib.sha256(hello_f[0] + hello_f[1] + ack_f[0] + ack_f[1]).digest()
    confirm = lambda d: hmac.new(derive(key, nonce, mig_id, th, "confirm", d, 0, 0, 32), th,
                                 hashlib.sha256).digest()
    r_kc = checksum_frame(1, 3, 0, 1, confirm(2))
    s_kc = checksum_frame(1, 3, 0, 1, confirm(1))
    bind_key = derive(key, nonce, mig_id, th, "bind", 1, 1, 0, 32)
    bind_mac = hmac.new(bind_key, mig_id + struct.pack(">H", 1), hashlib.sha256).digest()
    bind = checksum_frame(1, 4, 1, 0, mig_id + struct.pack(">H2x", 1) + bind_mac)
    first_epoch_frames = 1024 + struct.unpack(">H", th[:2])[0] % 1024
    whole = lambda f: (f[0] + f[1] + f[2]).hex()
    return [
        "# inputs",
        f"key {key.hex()}", f"nonce {nonce.hex()}", f"migration_id {mig_id.hex()}",
        f"sender_random {s_random.hex()}", f"receiver_random {r_random.hex()}",
        f"vm_name {vm.decode()}", f"page_size {page_size}", f"guest_pages {guest_pages}",
        f"streams {streams}", f"max_frames {max_frames}", f"max_bytes {max_bytes}",
        "# outputs: whole frames (header, payload, trailer)",
        f"hello {whole(hello_f)}", f"hello_ack {whole(ack_f)}", f"transcript_hash {th.hex()}",
        f"receiver_key_confirm {whole(r_kc)}", f"sender_key_confirm {whole(s_kc)}",
        f"stream_bind_1 {whole(bind)}", f"first_epoch_frames {first_epoch_frames}",
    ]


if __name__ == "__main__":
    main()
