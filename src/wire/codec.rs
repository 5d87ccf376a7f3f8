//! Length-prefixed frames over byte buffers. No I/O here: see [`super::io`].
//!
//! A frame is a 4-byte big-endian payload length followed by the postcard encoding
//! of one [`Message`]. The length is checked against [`MAX_FRAME`] before anything
//! is allocated for the payload.

use super::messages::Message;

/// The largest payload a frame may carry (1 MiB). Long lists are chunked well below it.
pub const MAX_FRAME: usize = 1 << 20;

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{extra} unexpected bytes after the message in a frame")]
    TrailingBytes { extra: usize },
}

/// The result of looking at a buffer that may hold a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole frame: the message and how many bytes of the buffer it used.
    Frame(Message, usize),
    /// Not enough bytes yet: at least this many more are needed.
    Incomplete { needed: usize },
}

/// Encodes `msg` as one frame.
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER_LEN];
    out = postcard::to_extend(msg, out).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    check_len(len)?;
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Reads the payload length from a frame header, refusing lengths over [`MAX_FRAME`].
pub fn payload_len(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    check_len(len)?;
    Ok(len)
}

fn check_len(len: usize) -> Result<usize, FrameError> {
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(len)
}

/// Decodes one message from exactly one frame's payload.
pub fn decode_payload(payload: &[u8]) -> Result<Message, FrameError> {
    check_len(payload.len())?;
    let (msg, rest) = postcard::take_from_bytes::<Message>(payload)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes { extra: rest.len() });
    }
    Ok(msg)
}

/// Decodes the first frame in `buf`, if it is complete.
pub fn decode_frame(buf: &[u8]) -> Result<Decoded, FrameError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(Decoded::Incomplete {
            needed: HEADER_LEN - buf.len(),
        });
    };
    let len = payload_len(*header)?;
    let total = HEADER_LEN + len;
    if buf.len() < total {
        return Ok(Decoded::Incomplete {
            needed: total - buf.len(),
        });
    }
    let msg = decode_payload(&buf[HEADER_LEN..total])?;
    Ok(Decoded::Frame(msg, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ContentHash;
    use crate::wire::messages::{FileEntry, Timestamp};

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let buf = [0xff, 0xff, 0xff, 0xff, 0];
        assert_eq!(
            decode_frame(&buf),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: MAX_FRAME
            })
        );
    }

    #[test]
    fn incomplete_and_invalid_are_different() {
        let frame = encode_frame(&Message::ListRequest).unwrap();
        assert_eq!(
            decode_frame(&frame[..2]),
            Ok(Decoded::Incomplete { needed: 2 })
        );
        assert_eq!(
            decode_frame(&frame),
            Ok(Decoded::Frame(Message::ListRequest, frame.len()))
        );
        // An unknown variant index is malformed, not incomplete.
        assert!(matches!(
            decode_frame(&[0, 0, 0, 1, 0x7f]),
            Err(FrameError::Malformed(_))
        ));
        // A frame with bytes after the message is refused.
        assert_eq!(
            decode_frame(&[0, 0, 0, 2, 2, 0]),
            Err(FrameError::TrailingBytes { extra: 1 })
        );
    }

    #[test]
    fn encoding_too_large_a_message_fails_cleanly() {
        let entry = FileEntry {
            path: "x".repeat(4000),
            size: 1,
            modified: Timestamp { secs: 0, nanos: 0 },
            hash: ContentHash([0; 32]),
        };
        let msg = Message::LocalEntries(vec![entry; 300]);
        assert!(matches!(
            encode_frame(&msg),
            Err(FrameError::TooLarge { .. })
        ));
    }
}
