//! `POST /v1/orgs/{org}/apps/{app}/envs/{env}/exec`: a command run in a
//! running instance (SPEC §4 `verge exec`; the protocol is in
//! [`verge_api::exec`]).
//!
//! The handler checks the caller, picks the instance (the one named, or
//! the only running one; several without a choice is refused with their
//! IDs), refuses wasm workloads, asks the instance's node over a QUIC
//! stream of its session, records `exec.started` (who, which instance,
//! the command; never its input or output), and answers `101` with the
//! upgraded connection relayed byte for byte to and from the node's
//! stream. A client that goes away resets the node's stream, which ends
//! the command and everything it started. `exec.ended` records the exit.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hyper_util::rt::TokioIo;
use quinn::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt as _;
use tracing::Instrument;
use verge_api::ErrorKind;
use verge_api::exec::{ExecRequest, ExecStarted};
use verge_api::manifest::Runtime;
use verge_api::wire::{ExecOpen, ExecReply, NodeStream};

use super::scope::{EnvCx, manifest_of};
use super::{AppState, Path};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::store::{InstanceRow, NewEvent};

/// The largest request body (the command line).
const MAX_REQUEST: usize = 256 * 1024;
/// How long a node may take to start the command.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// After the client left: how long the node gets to say how the command ended.
const END_TIMEOUT: Duration = Duration::from_secs(5);

pub fn routes() -> Router<AppState> {
    Router::new().route("/orgs/{org}/apps/{app}/envs/{env}/exec", post(exec))
}

async fn exec(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<(String, String, String)>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &path).await?;
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if upgrade != Some(verge_api::exec::UPGRADE) {
        return Err(ApiError::bad_request(format!(
            "exec needs an HTTP/1.1 connection upgraded to {}",
            verge_api::exec::UPGRADE
        ))
        .next("use verge exec, which speaks it"));
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let body = axum::body::to_bytes(req.into_body(), MAX_REQUEST)
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the exec request: {e}")))?;
    let request: ExecRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("invalid exec request: {e}"))
            .next("send an ExecRequest JSON object (see docs/cli.md)")
    })?;
    if request.command.is_empty() || request.command[0].is_empty() {
        return Err(ApiError::bad_request("exec needs a command to run")
            .next("verge exec -- sh  (the command follows --)"));
    }
    let (instance, node) = choose(&st, &cx, &request).await?;
    let span = tracing::info_span!(
        "exec",
        org = %cx.org.id, app = %cx.app.id, env = %cx.env.id,
        instance = %instance.id, node = %node.1,
    );
    let open = ExecOpen {
        instance: instance.id.clone(),
        command: request.command.clone(),
        stdin: request.stdin,
        tty: request.tty,
        size: request.size,
        term: request.term.clone(),
    };
    let (mut send, recv) = start(&st, &node, open).instrument(span.clone()).await?;
    let command = shell_words(&request.command);
    let started = ExecStarted {
        instance: instance.id.clone(),
        workload: instance.workload.clone(),
        node: node.1.clone(),
    };
    let message = format!(
        "exec into instance {} of {} on node {} by {}: {command}{}",
        instance.id,
        instance.workload,
        node.1,
        cx.actor,
        if request.tty { " (tty)" } else { "" }
    );
    if let Err(e) = record(&st, &cx, &instance, &node.0, "exec.started", message).await {
        let _ = send.reset(0u32.into());
        return Err(e);
    }
    tracing::info!(parent: &span, %command, actor = %cx.actor, "exec session started");
    let session = Session {
        st: st.clone(),
        cx,
        instance,
        node_id: node.0,
    };
    tokio::spawn(session.relay(on_upgrade, send, recv).instrument(span));
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(
        header::UPGRADE,
        HeaderValue::from_static(verge_api::exec::UPGRADE),
    );
    let started = serde_json::to_string(&started).expect("serialises");
    if let Ok(v) = HeaderValue::from_str(&started) {
        headers.insert(verge_api::exec::STARTED_HEADER, v);
    }
    Ok(resp)
}

