//! Which instance a volume is attached to, for the API: the rule is the
//! planner's ([`crate::reconcile::volumes::holders`]), applied to the
//! env's instances and their releases as stored.

use std::collections::BTreeMap;

use verge_api::manifest::Manifest;

use crate::store::{InstanceRow, Store, StoreError};

/// Volume name → the ID of the instance it is attached to, for every
/// attached volume of the env.
pub async fn attachments(
    store: &Store,
    env_id: &str,
) -> Result<BTreeMap<String, String>, StoreError> {
    Ok(attached_instances(store, env_id)
        .await?
        .into_iter()
        .map(|(volume, i)| (volume, i.id))
        .collect())
}

/// Volume name → the instance it is attached to (see [`attachments`]).
pub async fn attached_instances(
    store: &Store,
    env_id: &str,
) -> Result<BTreeMap<String, InstanceRow>, StoreError> {
    let instances = store.env_instances(env_id).await?;
    let mut manifests: BTreeMap<String, Manifest> = BTreeMap::new();
    for i in instances.iter().filter(|i| i.node_id.is_some()) {
        if manifests.contains_key(&i.release_id) {
            continue;
        }
        if let Some(r) = store.release_by_id(env_id, &i.release_id).await? {
            match serde_json::from_str::<Manifest>(&r.manifest) {
                Ok(m) => {
                    manifests.insert(r.id, m);
                }
                Err(e) => {
                    tracing::error!(release = %r.id, error = %e, "a stored release's manifest does not decode");
                }
            }
        }
    }
    Ok(crate::reconcile::volumes::holders(&instances, &manifests)
        .into_iter()
        .map(|(volume, i)| (volume, i.clone()))
        .collect())
}
