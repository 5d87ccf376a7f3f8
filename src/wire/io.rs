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

/// Takes the end of `recv` if it has already arrived (it usually comes in the same
/// packet as the last bytes), without waiting for it. A stream dropped before its
/// end was read makes QUIC tell the other side to stop sending (a `STOP_SENDING`
/// frame, and work on both sides) although it had finished: once per file
/// transfer in each direction otherwise.
pub async fn take_end(recv: &mut RecvStream) {
    use std::future::Future;
    use std::task::Poll;
    let mut end = std::pin::pin!(recv.read_chunk(1, true));
    std::future::poll_fn(|cx| Poll::Ready(end.as_mut().poll(cx).is_ready())).await;
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