/// The instance to run in and its node (ID, name), or why none is.
async fn choose(
    st: &AppState,
    cx: &EnvCx,
    req: &ExecRequest,
) -> Result<(InstanceRow, (String, String)), ApiError> {
    let release = st.store.current_release(&cx.env.id).await?.ok_or_else(|| {
        ApiError::conflict(format!("nothing is deployed in {}", cx.label()))
            .next(format!("verge deploy {}", cx.flags()))
    })?;
    let manifest = manifest_of(&release)?;
    let wasm = |workload: &str| {
        manifest
            .workloads
            .get(workload)
            .is_some_and(|w| w.runtime == Runtime::Wasm)
    };
    let no_wasm = |workload: &str| -> Result<(), ApiError> {
        if wasm(workload) {
            return Err(ApiError::bad_request(format!(
                "exec is not supported for wasm workloads: {workload} runs as WebAssembly, with no processes to run a command in"
            ))
            .next(format!("verge logs --workload {workload} {}", cx.flags())));
        }
        Ok(())
    };
    if let Some(w) = &req.workload {
        if !manifest.workloads.contains_key(w) {
            return Err(ApiError::not_found("workload", w).next(format!(
                "verge status {}  (the workloads of the env)",
                cx.flags()
            )));
        }
        no_wasm(w)?;
    }
    let rows = st.store.env_instances(&cx.env.id).await?;
    let chosen = match &req.instance {
        Some(id) => {
            let row = rows.iter().find(|i| &i.id == id).ok_or_else(|| {
                ApiError::not_found("instance", id)
                    .next(format!("verge status {}  (its instances)", cx.flags()))
            })?;
            if let Some(w) = &req.workload
                && &row.workload != w
            {
                return Err(ApiError::bad_request(format!(
                    "instance {id} is of workload {}, not {w}",
                    row.workload
                )));
            }
            no_wasm(&row.workload)?;
            if row.goal != "run" || row.state != "running" {
                return Err(ApiError::conflict(format!(
                    "instance {id} is {}{}, not running: exec runs only in a running instance",
                    row.state,
                    if row.goal == "run" {
                        ""
                    } else {
                        " (being stopped)"
                    }
                ))
                .next(format!("verge logs --instance {id} {}", cx.flags())));
            }
            row.clone()
        }
        None => {
            let running: Vec<&InstanceRow> = rows
                .iter()
                .filter(|i| req.workload.as_ref().is_none_or(|w| &i.workload == w))
                .filter(|i| i.goal == "run" && i.state == "running" && !wasm(&i.workload))
                .collect();
            let what = req
                .workload
                .as_ref()
                .map_or_else(|| cx.label(), |w| format!("workload {w} of {}", cx.label()));
            match running.as_slice() {
                [] => {
                    if let Some(w) = rows.iter().map(|i| &i.workload).find(|w| wasm(w)) {
                        no_wasm(w)?;
                    }
                    return Err(
                        ApiError::conflict(format!("no instance of {what} is running"))
                            .next(format!("verge status {}", cx.flags())),
                    );
                }
                [one] => (*one).clone(),
                several => {
                    let list: Vec<String> = several
                        .iter()
                        .map(|i| {
                            format!(
                                "{} ({} on {})",
                                i.id,
                                i.workload,
                                i.node_name.as_deref().unwrap_or("?")
                            )
                        })
                        .collect();
                    return Err(ApiError::conflict(format!(
                        "{} instances of {what} are running; choose one with --instance: {}",
                        several.len(),
                        list.join(", ")
                    ))
                    .next(format!(
                        "verge exec --instance {} {} -- …",
                        several[0].id,
                        cx.flags()
                    )));
                }
            }
        }
    };
    let node_id = chosen.node_id.clone().ok_or_else(|| {
        ApiError::conflict(format!("instance {} is not placed on a node", chosen.id))
    })?;
    let node = st.store.node(&node_id).await?;
    let name = node
        .as_ref()
        .map_or_else(|| node_id.clone(), |n| n.name.clone());
    if let Some(n) = &node
        && n.state == "offline"
    {
        return Err(ApiError::new(
            ErrorKind::Unavailable,
            format!(
                "instance {} is on node {name}, which is offline since {}",
                chosen.id,
                crate::time::rfc3339(n.state_since)
            ),
        ));
    }
    Ok((chosen, (node_id, name)))
}

