//! The `frame_decoder` target: every decoder a receiver runs on bytes before any key is
//! involved, on arbitrary input, with the invariants that tie them together.
//!
//! Input: `max_payload: u32 (big-endian) ‖ byte stream`. The stream goes through
//! [`FrameSplitter`] frame by frame; its first 24 bytes also through [`Header::decode`].
//! Each frame's payload goes through [`Message::decode`] for the header's frame type and,
//! when it decodes, back through [`Message::encode`] (which must reproduce it byte for
//! byte: every decoder is strict, so the encoding is canonical) and `decode` again. A
//! `Pages` payload's [`PagesView`] is iterated in full and checked against the raw bytes.
//! The frame also goes through [`ReceiverSession::peek_stream_bind`].

use vmotion_proto::frame::{FrameSplitter, FrameType, HEADER_LEN, Header, MAX_PAYLOAD};
use vmotion_proto::message::pages::{
    MAX_PAGE_SHIFT, MIN_PAGE_SHIFT, PAGES_TRAILER_LEN, PagesView, ZERO_PAGE_FLAG,
};
use vmotion_proto::message::{
    MAX_ABORT_MESSAGE, MAX_DEVICE_STATE, MAX_STREAMS, MAX_VM_NAME, Message,
};
use vmotion_proto::{ReceiverSession, WireFrame};

/// What one input exercised (the seed generator checks its seeds with it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Frames split off the stream.
    pub frames: usize,
    /// Payloads that decoded as the message of their frame type.
    pub messages: usize,
    /// Entries of `Pages` payloads iterated.
    pub pages: usize,
}

/// Runs one input.
pub fn run(data: &[u8]) -> Report {
    let mut report = Report::default();
    let Some((max, stream)) = data.split_first_chunk::<4>() else {
        return report;
    };
    let max_payload = u32::from_be_bytes(*max);
    if let Some(header) = stream.first_chunk::<HEADER_LEN>() {
        check_header(header, max_payload);
    }
    let splitter = FrameSplitter::new(max_payload);
    let mut rest = stream;
    loop {
        let split = splitter.split(rest);
        let header = rest.first_chunk::<HEADER_LEN>();
        match split {
            Ok(Some((frame, used))) => {
                let h = Header::decode(&frame.header, max_payload)
                    .expect("the splitter returned a frame whose header does not decode");
                assert_eq!(
                    used,
                    h.frame_len(),
                    "consumed length is not the frame length"
                );
                assert_eq!(
                    frame.to_bytes(),
                    rest[..used],
                    "frame is not the consumed prefix"
                );
                assert_eq!(frame.payload.len(), h.payload_len as usize);
                assert!(h.payload_len <= max_payload.min(MAX_PAYLOAD));
                report.frames += 1;
                check_frame(&frame, h.frame_type, &mut report);
                rest = &rest[used..];
            }
            Ok(None) => {
                // Only a short buffer may ask for more: a whole header must decode and
                // announce more bytes than there are.
                if let Some(header) = header {
                    let h = Header::decode(header, max_payload)
                        .expect("the splitter asked for more bytes after an invalid header");
                    assert!(rest.len() < h.frame_len(), "a complete frame was not split");
                }
                break;
            }
            Err(e) => {
                let header = header.expect("the splitter failed without a whole header");
                assert_eq!(
                    Header::decode(header, max_payload).err(),
                    Some(e),
                    "splitter and header decoder disagree"
                );
                break;
            }
        }
    }
    report
}

/// `Header::decode` accepts only canonical headers, within the length bound.
fn check_header(bytes: &[u8; HEADER_LEN], max_payload: u32) {
    if let Ok(h) = Header::decode(bytes, max_payload) {
        assert_eq!(
            &h.encode(),
            bytes,
            "a decoded header does not re-encode to its bytes"
        );
        assert!(h.payload_len <= max_payload.min(MAX_PAYLOAD));
    }
}

/// The payload decoders on one frame.
fn check_frame(frame: &WireFrame, frame_type: FrameType, report: &mut Report) {
    let peeked = ReceiverSession::peek_stream_bind(frame);
    match check_payload(frame_type, &frame.payload, report) {
        Some(Message::StreamBind(bind)) => {
            assert_eq!(peeked, Ok(bind), "peek_stream_bind disagrees with decode");
        }
        _ => assert!(
            peeked.is_err(),
            "peek_stream_bind accepted what decode does not"
        ),
    }
}

