//! The env a request under `/v1/orgs/{org}/apps/{app}/envs/{env}` acts on,
//! resolved through the caller's org scope, and the conversions of its rows
//! to API types.

use std::collections::BTreeMap;

use verge_api::manifest::Manifest;
use verge_api::names;
use verge_api::release::{Release, ReleaseRef, Target};

use super::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::store::{AppRow, EnvRow, NewEvent, OrgRow, ReleaseRow};
use crate::time::rfc3339;

/// An env and everything above it, plus who is asking.
#[derive(Debug, Clone)]
pub struct EnvCx {
    pub org: OrgRow,
    pub app: AppRow,
    pub env: EnvRow,
    /// `token-name (tok_...)`, recorded in events.
    pub actor: String,
}

impl EnvCx {
    /// Resolves `org/app/env`; 404 naming the first missing one.
    pub async fn resolve(
        st: &AppState,
        caller: &Caller,
        (org, app, env): &(String, String, String),
    ) -> Result<EnvCx, ApiError> {
        let org = caller.org(&st.store, org).await?;
        let app_row = super::nouns::find_app(&st.store, &org, app).await?;
        let env_row = match names::validate("env", env) {
            Ok(()) => st.store.env_by_name(&app_row.id, env).await?,
            Err(_) => None,
        }
        .ok_or_else(|| {
            ApiError::not_found("env", env)
                .next(format!("verge envs create {env} --app {}", app_row.name))
        })?;
        let span = tracing::Span::current();
        span.record("app", app_row.id.as_str());
        span.record("env", env_row.id.as_str());
        Ok(EnvCx {
            actor: format!("{} ({})", caller.token.name, caller.token.id),
            org,
            app: app_row,
            env: env_row,
        })
    }

    /// `app/env`, as messages name it.
    pub fn label(&self) -> String {
        format!("{}/{}", self.app.name, self.env.name)
    }

    /// `--app A --env E`, for suggested commands.
    pub fn flags(&self) -> String {
        format!("--app {} --env {}", self.app.name, self.env.name)
    }

    pub fn target(&self) -> Target {
        Target {
            org: self.org.name.clone(),
            project: self.app.project.clone(),
            app: self.app.name.clone(),
            env: self.env.name.clone(),
        }
    }

    /// An event about this env.
    pub fn event<'a>(
        &'a self,
        kind: &'a str,
        release: Option<&'a str>,
        message: String,
    ) -> NewEvent<'a> {
        NewEvent {
            org_id: Some(&self.org.id),
            app_id: Some(&self.app.id),
            env_id: Some(&self.env.id),
            release_id: release,
            kind,
            message,
            actor: Some(&self.actor),
            ..NewEvent::default()
        }
    }

    pub fn release_ref(&self, row: &ReleaseRow) -> ReleaseRef {
        ReleaseRef {
            id: row.id.clone(),
            number: row.number,
            env: self.env.name.clone(),
        }
    }

    /// A release for the API; the manifest only when `with_manifest`.
    pub fn release(
        &self,
        row: &ReleaseRow,
        current: Option<&str>,
        parent: Option<ReleaseRef>,
        with_manifest: bool,
    ) -> Result<Release, ApiError> {
        Ok(Release {
            id: row.id.clone(),
            number: row.number,
            env: self.env.name.clone(),
            app: self.app.name.clone(),
            current: current == Some(row.id.as_str()),
            created_at: rfc3339(row.created_at),
            created_by: row.created_by.clone(),
            images: decode(&row.images)?,
            config_version: row.config_version,
            secrets: decode(&row.secrets)?,
            parent,
            manifest: if with_manifest {
                Some(manifest_of(row)?)
            } else {
                None
            },
        })
    }
}

/// The manifest snapshot of a release.
pub fn manifest_of(row: &ReleaseRow) -> Result<Manifest, ApiError> {
    decode(&row.manifest)
}

/// Secret bundle → version a release uses.
pub fn secrets_of(row: &ReleaseRow) -> Result<BTreeMap<String, i64>, ApiError> {
    decode(&row.secrets)
}

fn decode<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, ApiError> {
    serde_json::from_str(json).map_err(|e| {
        tracing::error!(error = %e, "a stored release does not decode");
        ApiError::new(
            verge_api::ErrorKind::Internal,
            "internal error: a stored release could not be read",
        )
    })
}