/// Opens the node's stream and waits for the command to start.
async fn start(
    st: &AppState,
    (node_id, name): &(String, String),
    open: ExecOpen,
) -> Result<(SendStream, RecvStream), ApiError> {
    let unavailable = |m: String| ApiError::new(ErrorKind::Unavailable, m);
    let (send, mut recv) = st
        .cluster
        .open_node_stream(node_id, &NodeStream::Exec(open))
        .await
        .map_err(unavailable)?;
    let reply = tokio::time::timeout(
        START_TIMEOUT,
        verge_api::wire::io::read_one::<ExecReply, _>(&mut recv, 64 * 1024),
    )
    .await
    .map_err(|_| {
        unavailable(format!(
            "node {name} did not start the command within {START_TIMEOUT:?}"
        ))
    })?
    .map_err(|e| unavailable(format!("node {name} did not answer the exec: {e}")))?;
    match reply {
        ExecReply::Started => Ok((send, recv)),
        ExecReply::Refused {
            message,
            busy: true,
        } => Err(unavailable(message)
            .next("wait for a session to end, or raise --exec-max-sessions on the node")),
        ExecReply::Refused { message, .. } => Err(ApiError::bad_request(message).next(
            "verge status  (the instance's state), or check the command's path in the image",
        )),
    }
}

async fn record(
    st: &AppState,
    cx: &EnvCx,
    instance: &InstanceRow,
    node_id: &str,
    kind: &str,
    message: String,
) -> Result<(), ApiError> {
    let mut m = st.store.mutation().await?;
    m.emit(NewEvent {
        instance_id: Some(&instance.id),
        node_id: Some(node_id),
        ..cx.event(kind, Some(&instance.release_id), message)
    })
    .await?;
    m.commit().await?;
    Ok(())
}

/// A started session, relayed until it ends.
struct Session {
    st: AppState,
    cx: EnvCx,
    instance: InstanceRow,
    node_id: String,
}

impl Session {
    async fn relay(
        self,
        on_upgrade: hyper::upgrade::OnUpgrade,
        mut send: SendStream,
        recv: RecvStream,
    ) {
        let began = Instant::now();
        let client = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::info!(error = %e, "exec client never took the upgraded connection");
                let _ = send.reset(0u32.into());
                return;
            }
        };
        let (mut from_client, to_client) = tokio::io::split(client);
        // The client never half-closes: its end of input is a frame, so
        // the end of its bytes means it is gone.
        let up = async move {
            let _ = tokio::io::copy(&mut from_client, &mut send).await;
            let _ = send.reset(0u32.into());
        };
        let down = down(recv, to_client);
        tokio::pin!(down);
        let ended = tokio::select! {
            ended = &mut down => ended,
            () = up => match tokio::time::timeout(END_TIMEOUT, &mut down).await {
                Ok(Ended::Exit(code)) => Ended::Gone(Some(code)),
                _ => Ended::Gone(None),
            },
        };
        let took = format!("{:.1}s", began.elapsed().as_secs_f64());
        let message = match ended {
            Ended::Exit(code) => format!(
                "exec in instance {} ended: exit code {code} after {took}",
                self.instance.id
            ),
            Ended::Error(why) => format!(
                "exec in instance {} broke after {took}: {why}",
                self.instance.id
            ),
            Ended::Gone(code) => format!(
                "exec in instance {} ended after {took}: the client went away; the command and its processes were stopped{}",
                self.instance.id,
                code.map(|c| format!(" (exit code {c})"))
                    .unwrap_or_default()
            ),
        };
        tracing::info!(%message, "exec session ended");
        let (st, cx, instance, node) = (&self.st, &self.cx, &self.instance, &self.node_id);
        if let Err(e) = record(st, cx, instance, node, "exec.ended", message).await {
            tracing::warn!(error = ?e.0, "recording the end of an exec session failed");
        }
    }
}

/// How a session ended, as far as the control plane saw.
enum Ended {
    Exit(i32),
    Error(String),
    /// The client left first; the exit code if the node said it in time.
    Gone(Option<i32>),
}

/// Copies the node's frames to the client, watching for the last one.
async fn down(
    mut recv: RecvStream,
    mut to_client: tokio::io::WriteHalf<TokioIo<hyper::upgrade::Upgraded>>,
) -> Ended {
    let mut scan = Scanner::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match recv.read(&mut buf).await {
            Ok(Some(n)) => {
                scan.feed(&buf[..n]);
                if to_client.write_all(&buf[..n]).await.is_err() {
                    // The client left; its side of the relay resets the node's stream.
                    let code = match scan.last {
                        Some(Ended::Exit(code)) => Some(code),
                        _ => None,
                    };
                    return Ended::Gone(code);
                }
            }
            Ok(None) => break,
            Err(e) => {
                if scan.last.is_none() {
                    scan.last = Some(Ended::Error(format!("the node's stream broke: {e}")));
                }
                break;
            }
        }
    }
    let _ = to_client.shutdown().await;
    scan.last
        .unwrap_or_else(|| Ended::Error("the node ended the session without an exit code".into()))
}

