//! The zero-copy relay for plain TCP legs (plain SSH or HTTP to an upstream): splice(2) from
//! one socket into a pipe and from the pipe into the other socket, one pipe per direction,
//! driven by tokio readiness. Pipes come from a bounded pool (pipe memory per user is limited);
//! when it is empty the caller falls back to the copy relay. Half-close, byte counts, idle
//! timeout and shutdown behave as in the copy relay.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{drive, Bytes, Dir, End, HalfError, Idle, Pair};

/// Requested size of each pipe (the kernel may round it or refuse; the default is 64 KiB).
/// 1 MiB measured about 0.29 CPU-s/GiB against 0.35-0.43 at 256 KiB (BENCHMARKS.md).
const PIPE_SIZE: usize = 1024 * 1024;

/// A pipe: read end, write end, and its capacity.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        use rustix::pipe::{fcntl_setpipe_size, pipe_with, PipeFlags};
        let (r, w) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // Failure leaves the default size, which is fine.
        let cap = fcntl_setpipe_size(&w, PIPE_SIZE).unwrap_or(64 * 1024);
        Ok(Pipe { r, w, cap })
    }
}

/// A bounded pool of pipes, shared by all connections.
pub struct PipePool {
    free: Mutex<Vec<Pipe>>,
    /// Pipes that may still be created or handed out.
    budget: Mutex<usize>,
}

impl PipePool {
    /// A pool of at most `max` pipes (two per spliced connection).
    pub fn new(max: usize) -> Arc<PipePool> {
        Arc::new(PipePool {
            free: Mutex::new(Vec::new()),
            budget: Mutex::new(max),
        })
    }

    fn take(&self) -> Option<Pipe> {
        let mut budget = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        if *budget == 0 {
            return None;
        }
        let pipe = match self.free.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            Some(p) => p,
            None => Pipe::new().ok()?,
        };
        *budget -= 1;
        Some(pipe)
    }

    /// Returns a pipe; one still holding bytes is closed instead of reused.
    fn give(&self, pipe: Pipe, empty: bool) {
        if empty {
            self.free
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(pipe);
        }
        *self.budget.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    /// Two pipes for one connection, or none.
    fn take_pair(self: &Arc<Self>) -> Option<(Pipe, Pipe)> {
        let a = self.take()?;
        match self.take() {
            Some(b) => Some((a, b)),
            None => {
                self.give(a, true);
                None
            }
        }
    }
}

fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    use rustix::pipe::SpliceFlags;
    // No offsets: "current position", as required for sockets and pipes.
    Ok(rustix::pipe::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
    )?)
}

/// One direction: socket -> pipe -> socket.
struct Half {
    pipe: Option<Pipe>,
    in_pipe: usize,
    eof: bool,
    done: bool,
    bytes: u64,
    /// Client to upstream (for the process-wide byte counters).
    from_client: bool,
}

impl Half {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        last: &mut Instant,
    ) -> Poll<Result<(), HalfError>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            let Some(pipe) = &self.pipe else {
                return Poll::Ready(Ok(()));
            };
            // Whether to go round again: after bytes moved, or after readiness was cleared (so
            // that polling registers for the next edge). Not after a pipe-full EAGAIN: the
            // socket is still readable and only the writer's progress can change that.
            let mut again = false;
            if !self.eof && self.in_pipe < pipe.cap {
                if let Poll::Ready(r) = src.poll_read_ready(cx) {
                    r.map_err(HalfError::Read)?;
                    let room = pipe.cap - self.in_pipe;
                    let fill = || splice(src, &pipe.w, room);
                    // EAGAIN means "socket empty" or "pipe full" (a pipe fills by slots, one
                    // per skb fragment: off loopback long before `cap` bytes). Only with an
                    // empty pipe is it surely the socket, and only then may readiness be
                    // cleared; otherwise the window is closed, no new edge comes, and the leg
                    // would hang (HAProxy's raw_sock_to_pipe decides the same way).
                    let clears = self.in_pipe == 0;
                    let got = if clears {
                        src.try_io(Interest::READABLE, fill)
                    } else {
                        fill()
                    };
                    match got {
                        Ok(0) => {
                            self.eof = true;
                            again = true;
                        }
                        Ok(n) => {
                            self.in_pipe += n;
                            self.bytes += n as u64;
                            crate::metrics::get().relayed(self.from_client, n as u64);
                            crate::metrics::get().spliced(n as u64);
                            *last = Instant::now();
                            again = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => again |= clears,
                        Err(e) => return Poll::Ready(Err(HalfError::Read(e))),
                    }
                }
            }
            if self.in_pipe > 0 {
                if let Poll::Ready(r) = dst.poll_write_ready(cx) {
                    r.map_err(HalfError::Write)?;
                    // The pipe holds bytes, so EAGAIN here is the socket: clearing is right.
                    match dst.try_io(Interest::WRITABLE, || splice(&pipe.r, dst, self.in_pipe)) {
                        Ok(n) => self.in_pipe -= n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(HalfError::Write(e))),
                    }
                    again = true;
                }
            }
            if self.eof && self.in_pipe == 0 {
                // Carry the half-close: the other side reads EOF, and may still answer.
                let _ = socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write);
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if !again {
                return Poll::Pending;
            }
        }
    }

    fn abort(&mut self) {
        self.done = true;
    }
}

