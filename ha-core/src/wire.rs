//! The wire codec every transport shares: length-prefixed postcard frames (a
//! big-endian `u32` length, then that many bytes of a postcard-encoded message).
//!
//! Frames larger than the configured maximum (at most [`MAX_FRAME_BYTES`]) are
//! refused on both sides. Reads are bounded in size, memory and time:
//! - once the first byte of a frame arrived, the rest (prefix and body) must
//!   arrive within the frame timeout ([`read_frame`]); a stream may idle between
//!   frames, and a caller that must bound the wait for the first byte too (a
//!   request stream that carries one frame) wraps the read in a timeout;
//! - the announced length is taken from the connection's [`ReadBudget`] before
//!   anything is allocated, and the buffer then grows only as bytes arrive (by
//!   doubling, never past the announced length), so a peer that announces a
//!   large frame and sends part of it holds at most twice that part;
//! - the budget stays taken while the frame's request is handled (the caller
//!   keeps the [`Frame`]'s permit), so one connection pins at most its budget.
//!
//! [`split_frame`] is the sans-IO decoder for byte streams and fuzzing.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The largest frame body accepted or sent by default (16 MiB).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// The length prefix size.
pub const HEADER_BYTES: usize = 4;

/// The default read budget of one connection: two frames of the largest size.
pub const DEFAULT_READ_BUDGET: usize = 2 * MAX_FRAME_BYTES;

/// A frame body's buffer starts at this size (or the announced length, if
/// smaller) and doubles as bytes arrive, never past the announced length.
const GROW_STEP: usize = 64 * 1024;

/// `now + d`, saturating far in the future instead of overflowing (a timeout
/// configured near `Duration::MAX`).
fn deadline_after(d: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

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
    /// The frame did not arrive in time.
    #[error("frame not received within {0:?}")]
    Timeout(Duration),
    /// No frame began within the idle timeout.
    #[error("nothing received within the idle timeout of {0:?}")]
    Idle(Duration),
    /// The connection's read budget is closed (the connection is going away).
    #[error("the connection's read budget is closed")]
    BudgetClosed,
    /// An I/O error.
    #[error("i/o: {0}")]
    Io(String),
}

