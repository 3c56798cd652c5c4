//! A joined node's session: mutual TLS identifies the node, then one
//! bidirectional stream carries its heartbeats, instance reports and
//! listener reports ([`super::listeners`]) in, and its desired sets out
//! (whenever its version moves past the last one sent).
//! While it lasts, the connection is in the registry of sessions, where
//! ingresses' tunnels find it ([`super::tunnel`]).

use std::time::Duration;

use quinn::{RecvStream, SendStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use verge_api::wire::io::{Reader, Writer};
use verge_api::wire::{ControlMsg, InstanceReport, NodeMsg};

use super::Cluster;
use crate::store::{Hello, NewEvent, NodeRow, Reported, Result};

impl Cluster {
    pub(super) async fn session(&self, conn: quinn::Connection, shutdown: CancellationToken) {
        let Some(node) = self.identify(&conn).await else {
            conn.close(
                2u32.into(),
                b"unknown node certificate: join again with a new token",
            );
            return;
        };
        let span = tracing::info_span!("session", node = %node.id, name = %node.name);
        match self
            .run_session(&conn, node, shutdown)
            .instrument(span.clone())
            .await
        {
            Ok(()) => span.in_scope(|| tracing::info!("session ended")),
            Err(e) => span.in_scope(|| tracing::info!(error = %e, "session ended")),
        }
    }

    /// The node whose certificate the peer presented.
    async fn identify(&self, conn: &quinn::Connection) -> Option<NodeRow> {
        let certs = conn
            .peer_identity()?
            .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
            .ok()?;
        let fingerprint = super::ca::sha256_hex(certs.first()?);
        match self.inner.store.node_by_cert(&fingerprint).await {
            Ok(node) => node,
            Err(e) => {
                tracing::warn!(error = %e, "looking up a node certificate failed");
                None
            }
        }
    }

    async fn run_session(
        &self,
        conn: &quinn::Connection,
        node: NodeRow,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        let (send, recv): (SendStream, RecvStream) =
            conn.accept_bi().await.map_err(|e| e.to_string())?;
        let (mut reader, mut writer) = (Reader::new(recv), Writer::new(send));
        let Some(NodeMsg::Hello {
            version,
            labels,
            capacity,
            isolation,
            applied_version,
            instances,
            behind_nat,
        }) = reader.next().await.map_err(|e| e.to_string())?
        else {
            return Err("the node's first message was not hello".into());
        };
        let store = &self.inner.store;
        let labels = serde_json::to_string(&labels).expect("a string map serialises");
        let mut tx = store.mutation().await.map_err(|e| e.to_string())?;
        let came_back = tx
            .node_online(
                &node,
                &Hello {
                    labels: &labels,
                    cpu_millis: (capacity.cpu * 1000.0).round() as i64,
                    memory: capacity.memory as i64,
                    isolation: &isolation.to_string(),
                    version: &version,
                    applied_version: applied_version as i64,
                    behind_nat,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())?;
        tracing::info!(came_back, instances = instances.len(), "node online");
        for r in &instances {
            self.apply_report(&node, r)
                .await
                .map_err(|e| e.to_string())?;
        }
        self.forget_gone(&node, &instances)
            .await
            .map_err(|e| e.to_string())?;
        self.poke();
        writer
            .send(&ControlMsg::Welcome {
                node_id: node.id.clone(),
                name: node.name.clone(),
                heartbeat_ms: self.inner.config.heartbeat.as_millis() as u64,
            })
            .await
            .map_err(|e| e.to_string())?;
        // Ingresses' tunnels to this node go through this connection now.
        let _registered = self.register_session(&node.id, conn);

        let mut desired = self.inner.desired.subscribe();
        let mut sent: Option<i64> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        // Whether the node's desired version may have moved: at the start,
        // when this replica's reconciler changed a set, and on every tick
        // (other replicas' changes); not after each message the node sends.
        let mut recheck = true;
        loop {
            // Send the node's desired set whenever its version moved.
            let row = if std::mem::take(&mut recheck) {
                store.node(&node.id).await
            } else {
                Ok(None)
            };
            match row {
                Ok(Some(now)) if sent.is_none_or(|v| now.desired_version > v) => {
                    let set = crate::reconcile::desired_set(store, &self.inner.keyring, &now)
                        .await
                        .map_err(|e| e.to_string())?;
                    tracing::debug!(
                        version = set.version,
                        instances = set.instances.len(),
                        listeners = set.listeners.len(),
                        "sending desired set"
                    );
                    writer
                        .send(&ControlMsg::Desired(set))
                        .await
                        .map_err(|e| e.to_string())?;
                    sent = Some(now.desired_version);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reading the node's desired version failed"),
            }
            tokio::select! {
                msg = reader.next::<NodeMsg>() => match msg.map_err(|e| e.to_string())? {
                    None => return Ok(()),
                    Some(NodeMsg::Heartbeat { capacity, usage, volumes }) => {
                        crate::volumes::record_usage(store, &node, &volumes).await;
                        let usage = serde_json::to_string(&usage).expect("usage serialises");
                        let back = store
                            .node_heartbeat(&node, (capacity.cpu * 1000.0).round() as i64, capacity.memory as i64, &usage)
                            .await
                            .map_err(|e| e.to_string())?;
                        if back {
                            tracing::info!("node online again: its heartbeats resumed");
                            self.poke();
                        }
                    }
                    Some(NodeMsg::Report(r)) => {
                        self.apply_report(&node, &r).await.map_err(|e| e.to_string())?;
                    }
                    Some(NodeMsg::Listeners { listeners }) => {
                        self.apply_listeners(&node, &listeners).await.map_err(|e| e.to_string())?;
                    }
                    Some(NodeMsg::Hello { .. }) => return Err("hello sent twice".into()),
                },
                _ = desired.changed() => recheck = true,
                _ = tick.tick() => recheck = true,
                () = shutdown.cancelled() => {
                    conn.close(0u32.into(), b"control plane shutting down");
                    return Ok(());
                }
            }
        }
    }

    /// Instances the control plane was waiting to see stopped that the node
    /// no longer has (its `stopped` report was lost while disconnected, or
    /// it stopped them while restarting): they are gone, so forget them.
    async fn forget_gone(&self, node: &NodeRow, present: &[InstanceReport]) -> Result<()> {
        let store = &self.inner.store;
        let gone: Vec<_> = store
            .node_instances(&node.id)
            .await?
            .into_iter()
            .filter(|i| i.goal == "stop" && !present.iter().any(|r| r.id == i.id))
            .collect();
        for i in gone {
            let mut tx = store.mutation().await?;
            let scope = tx.env_scope(&i.env_id).await?;
            tx.delete_instance(&i.id).await?;
            tx.emit(NewEvent {
                org_id: scope.as_ref().map(|s| s.org_id.as_str()),
                app_id: scope.as_ref().map(|s| s.app_id.as_str()),
                env_id: Some(&i.env_id),
                release_id: Some(&i.release_id),
                instance_id: Some(&i.id),
                node_id: Some(&node.id),
                kind: "instance.stopped",
                message: format!(
                    "instance {} of {} on {}: stopped (the node no longer runs it)",
                    i.id, i.workload, node.name
                ),
                actor: None,
            })
            .await?;
            tx.commit().await?;
        }
        Ok(())
    }

    /// Records a node's report on one of its instances, with an event when
    /// the state changed; forgets instances that stopped because they were
    /// no longer wanted.
    async fn apply_report(&self, node: &NodeRow, r: &InstanceReport) -> Result<()> {
        let store = &self.inner.store;
        let mut tx = store.mutation().await?;
        let Some(before) = tx.instance(&r.id).await? else {
            return Ok(());
        };
        if before.node_id.as_deref() != Some(node.id.as_str()) {
            return Ok(());
        }
        let state = r.state.as_str();
        let category = r.category.map(|c| c.as_str());
        tx.report_instance(
            &node.id,
            &r.id,
            &Reported {
                state,
                category,
                message: r.message.as_deref(),
                address: r.address.as_deref(),
                restarts: i64::from(r.restarts),
                healthy: r.healthy,
            },
        )
        .await?;
        let changed = before.state != state
            || before.category.as_deref() != category
            || before.restarts != i64::from(r.restarts)
            || before.healthy() != r.healthy;
        if changed {
            let scope = tx.env_scope(&before.env_id).await?;
            let mut message = format!(
                "instance {} of {} on {}: {state}",
                r.id, before.workload, node.name
            );
            if let Some(c) = category {
                message.push_str(&format!(" ({c})"));
            }
            if let Some(m) = &r.message {
                message.push_str(&format!(": {m}"));
            }
            if let (Some(a), "running") = (&r.address, state) {
                message.push_str(&format!(" at {a}"));
            }
            match r.healthy {
                Some(true) => message.push_str(", healthy"),
                Some(false) => message.push_str(", unhealthy"),
                None => {}
            }
            tx.emit(NewEvent {
                org_id: scope.as_ref().map(|s| s.org_id.as_str()),
                app_id: scope.as_ref().map(|s| s.app_id.as_str()),
                env_id: Some(&before.env_id),
                release_id: Some(&before.release_id),
                instance_id: Some(&r.id),
                node_id: Some(&node.id),
                kind: match (state, r.healthy) {
                    ("failed", _) => "instance.failed",
                    ("running", Some(true)) => "instance.healthy",
                    ("running", Some(false)) => "instance.unhealthy",
                    ("running", None) => "instance.running",
                    ("stopped", _) => "instance.stopped",
                    _ => "instance.state",
                },
                message,
                actor: None,
            })
            .await?;
        }
        if state == "stopped" && before.goal == "stop" {
            tx.delete_instance(&r.id).await?;
        }
        tx.commit().await?;
        if changed {
            // Its rollout may move on.
            self.poke_env(&before.env_id);
        }
        Ok(())
    }
}
