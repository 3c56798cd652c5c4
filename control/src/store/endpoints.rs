//! Endpoint addresses and ports (rules in [`crate::endpoints`]) and what
//! ingresses report.

use std::collections::BTreeSet;

use sqlx::{Any, Executor, FromRow};
use verge_api::manifest::Manifest;

use super::events::Mutation;
use super::{Result, Store, StoreError, new_id};
use crate::endpoints::Addressing;
use crate::time::now_ms;

/// An endpoint's addresses.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct EndpointAddressRow {
    pub id: String,
    pub env_id: String,
    pub name: String,
    pub ipv6: String,
    pub ipv4: Option<String>,
    pub created_at: i64,
}

/// What an ingress last reported.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct IngressRow {
    pub name: String,
    /// JSON of `verge_api::routing::IngressReport`.
    pub report: String,
    pub seen_at: i64,
}

const COLUMNS: &str = "id, env_id, name, ipv6, ipv4, created_at";

async fn env_endpoints<'e>(
    e: impl Executor<'e, Database = Any>,
    env_id: &str,
) -> Result<Vec<EndpointAddressRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM endpoint_addresses WHERE env_id = $1 ORDER BY name"
    ))
    .bind(env_id)
    .fetch_all(e)
    .await?)
}

impl Store {
    /// Every endpoint's addresses, of every env.
    pub async fn all_endpoint_addresses(&self) -> Result<Vec<EndpointAddressRow>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM endpoint_addresses ORDER BY env_id, name"
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    /// One env's endpoint addresses.
    pub async fn endpoint_addresses(&self, env_id: &str) -> Result<Vec<EndpointAddressRow>> {
        env_endpoints(&self.pool, env_id).await
    }

    /// Records an ingress's report (JSON), replacing its previous one.
    pub async fn put_ingress_report(&self, name: &str, report: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO ingresses (name, report, seen_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET report = excluded.report, seen_at = excluded.seen_at",
        )
        .bind(name)
        .bind(report)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every ingress's last report, by name.
    pub async fn ingress_reports(&self) -> Result<Vec<IngressRow>> {
        Ok(
            sqlx::query_as("SELECT name, report, seen_at FROM ingresses ORDER BY name")
                .fetch_all(&self.pool)
                .await?,
        )
    }
}

/// An endpoint's addresses as a release will have them.
struct Wanted<'m> {
    id: String,
    ipv6: String,
    ipv4: Option<String>,
    endpoint: &'m verge_api::manifest::Endpoint,
}

/// The addresses and ports a release's endpoints take, and which takes each.
type Claims<'m> = std::collections::BTreeMap<(String, u16), &'m str>;

/// Who holds an address and port.
#[derive(Debug, FromRow)]
struct Holder {
    endpoint: String,
    env_id: String,
    env: String,
    app: String,
    org_id: String,
}