/// The bytes of frames one connection may hold at once (read but not yet
/// handled and answered). Clones share the budget.
#[derive(Clone, Debug)]
pub struct ReadBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl ReadBudget {
    /// A budget of `bytes`, raised to `max_frame` if smaller (a frame of the
    /// largest size must always fit).
    pub fn new(bytes: usize, max_frame: usize) -> Self {
        let total = bytes.max(max_frame).clamp(1, Semaphore::MAX_PERMITS);
        ReadBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// The whole budget.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes currently taken by frames not yet released.
    pub fn in_use(&self) -> usize {
        self.total - self.bytes.available_permits()
    }

    /// Waits for `len` bytes of the budget.
    async fn take(&self, len: usize) -> Result<BudgetPermit, FrameError> {
        if len == 0 {
            return Ok(BudgetPermit(None));
        }
        let n = u32::try_from(len).map_err(|_| FrameError::TooLarge {
            len,
            max: self.total,
        })?;
        if len > self.total {
            return Err(FrameError::TooLarge {
                len,
                max: self.total,
            });
        }
        self.bytes
            .clone()
            .acquire_many_owned(n)
            .await
            .map(|p| BudgetPermit(Some(p)))
            .map_err(|_| FrameError::BudgetClosed)
    }
}

/// A frame's share of its connection's [`ReadBudget`], returned on drop.
#[derive(Debug)]
pub struct BudgetPermit(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

/// One frame body read from a connection, holding its share of the budget.
#[derive(Debug)]
pub struct Frame {
    /// The body (without the prefix).
    pub body: Vec<u8>,
    /// The body's share of the connection's budget; keep it until the frame's
    /// request is answered.
    pub permit: BudgetPermit,
}

impl Frame {
    /// Decodes the body; the permit comes along.
    pub fn decode<T: DeserializeOwned>(self) -> Result<(T, BudgetPermit), FrameError> {
        decode(&self.body).map(|msg| (msg, self.permit))
    }
}

/// Encodes `msg` as one frame (prefix and body), refusing bodies over `max`.
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let buf = vec![0u8; HEADER_BYTES];
    let mut buf = postcard::to_extend(msg, buf).map_err(|e| FrameError::Encode(e.to_string()))?;
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

fn io(e: std::io::Error) -> FrameError {
    FrameError::Io(e.to_string())
}

/// Reads one frame. `Ok(None)` on a clean end of stream before a frame. Waits
/// for the first byte without a time limit; from then on the rest of the prefix
/// and the body must arrive within `frame_timeout` (waiting for the budget is
/// not counted: that wait is this node's backpressure, not the peer's delay).
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    frame_timeout: Duration,
    budget: &ReadBudget,
) -> Result<Option<Frame>, FrameError> {
    read_frame_or_idle(r, max, None, frame_timeout, budget).await
}

/// As [`read_frame`], but fails with [`FrameError::Idle`] if no frame begins
/// within `idle` (for connections that must see traffic, such as pings).
pub async fn read_frame_or_idle<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    idle: Option<Duration>,
    frame_timeout: Duration,
    budget: &ReadBudget,
) -> Result<Option<Frame>, FrameError> {
    let mut prefix = [0u8; HEADER_BYTES];
    let n = match idle {
        Some(idle) => tokio::time::timeout(idle, r.read(&mut prefix))
            .await
            .map_err(|_| FrameError::Idle(idle))?
            .map_err(io)?,
        None => r.read(&mut prefix).await.map_err(io)?,
    };
    if n == 0 {
        return Ok(None);
    }
    let deadline = deadline_after(frame_timeout);
    let rest_of_prefix = async {
        let mut got = n;
        while got < HEADER_BYTES {
            let n = r.read(&mut prefix[got..]).await.map_err(io)?;
            if n == 0 {
                return Err(FrameError::Truncated {
                    got,
                    want: HEADER_BYTES,
                });
            }
            got += n;
        }
        Ok(())
    };
    tokio::time::timeout_at(deadline, rest_of_prefix)
        .await
        .map_err(|_| FrameError::Timeout(frame_timeout))??;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let waited_from = tokio::time::Instant::now();
    let permit = budget.take(len).await?;
    let deadline = deadline
        .checked_add(waited_from.elapsed())
        .unwrap_or(deadline);
    let mut body = Vec::new();
    let read_body = async {
        while body.len() < len {
            if body.len() == body.capacity() {
                let grow = body.capacity().max(GROW_STEP).min(len - body.len());
                body.reserve_exact(grow);
            }
            let room = (body.capacity() - body.len()).min(len - body.len());
            let n = (&mut *r)
                .take(room as u64)
                .read_buf(&mut body)
                .await
                .map_err(io)?;
            if n == 0 {
                return Err(FrameError::Truncated {
                    got: body.len(),
                    want: len,
                });
            }
        }
        Ok(())
    };
    tokio::time::timeout_at(deadline, read_body)
        .await
        .map_err(|_| FrameError::Timeout(frame_timeout))??;
    Ok(Some(Frame { body, permit }))
}

/// Reads one frame and decodes it; a missing frame (end of stream) is
/// [`FrameError::Truncated`].
pub async fn read_message<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    frame_timeout: Duration,
    budget: &ReadBudget,
) -> Result<(T, BudgetPermit), FrameError> {
    match read_frame(r, max, frame_timeout, budget).await? {
        Some(frame) => frame.decode(),
        None => Err(FrameError::Truncated {
            got: 0,
            want: HEADER_BYTES,
        }),
    }
}

