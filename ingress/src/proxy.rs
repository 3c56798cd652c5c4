//! The byte path of one client connection. It owns copying bytes both ways
//! between the client and the backend once both are connected: the PROXY
//! header written first, a half-close passed on (when one side finishes
//! sending, the other side's write half is shut down and the opposite
//! direction keeps flowing), backpressure respected (a side that does not
//! read stops the copy from the other: at most one pipe or one buffer per
//! direction is in flight), the idle timeout, the stop signal, and the live
//! byte counters.
//!
//! TCP to TCP goes through the kernel with splice(2) ([`relay_tcp`]); other
//! streams (QUIC tunnel streams) through one buffer per direction, allocated
//! once per connection ([`relay`]). Neither allocates per byte or per chunk.
//!
//! It must not choose backends, parse anything the client sends, or spawn
//! tasks: both directions, the idle timer and the stop signal are driven by
//! the caller's task.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes per direction held in flight by the buffered copy.
pub const BUFFER: usize = 64 * 1024;

/// Pipe capacity asked for per direction by the splice copy: on loopback,
/// 256 KiB took about a tenth less CPU per byte than the default 64 KiB.
pub const PIPE: usize = 256 * 1024;

/// A pipe smaller than this (the kernel refused [`PIPE`] and shrank even
/// the default) makes [`relay_tcp`] fall back to buffers.
pub const MIN_PIPE: usize = 64 * 1024;

/// Per-connection settings.
#[derive(Debug, Clone)]
pub struct Relay {
    /// The connection is closed when no byte moved either way for this long.
    pub idle_timeout: Duration,
    /// Cancelled when the drain deadline passed or the ingress shuts down.
    pub stop: CancellationToken,
}

/// Live byte counters, incremented as bytes move (not only at the end), so
/// /metrics shows long connections too. The PROXY header is not counted.
#[derive(Debug, Clone, Default)]
pub struct Meter {
    pub to_backend: Counter,
    pub to_client: Counter,
}

/// Why a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both directions finished (end of stream both ways), or a peer went
    /// away (reset, broken pipe, timed out).
    Closed,
    /// No byte moved either way for [`Relay::idle_timeout`].
    IdleTimeout,
    /// [`Relay::stop`] was cancelled.
    Stopped,
}

/// How many bytes went each way, and why the relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub to_backend: u64,
    pub to_client: u64,
    pub ended: Ended,
}

/// Relays between two TCP streams with zero copy: splice(2) through one
/// pipe per direction (socket → pipe, then pipe → socket until the pipe is
/// empty, then read again), so the bytes never enter user space. On
/// loopback it took about half the CPU of [`relay`] per byte moved.
///
/// Falls back to [`relay`] if the pipes cannot be made (descriptor or
/// `fs.pipe-user-pages-hard` limits), or if they are smaller than
/// [`MIN_PIPE`]: past `fs.pipe-user-pages-soft`, an unprivileged user gets
/// two-page pipes, which cost more CPU than the buffers. An ingress without
/// `CAP_SYS_RESOURCE` should raise that limit: each connection is charged
/// two pipes of [`PIPE`] (pages are only used while bytes are in flight).
///
/// Semantics, errors and the end of the connection are those of [`relay`].
/// Splicing into a socket the peer closed raises `SIGPIPE` (there is no
/// `MSG_NOSIGNAL` for splice); the Rust runtime ignores `SIGPIPE`, so it
/// arrives as `EPIPE`.
pub async fn relay_tcp(
    client: TcpStream,
    backend: TcpStream,
    preface: &[u8],
    opts: &Relay,
    meter: &Meter,
) -> io::Result<Copied> {
    let pipes = Pipe::new().and_then(|up| Ok((up, Pipe::new()?)));
    let (up_pipe, down_pipe) = match pipes {
        Ok((up, down)) if up.size >= MIN_PIPE && down.size >= MIN_PIPE => (up, down),
        Ok(_) => {
            tracing::debug!("pipes too small for splice, copying through buffers");
            return relay(client, backend, preface, opts, meter).await;
        }
        Err(error) => {
            tracing::debug!(%error, "no pipes for splice, copying through buffers");
            return relay(client, backend, preface, opts, meter).await;
        }
    };
    let activity = Activity::new();
    let (mut to_backend, mut to_client) = (0, 0);
    let up = async {
        write_all_tcp(&backend, preface).await?;
        let counts = Counts::new(&mut to_backend, &meter.to_backend, &activity);
        splice_one_way(&client, &backend, &up_pipe, counts).await
    };
    let down = splice_one_way(
        &backend,
        &client,
        &down_pipe,
        Counts::new(&mut to_client, &meter.to_client, &activity),
    );
    let ended = run(up, down, &activity, opts).await?;
    Ok(Copied {
        to_backend,
        to_client,
        ended,
    })
}

