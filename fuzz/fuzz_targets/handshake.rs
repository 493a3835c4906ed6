//! Fuzz target `handshake`: a real receiver or sender handshake state machine against
//! the fuzzer playing the other end, then the established session's control channel and
//! data streams.
//!
//! Input: a script (`vmotion_fuzz::script`): one byte choosing the end under attack and
//! its configuration, then frames (built with valid checksums unless the script says
//! otherwise, so the fuzzer gets past the XXH3 trailer). The checks are in
//! `vmotion_fuzz::handshake`; run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run handshake corpus/handshake seeds/handshake`
//! (see docs/fuzzing.md).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmotion_fuzz::handshake::run(data);
});
