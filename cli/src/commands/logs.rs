//! `verge logs`: an env's logs, history then (with `--follow`) new lines.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::time::Instant;

use verge_api::logs::{LogItem, LogNotice, LogQuery};

use super::Result;
use super::follow::Reconnect;
use crate::args::LogsArgs;
use crate::context::Context;
use crate::output::Output;

pub async fn logs(ctx: &Context, args: LogsArgs, out: &Output) -> Result {
    let names = ctx.env_names().await?;
    let mut query = LogQuery {
        workload: args.workload,
        instance: args.instance,
        source: parse(args.source)?,
        severity: parse(args.severity)?,
        since: args.since,
        until: args.until,
        previous: args.previous,
        follow: args.follow,
    };
    // A first request that fails is an error: wrong server, token, env, filter.
    let mut stream = ctx.client.logs(names.scope(), &query).await?;
    // The newest time printed, and the lines printed at that very
    // microsecond: after a reconnect the history repeats up to there.
    let mut last: Option<String> = None;
    let mut at_last: HashSet<(String, String)> = HashSet::new();
    let mut resumed = false;
    let mut reconnect = Reconnect::new();
    loop {
        let connected = Instant::now();
        let mut received = false;
        let why = loop {
            match stream.next().await {
                Some(Ok(LogItem::Line(line))) => {
                    if resumed {
                        match last.as_ref().map(|t| line.time.cmp(t)) {
                            Some(Ordering::Less) => continue,
                            Some(Ordering::Equal)
                                if at_last
                                    .contains(&(line.instance.clone(), line.message.clone())) =>
                            {
                                continue;
                            }
                            _ => {}
                        }
                    }
                    match last.as_ref().map(|t| line.time.cmp(t)) {
                        Some(Ordering::Equal) => {}
                        Some(Ordering::Less) => {}
                        _ => {
                            last = Some(line.time.clone());
                            at_last.clear();
                        }
                    }
                    if last.as_ref() == Some(&line.time) {
                        at_last.insert((line.instance.clone(), line.message.clone()));
                    }
                    received = true;
                    out.stream_item(&line, ToString::to_string);
                }
                Some(Ok(LogItem::Notice(n))) => notice(out, &n),
                Some(Err(e)) if !query.follow => return Err(e.into()),
                Some(Err(e)) => break e.to_string(),
                None if !query.follow => return Ok(()),
                None => break "the server ended the log stream".to_string(),
            }
        };
        reconnect.ended(connected.elapsed(), received);
        // Resume at the newest line printed: older lines of the repeated
        // history, and those printed at that same microsecond, are skipped.
        if let Some(t) = &last {
            query.since = Some(t.clone());
            resumed = true;
        }
        stream = reconnect
            .again(out, why, || ctx.client.logs(names.scope(), &query))
            .await?;
    }
}

/// What could not be read goes to stderr: a JSON line under `-o json`
/// (stdout stays lines only), `verge: …` otherwise.
fn notice(out: &Output, n: &LogNotice) {
    if out.is_json() {
        eprintln!("{}", serde_json::to_string(n).expect("notices serialise"));
    } else {
        eprintln!("verge: {}", n.notice);
    }
}

fn parse<T: std::str::FromStr<Err = String>>(text: Option<String>) -> Result<Option<T>> {
    text.map(|t| t.parse().map_err(super::bad_request))
        .transpose()
}
