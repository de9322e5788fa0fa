//! The relay core: a two-way copy between the client and the upstream.
//!
//! Half-close is carried both ways (EOF on one side shuts down the other side's write half and
//! the opposite direction keeps flowing); a TLS peer that closes without close_notify counts as
//! EOF; an idle timeout and a shutdown token bound every relay. Buffers are 64 KiB, taken from
//! a small per-thread pool when data flows and given back whenever a direction goes idle, so
//! idle connections hold no relay buffer.

#[cfg(target_os = "linux")]
pub mod splice;
/// splice(2) is Linux's: elsewhere the pool is empty and every leg uses the copy relay.
#[cfg(not(target_os = "linux"))]
pub mod splice {
    use std::sync::Arc;

    use tokio::net::TcpStream;
    use tokio_util::sync::CancellationToken;

    use super::{Bytes, End, Idle};

    /// No pipes off Linux.
    pub struct PipePool;

    impl PipePool {
        /// A pool that never has a pipe.
        pub fn new(_max: usize) -> Arc<PipePool> {
            Arc::new(PipePool)
        }
    }

    /// Always declines: the caller uses the copy relay.
    pub async fn relay(
        _pool: &Arc<PipePool>,
        _client: &TcpStream,
        _upstream: &TcpStream,
        _idle: Idle,
        _stop: &CancellationToken,
    ) -> Option<(Bytes, End)> {
        None
    }
}

use std::cell::RefCell;
use std::fmt;
use std::future::poll_fn;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Default idle limit once one direction has finished: a peer that half-closed and went quiet.
pub const HALF_CLOSED_IDLE: Duration = Duration::from_secs(60);

/// How long a relay may go without bytes in either direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idle {
    /// While both directions are open.
    pub open: Duration,
    /// Once one direction has finished (EOF carried): shorter, as a peer that half-closed and
    /// went quiet is usually gone (cf. HAProxy's client-fin). Never longer than `open`.
    pub half_closed: Duration,
}

impl Idle {
    /// `open`, and the default half-closed linger (60 s, or `open` if shorter).
    pub fn new(open: Duration) -> Idle {
        Idle {
            open,
            half_closed: HALF_CLOSED_IDLE,
        }
    }
}

/// Size of one relay buffer.
pub const BUF_SIZE: usize = 64 * 1024;
const POOL_MAX: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_buf(b: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(b);
        }
    });
}

/// Bytes moved by a relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bytes {
    /// Client to upstream.
    pub up: u64,
    /// Upstream to client.
    pub down: u64,
}

/// Which end of a relay failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client.
    Client,
    /// The upstream.
    Upstream,
}

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// Both directions reached EOF and were shut down.
    Closed,
    /// No bytes in either direction for the idle timeout.
    IdleTimeout,
    /// The daemon's shutdown grace ran out.
    Shutdown,
    /// An I/O error on one side.
    Error(Side, io::Error),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Closed => f.write_str("closed"),
            End::IdleTimeout => f.write_str("idle timeout"),
            End::Shutdown => f.write_str("shutdown"),
            End::Error(Side::Client, e) => write!(f, "client error: {e}"),
            End::Error(Side::Upstream, e) => write!(f, "upstream error: {e}"),
        }
    }
}

impl From<End> for crate::outcome::Outcome {
    fn from(end: End) -> Self {
        use crate::outcome::{Outcome, Side as By};
        match end {
            End::Closed => Outcome::Closed,
            End::IdleTimeout => Outcome::IdleTimeout,
            End::Shutdown => Outcome::Shutdown,
            End::Error(Side::Client, e) => Outcome::Io(By::Client, e),
            End::Error(Side::Upstream, e) => Outcome::Io(By::Upstream, e),
        }
    }
}

