//! [`Prefixed`]: a stream that first replays bytes already read from it.
//!
//! Detection consumes the client's first bytes; wrapping the stream in `Prefixed` hands them
//! to whoever reads next (rustls, or later the embedded SSH server) as if never read.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream whose reads return `prefix` first, then the inner stream's bytes.
#[derive(Debug)]
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
    /// Everything read so far, while recording (a ClientHello that may be passed through).
    record: Option<Vec<u8>>,
}

/// The most a recording keeps; past it, the recording is dropped (nothing can be replayed).
const RECORD_MAX: usize = 64 * 1024;

impl<S> Prefixed<S> {
    /// Replays `prefix` before reading from `inner`.
    pub(crate) fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
            record: None,
        }
    }

    /// As `new`, also keeping a copy of every byte read (at most 64 KiB), so that what a
    /// reader consumed can be replayed to someone else ([`Prefixed::replay`]).
    pub(crate) fn recording(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            record: Some(Vec::new()),
            ..Prefixed::new(prefix, inner)
        }
    }

    /// Stops recording (its memory is freed).
    pub(crate) fn stop_recording(&mut self) {
        self.record = None;
    }

    /// A stream that replays every byte read so far, then the rest; `Err(self)` when the
    /// recording is not complete (not recording, or past 64 KiB).
    pub(crate) fn replay(mut self) -> Result<Self, Self> {
        let Some(mut record) = self.record.take() else {
            return Err(self);
        };
        record.extend_from_slice(&self.prefix[self.pos..]);
        Ok(Prefixed::new(record, self.inner))
    }
}

/// Adds `bytes` to a recording, or drops it when it would pass [`RECORD_MAX`].
fn keep(record: &mut Option<Vec<u8>>, bytes: &[u8]) {
    if let Some(r) = record {
        if r.len() + bytes.len() > RECORD_MAX {
            *record = None;
        } else {
            r.extend_from_slice(bytes);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            keep(&mut this.record, &this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                // Free the prefix; a long-lived connection should not keep it.
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if this.record.is_none() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            keep(&mut this.record, &buf.filled()[before..]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Byte counts shared between a [`Counted`] stream and whoever logs them.
#[derive(Debug, Default, Clone)]
pub(crate) struct Counts(
    std::sync::Arc<(std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64)>,
);

impl Counts {
    /// (read from the stream, written to it) so far.
    pub(crate) fn get(&self) -> crate::relay::Bytes {
        use std::sync::atomic::Ordering::Relaxed;
        crate::relay::Bytes {
            up: self.0 .0.load(Relaxed),
            down: self.0 .1.load(Relaxed),
        }
    }
}

/// A stream that counts the bytes read from it (`up`) and written to it (`down`).
#[derive(Debug)]
pub(crate) struct Counted<S> {
    inner: S,
    counts: Counts,
    /// Also counted in the relayed-bytes metrics (the outer connection), or not (a channel
    /// inside one, already counted there).
    metric: bool,
}

impl<S> Counted<S> {
    /// Wraps `inner`; the returned [`Counts`] reads the totals.
    pub(crate) fn new(inner: S) -> (Self, Counts) {
        let counts = Counts::default();
        (
            Counted {
                inner,
                counts: counts.clone(),
                metric: true,
            },
            counts,
        )
    }

    /// Wraps `inner`, adding to `counts` and not to the metrics.
    pub(crate) fn quiet(inner: S, counts: Counts) -> Self {
        Counted {
            inner,
            counts,
            metric: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.counts
            .0
             .0
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if self.metric {
            crate::metrics::get().relayed(true, n);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.counts
                .0
                 .1
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            if self.metric {
                crate::metrics::get().relayed(false, n as u64);
            }
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream that fails every read and write once its token is cancelled: a way to end a
/// session that runs in a task we do not own (russh's), even before its protocol can say goodbye.
pub(crate) struct Killable<S> {
    inner: S,
    killed: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl<S> Killable<S> {
    /// Wraps `inner`; cancelling `token` kills it.
    pub(crate) fn new(inner: S, token: tokio_util::sync::CancellationToken) -> Self {
        Killable {
            inner,
            killed: Box::pin(token.cancelled_owned()),
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.killed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed by sluice",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Killable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Killable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn replays_prefix_then_inner() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut p = Prefixed::new(b"SSH-2.0-".to_vec(), a);
        b.write_all(b"x\r\n").await.unwrap();
        drop(b);
        let mut out = Vec::new();
        let mut small = [0u8; 3];
        // Small reads split the prefix; nothing is lost or repeated.
        let n = p.read(&mut small).await.unwrap();
        out.extend_from_slice(&small[..n]);
        p.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"SSH-2.0-x\r\n");
    }

    #[tokio::test]
    async fn a_recording_replays_what_was_read_then_the_rest() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut p = Prefixed::recording(b"\x16\x03\x01".to_vec(), a);
        b.write_all(b"hello, rest").await.unwrap();
        drop(b);
        let mut head = [0u8; 2];
        p.read_exact(&mut head).await.unwrap();
        let mut more = [0u8; 6];
        p.read_exact(&mut more).await.unwrap();
        // Read: the prefix's 3 bytes and 5 of the inner stream's; replayed: all, then the rest.
        let mut again = p.replay().map_err(|_| ()).unwrap();
        let mut out = Vec::new();
        again.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"\x16\x03\x01hello, rest");
        // Past the bound, nothing can be replayed.
        let (a, mut b) = tokio::io::duplex(1 << 17);
        let mut p = Prefixed::recording(Vec::new(), a);
        b.write_all(&vec![0u8; RECORD_MAX + 1]).await.unwrap();
        let mut sink = vec![0u8; RECORD_MAX + 1];
        p.read_exact(&mut sink).await.unwrap();
        assert!(p.replay().is_err());
    }

    #[tokio::test]
    async fn killable_ends_a_pending_read() {
        let (a, _b) = tokio::io::duplex(64);
        let token = tokio_util::sync::CancellationToken::new();
        let mut k = Killable::new(a, token.clone());
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            k.read(&mut buf).await
        });
        tokio::task::yield_now().await;
        token.cancel();
        let r = reader.await.unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
    }
}