/// Relays between any two streams (QUIC tunnel streams are
/// `tokio::io::Join<RecvStream, SendStream>`) through one buffer per
/// direction, after writing `preface` (a PROXY header, or nothing) to the
/// backend before any client byte.
///
/// It returns when both directions reached end of stream ([`Ended::Closed`]),
/// when nothing moved for `opts.idle_timeout` ([`Ended::IdleTimeout`]), or
/// when `opts.stop` is cancelled ([`Ended::Stopped`]); both streams are then
/// dropped, which closes them. A peer that went away (reset, broken pipe,
/// not connected, timed out, unreachable) ends the relay as
/// [`Ended::Closed`] too: that is how TCP connections end, not a fault of
/// the proxy. Any other error is returned; the bytes moved until then are
/// in the [`Meter`].
pub async fn relay<C, B>(
    client: C,
    backend: B,
    preface: &[u8],
    opts: &Relay,
    meter: &Meter,
) -> io::Result<Copied>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut buffers = vec![0u8; 2 * BUFFER];
    let (up_buf, down_buf) = buffers.split_at_mut(BUFFER);
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut backend_read, mut backend_write) = tokio::io::split(backend);
    let activity = Activity::new();
    let (mut to_backend, mut to_client) = (0, 0);
    let up = async {
        backend_write.write_all(preface).await?;
        backend_write.flush().await?;
        let counts = Counts::new(&mut to_backend, &meter.to_backend, &activity);
        copy_one_way(&mut client_read, &mut backend_write, up_buf, counts).await
    };
    let down = copy_one_way(
        &mut backend_read,
        &mut client_write,
        down_buf,
        Counts::new(&mut to_client, &meter.to_client, &activity),
    );
    let ended = run(up, down, &activity, opts).await?;
    Ok(Copied {
        to_backend,
        to_client,
        ended,
    })
}

/// Drives both directions, the idle timer and the stop signal in the
/// caller's task, until one of them ends the connection.
async fn run(
    up: impl Future<Output = io::Result<()>>,
    down: impl Future<Output = io::Result<()>>,
    activity: &Activity,
    opts: &Relay,
) -> io::Result<Ended> {
    // Every wakeup polls the stop signal, which takes its token's lock: a
    // child of its own keeps connections sharing one token from contending.
    let stop = opts.stop.child_token();
    tokio::select! {
        biased;
        () = stop.cancelled() => Ok(Ended::Stopped),
        both = async { tokio::try_join!(up, down) } => match both {
            Ok(_) => Ok(Ended::Closed),
            Err(e) if peer_gone(&e) => Ok(Ended::Closed),
            Err(e) => Err(e),
        },
        () = activity.idle_for(opts.idle_timeout) => Ok(Ended::IdleTimeout),
    }
}

/// Whether an error means the peer (or the path to it) went away.
fn peer_gone(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset
            | ConnectionAborted
            | BrokenPipe
            | NotConnected
            | TimedOut
            | HostUnreachable
            | NetworkUnreachable
    )
}

/// One direction of the buffered copy: read, write all of it, read again.
async fn copy_one_way<R, W>(
    from: &mut R,
    to: &mut W,
    buf: &mut [u8],
    mut counts: Counts<'_>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        // Streams that are not Tokio's own (QUIC) do not count against the
        // task's budget: without this, a stream that is always ready would
        // keep the idle timer, the stop signal and other tasks from running.
        tokio::task::coop::consume_budget().await;
        let read = from.read(buf).await?;
        if read == 0 {
            return to.shutdown().await;
        }
        let mut written = 0;
        while written < read {
            let n = to.write(&buf[written..read]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            written += n;
            counts.moved(n);
        }
        to.flush().await?;
    }
}

/// One direction of the splice copy: socket → pipe, then pipe → socket
/// until the pipe is empty, then read again.
async fn splice_one_way(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    mut counts: Counts<'_>,
) -> io::Result<()> {
    loop {
        // The pipe is empty here, so `WouldBlock` means the socket has
        // nothing to read, never that the pipe is full.
        let read = from
            .async_io(Interest::READABLE, || {
                splice(from.as_fd(), pipe.write.as_fd(), pipe.size)
            })
            .await?;
        if read == 0 {
            return socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
        }
        let mut in_pipe = read;
        while in_pipe > 0 {
            // The pipe holds bytes here, so `WouldBlock` means the socket's
            // send buffer is full.
            let n = to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_fd(), to.as_fd(), in_pipe)
                })
                .await?;
            in_pipe -= n;
            counts.moved(n);
        }
    }
}

