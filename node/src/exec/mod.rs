//! Exec sessions on the node (SPEC §5 Exec). STUB: to be written.

use quinn::{RecvStream, SendStream, VarInt};
use verge_api::wire::ExecOpen;

use crate::reconcile::Reconciler;

/// Exec sessions of this node's instances, and their limits.
#[derive(Debug, Clone, Default)]
pub struct Exec {}

impl Exec {
    /// Serves one exec stream (see [`ExecOpen`]).
    pub async fn serve(
        &self,
        _open: ExecOpen,
        mut send: SendStream,
        _recv: RecvStream,
        _reconciler: &Reconciler,
        _node: &str,
    ) {
        let _ = send.reset(VarInt::from_u32(0));
    }
}
