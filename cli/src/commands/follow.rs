//! Reconnecting a followed stream (`verge events --follow`, `verge logs
//! --follow`): after 0.5 s, doubling up to 10 s, each retry said on stderr
//! (not under `-o json`, where stderr is kept for the one JSON error line).

use std::future::Future;
use std::time::Duration;

use verge_api::ErrorKind;
use verge_api::client::ClientError;

use super::Result;
use crate::output::Output;

const FIRST: Duration = Duration::from_millis(500);
const MAX: Duration = Duration::from_secs(10);

/// The backoff between reconnections of one followed stream.
#[derive(Debug)]
pub struct Reconnect {
    backoff: Duration,
}

impl Reconnect {
    pub fn new() -> Reconnect {
        Reconnect { backoff: FIRST }
    }

    /// A stream that lasted `lasted` ended: one that delivered something,
    /// or lasted a while, starts the backoff again.
    pub fn ended(&mut self, lasted: Duration, delivered: bool) {
        if delivered || lasted >= MAX {
            self.backoff = FIRST;
        }
    }

    /// Calls `connect` until it succeeds, waiting the backoff before each
    /// try; `why` says why the stream is gone. An error retrying cannot fix
    /// (a revoked token, a filter refused) ends it.
    pub async fn again<S, F, Fut>(
        &mut self,
        out: &Output,
        mut why: String,
        mut connect: F,
    ) -> Result<S>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<S, ClientError>>,
    {
        loop {
            if !out.is_json() {
                eprintln!(
                    "{why}; reconnecting in {}...",
                    humantime::format_duration(self.backoff)
                );
            }
            tokio::time::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(MAX);
            match connect().await {
                Ok(stream) => return Ok(stream),
                Err(e) if !transient(&e) => return Err(e.into()),
                Err(e) => why = e.to_string(),
            }
        }
    }
}

/// Whether retrying may help: the server is down or overloaded, not
/// refusing this request.
pub fn transient(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { .. } | ClientError::Decode { .. } => true,
        ClientError::Api(d) => matches!(
            d.kind,
            ErrorKind::Unavailable | ErrorKind::Internal | ErrorKind::Timeout
        ),
        ClientError::BadServer { .. } | ClientError::BadCaCert(_) => false,
    }
}
