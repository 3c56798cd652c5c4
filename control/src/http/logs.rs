//! `GET /v1/orgs/{org}/apps/{app}/envs/{env}/logs`: the env's logs as NDJSON
//! of [`LogItem`]s (SPEC §4 `verge logs`).
//!
//! The control plane keeps no logs: it finds which instances the query is
//! about (the env's instances, the listeners of its per-connection
//! workloads on each node that reported one — a listener's logs are its
//! connections' instances' — and with `previous` the earlier instances its
//! `instance.placed` events name), asks each of their nodes over a QUIC
//! stream of the node's session ([`LogsOpen`]), and merges what the nodes
//! send in time order. A node it cannot ask (offline, or connected to
//! another replica) is named in a [`LogNotice`], never left out silently.
//! With `follow`, the history is followed by new records as nodes write
//! them, with a blank line every [`KEEPALIVE`] of silence.
//!
//! Memory stays bounded: each node's records wait in a small channel, the
//! answer's body is a bounded channel too, and a node's stream is read only
//! as fast as the client reads the answer (QUIC flow control does the rest).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::mpsc;
use tracing::Instrument;
use verge_api::logs::{InstanceRecord, LogItem, LogLine, LogNotice, LogQuery, rfc3339_micros};
use verge_api::wire::io::Reader;
use verge_api::wire::{LogsFrame, LogsOpen, NodeStream};

use super::observe::{KEEPALIVE, query_time, tokio_stream_from};
use super::scope::{EnvCx, manifest_of};
use super::{AppState, Path, Query};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::store::{InstanceRow, ListenerRow};
use crate::time::rfc3339;

/// How many earlier instances of an env `previous` looks for.
const HISTORY: i64 = 500;
/// Record batches buffered per node.
const PER_NODE: usize = 4;
/// Bytes of lines gathered before they are handed to the answer.
const FLUSH_AT: usize = 32 * 1024;
/// How long a node may be silent before its history is complete.
const HISTORY_IDLE: Duration = Duration::from_secs(30);
/// How often a follow looks for instances that started since.
const REPLAN: Duration = Duration::from_secs(2);

pub fn routes() -> Router<AppState> {
    Router::new().route("/orgs/{org}/apps/{app}/envs/{env}/logs", get(logs))
}

async fn logs(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<(String, String, String)>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &path).await?;
    let plan = plan(&st, &cx, &q).await?;
    let (tx, rx) = mpsc::channel::<Result<Vec<u8>, std::io::Error>>(16);
    let span = tracing::info_span!("logs", org = %cx.org.id, app = %cx.app.id, env = %cx.env.id);
    tokio::spawn(stream(st, plan, cx, q, tx).instrument(span));
    let body = Body::from_stream(tokio_stream_from(rx));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// The nodes to ask, and what is known to be unavailable already.
struct Plan {
    open: LogsOpen,
    /// Only records of this workload (earlier instances' workloads are
    /// known only from their records).
    workload: Option<String>,
    nodes: Vec<Target>,
    notices: Vec<LogNotice>,
    /// Every instance (or listener) and node asked about so far (a follow
    /// adds new ones).
    known: BTreeSet<(String, String)>,
}

/// One node and the instances it is asked about.
struct Target {
    id: String,
    name: String,
    instances: Vec<String>,
}