/// Writes an already encoded frame (see [`encode`]).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> Result<(), FrameError> {
    w.write_all(frame).await.map_err(io)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn budget() -> ReadBudget {
        ReadBudget::new(DEFAULT_READ_BUDGET, MAX_FRAME_BYTES)
    }

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
        let r = read_frame(
            &mut short,
            MAX_FRAME_BYTES,
            Duration::from_secs(1),
            &budget(),
        )
        .await;
        assert!(matches!(r, Err(FrameError::Truncated { .. })));
        let mut empty: &[u8] = &[];
        let r = read_frame(
            &mut empty,
            MAX_FRAME_BYTES,
            Duration::from_secs(1),
            &budget(),
        )
        .await;
        assert!(matches!(r, Ok(None)));
    }

    /// A peer that announces the largest frame and sends a few bytes of it
    /// holds a buffer of those bytes, not of the announced length, and the
    /// read gives up at the frame timeout.
    #[tokio::test(start_paused = true)]
    async fn a_half_sent_frame_holds_only_what_arrived_and_times_out() {
        let (mut tx, mut rx) = tokio::io::duplex(1024);
        let len = u32::try_from(MAX_FRAME_BYTES).unwrap();
        tx.write_all(&len.to_be_bytes()).await.unwrap();
        tx.write_all(&[7u8; 100]).await.unwrap();
        let b = budget();
        let read = read_frame(&mut rx, MAX_FRAME_BYTES, Duration::from_secs(2), &b);
        tokio::pin!(read);
        // The read waits for the rest; the announced length is taken from
        // the budget, but nothing near it is allocated.
        assert!(tokio::time::timeout(Duration::from_secs(1), &mut read)
            .await
            .is_err());
        assert_eq!(b.in_use(), MAX_FRAME_BYTES);
        let r = read.await;
        assert!(matches!(r, Err(FrameError::Timeout(_))), "{r:?}");
        assert_eq!(b.in_use(), 0, "the budget is returned");
        drop(tx);
    }

    /// The body buffer never grows past what has arrived by more than one step
    /// (or doubling), and never past the announced length.
    #[tokio::test]
    async fn the_buffer_grows_with_the_bytes_and_stops_at_the_length() {
        let payload = vec![3u8; 3 * GROW_STEP + 17];
        let frame = encode(&payload, MAX_FRAME_BYTES).unwrap();
        let mut r: &[u8] = &frame;
        let got = read_frame(&mut r, MAX_FRAME_BYTES, Duration::from_secs(1), &budget())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.body.capacity(), got.body.len());
        let back: Vec<u8> = decode(&got.body).unwrap();
        assert_eq!(back, payload);
    }

    /// A frame waits for budget held by frames not yet released, and gets it
    /// once they are.
    #[tokio::test(start_paused = true)]
    async fn frames_wait_for_the_connection_budget() {
        let b = ReadBudget::new(100, 80);
        let frame = encode(&vec![1u8; 70], 80).unwrap();
        let mut stream = frame.clone();
        stream.extend_from_slice(&frame);
        let mut r: &[u8] = &stream;
        let first = read_frame(&mut r, 80, Duration::from_secs(1), &b)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.in_use(), first.body.len());
        {
            let second = read_frame(&mut r, 80, Duration::from_secs(1), &b);
            tokio::pin!(second);
            assert!(
                tokio::time::timeout(Duration::from_secs(30), &mut second)
                    .await
                    .is_err(),
                "a second frame does not fit the budget while the first is held"
            );
            drop(first);
            let second = second.await.unwrap().unwrap();
            assert_eq!(b.in_use(), second.body.len());
        }
        assert_eq!(b.in_use(), 0);
    }

    /// Between frames a stream may idle as long as it likes; a started prefix
    /// must be finished within the frame timeout.
    #[tokio::test(start_paused = true)]
    async fn a_started_prefix_must_finish_in_time() {
        let (mut tx, mut rx) = tokio::io::duplex(64);
        tx.write_all(&[0u8, 0]).await.unwrap();
        let r = read_frame(&mut rx, MAX_FRAME_BYTES, Duration::from_secs(2), &budget()).await;
        assert!(matches!(r, Err(FrameError::Timeout(_))), "{r:?}");
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut rest: &[u8] = &bytes;
            loop {
                match split_frame(rest, 256) {
                    Ok(Some((body, used))) => {
                        let _ = decode::<crate::message::Envelope<crate::message::Request>>(body);
                        let _ = decode::<crate::message::Envelope<crate::message::Response>>(body);
                        proptest::prop_assert!(used > 0 && used <= rest.len());
                        rest = &rest[used..];
                    }
                    Ok(None) => break,
                    Err(FrameError::TooLarge { len, .. }) => {
                        proptest::prop_assert!(len > 256);
                        break;
                    }
                    Err(e) => proptest::prop_assert!(false, "unexpected {e}"),
                }
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

        /// The async reader and the sans-IO decoder agree on any byte stream.
        #[test]
        fn reader_agrees_with_split(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            let mut rest: &[u8] = &bytes;
            let mut stream: &[u8] = &bytes;
            let b = ReadBudget::new(256, 256);
            rt.block_on(async {
                loop {
                    let read = read_frame(&mut stream, 256, Duration::from_secs(1), &b).await;
                    match (split_frame(rest, 256), read) {
                        (Ok(Some((body, used))), Ok(Some(frame))) => {
                            assert_eq!(body, &frame.body[..]);
                            rest = &rest[used..];
                        }
                        (Ok(None), Ok(None)) => { assert!(rest.is_empty()); break; }
                        (Ok(None), Err(FrameError::Truncated { .. })) => { assert!(!rest.is_empty()); break; }
                        (Err(FrameError::TooLarge { .. }), Err(FrameError::TooLarge { .. })) => break,
                        (a, b) => panic!("split {a:?} vs read {b:?}"),
                    }
                }
            });
        }
    }
}