/// One direction of the copy.
#[derive(Default)]
struct Half {
    buf: Option<Box<[u8]>>,
    pos: usize,
    cap: usize,
    eof: bool,
    done: bool,
    need_flush: bool,
    bytes: u64,
    /// Client to upstream (for the process-wide byte counters).
    from_client: bool,
}

/// An I/O error tagged with whether it came from the reader or the writer.
pub(crate) enum HalfError {
    Read(io::Error),
    Write(io::Error),
}

/// One of the two directions of a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// Client to upstream.
    Up,
    /// Upstream to client.
    Down,
}

/// The two directions of a relay, whichever core moves the bytes (copy or splice).
pub(crate) trait Pair {
    /// Moves bytes in direction `d`; `Ready(Ok)` once it is finished (EOF carried or aborted).
    fn poll_dir(
        &mut self,
        d: Dir,
        cx: &mut Context<'_>,
        last: &mut Instant,
    ) -> Poll<Result<(), HalfError>>;
    /// The reader of `d` is gone: deliver what was read, then shut the writer down.
    fn set_eof(&mut self, d: Dir);
    /// The writer of `d` is gone: stop this direction.
    fn abort(&mut self, d: Dir);
    /// Whether `d` is finished.
    fn is_done(&self, d: Dir) -> bool;
}

/// Runs both directions of `pair` until both are finished, nothing moves for `idle.open`
/// (`idle.half_closed` once one direction is finished), or `stop` is cancelled.
///
/// An error ends only what it must: a dead reader's peer still gets what was read (then EOF),
/// a dead writer's direction stops, and the other direction drains on its own.
pub(crate) async fn drive(pair: &mut impl Pair, idle: Idle, stop: &CancellationToken) -> End {
    let mut failed: Option<(Side, io::Error)> = None;
    let mut last = Instant::now();
    let sleep = tokio::time::sleep_until(last + idle.open);
    tokio::pin!(sleep);
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    // Which side reads and which writes in each direction.
    let sides = |d: Dir| match d {
        Dir::Up => (Side::Client, Side::Upstream),
        Dir::Down => (Side::Upstream, Side::Client),
    };
    let other = |d: Dir| match d {
        Dir::Up => Dir::Down,
        Dir::Down => Dir::Up,
    };
    poll_fn(|cx| {
        loop {
            let mut changed = false;
            for d in [Dir::Up, Dir::Down] {
                if pair.is_done(d) {
                    continue;
                }
                if let Poll::Ready(Err(e)) = pair.poll_dir(d, cx, &mut last) {
                    changed = true;
                    let (reader, writer) = sides(d);
                    match e {
                        HalfError::Read(e) => {
                            failed.get_or_insert((reader, e));
                            pair.set_eof(d);
                            pair.abort(other(d));
                        }
                        HalfError::Write(e) => {
                            failed.get_or_insert((writer, e));
                            pair.abort(d);
                        }
                    }
                }
            }
            if !changed {
                break;
            }
        }
        let (up_done, down_done) = (pair.is_done(Dir::Up), pair.is_done(Dir::Down));
        if up_done && down_done {
            return Poll::Ready(match failed.take() {
                Some((side, e)) => End::Error(side, e),
                None => End::Closed,
            });
        }
        if stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(End::Shutdown);
        }
        // Half-closed connections linger only briefly without traffic.
        let limit = if up_done != down_done {
            idle.open.min(idle.half_closed)
        } else {
            idle.open
        };
        if sleep.deadline() > last + limit {
            sleep.as_mut().reset(last + limit);
        }
        // The timer is not reset on every read; when it fires, check the last activity.
        while sleep.as_mut().poll(cx).is_ready() {
            let deadline = last + limit;
            if deadline <= Instant::now() {
                return Poll::Ready(End::IdleTimeout);
            }
            sleep.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await
}

impl Half {
    /// Stops this direction: its destination is gone, so buffered bytes have nowhere to go.
    fn abort(&mut self) {
        self.done = true;
        self.pos = 0;
        self.cap = 0;
        if let Some(b) = self.buf.take() {
            give_buf(b);
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        last: &mut Instant,
    ) -> Poll<Result<(), HalfError>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.pos == self.cap && !self.eof {
                let buf = self.buf.get_or_insert_with(take_buf);
                let mut rb = ReadBuf::new(buf);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.eof = true;
                        } else {
                            self.pos = 0;
                            self.cap = n;
                            self.bytes += n as u64;
                            crate::metrics::get().relayed(self.from_client, n as u64);
                            *last = Instant::now();
                        }
                    }
                    // A TLS peer that closes without close_notify: all data was delivered.
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        self.eof = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(HalfError::Read(e))),
                    Poll::Pending => {
                        // The writer may buffer (TLS does): push out what it holds before waiting.
                        if self.need_flush {
                            match Pin::new(&mut *w).poll_flush(cx) {
                                Poll::Ready(Ok(())) => self.need_flush = false,
                                Poll::Ready(Err(e)) => {
                                    return Poll::Ready(Err(HalfError::Write(e)))
                                }
                                Poll::Pending => {}
                            }
                        }
                        if let Some(b) = self.buf.take() {
                            give_buf(b);
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.cap {
                let Some(buf) = self.buf.as_deref() else {
                    break;
                };
                match ready!(Pin::new(&mut *w).poll_write(cx, &buf[self.pos..self.cap])) {
                    Ok(0) => {
                        return Poll::Ready(Err(HalfError::Write(io::ErrorKind::WriteZero.into())))
                    }
                    Ok(n) => {
                        self.pos += n;
                        self.need_flush = true;
                    }
                    Err(e) => return Poll::Ready(Err(HalfError::Write(e))),
                }
            }
            self.pos = 0;
            self.cap = 0;
            if self.eof {
                if let Some(b) = self.buf.take() {
                    give_buf(b);
                }
                ready!(Pin::new(&mut *w).poll_shutdown(cx)).map_err(HalfError::Write)?;
                self.done = true;
            }
        }
    }
}

/// The copy core's two directions over any streams.
struct CopyPair<'a, C: ?Sized, U: ?Sized> {
    client: &'a mut C,
    upstream: &'a mut U,
    up: Half,
    down: Half,
}