/// Writes all of `bytes` to a socket shared by both directions.
async fn write_all_tcp(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// splice(2) between a socket and a pipe without blocking.
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are borrowed, so they stay open for the call;
    // the offsets are null (sockets and pipes have none), and splice reads
    // and writes no memory of ours.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// A non-blocking pipe, the in-kernel buffer of one splice direction.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Capacity in bytes, as the kernel reports it.
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [-1; 2];
        // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by
        // nothing else; each is wrapped exactly once.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Asking for the size we want is best effort: the kernel may refuse
        // (per-user pipe limits) and report what the pipe has instead.
        let want = libc::c_int::try_from(PIPE).unwrap_or(libc::c_int::MAX);
        // SAFETY: fcntl on a descriptor we own, with an integer argument.
        let mut size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
        if size == -1 {
            // SAFETY: as above; F_GETPIPE_SZ takes no argument.
            size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        }
        let size = usize::try_from(size).map_err(|_| io::Error::last_os_error())?;
        Ok(Pipe { read, write, size })
    }
}

/// When a byte last moved either way, shared by both directions and the
/// idle timer of one connection.
struct Activity {
    start: Instant,
    /// Nanoseconds since `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let since = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(since, Ordering::Relaxed);
    }

    /// Returns once nothing moved for `timeout`; never, if `timeout` is too
    /// long to represent.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let last = self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed));
            let Some(deadline) = last.checked_add(timeout) else {
                return std::future::pending().await;
            };
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Where one direction records the bytes it moved.
struct Counts<'a> {
    total: &'a mut u64,
    meter: &'a Counter,
    activity: &'a Activity,
}