async fn plan(st: &AppState, cx: &EnvCx, q: &LogQuery) -> Result<Plan, ApiError> {
    let micros = |d: Duration| d.as_micros() as u64;
    let since_us = query_time("since", q.since.as_ref())?.map(micros);
    let until_us = query_time("until", q.until.as_ref())?.map(micros);
    if q.follow && until_us.is_some() {
        return Err(ApiError::bad_request(
            "until ends a history, and follow never ends: use one of them",
        ));
    }
    if let (Some(s), Some(u)) = (since_us, until_us)
        && u <= s
    {
        return Err(ApiError::bad_request(format!(
            "until ({}) is not after since ({})",
            q.until.as_deref().unwrap_or_default(),
            q.since.as_deref().unwrap_or_default()
        )));
    }
    let rows = st.store.env_instances(&cx.env.id).await?;
    let listeners = st.store.env_listeners(&cx.env.id).await?;
    if let Some(w) = &q.workload {
        let current = match st.store.current_release(&cx.env.id).await? {
            Some(row) => manifest_of(&row)?.workloads.contains_key(w),
            None => false,
        };
        if !current
            && !rows.iter().any(|i| &i.workload == w)
            && !listeners.iter().any(|l| &l.workload == w)
        {
            return Err(ApiError::not_found("workload", w).next(format!(
                "verge status {}  (the workloads of the env)",
                cx.flags()
            )));
        }
    }
    let known = rows
        .iter()
        .map(|i| &i.id)
        .chain(listeners.iter().map(|l| &l.id))
        .any(|i| q.instance.as_ref() == Some(i));
    let mut wanted = started(&rows, q);
    wanted.extend(listened(&listeners, q));
    let has = |wanted: &BTreeSet<(String, String)>, id: &str| wanted.iter().any(|(i, _)| i == id);
    if q.previous || (q.instance.is_some() && !known) {
        for p in st.store.placed_history(&cx.env.id, HISTORY).await? {
            let current = rows.iter().any(|i| i.id == p.instance_id);
            let chosen = q.instance.as_ref().is_none_or(|id| id == &p.instance_id);
            if !current && chosen && !has(&wanted, &p.instance_id) {
                wanted.insert((p.instance_id, p.node_id));
            }
        }
    }
    if let Some(id) = &q.instance
        && !has(&wanted, id)
        && !known
    {
        return Err(ApiError::not_found("instance", id).next(format!(
            "verge status {}  (instances of the env; add --previous for earlier ones)",
            cx.flags()
        )));
    }
    // A current instance the filters leave out says why, not nothing.
    let mut notices = Vec::new();
    if let Some(row) = rows.iter().find(|i| Some(&i.id) == q.instance.as_ref()) {
        if let Some(w) = q.workload.as_ref().filter(|w| **w != row.workload) {
            return Err(ApiError::bad_request(format!(
                "instance {} is of workload {}, not {w}",
                row.id, row.workload
            )));
        }
        if !has(&wanted, &row.id) {
            notices.push(LogNotice {
                notice: format!(
                    "instance {} has no logs yet: it is {} and has not started on a node",
                    row.id, row.state
                ),
                node: row.node_name.clone(),
                instances: vec![row.id.clone()],
            });
        }
    }
    let mut plan = Plan {
        open: LogsOpen {
            instances: Vec::new(),
            source: q.source,
            min_severity: q.severity,
            since_us,
            until_us,
            follow: q.follow,
        },
        workload: q.workload.clone(),
        nodes: Vec::new(),
        notices,
        known: wanted.clone(),
    };
    targets(st, wanted, &mut plan).await?;
    Ok(plan)
}

/// The env's current instances that match `q` and have started on a node
/// (an instance still waiting for its first start has no logs yet: a
/// follow picks it up once it has), by ID, with their node.
fn started(rows: &[InstanceRow], q: &LogQuery) -> BTreeSet<(String, String)> {
    rows.iter()
        .filter(|i| q.workload.as_ref().is_none_or(|w| &i.workload == w))
        .filter(|i| q.instance.as_ref().is_none_or(|id| &i.id == id))
        .filter(|i| i.state != "pending" || i.restarts > 0)
        .filter_map(|i| Some((i.id.clone(), i.node_id.clone()?)))
        .collect()
}

/// The listeners nodes reported that match `q`, by ID, with their node
/// (one listener ID runs on every node that answers its workload).
fn listened(rows: &[ListenerRow], q: &LogQuery) -> BTreeSet<(String, String)> {
    rows.iter()
        .filter(|l| q.workload.as_ref().is_none_or(|w| &l.workload == w))
        .filter(|l| q.instance.as_ref().is_none_or(|id| &l.id == id))
        .map(|l| (l.id.clone(), l.node_id.clone()))
        .collect()
}

/// Groups `wanted` (instance, node) by node into `plan`: a target per
/// reachable node, a notice per offline one.
async fn targets(
    st: &AppState,
    wanted: BTreeSet<(String, String)>,
    plan: &mut Plan,
) -> Result<(), ApiError> {
    let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (instance, node) in wanted {
        by_node.entry(node).or_default().push(instance);
    }
    let nodes = st.store.nodes().await?;
    for (node_id, instances) in by_node {
        let row = nodes.iter().find(|n| n.id == node_id);
        let name = row.map_or_else(|| node_id.clone(), |n| n.name.clone());
        match row {
            Some(n) if n.state != "offline" => plan.nodes.push(Target {
                id: node_id,
                name,
                instances,
            }),
            _ => {
                let why = match row {
                    Some(n) => format!("offline since {}", rfc3339(n.state_since)),
                    None => "the node was removed".to_string(),
                };
                plan.notices.push(LogNotice {
                    notice: format!("logs of instances on node {name} unavailable: {why}"),
                    node: Some(name),
                    instances,
                });
            }
        }
    }
    Ok(())
}

/// What a node's reader task passes on.
enum FromNode {
    Frame(LogsFrame),
    /// The node could not be asked, or its stream broke.
    Failed(String),
}