/// Decodes a payload as `frame_type`; if it decodes, checks the message's promises and
/// the encode/decode round trip. Also used by the `handshake` target on opened frames.
pub fn check_payload<'a>(
    frame_type: FrameType,
    payload: &'a [u8],
    report: &mut Report,
) -> Option<Message<'a>> {
    let message = Message::decode(frame_type, payload).ok()?;
    report.messages += 1;
    assert_eq!(message.frame_type(), frame_type);
    check_message(&message, payload, report);

    let encoded = message
        .encode()
        .expect("a decoded message must be encodable");
    assert_eq!(
        encoded, payload,
        "{frame_type:?}: decode then encode does not reproduce the payload"
    );
    assert_eq!(
        Message::decode(frame_type, &encoded).as_ref(),
        Ok(&message),
        "{frame_type:?}: the re-encoded payload decodes differently"
    );
    Some(message)
}

/// Each message's validation promises.
fn check_message(message: &Message<'_>, payload: &[u8], report: &mut Report) {
    match message {
        Message::Hello(h) => {
            assert!(*h.versions.start() >= 1 && h.versions.start() <= h.versions.end());
            assert!(h.page_size.is_power_of_two());
            assert!(h.streams <= MAX_STREAMS);
            assert!((1..=MAX_VM_NAME).contains(&h.vm_name.len()));
        }
        Message::StreamBind(b) => assert_ne!(b.stream, 0),
        Message::Pages(view) => report.pages += check_pages(view, payload),
        Message::DeviceState(d) => {
            assert!(d.total_len <= MAX_DEVICE_STATE);
            assert!(d.offset + d.data.len() as u64 <= d.total_len);
            assert_eq!(d.data.len() + 16, payload.len());
        }
        Message::Complete(c) => assert!(c.streams.len() <= usize::from(MAX_STREAMS)),
        Message::Abort(a) => assert!(a.message.len() <= MAX_ABORT_MESSAGE),
        Message::TunnelData(d) => assert_eq!(*d, payload),
        Message::Commit(_) => assert_eq!(payload.len(), 1),
        Message::TunnelShutdown | Message::Claimed => {
            assert!(payload.is_empty())
        }
        Message::HelloAck(_)
        | Message::KeyConfirm(_)
        | Message::IterationMarker(_)
        | Message::EndOfStream(_)
        | Message::Ready(_) => {}
    }
}

/// Iterates a `Pages` view in full and checks every entry against the raw payload:
/// `data (d × page_size) ‖ entries (n × u64) ‖ n:u32 ‖ shift:u8 ‖ 0 0 0`.
fn check_pages(view: &PagesView<'_>, payload: &[u8]) -> usize {
    let page_size = view.page_size();
    assert!(page_size.is_power_of_two());
    assert!((1 << MIN_PAGE_SHIFT..=1 << MAX_PAGE_SHIFT).contains(&page_size));
    let data_len = view.data_pages() * page_size;
    assert_eq!(
        data_len + 8 * view.len() + PAGES_TRAILER_LEN,
        payload.len(),
        "data pages, entries and trailer do not add up to the payload"
    );
    assert_eq!(view.is_empty(), view.iter().next().is_none());
    let entries = &payload[data_len..payload.len() - PAGES_TRAILER_LEN];
    let (mut n, mut data_pages) = (0, 0);
    for (entry, raw) in view.iter().zip(entries.chunks_exact(8)) {
        let raw = u64::from_be_bytes(raw.try_into().expect("chunks of 8"));
        assert_eq!(entry.index, raw & !ZERO_PAGE_FLAG);
        assert_eq!(entry.index & ZERO_PAGE_FLAG, 0);
        match entry.data {
            Some(page) => {
                assert_eq!(raw & ZERO_PAGE_FLAG, 0, "a zero-flagged entry has data");
                let at = data_pages * page_size;
                assert_eq!(page, &payload[at..at + page_size], "page data out of order");
                data_pages += 1;
            }
            None => assert_ne!(raw & ZERO_PAGE_FLAG, 0, "a data entry has no data"),
        }
        n += 1;
    }
    assert_eq!(view.iter().count(), view.len(), "iter() and len() disagree");
    assert_eq!(n, view.len());
    assert_eq!(data_pages, view.data_pages());
    n
}