/// Follows frame boundaries in a byte stream to find `Exit` and `Error`
/// frames without buffering the output.
#[derive(Default)]
struct Scanner {
    header: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    skip: usize,
    /// The payload of an `Exit` or `Error` frame being read.
    keep: Option<(u8, Vec<u8>)>,
    last: Option<Ended>,
}

impl Scanner {
    fn feed(&mut self, mut bytes: &[u8]) {
        use verge_api::exec::{Frame, HEADER};
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                if let Some((_, payload)) = &mut self.keep {
                    payload.extend_from_slice(&bytes[..n]);
                }
                self.skip -= n;
                bytes = &bytes[n..];
            } else {
                let n = (HEADER - self.header.len()).min(bytes.len());
                self.header.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                if self.header.len() < HEADER {
                    continue;
                }
                let kind = self.header[0];
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.skip = len;
                self.keep = Some((kind, Vec::new())).filter(|_| kind >= 12 && len <= 64 * 1024);
            }
            if self.skip == 0 && self.header.len() == HEADER {
                let (kind, payload) = self.keep.take().unwrap_or_default();
                let mut whole = std::mem::take(&mut self.header);
                whole.extend_from_slice(&payload);
                if kind >= 12 {
                    match Frame::decode(&whole) {
                        Ok(Some((Frame::Exit(code), _))) => self.last = Some(Ended::Exit(code)),
                        Ok(Some((Frame::Error(why), _))) => self.last = Some(Ended::Error(why)),
                        _ => {}
                    }
                }
            }
        }
    }
}

/// The longest command line an event shows.
const SHOWN_COMMAND: usize = 300;

/// The command as a shell would show it (words with spaces or quotes
/// quoted), with passwords in URLs (`scheme://user:secret@host`) masked
/// and cut at [`SHOWN_COMMAND`] characters: events keep who ran what, not
/// credentials typed on a command line.
fn shell_words(command: &[String]) -> String {
    let text = command
        .iter()
        .map(|w| mask_url_password(w))
        .map(|w| {
            let plain = !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
            if plain {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    if text.chars().count() <= SHOWN_COMMAND {
        return text;
    }
    let cut: String = text.chars().take(SHOWN_COMMAND).collect();
    format!("{cut}… ({} characters)", text.chars().count())
}

/// `postgres://app:s3cret@db/x` → `postgres://app:***@db/x`; other text as is.
fn mask_url_password(word: &str) -> String {
    let mut out = String::new();
    let mut rest = word;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail.find(['/', ' ', '?', '#']).unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority
            .rfind('@')
            .and_then(|a| authority[..a].find(':').map(|c| (c, a)))
        {
            Some((colon, at)) => {
                out.push_str(&authority[..=colon]);
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::exec::Frame;

    #[test]
    fn the_scanner_finds_the_exit_across_any_split() {
        let mut bytes = Vec::new();
        Frame::Stdout(vec![12; 100]).encode(&mut bytes);
        Frame::Stderr(b"x".to_vec()).encode(&mut bytes);
        Frame::Exit(3).encode(&mut bytes);
        for cut in 1..bytes.len() {
            let mut s = Scanner::default();
            s.feed(&bytes[..cut]);
            s.feed(&bytes[cut..]);
            assert!(matches!(s.last, Some(Ended::Exit(3))), "cut at {cut}");
        }
        let mut s = Scanner::default();
        let mut err = Vec::new();
        Frame::Error("lost".into()).encode(&mut err);
        s.feed(&err);
        assert!(matches!(s.last, Some(Ended::Error(ref m)) if m == "lost"));
    }

    #[test]
    fn passwords_in_urls_are_masked_and_long_commands_cut() {
        let cmd = ["psql", "postgres://app:s3cret@db:5432/x", "http://host/p"].map(String::from);
        let shown = shell_words(&cmd);
        assert_eq!(shown, "psql 'postgres://app:***@db:5432/x' http://host/p");
        assert!(!shown.contains("s3cret"));
        let long = vec!["x".repeat(1000)];
        let shown = shell_words(&long);
        assert!(shown.ends_with("… (1000 characters)") && shown.chars().count() < 330);
    }

    #[test]
    fn commands_are_shown_as_a_shell_would_take_them() {
        let cmd = ["sh", "-c", "exit 3", "it's", ""].map(String::from);
        assert_eq!(shell_words(&cmd), r#"sh -c 'exit 3' 'it'\''s' ''"#);
    }
}
