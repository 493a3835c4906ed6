//! Fuzz target `frame_decoder`: arbitrary bytes through every key-less decoder a receiver
//! runs — `Header::decode`, `FrameSplitter::split` in a loop, `Message::decode` on each
//! frame (with the encode/decode round trip and a full `PagesView` iteration) and
//! `ReceiverSession::peek_stream_bind`.
//!
//! Input: `max_payload: u32 (big-endian) ‖ byte stream`. The checks are in
//! `vmotion_fuzz::frames`; run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run frame_decoder` (see docs/fuzzing.md).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmotion_fuzz::frames::run(data);
});