/// Relays between two plain sockets with splice(2). Returns `None`, touching nothing, if the
/// pool has no pipes left: the caller then uses the copy relay.
pub async fn relay(
    pool: &Arc<PipePool>,
    client: &TcpStream,
    upstream: &TcpStream,
    idle: Idle,
    stop: &CancellationToken,
) -> Option<(Bytes, End)> {
    let (p1, p2) = pool.take_pair()?;
    let mut pair = SplicePair {
        client,
        upstream,
        up: Half {
            pipe: Some(p1),
            in_pipe: 0,
            eof: false,
            done: false,
            bytes: 0,
            from_client: true,
        },
        down: Half {
            pipe: Some(p2),
            in_pipe: 0,
            eof: false,
            done: false,
            bytes: 0,
            from_client: false,
        },
    };
    let end = drive(&mut pair, idle, stop).await;
    for h in [&mut pair.up, &mut pair.down] {
        if let Some(p) = h.pipe.take() {
            pool.give(p, h.in_pipe == 0);
        }
    }
    Some((
        Bytes {
            up: pair.up.bytes,
            down: pair.down.bytes,
        },
        end,
    ))
}

/// The splice core's two directions over two plain sockets.
struct SplicePair<'a> {
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    up: Half,
    down: Half,
}

impl Pair for SplicePair<'_> {
    fn poll_dir(
        &mut self,
        d: Dir,
        cx: &mut Context<'_>,
        last: &mut Instant,
    ) -> Poll<Result<(), HalfError>> {
        match d {
            Dir::Up => self.up.poll(cx, self.client, self.upstream, last),
            Dir::Down => self.down.poll(cx, self.upstream, self.client, last),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn carries_data_both_ways_with_half_close() {
        let pool = PipePool::new(2);
        let (mut client_peer, client) = pair().await;
        let (upstream, mut upstream_peer) = pair().await;
        let stop = CancellationToken::new();
        let relay = tokio::spawn(async move {
            relay(
                &pool,
                &client,
                &upstream,
                Idle::new(Duration::from_secs(60)),
                &stop,
            )
            .await
        });
        let data: Vec<u8> = (0..8 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let d2 = data.clone();
        let writer = tokio::spawn(async move {
            client_peer.write_all(&d2).await.unwrap();
            client_peer.shutdown().await.unwrap();
            let mut reply = Vec::new();
            client_peer.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut got = Vec::new();
        upstream_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data, "client -> upstream, then EOF");
        upstream_peer.write_all(b"after your EOF").await.unwrap();
        upstream_peer.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"after your EOF");
        let (bytes, end) = relay.await.unwrap().expect("pipes available");
        assert!(matches!(end, End::Closed), "{end}");
        assert_eq!(
            bytes,
            Bytes {
                up: 8 << 20,
                down: 14
            }
        );
    }

    #[tokio::test]
    async fn an_empty_pool_declines() {
        let pool = PipePool::new(1); // one pipe: not enough for a connection
        let (_a, client) = pair().await;
        let (upstream, _b) = pair().await;
        let stop = CancellationToken::new();
        assert!(relay(
            &pool,
            &client,
            &upstream,
            Idle::new(Duration::from_secs(1)),
            &stop
        )
        .await
        .is_none());
        // The pipe taken for the failed attempt went back.
        assert_eq!(*pool.budget.lock().unwrap(), 1);
    }
}