impl<C, U> Pair for CopyPair<'_, C, U>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    fn poll_dir(
        &mut self,
        d: Dir,
        cx: &mut Context<'_>,
        last: &mut Instant,
    ) -> Poll<Result<(), HalfError>> {
        match d {
            Dir::Up => self
                .up
                .poll_copy(cx, &mut *self.client, &mut *self.upstream, last),
            Dir::Down => self
                .down
                .poll_copy(cx, &mut *self.upstream, &mut *self.client, last),
        }
    }

    fn set_eof(&mut self, d: Dir) {
        match d {
            Dir::Up => self.up.eof = true,
            Dir::Down => self.down.eof = true,
        }
    }

    fn abort(&mut self, d: Dir) {
        match d {
            Dir::Up => self.up.abort(),
            Dir::Down => self.down.abort(),
        }
    }

    fn is_done(&self, d: Dir) -> bool {
        match d {
            Dir::Up => self.up.done,
            Dir::Down => self.down.done,
        }
    }
}

/// Relays between `client` and `upstream` until both directions are finished (by EOF or by an
/// error on one side), nothing moves for `idle`, or `stop` is cancelled. Returns the byte counts and how it ended.
pub async fn relay<C, U>(
    client: &mut C,
    upstream: &mut U,
    idle: Idle,
    stop: &CancellationToken,
) -> (Bytes, End)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut pair = CopyPair {
        client,
        upstream,
        up: Half {
            from_client: true,
            ..Half::default()
        },
        down: Half::default(),
    };
    let end = drive(&mut pair, idle, stop).await;
    let CopyPair {
        mut up, mut down, ..
    } = pair;
    for h in [&mut up, &mut down] {
        if let Some(b) = h.buf.take() {
            give_buf(b);
        }
    }
    (
        Bytes {
            up: up.bytes,
            down: down.bytes,
        },
        end,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn half_closed_and_quiet_ends_after_the_linger() {
        let (mut client, mut client_peer) = tokio::io::duplex(1024);
        let (mut upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let stop = CancellationToken::new();
        let relay = tokio::spawn(async move {
            relay(
                &mut client,
                &mut upstream,
                Idle::new(Duration::from_secs(3600)),
                &stop,
            )
            .await
        });
        // The upstream says goodbye and half-closes; the client never answers or closes.
        upstream_peer.write_all(b"bye").await.unwrap();
        upstream_peer.shutdown().await.unwrap();
        let mut got = [0u8; 3];
        client_peer.read_exact(&mut got).await.unwrap();
        tokio::time::sleep(HALF_CLOSED_IDLE - Duration::from_secs(1)).await;
        assert!(!relay.is_finished(), "ended before the linger");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (bytes, end) = relay.await.unwrap();
        assert!(matches!(end, End::IdleTimeout), "{end}");
        assert_eq!(bytes, Bytes { up: 0, down: 3 });
    }

    #[tokio::test(start_paused = true)]
    async fn the_half_closed_linger_is_a_setting() {
        let (mut client, mut client_peer) = tokio::io::duplex(1024);
        let (mut upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let stop = CancellationToken::new();
        let idle = Idle {
            open: Duration::from_secs(3600),
            half_closed: Duration::from_secs(5),
        };
        let relay =
            tokio::spawn(async move { relay(&mut client, &mut upstream, idle, &stop).await });
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream_peer.read_to_end(&mut got).await.unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!relay.is_finished(), "ended before the linger");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(relay.is_finished(), "still open 6 s after the half-close");
        let (_, end) = relay.await.unwrap();
        assert!(matches!(end, End::IdleTimeout), "{end}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_counts_from_the_last_byte() {
        let (mut client, mut client_peer) = tokio::io::duplex(1024);
        let (mut upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let stop = CancellationToken::new();
        let relay = tokio::spawn(async move {
            relay(
                &mut client,
                &mut upstream,
                Idle::new(Duration::from_secs(10)),
                &stop,
            )
            .await
        });
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(8)).await;
            client_peer.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            upstream_peer.read_exact(&mut b).await.unwrap();
        }
        assert!(
            !relay.is_finished(),
            "traffic every 8 s keeps a 10 s idle timeout away"
        );
        tokio::time::sleep(Duration::from_secs(11)).await;
        let (bytes, end) = relay.await.unwrap();
        assert!(matches!(end, End::IdleTimeout), "{end}");
        assert_eq!(bytes.up, 5);
    }

    /// Yields its chunks, then fails like a reset socket.
    struct ThenReset(Vec<&'static [u8]>);

    impl AsyncRead for ThenReset {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.0.is_empty() {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            let chunk = self.0.remove(0);
            buf.put_slice(chunk);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for ThenReset {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn upstream_reset_still_delivers_what_was_read() {
        // The client side buffers writes, as TLS does: the answer must be flushed, not dropped.
        let (client_io, mut client_peer) = tokio::io::duplex(1 << 20);
        let mut client = tokio::io::BufWriter::new(client_io);
        let mut upstream = ThenReset(vec![b"HTTP/1.1 200 OK\r\n", b"\r\nlast words"]);
        let stop = CancellationToken::new();
        let (bytes, end) = relay(
            &mut client,
            &mut upstream,
            Idle::new(Duration::from_secs(10)),
            &stop,
        )
        .await;
        assert!(matches!(end, End::Error(Side::Upstream, _)), "{end}");
        assert_eq!(bytes.down, 29);
        drop(client);
        let mut got = Vec::new();
        client_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"HTTP/1.1 200 OK\r\n\r\nlast words");
    }
}
