//! A node joins: it proves it holds a join token and gets a certificate
//! for the key it made, signed by the cluster CA, and an instance prefix.

use std::net::Ipv6Addr;

use verge_api::names;
use verge_api::wire::io::{Reader, Writer};
use verge_api::wire::{JoinRequest, JoinResponse, JoinToken, Joined};

use super::Cluster;
use crate::auth::hash_token;
use crate::store::{NewEvent, NewNode, StoreError, new_node_id};
use crate::time::{now_ms, rfc3339};

/// A join token minted by [`Cluster::mint_join_token`].
#[derive(Debug, Clone)]
pub struct Minted {
    pub token: JoinToken,
    /// Milliseconds since the epoch.
    pub expires_at: i64,
}

impl Cluster {
    /// Makes a join token good for `uses` joins within `ttl`; only the
    /// secret's hash is stored, and the token pins this cluster's CA.
    pub async fn mint_join_token(
        &self,
        ttl: std::time::Duration,
        uses: i64,
        created_by: &str,
    ) -> Result<Minted, StoreError> {
        let secret = crate::auth::generate_token().replace('_', "");
        let expires_at = now_ms() + ttl.as_millis() as i64;
        let id = self
            .inner
            .store
            .create_join_token(&hash_token(&secret), expires_at, uses, created_by)
            .await?;
        Ok(Minted {
            token: JoinToken {
                id,
                secret,
                ca_sha256: self.ca_sha256().to_string(),
            },
            expires_at,
        })
    }
}

