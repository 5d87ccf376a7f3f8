//! Thin async helpers that move frames over QUIC streams.

use quinn::{RecvStream, SendStream};

use super::codec::{decode_payload, encode_frame, payload_len, FrameError, HEADER_LEN};
use super::messages::Message;

/// What can go wrong moving a frame over a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the other side finished the stream in the middle of a frame")]
    Truncated,
}

/// Writes one frame.
pub async fn write_message(send: &mut SendStream, msg: &Message) -> Result<(), StreamError> {
    let frame = encode_frame(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Writes one frame followed by `data`, handing both to QUIC without copying
/// (a small file and its header usually leave in one packet).
pub async fn write_message_and(
    send: &mut SendStream,
    msg: &Message,
    data: bytes::Bytes,
) -> Result<(), StreamError> {
    let frame = encode_frame(msg)?;
    send.write_all_chunks(&mut [frame.into(), data]).await?;
    Ok(())
}

/// Reads one frame. `Ok(None)` means the other side finished the stream cleanly
/// between frames.
pub async fn read_message(recv: &mut RecvStream) -> Result<Option<Message>, StreamError> {
    let mut header = [0u8; HEADER_LEN];
    // Read the first byte separately so that a clean end of stream is not an error.
    match recv.read(&mut header[..1]).await {
        Ok(None) => return Ok(None),
        Ok(Some(0)) => return Err(StreamError::Truncated),
        Ok(Some(_)) => {}
        Err(quinn::ReadError::ConnectionLost(e)) => return Err(StreamError::Connection(e)),
        Err(e) => return Err(StreamError::Read(quinn::ReadExactError::ReadError(e))),
    }
    read_exact(recv, &mut header[1..]).await?;
    let len = payload_len(header)?;
    let mut payload = vec![0u8; len];
    read_exact(recv, &mut payload).await?;
    Ok(Some(decode_payload(&payload)?))
}

async fn read_exact(recv: &mut RecvStream, buf: &mut [u8]) -> Result<(), StreamError> {
    match recv.read_exact(buf).await {
        Ok(()) => Ok(()),
        Err(quinn::ReadExactError::FinishedEarly(_)) => Err(StreamError::Truncated),
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e))) => {
            Err(StreamError::Connection(e))
        }
        Err(e) => Err(StreamError::Read(e)),
    }
}
