//! Length-prefixed postcard frames: a big-endian `u32` length, then that many
//! bytes of a postcard-encoded message. Frames larger than [`MAX_FRAME_BYTES`]
//! are refused on both sides; reads are bounded in size and time.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame body accepted or sent (16 MiB).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// The length prefix size.
pub const HEADER_BYTES: usize = 4;

/// Why a frame could not be read, written or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix names more than the limit.
    #[error("frame of {len} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("truncated frame: stream ended after {got} of {want} bytes")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The frame body did not decode, or had trailing bytes.
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// Encoding failed.
    #[error("cannot encode frame: {0}")]
    Encode(String),
    /// The frame body did not arrive in time.
    #[error("frame body not received within {0:?}")]
    Timeout(Duration),
    /// An I/O error.
    #[error("i/o: {0}")]
    Io(String),
}

/// Encodes `msg` as one frame (prefix and body), refusing bodies over `max`.
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; HEADER_BYTES];
    let mut buf = postcard::to_extend(msg, std::mem::take(&mut buf))
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = buf.len() - HEADER_BYTES;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?;
    buf[..HEADER_BYTES].copy_from_slice(&prefix.to_be_bytes());
    Ok(buf)
}

/// Decodes a frame body into a message; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes(body) {
        Ok((msg, [])) => Ok(msg),
        Ok((_, rest)) => Err(FrameError::Decode(format!(
            "{} trailing bytes after the message",
            rest.len()
        ))),
        Err(e) => Err(FrameError::Decode(e.to_string())),
    }
}

/// Splits one complete frame off the front of `buf`: `Ok(Some((body, used)))`,
/// `Ok(None)` if more bytes are needed, or an error for an oversized prefix.
/// A sans-IO decoder for byte-stream transports and fuzzing.
pub fn split_frame(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(prefix) = buf.get(..HEADER_BYTES) else {
        return Ok(None);
    };
    let mut len_bytes = [0u8; HEADER_BYTES];
    len_bytes.copy_from_slice(prefix);
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let end = HEADER_BYTES + len;
    match buf.get(HEADER_BYTES..end) {
        Some(body) => Ok(Some((body, end))),
        None => Ok(None),
    }
}

/// Reads one frame body. `Ok(None)` on a clean end of stream before a frame;
/// once the prefix arrived, the body must arrive within `body_timeout`.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    body_timeout: Duration,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut prefix = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        let n = r
            .read(&mut prefix[got..])
            .await
            .map_err(|e| FrameError::Io(e.to_string()))?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(FrameError::Truncated {
                got,
                want: HEADER_BYTES,
            });
        }
        got += n;
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    let read_body = async {
        let mut got = 0;
        while got < len {
            let n = r
                .read(&mut body[got..])
                .await
                .map_err(|e| FrameError::Io(e.to_string()))?;
            if n == 0 {
                return Err(FrameError::Truncated { got, want: len });
            }
            got += n;
        }
        Ok(())
    };
    match tokio::time::timeout(body_timeout, read_body).await {
        Ok(Ok(())) => Ok(Some(body)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(FrameError::Timeout(body_timeout)),
    }
}

/// Reads one frame and decodes it; a missing frame (end of stream) is
/// [`FrameError::Truncated`].
pub async fn read_message<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    body_timeout: Duration,
) -> Result<T, FrameError> {
    match read_frame(r, max, body_timeout).await? {
        Some(body) => decode(&body),
        None => Err(FrameError::Truncated {
            got: 0,
            want: HEADER_BYTES,
        }),
    }
}

/// Writes an already encoded frame (see [`encode`]).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> Result<(), FrameError> {
    w.write_all(frame)
        .await
        .map_err(|e| FrameError::Io(e.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let msg = (7u64, String::from("hello"), vec![1u8, 2, 3]);
        let frame = encode(&msg, MAX_FRAME_BYTES).unwrap();
        let (body, used) = split_frame(&frame, MAX_FRAME_BYTES).unwrap().unwrap();
        assert_eq!(used, frame.len());
        let back: (u64, String, Vec<u8>) = decode(body).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn oversized_refused() {
        let msg = vec![0u8; 100];
        assert!(matches!(encode(&msg, 10), Err(FrameError::TooLarge { .. })));
        let mut frame = encode(&msg, MAX_FRAME_BYTES).unwrap();
        frame[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            split_frame(&frame, MAX_FRAME_BYTES),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn truncated_stream() {
        let frame = encode(&vec![5u8; 50], MAX_FRAME_BYTES).unwrap();
        let mut short = &frame[..20];
        let r = read_frame(&mut short, MAX_FRAME_BYTES, Duration::from_secs(1)).await;
        assert!(matches!(r, Err(FrameError::Truncated { .. })));
        let mut empty: &[u8] = &[];
        let r = read_frame(&mut empty, MAX_FRAME_BYTES, Duration::from_secs(1)).await;
        assert!(matches!(r, Ok(None)));
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let mut rest: &[u8] = &bytes;
            while let Ok(Some((body, used))) = split_frame(rest, 64) {
                let _ = decode::<ha_core::message::Envelope<ha_core::message::Request>>(body);
                let _ = decode::<ha_core::message::Envelope<ha_core::message::Response>>(body);
                rest = &rest[used..];
            }
        }

        #[test]
        fn split_inverts_encode(payloads in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..8)) {
            let mut stream = Vec::new();
            for p in &payloads {
                stream.extend(encode(p, MAX_FRAME_BYTES).unwrap());
            }
            let mut rest: &[u8] = &stream;
            let mut back = Vec::new();
            while let Some((body, used)) = split_frame(rest, MAX_FRAME_BYTES).unwrap() {
                back.push(decode::<Vec<u8>>(body).unwrap());
                rest = &rest[used..];
            }
            proptest::prop_assert!(rest.is_empty());
            proptest::prop_assert_eq!(back, payloads);
        }
    }
}
