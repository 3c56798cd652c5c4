//! WASI contexts for one run: arguments, environment, preopened
//! directories, sockets, and the standard streams: stdin and stdout from
//! the guest's streams when it has them, else an empty stdin and stdout
//! into its logs; stderr always into its logs, one app record per line
//! ([`crate::logs::Capture`]).
//!
//! The same builder makes the preview 1 context of modules
//! ([`WasiP1Ctx`]) and the preview 2 context of components ([`WasiCtx`]
//! with its [`ResourceTable`]).

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use verge_api::logs::LogStream;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{AsyncStdinStream, AsyncStdoutStream, IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::limits::{MemoryLimiter, Run};
use super::{LogSink, Preopen, ReadHalf, WriteHalf};

/// How many bytes a guest may have in flight to a given stdout stream.
const STDOUT_BUDGET: usize = 64 << 10;

/// A store's data: the guest's WASI state and the run's limits.
pub(crate) struct State<W> {
    pub(crate) wasi: W,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) run: Arc<Run>,
}

/// The WASI state of a component.
pub(crate) struct P2 {
    pub(crate) ctx: WasiCtx,
    pub(crate) table: ResourceTable,
}

impl WasiView for State<P2> {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.ctx,
            table: &mut self.wasi.table,
        }
    }
}

/// What a guest's WASI context is made of.
pub(crate) struct Setup<'a> {
    pub(crate) args: &'a [String],
    pub(crate) env: &'a [(String, String)],
    pub(crate) preopens: &'a [Preopen],
    pub(crate) network: bool,
    pub(crate) stdin: Option<ReadHalf>,
    pub(crate) stdout: Option<WriteHalf>,
    pub(crate) logs: &'a LogSink,
    /// Woken when a log stream has an unfinished line.
    pub(crate) partial: &'a Arc<Notify>,
}

/// The builder for `setup`; `Err` says which preopened directory cannot
/// be opened.
pub(crate) fn builder(setup: Setup<'_>) -> Result<WasiCtxBuilder, String> {
    let mut b = WasiCtxBuilder::new();
    b.args(setup.args).envs(setup.env);
    for p in setup.preopens {
        let perms = if p.writable {
            FsPerms::ReadWrite
        } else {
            FsPerms::ReadOnly
        };
        b.preopened_dir(&p.host, &p.guest, perms).map_err(|e| {
            format!(
                "the directory {} (preopened as {}) cannot be opened: {e:#}",
                p.host.display(),
                p.guest
            )
        })?;
    }
    if setup.network {
        // TCP to and from any address of the instance's network namespace,
        // and name lookups; no UDP.
        b.inherit_network()
            .allow_tcp(true)
            .allow_udp(false)
            .allow_ip_name_lookup(true);
    } else {
        b.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
    }
    if let Some(stdin) = setup.stdin {
        b.stdin(AsyncStdinStream::new(Exclusive::new(stdin)));
    }
    let log = |stream| LogOutput {
        logs: setup.logs.clone(),
        stream,
        partial: setup.partial.clone(),
    };
    match setup.stdout {
        Some(stdout) => b.stdout(AsyncStdoutStream::new(
            STDOUT_BUDGET,
            Exclusive::new(stdout),
        )),
        None => b.stdout(log(LogStream::Stdout)),
    };
    b.stderr(log(LogStream::Stderr));
    Ok(b)
}

/// The preview 1 context of a module.
pub(crate) fn p1(mut b: WasiCtxBuilder) -> WasiP1Ctx {
    b.build_p1()
}

/// The preview 2 state of a component.
pub(crate) fn p2(mut b: WasiCtxBuilder) -> P2 {
    P2 {
        ctx: b.build(),
        table: ResourceTable::new(),
    }
}

/// Writes the unfinished lines of the guest's logs, at the end of a run.
pub(crate) fn flush_logs(logs: &LogSink) {
    let mut c = logs.lock().unwrap_or_else(PoisonError::into_inner);
    c.flush_partial(LogStream::Stdout);
    c.flush_partial(LogStream::Stderr);
    c.flush();
}

/// Writes the unfinished lines that waited long enough for their end,
/// while the run lasts (a prompt that never ends its line still shows).
pub(crate) async fn flush_quiet_lines(logs: LogSink, partial: Arc<Notify>) {
    loop {
        let due = logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .quiet_deadline();
        match due {
            Some(due) => {
                tokio::time::sleep_until(due.into()).await;
                let mut c = logs.lock().unwrap_or_else(PoisonError::into_inner);
                c.flush_quiet(Instant::now());
                c.flush();
            }
            None => partial.notified().await,
        }
    }
}

/// A guest output that goes into its logs.
#[derive(Clone)]
struct LogOutput {
    logs: LogSink,
    stream: LogStream,
    partial: Arc<Notify>,
}

impl LogOutput {
    fn take(&self, bytes: &[u8]) {
        let mut c = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
        c.take(self.stream, bytes, Instant::now());
        c.flush();
        if c.quiet_deadline().is_some() {
            self.partial.notify_one();
        }
    }
}

impl IsTerminal for LogOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for LogOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.take(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(STDOUT_BUDGET)
    }
}

impl AsyncWrite for LogOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.take(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A stream that is `Sync` because it is only ever used through `&mut`
/// (wasmtime-wasi asks its stdio streams to be `Sync`; a guest's streams,
/// like a TCP connection's halves, need not be).
struct Exclusive<S>(Mutex<S>);

impl<S> Exclusive<S> {
    fn new(s: S) -> Exclusive<S> {
        Exclusive(Mutex::new(s))
    }

    fn project(self: Pin<&mut Self>) -> Pin<&mut S>
    where
        S: Unpin,
    {
        Pin::new(
            self.get_mut()
                .0
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Exclusive<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Exclusive<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().poll_shutdown(cx)
    }
}