/// How long a joining node may take to send its request.
const JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Cluster {
    pub(super) async fn join(&self, conn: quinn::Connection) {
        // Unauthenticated peers get a few seconds to ask, not a connection to hold.
        let request = async {
            let (send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
            let mut reader = Reader::new(recv);
            match reader.next::<JoinRequest>().await {
                Ok(Some(r)) => Ok((r, Writer::new(send))),
                Ok(None) => Err("the node sent no request".to_string()),
                Err(e) => Err(format!("unreadable join request: {e}")),
            }
        };
        let (req, mut writer) = match tokio::time::timeout(JOIN_TIMEOUT, request).await {
            Ok(Ok(r)) => r,
            Ok(Err(why)) => {
                tracing::info!(%why, "join failed before its request");
                return;
            }
            Err(_) => {
                tracing::info!("join request timed out");
                conn.close(3u32.into(), b"join request timed out");
                return;
            }
        };
        let answer = match self.admit(&req).await {
            Ok(joined) => {
                tracing::info!(node = %joined.node_id, name = %joined.name, "node joined");
                JoinResponse::Accepted(Box::new(joined))
            }
            Err(message) => {
                tracing::info!(name = %req.name, %message, "join refused");
                JoinResponse::Refused { message }
            }
        };
        if writer.send(&answer).await.is_ok() {
            let _ = writer.get_mut().finish();
            // Wait for the node to read the answer and close.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn.closed()).await;
        }
    }

    /// Checks a join request and records the node; `Err` is the message the
    /// node shows its operator.
    async fn admit(&self, req: &JoinRequest) -> Result<Joined, String> {
        let store = &self.inner.store;
        let internal =
            |e: StoreError| format!("the control plane could not record the join: {e}; try again");
        let token = store.join_token(&req.token_id).await.map_err(internal)?;
        let Some(token) = token.filter(|t| t.secret_hash == hash_token(&req.token_secret)) else {
            return Err("the join token is not valid (unknown, or its secret is wrong): mint a new one with `verge nodes join-token`".into());
        };
        if token.expires_at <= now_ms() {
            return Err(format!(
                "the join token {} expired at {}: mint a new one with `verge nodes join-token`",
                token.id,
                rfc3339(token.expires_at)
            ));
        }
        names::validate("node", &req.name)
            .map_err(|e| format!("{e}; start the node with a valid --name"))?;
        for (k, v) in &req.labels {
            names::label(k, v).map_err(|e| format!("{e}; fix --label"))?;
        }
        // A node of that name that joined but never connected lost its join
        // answer (or crashed before saving it): this join takes its place.
        let unused = store
            .node_by_name(&req.name)
            .await
            .map_err(internal)?
            .filter(|n| n.last_seen.is_none());
        let node_id = unused.as_ref().map_or_else(new_node_id, |n| n.id.clone());
        let cert_pem = self
            .inner
            .ca
            .sign_node(&req.csr_pem, &node_id)
            .map_err(|e| e.to_string())?;
        let cert_der = super::ca::cert_from_pem(&cert_pem)
            .ok_or("signing the node certificate failed: the result does not parse")?;
        let labels = serde_json::to_string(&req.labels).expect("a string map serialises");
        let prefix = self.inner.config.instance_prefix;
        let isolation = req.isolation.to_string();
        let cert_sha256 = super::ca::sha256_hex(&cert_der);
        let new = NewNode {
            id: &node_id,
            name: &req.name,
            labels: &labels,
            cpu_millis: (req.capacity.cpu * 1000.0).round() as i64,
            memory: req.capacity.memory as i64,
            isolation: &isolation,
            version: &req.version,
            cert_sha256: &cert_sha256,
            join_token_id: &token.id,
        };
        let mut tx = store.mutation().await.map_err(internal)?;
        if !tx.use_join_token(&token.id).await.map_err(internal)? {
            return Err(format!(
                "the join token {} was already used (it allows {} join{}): mint a new one with `verge nodes join-token` (--uses N for several nodes)",
                token.id,
                token.max_uses,
                if token.max_uses == 1 { "" } else { "s" }
            ));
        }
        if unused.is_some()
            && let Some(node) = tx.rejoin_node(&new).await.map_err(internal)?
        {
            tx.commit().await.map_err(internal)?;
            tracing::info!(node = %node.id, "a node that never connected joined again");
            return Ok(Joined {
                node_id: node.id,
                name: node.name,
                cert_pem,
                ca_pem: self.inner.ca.cert_pem().to_string(),
                instance_prefix: node.instance_prefix,
            });
        }
        let node = tx
            .insert_node(&new, |index| node_prefix(prefix, index))
            .await
            .map_err(|e| match e {
                StoreError::Conflict => format!(
                    "a node named {} already exists in this cluster: start this one with another --name",
                    req.name
                ),
                e => internal(e),
            })?
            .ok_or_else(|| {
                format!(
                    "the cluster's instance prefix {prefix} has no /64 left for another node: \
                     the control plane needs a shorter instance_prefix"
                )
            })?;
        let message = format!(
            "node {} joined (isolation {}, {} cores, {} memory, instance prefix {})",
            node.name,
            req.isolation,
            req.capacity.cpu,
            verge_api::manifest::human_size(req.capacity.memory),
            node.instance_prefix
        );
        tx.emit(NewEvent::about_node(&node.id, "node.joined", message))
            .await
            .map_err(internal)?;
        tx.commit().await.map_err(internal)?;
        Ok(Joined {
            node_id: node.id,
            name: node.name,
            cert_pem,
            ca_pem: self.inner.ca.cert_pem().to_string(),
            instance_prefix: node.instance_prefix,
        })
    }
}

/// The `index`th /64 of the cluster's instance prefix; `None` past its end.
fn node_prefix(cluster: ipnet::Ipv6Net, index: i64) -> Option<String> {
    let room = 1u128 << (64 - u32::from(cluster.prefix_len()));
    if index < 1 || index as u128 >= room {
        return None;
    }
    let base = u128::from(cluster.network());
    let addr = Ipv6Addr::from(base | ((index as u128) << 64));
    Some(format!("{addr}/64"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_prefixes_are_consecutive_64s() {
        let p = "fd76:6572:6765::/48".parse().unwrap();
        assert_eq!(super::node_prefix(p, 1).unwrap(), "fd76:6572:6765:1::/64");
        assert_eq!(
            super::node_prefix(p, 258).unwrap(),
            "fd76:6572:6765:102::/64"
        );
        let small = "fd76:6572:6765:ff00::/56".parse().unwrap();
        assert_eq!(
            super::node_prefix(small, 255).unwrap(),
            "fd76:6572:6765:ffff::/64"
        );
        assert_eq!(
            super::node_prefix(small, 256),
            None,
            "past the end of the /56"
        );
    }
}
