#!/usr/bin/env python3
"""Independent implementation of vmotion's key schedule and record sealing.

Written from docs/protocol.md only (Python's hmac/hashlib and the `cryptography`
package's AESGCM), never from the Rust code's output. Regenerate with

    python3 crates/vmotion-proto/testdata/gen_vectors.py

and commit both output files. The Rust tests check the crate against them.
"""
import hashlib
import hmac
import os
import random
import struct

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
    for i in range(12):
        key, nonce, mig_id, th = rb(32), rb(8), rb(16), rb(32)
        label, length = [("key", 32), ("iv", 12), ("confirm", 32), ("bind", 32)][i % 4]
        direction = 1 + (i % 2)
        stream = [0, 1, 7, 65535][i % 4]
        epoch = [0, 1, 3, 4294967295][(i // 4) % 4]
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


if __name__ == "__main__":
    main()