impl<'a> Counts<'a> {
    fn new(total: &'a mut u64, meter: &'a Counter, activity: &'a Activity) -> Counts<'a> {
        Counts {
            total,
            meter,
            activity,
        }
    }

    fn moved(&mut self, n: usize) {
        let n = n as u64;
        *self.total += n;
        self.meter.inc_by(n);
        self.activity.touch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    /// Which copy a test drives.
    #[derive(Debug, Clone, Copy)]
    enum Path {
        Splice,
        Buffered,
    }

    /// A client, the proxy's two sockets, and a backend, all on loopback.
    async fn pairs() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        async fn pair() -> (TcpStream, TcpStream) {
            let l = TcpListener::bind("[::1]:0").await.unwrap();
            let dial = TcpStream::connect(l.local_addr().unwrap());
            let (a, b) = tokio::join!(dial, l.accept());
            (a.unwrap(), b.unwrap().0)
        }
        let (client, proxy_in) = pair().await;
        let (proxy_out, backend) = pair().await;
        (client, proxy_in, proxy_out, backend)
    }

    fn opts(idle_timeout: Duration) -> Relay {
        Relay {
            idle_timeout,
            stop: CancellationToken::new(),
        }
    }

    /// Runs the relay on `path` in its own task. The buffered path gets the
    /// backend as a `Join` of two halves, the shape of a QUIC stream.
    fn start(
        path: Path,
        proxy_in: TcpStream,
        proxy_out: TcpStream,
        preface: &'static [u8],
        opts: &Relay,
        meter: &Meter,
    ) -> JoinHandle<io::Result<Copied>> {
        let (opts, meter) = (opts.clone(), meter.clone());
        tokio::spawn(async move {
            match path {
                Path::Splice => relay_tcp(proxy_in, proxy_out, preface, &opts, &meter).await,
                Path::Buffered => {
                    let (r, w) = proxy_out.into_split();
                    let backend = tokio::io::join(r, w);
                    relay(proxy_in, backend, preface, &opts, &meter).await
                }
            }
        })
    }

    /// Polls `check` until it holds, failing after five seconds.
    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Runs a test, failing it after thirty seconds instead of hanging.
    async fn bounded(test: impl Future<Output = ()>) {
        tokio::time::timeout(Duration::from_secs(30), test)
            .await
            .expect("test hung");
    }

    /// Reads to the end of stream, failing after five seconds.
    async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got))
            .await
            .expect("no end of stream")
            .unwrap();
        got
    }

    const LONG: Duration = Duration::from_secs(60);

    async fn a_half_close_passes_through_and_the_answer_still_comes_back(path: Path) {
        let (mut client, proxy_in, proxy_out, mut backend) = pairs().await;
        let proxy = start(
            path,
            proxy_in,
            proxy_out,
            b"HEAD",
            &opts(LONG),
            &Meter::default(),
        );
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        // The backend sees the preface, the request, then end of stream.
        assert_eq!(read_to_end(&mut backend).await, b"HEADping");
        // After the client's half-close, the other direction still flows.
        backend.write_all(b"pong").await.unwrap();
        backend.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut client).await, b"pong");
        let copied = proxy.await.unwrap().unwrap();
        assert_eq!(
            copied,
            Copied {
                to_backend: 4,
                to_client: 4,
                ended: Ended::Closed,
            }
        );
    }

    async fn large_transfers_both_ways_arrive_intact(path: Path) {
        const SIZE: usize = 8 << 20;
        let (mut client, proxy_in, proxy_out, mut backend) = pairs().await;
        let meter = Meter::default();
        let proxy = start(path, proxy_in, proxy_out, b"", &opts(LONG), &meter);
        let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
        let (mut cr, mut cw) = client.split();
        let (mut br, mut bw) = backend.split();
        let send = async {
            cw.write_all(&data).await.unwrap();
            cw.shutdown().await.unwrap();
        };
        let echo_back = async {
            bw.write_all(&data).await.unwrap();
            bw.shutdown().await.unwrap();
        };
        let mut at_backend = Vec::new();
        let mut at_client = Vec::new();
        tokio::join!(
            send,
            echo_back,
            async { br.read_to_end(&mut at_backend).await.unwrap() },
            async { cr.read_to_end(&mut at_client).await.unwrap() },
        );
        assert!(at_backend == data, "client → backend bytes differ");
        assert!(at_client == data, "backend → client bytes differ");
        let copied = proxy.await.unwrap().unwrap();
        assert_eq!(copied.to_backend, SIZE as u64);
        assert_eq!(copied.to_client, SIZE as u64);
        assert_eq!(copied.ended, Ended::Closed);
        assert_eq!(meter.to_backend.get(), SIZE as u64);
        assert_eq!(meter.to_client.get(), SIZE as u64);
    }

    async fn a_backend_that_stops_reading_holds_the_client_back(path: Path) {
        let (mut client, proxy_in, proxy_out, backend) = pairs().await;
        let _proxy = start(
            path,
            proxy_in,
            proxy_out,
            b"",
            &opts(LONG),
            &Meter::default(),
        );
        // The backend never reads: the client's writes must stall once the
        // kernel buffers and the proxy's one buffer are full, not pile up.
        let chunk = vec![0u8; 1 << 20];
        let mut written = 0usize;
        let stalled = loop {
            match tokio::time::timeout(Duration::from_secs(1), client.write_all(&chunk)).await {
                Ok(Ok(())) => written += chunk.len(),
                Ok(Err(e)) => panic!("write failed: {e}"),
                Err(_) => break true,
            }
            if written > 512 << 20 {
                break false;
            }
        };
        assert!(
            stalled,
            "wrote {written} bytes to a backend that never reads"
        );
        drop(backend);
    }

    async fn the_preface_arrives_before_any_client_byte(path: Path) {
        let (mut client, proxy_in, proxy_out, mut backend) = pairs().await;
        // The client's bytes wait at the proxy before the relay starts.
        client.write_all(b"early").await.unwrap();
        client.shutdown().await.unwrap();
        let preface = b"\r\n\r\n\0\r\nQUIT\n!\x11\0\x0c";
        let _proxy = start(
            path,
            proxy_in,
            proxy_out,
            preface,
            &opts(LONG),
            &Meter::default(),
        );
        let got = read_to_end(&mut backend).await;
        assert_eq!(&got[..preface.len()], preface);
        assert_eq!(&got[preface.len()..], b"early");
    }

    async fn a_quiet_connection_is_closed_after_the_idle_timeout(path: Path) {
        let idle = Duration::from_millis(200);
        let (mut client, proxy_in, proxy_out, mut backend) = pairs().await;
        let began = Instant::now();
        let proxy = start(
            path,
            proxy_in,
            proxy_out,
            b"",
            &opts(idle),
            &Meter::default(),
        );
        // Both sides see the end of stream, with nothing before it.
        assert_eq!(read_to_end(&mut client).await, b"");
        assert_eq!(read_to_end(&mut backend).await, b"");
        let copied = proxy.await.unwrap().unwrap();
        assert_eq!(copied.ended, Ended::IdleTimeout);
        let took = began.elapsed();
        assert!(
            took >= idle,
            "closed after {took:?}, before the idle timeout"
        );
        assert!(took < Duration::from_secs(3), "closed only after {took:?}");
    }

    async fn traffic_every_50ms_keeps_a_300ms_idle_timeout_away(path: Path) {
        let (mut client, proxy_in, proxy_out, mut backend) = pairs().await;
        let relay = opts(Duration::from_millis(300));
        let proxy = start(path, proxy_in, proxy_out, b"", &relay, &Meter::default());
        let mut byte = [0u8; 1];
        let began = Instant::now();
        let mut turn = 0;
        while began.elapsed() < Duration::from_secs(1) {
            // Alternate directions: either one moving keeps the connection.
            let (from, to) = if turn % 2 == 0 {
                (&mut client, &mut backend)
            } else {
                (&mut backend, &mut client)
            };
            from.write_all(b"x").await.unwrap();
            to.read_exact(&mut byte).await.unwrap();
            turn += 1;
            // Pacing the traffic, not waiting for the proxy.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!proxy.is_finished(), "closed a connection with traffic");
        relay.stop.cancel();
        let copied = proxy.await.unwrap().unwrap();
        assert_eq!(copied.ended, Ended::Stopped);
        assert_eq!(copied.to_backend + copied.to_client, turn);
    }

    async fn stop_closes_both_sides_promptly(path: Path) {
        let (mut client, proxy_in, proxy_out, mut backend) = pairs().await;
        let relay = opts(LONG);
        let proxy = start(path, proxy_in, proxy_out, b"", &relay, &Meter::default());
        client.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        backend.read_exact(&mut got).await.unwrap();
        relay.stop.cancel();
        let copied = tokio::time::timeout(Duration::from_secs(1), proxy)
            .await
            .expect("relay did not stop")
            .unwrap()
            .unwrap();
        assert_eq!(
            copied,
            Copied {
                to_backend: 5,
                to_client: 0,
                ended: Ended::Stopped,
            }
        );
        assert_eq!(read_to_end(&mut client).await, b"");
        assert_eq!(read_to_end(&mut backend).await, b"");
    }

    async fn the_meter_counts_bytes_while_the_connection_is_open(path: Path) {
        let (mut client, proxy_in, proxy_out, mut backend) = pairs().await;
        let meter = Meter::default();
        let proxy = start(path, proxy_in, proxy_out, b"HEAD", &opts(LONG), &meter);
        let mut got = vec![0u8; 4 + 1000];
        client.write_all(&[1; 1000]).await.unwrap();
        backend.read_exact(&mut got).await.unwrap();
        eventually("1000 bytes to the backend", || {
            meter.to_backend.get() == 1000
        })
        .await;
        backend.write_all(&[2; 300]).await.unwrap();
        client.read_exact(&mut got[..300]).await.unwrap();
        eventually("300 bytes to the client", || meter.to_client.get() == 300).await;
        assert!(!proxy.is_finished());
        client.shutdown().await.unwrap();
        backend.shutdown().await.unwrap();
        let copied = proxy.await.unwrap().unwrap();
        assert_eq!((copied.to_backend, copied.to_client), (1000, 300));
        assert_eq!((meter.to_backend.get(), meter.to_client.get()), (1000, 300));
    }

    async fn a_backend_reset_ends_the_relay_as_closed(path: Path) {
        let (mut client, proxy_in, proxy_out, backend) = pairs().await;
        let proxy = start(
            path,
            proxy_in,
            proxy_out,
            b"",
            &opts(LONG),
            &Meter::default(),
        );
        // Closing with a zero linger sends a reset instead of a FIN.
        socket2::SockRef::from(&backend)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(backend);
        let copied = proxy.await.unwrap().unwrap();
        assert_eq!(copied.ended, Ended::Closed);
        assert_eq!(read_to_end(&mut client).await, b"");
    }

    /// Each test above, once through splice and once through buffers.
    macro_rules! on_both_paths {
        ($($test:ident),* $(,)?) => {
            mod via_splice {
                $(#[tokio::test]
                async fn $test() {
                    super::bounded(super::$test(super::Path::Splice)).await
                })*
            }
            mod via_buffers {
                $(#[tokio::test]
                async fn $test() {
                    super::bounded(super::$test(super::Path::Buffered)).await
                })*
            }
        };
    }

    on_both_paths!(
        a_half_close_passes_through_and_the_answer_still_comes_back,
        large_transfers_both_ways_arrive_intact,
        a_backend_that_stops_reading_holds_the_client_back,
        the_preface_arrives_before_any_client_byte,
        a_quiet_connection_is_closed_after_the_idle_timeout,
        traffic_every_50ms_keeps_a_300ms_idle_timeout_away,
        stop_closes_both_sides_promptly,
        the_meter_counts_bytes_while_the_connection_is_open,
        a_backend_reset_ends_the_relay_as_closed,
    );
}
