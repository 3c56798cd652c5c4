//! Binding a listener's sockets (in its network namespace), accepting
//! within its concurrency, and one instance per connection.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use verge_api::logs::Severity;
use verge_api::wire::ListenerSpec;

use super::{Status, lock};
use crate::logs::Logs;
use crate::net::ns;
use crate::wasm::instance;
use crate::wasm::{Guest, LogSink, Outcome, Preopen, Program};

/// What every connection of one served spec shares.
pub(super) struct Conn {
    pub(super) id: String,
    pub(super) program: Program,
    pub(super) spec: ListenerSpec,
    pub(super) preopens: Vec<Preopen>,
    pub(super) sink: LogSink,
    pub(super) logs: Logs,
    /// Fires to stop the connections' instances.
    pub(super) stop: CancellationToken,
    pub(super) status: Arc<Mutex<Status>>,
}

/// Binds `binds` (spec port, address) in `netns` (the node's if `None`),
/// on a thread of its own; the listeners are handed to this runtime, each
/// with its spec port and the address it is bound to.
pub(super) async fn bind(
    netns: Option<PathBuf>,
    binds: Vec<(u16, SocketAddr)>,
) -> Result<Vec<(u16, TcpListener, SocketAddr)>, String> {
    let bind_all = move || -> Result<Vec<(u16, std::net::TcpListener)>, String> {
        if let Some(ns) = &netns {
            ns::enter(ns)
                .map_err(|e| format!("entering the network namespace {}: {e}", ns.display()))?;
        }
        let bind_one = |addr: SocketAddr| {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(l)
        };
        binds
            .into_iter()
            .map(|(port, addr)| {
                bind_one(addr)
                    .map(|l| (port, l))
                    .map_err(|e| format!("binding {addr}: {e}"))
            })
            .collect()
    };
    // Namespace changes only on a thread made for it, which ends here.
    let bound = ns::on_thread(bind_all)
        .await
        .map_err(|e| format!("binding the listener on a thread of its own: {e}"))??;
    bound
        .into_iter()
        .map(|(port, l)| {
            let addr = l.local_addr().map_err(|e| e.to_string())?;
            let l = TcpListener::from_std(l).map_err(|e| format!("listening on {addr}: {e}"))?;
            Ok((port, l, addr))
        })
        .collect()
}

/// Accepts connections while `accepting`, each with a permit taken first.
pub(super) async fn accept(
    listener: TcpListener,
    permits: Arc<Semaphore>,
    accepting: CancellationToken,
    conns: TaskTracker,
    conn: Arc<Conn>,
) {
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = accepting.cancelled() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = accepting.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let span = tracing::info_span!("connection", %peer);
                conns.spawn(connection(stream, peer, permit, conn.clone()).instrument(span));
            }
            Err(e) => {
                // Out of file descriptors, say: try again shortly.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One connection: a fresh instance with the connection as stdin and stdout.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    c: Arc<Conn>,
) {
    lock(&c.status).report.active += 1;
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let s = &c.spec;
    let outcome = c
        .program
        .run(Guest {
            args: instance::args(&s.workload, s.command.as_deref()),
            env: s
                .env_vars
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            preopens: c.preopens.clone(),
            memory: s.memory,
            cpu: s.cpu,
            max_cpu_time: Duration::from_millis(s.max_cpu_time_ms),
            network: false,
            stdin: Some(Box::new(r)),
            stdout: Some(Box::new(w)),
            logs: c.sink.clone(),
            stop: c.stop.child_token(),
        })
        .await;
    drop(permit);
    let mut st = lock(&c.status);
    st.report.active = st.report.active.saturating_sub(1);
    match outcome {
        // Cut short by the listener's end: neither served nor failed.
        Outcome::Stopped => {}
        Outcome::Exited(_) => st.report.served += 1,
        failed => {
            let exit = instance::exit_of(failed);
            let message = exit.describe();
            st.report.failed += 1;
            st.report.last_failure = Some(message.clone());
            st.report.last_failure_category = exit.category();
            drop(st);
            tracing::info!(%message, "connection failed");
            c.logs.system(
                &c.id,
                Severity::Error,
                format!("connection from {peer}: {message}"),
            );
        }
    }
}