impl Mutation<'_> {
    /// Gives every endpoint of `manifest` (about to be the current release
    /// of `env_id`) its addresses and ports, and frees those of endpoints
    /// it no longer has. A port another endpoint holds on the address
    /// refuses the whole change ([`StoreError::Endpoint`]) before anything
    /// is written, so the caller's mutation may go on without it.
    pub async fn assign_endpoints(
        &mut self,
        env_id: &str,
        manifest: &Manifest,
        pools: &Addressing,
    ) -> Result<()> {
        let org = self.env_scope(env_id).await?.map(|s| s.org_id);
        let org_id = org.as_deref().unwrap_or_default();
        let existing = env_endpoints(self.conn(), env_id).await?;
        // Addresses of every endpoint, read once and only when a new
        // endpoint needs one of its own.
        let mut taken_v6: Option<BTreeSet<String>> = None;
        // First decide everything (reads only); the env's own ports do not
        // count as taken: its endpoints may trade ports between releases.
        let mut wanted: Vec<Wanted<'_>> = Vec::new();
        let mut claimed = Claims::new();
        for e in &manifest.endpoints {
            let old = existing.iter().find(|r| r.name == e.name);
            let ipv6 = match old {
                Some(r) => r.ipv6.clone(),
                None if pools.shared_ipv6() => pools.ipv6.addr().to_string(),
                None => {
                    let taken = match &mut taken_v6 {
                        Some(t) => t,
                        none => none.insert(
                            sqlx::query_scalar::<_, String>("SELECT ipv6 FROM endpoint_addresses")
                                .fetch_all(self.conn())
                                .await?
                                .into_iter()
                                .collect(),
                        ),
                    };
                    let free = pools
                        .ipv6_candidates()
                        .map(|a| a.to_string())
                        .find(|a| !taken.contains(a))
                        .ok_or_else(|| {
                            StoreError::Endpoint(format!(
                                "endpoint {}: every address of endpoint_prefix {} is taken; \
                                 remove unused endpoints or configure a larger prefix",
                                e.name, pools.ipv6
                            ))
                        })?;
                    taken.insert(free.clone());
                    free
                }
            };
            let ipv4 = if e.ipv4 {
                let keep = old.and_then(|r| r.ipv4.clone());
                Some(
                    self.free_ipv4(env_id, org_id, e, keep, pools, &claimed)
                        .await?,
                )
            } else {
                None
            };
            for address in std::iter::once(&ipv6).chain(ipv4.as_ref()) {
                for &port in &e.ports {
                    if let Some(other) = claimed.get(&(address.clone(), port)) {
                        return Err(StoreError::Endpoint(format!(
                            "endpoints {other} and {} both want port {port} on the shared address {}; \
                             give one of them another port in verge.toml",
                            e.name,
                            shown(address, port)
                        )));
                    }
                    if let Some(h) = self.holder(address, port).await?
                        && h.env_id != env_id
                    {
                        return Err(taken(&e.name, address, port, &h, org_id));
                    }
                    claimed.insert((address.clone(), port), &e.name);
                }
            }
            wanted.push(Wanted {
                id: old.map_or_else(|| new_id("ep"), |r| r.id.clone()),
                ipv6,
                ipv4,
                endpoint: e,
            });
        }
        // Then write.
        for row in &existing {
            sqlx::query("DELETE FROM endpoint_ports WHERE endpoint_id = $1")
                .bind(&row.id)
                .execute(self.conn())
                .await?;
            if !wanted.iter().any(|w| w.id == row.id) {
                sqlx::query("DELETE FROM endpoint_addresses WHERE id = $1")
                    .bind(&row.id)
                    .execute(self.conn())
                    .await?;
            }
        }
        for Wanted {
            id,
            ipv6,
            ipv4,
            endpoint: e,
        } in &wanted
        {
            if existing.iter().any(|r| r.id == *id) {
                sqlx::query("UPDATE endpoint_addresses SET ipv4 = $2 WHERE id = $1")
                    .bind(id)
                    .bind(ipv4)
                    .execute(self.conn())
                    .await?;
            } else {
                sqlx::query(&format!(
                    "INSERT INTO endpoint_addresses ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
                ))
                .bind(id)
                .bind(env_id)
                .bind(&e.name)
                .bind(ipv6)
                .bind(ipv4)
                .bind(now_ms())
                .execute(self.conn())
                .await?;
            }
            for address in std::iter::once(ipv6).chain(ipv4.as_ref()) {
                for &port in &e.ports {
                    sqlx::query(
                        "INSERT INTO endpoint_ports (address, port, endpoint_id) VALUES ($1, $2, $3)",
                    )
                    .bind(address)
                    .bind(i64::from(port))
                    .bind(id)
                    .execute(self.conn())
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// An IPv4 address of the pool where every port of `e` is free (not
    /// held by another env, not `claimed` by this release): the one it
    /// has (`keep`) if it still fits, else the first that does.
    async fn free_ipv4(
        &mut self,
        env_id: &str,
        org_id: &str,
        e: &verge_api::manifest::Endpoint,
        keep: Option<String>,
        pools: &Addressing,
        claimed: &Claims<'_>,
    ) -> Result<String> {
        let mut first_clash = None;
        let mut ours = None;
        let candidates = keep
            .into_iter()
            .chain(pools.ipv4_candidates().map(|a| a.to_string()));
        'address: for address in candidates {
            for &port in &e.ports {
                if claimed.contains_key(&(address.clone(), port)) {
                    ours.get_or_insert(address.clone());
                    continue 'address;
                }
                if let Some(h) = self.holder(&address, port).await?
                    && h.env_id != env_id
                {
                    first_clash.get_or_insert((address.clone(), port, h));
                    continue 'address;
                }
            }
            return Ok(address);
        }
        // Only this release's own endpoints are in the way: the caller
        // names both of them.
        if let (Some(address), None) = (ours, &first_clash) {
            return Ok(address);
        }
        Err(match first_clash {
            Some((address, port, h)) if pools.ipv4.prefix_len() == 32 => {
                taken(&e.name, &address, port, &h, org_id)
            }
            _ => StoreError::Endpoint(format!(
                "endpoint {}: no address of endpoint_ipv4_pool {} has ports {:?} free; \
                 use other ports or configure a larger pool",
                e.name, pools.ipv4, e.ports
            )),
        })
    }

    async fn holder(&mut self, address: &str, port: u16) -> Result<Option<Holder>> {
        Ok(sqlx::query_as(
            "SELECT ea.name AS endpoint, e.id AS env_id, e.name AS env, a.name AS app, a.org_id AS org_id \
             FROM endpoint_ports p JOIN endpoint_addresses ea ON ea.id = p.endpoint_id \
             JOIN envs e ON e.id = ea.env_id JOIN apps a ON a.id = e.app_id \
             WHERE p.address = $1 AND p.port = $2",
        )
        .bind(address)
        .bind(i64::from(port))
        .fetch_optional(self.conn())
        .await?)
    }
}

/// The error for a port `h` holds; names of another org are not told.
fn taken(endpoint: &str, address: &str, port: u16, h: &Holder, org_id: &str) -> StoreError {
    let who = if h.org_id == org_id {
        format!("endpoint {} of {}/{}", h.endpoint, h.app, h.env)
    } else {
        "an endpoint of another org".to_string()
    };
    StoreError::Endpoint(format!(
        "endpoint {endpoint}: port {port} is taken on the shared address ({} is {who}); \
         choose another port for it in verge.toml",
        shown(address, port)
    ))
}

/// `address:port`, with brackets around IPv6.
fn shown(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}