/// Asks one node and passes its frames on until the stream ends or the
/// merge stops listening (which drops the stream: the node stops too).
async fn ask(st: AppState, target: Target, mut open: LogsOpen, tx: mpsc::Sender<FromNode>) {
    let follow = open.follow;
    open.instances = target.instances;
    let opened = st
        .cluster
        .open_node_stream(&target.id, &NodeStream::Logs(open))
        .await;
    let (_send, recv) = match opened {
        Ok(streams) => streams,
        Err(why) => {
            let _ = tx.send(FromNode::Failed(why)).await;
            return;
        }
    };
    let name = &target.name;
    let mut reader = Reader::new(recv);
    let mut history_done = false;
    loop {
        // A node that goes quiet before its history is complete would hold
        // back every node's lines: it is given up on, and said so.
        let next = async {
            if history_done {
                Ok(reader.next::<LogsFrame>().await)
            } else {
                tokio::time::timeout(HISTORY_IDLE, reader.next::<LogsFrame>()).await
            }
        };
        let item = tokio::select! {
            frame = next => match frame {
                Ok(Ok(Some(frame))) => {
                    history_done |= frame == LogsFrame::HistoryEnd;
                    FromNode::Frame(frame)
                }
                Ok(Ok(None)) if history_done && !follow => return,
                Ok(Ok(None)) if history_done => FromNode::Failed(format!("node {name} ended its logs stream")),
                Ok(Ok(None)) => FromNode::Failed(format!("node {name} ended its logs stream before the whole history was sent")),
                Ok(Err(e)) => FromNode::Failed(format!("node {name}: logs stream broke: {e}")),
                Err(_) => FromNode::Failed(format!("node {name} sent nothing for {}s", HISTORY_IDLE.as_secs())),
            },
            () = tx.closed() => return,
        };
        let last = matches!(item, FromNode::Failed(_));
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// One node as the merge sees it.
struct Source {
    name: String,
    rx: mpsc::Receiver<FromNode>,
    buffered: VecDeque<InstanceRecord>,
    /// Its history is complete (or it failed).
    done: bool,
}

/// Lines on their way to the answer.
struct Out {
    tx: mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
    buf: Vec<u8>,
    workload: Option<String>,
}

impl Out {
    fn line(&mut self, node: &str, r: InstanceRecord) {
        if self.workload.as_ref().is_some_and(|w| w != &r.workload) {
            return;
        }
        let line = LogItem::Line(LogLine {
            time: rfc3339_micros(r.record.time_us),
            source: r.record.source,
            workload: r.workload,
            instance: r.instance,
            severity: r.record.severity,
            message: r.record.message,
            stream: r.record.stream,
            node: node.to_string(),
        });
        serde_json::to_writer(&mut self.buf, &line).expect("log lines serialise");
        self.buf.push(b'\n');
    }

    fn notice(&mut self, notice: LogNotice) {
        serde_json::to_writer(&mut self.buf, &LogItem::Notice(notice)).expect("notices serialise");
        self.buf.push(b'\n');
    }

    /// Hands what is gathered to the answer; `false` once the client left.
    async fn flush(&mut self) -> bool {
        if self.buf.is_empty() {
            return !self.tx.is_closed();
        }
        self.tx
            .send(Ok(std::mem::take(&mut self.buf)))
            .await
            .is_ok()
    }

    async fn maybe_flush(&mut self) -> bool {
        self.buf.len() < FLUSH_AT || self.flush().await
    }
}

async fn stream(
    st: AppState,
    plan: Plan,
    cx: EnvCx,
    query: LogQuery,
    tx: mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
) {
    let mut out = Out {
        tx,
        buf: Vec::new(),
        workload: plan.workload,
    };
    for n in plan.notices {
        out.notice(n);
    }
    let mut sources = Vec::new();
    for target in plan.nodes {
        let (ntx, rx) = mpsc::channel(PER_NODE);
        sources.push(Source {
            name: target.name.clone(),
            rx,
            buffered: VecDeque::new(),
            done: false,
        });
        tokio::spawn(ask(st.clone(), target, plan.open.clone(), ntx).in_current_span());
    }
    if !out.flush().await || !history(&mut sources, &mut out).await || !out.flush().await {
        return;
    }
    if plan.open.follow {
        let follow_with = Follow {
            cx,
            query,
            open: plan.open,
            known: plan.known,
        };
        follow(&st, follow_with, sources, out).await;
    }
}

/// Merges the nodes' histories in time order: a record is written only
/// once every node still sending history has one buffered to compare.
async fn history(sources: &mut [Source], out: &mut Out) -> bool {
    loop {
        for s in sources.iter_mut() {
            while !s.done && s.buffered.is_empty() {
                match s.rx.recv().await {
                    Some(FromNode::Frame(LogsFrame::Records { records })) => {
                        s.buffered.extend(records);
                    }
                    Some(FromNode::Frame(LogsFrame::HistoryEnd)) => s.done = true,
                    Some(FromNode::Frame(LogsFrame::Missing { instance, reason })) => {
                        out.notice(LogNotice {
                            notice: reason,
                            node: Some(s.name.clone()),
                            instances: vec![instance],
                        });
                    }
                    Some(FromNode::Failed(why)) => {
                        out.notice(failed(&s.name, why));
                        s.done = true;
                    }
                    None => s.done = true,
                }
            }
        }
        let next = sources
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.buffered.front().map(|r| (r.record.time_us, i)))
            .min();
        let Some((_, i)) = next else { return true };
        let s = &mut sources[i];
        let record = s.buffered.pop_front().expect("has a front");
        out.line(&s.name, record);
        if !out.maybe_flush().await {
            return false;
        }
    }
}

fn failed(node: &str, why: String) -> LogNotice {
    LogNotice {
        notice: format!("logs of instances on node {node} unavailable: {why}"),
        node: Some(node.to_string()),
        instances: Vec::new(),
    }
}

/// New records as the nodes send them, until the client leaves or the
/// server shuts down. Every [`REPLAN`] it looks for instances that started
/// since (a deploy, a scale, a replacement) and follows them too.
async fn follow(st: &AppState, follow: Follow, sources: Vec<Source>, mut out: Out) {
    let (live_tx, mut live) = mpsc::channel::<(String, FromNode)>(PER_NODE * 4);
    for s in sources {
        forward(s.name, s.rx, live_tx.clone());
    }
    let Follow {
        cx,
        query,
        mut open,
        mut known,
    } = follow;
    // New instances: their whole history (within `since`), then live.
    let mut replan = tokio::time::interval(REPLAN);
    replan.tick().await;
    let mut quiet = tokio::time::Instant::now();
    loop {
        let item = tokio::select! {
            item = live.recv() => item,
            () = out.tx.closed() => return,
            () = st.shutdown.cancelled() => return,
            _ = replan.tick() => {
                let Ok(rows) = st.store.env_instances(&cx.env.id).await else { continue };
                let Ok(listeners) = st.store.env_listeners(&cx.env.id).await else { continue };
                let new: BTreeSet<(String, String)> = started(&rows, &query)
                    .into_iter()
                    .chain(listened(&listeners, &query))
                    .filter(|pair| known.insert(pair.clone()))
                    .collect();
                if new.is_empty() {
                    continue;
                }
                let mut plan = Plan {
                    open: open.clone(),
                    workload: None,
                    nodes: Vec::new(),
                    notices: Vec::new(),
                    known: Default::default(),
                };
                if targets(st, new, &mut plan).await.is_err() {
                    continue;
                }
                for n in plan.notices {
                    out.notice(n);
                }
                for target in plan.nodes {
                    let (ntx, rx) = mpsc::channel(PER_NODE);
                    forward(target.name.clone(), rx, live_tx.clone());
                    open.instances.clear();
                    tokio::spawn(ask(st.clone(), target, open.clone(), ntx).in_current_span());
                }
                if !out.flush().await {
                    return;
                }
                continue;
            }
            () = tokio::time::sleep_until(quiet + KEEPALIVE) => {
                if out.tx.send(Ok(b"\n".to_vec())).await.is_err() {
                    return;
                }
                quiet = tokio::time::Instant::now();
                continue;
            }
        };
        quiet = tokio::time::Instant::now();
        match item {
            Some((node, FromNode::Frame(LogsFrame::Records { records }))) => {
                for r in records {
                    out.line(&node, r);
                }
            }
            Some((node, FromNode::Frame(LogsFrame::Missing { instance, reason }))) => {
                out.notice(LogNotice {
                    notice: reason,
                    node: Some(node),
                    instances: vec![instance],
                });
            }
            Some((_, FromNode::Frame(LogsFrame::HistoryEnd))) => {}
            Some((node, FromNode::Failed(why))) => out.notice(failed(&node, why)),
            // `live_tx` is held here: the channel never closes.
            None => return,
        }
        if !out.flush().await {
            return;
        }
    }
}

/// What a follow needs to find instances that start later.
struct Follow {
    cx: EnvCx,
    query: LogQuery,
    open: LogsOpen,
    known: BTreeSet<(String, String)>,
}

/// Passes one node's items on to the follow's channel, until either side
/// is gone (dropping `rx` then ends that node's stream).
fn forward(name: String, mut rx: mpsc::Receiver<FromNode>, tx: mpsc::Sender<(String, FromNode)>) {
    tokio::spawn(
        async move {
            loop {
                let item = tokio::select! {
                    item = rx.recv() => item,
                    () = tx.closed() => return,
                };
                let Some(item) = item else { return };
                if tx.send((name.clone(), item)).await.is_err() {
                    return;
                }
            }
        }
        .in_current_span(),
    );
}
