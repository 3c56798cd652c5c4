//! Instance logs on the node (SPEC §5 Logs). STUB: to be written.

use quinn::{RecvStream, SendStream, VarInt};
use verge_api::wire::LogsOpen;

use crate::reconcile::Reconciler;

/// The node's log store: where instance logs live and their limits.
#[derive(Debug, Clone, Default)]
pub struct Logs {}

impl Logs {
    /// Serves one logs stream (see [`LogsOpen`]).
    pub async fn serve(
        &self,
        _open: LogsOpen,
        mut send: SendStream,
        _recv: RecvStream,
        _reconciler: &Reconciler,
    ) {
        let _ = send.reset(VarInt::from_u32(0));
    }
}
