//! Orgs, projects, apps and envs. Every lookup below an org is by org ID, so
//! a query can only ever see one org's rows.

use sqlx::FromRow;

use super::{Result, Store, new_id};
use crate::time::now_ms;

#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct OrgRow {
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct ProjectRow {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub created_at: i64,
}

/// An app with the name of its project, as listings show it.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct AppRow {
    pub id: String,
    pub org_id: String,
    pub project_id: String,
    pub project: String,
    pub name: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct EnvRow {
    pub id: String,
    pub app_id: String,
    pub name: String,
    pub created_at: i64,
}

const APP_COLUMNS: &str = "a.id, a.org_id, a.project_id, p.name AS project, a.name, a.created_at \
                           FROM apps a JOIN projects p ON p.id = a.project_id";

impl Store {
    /// Creates an org; [`StoreError::Conflict`](super::StoreError::Conflict) if the name is taken.
    pub async fn create_org(&self, name: &str) -> Result<OrgRow> {
        let row = OrgRow {
            id: new_id("org"),
            name: name.to_string(),
            created_at: now_ms(),
        };
        sqlx::query("INSERT INTO orgs (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&row.id)
            .bind(&row.name)
            .bind(row.created_at)
            .execute(&self.pool)
            .await?;
        Ok(row)
    }

    pub async fn org_by_name(&self, name: &str) -> Result<Option<OrgRow>> {
        let row = sqlx::query_as("SELECT id, name, created_at FROM orgs WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    pub async fn org_by_id(&self, id: &str) -> Result<Option<OrgRow>> {
        let row = sqlx::query_as("SELECT id, name, created_at FROM orgs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    /// All orgs, by name.
    pub async fn list_orgs(&self) -> Result<Vec<OrgRow>> {
        let rows = sqlx::query_as("SELECT id, name, created_at FROM orgs ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows)
    }

    pub async fn create_project(&self, org_id: &str, name: &str) -> Result<ProjectRow> {
        let row = ProjectRow {
            id: new_id("prj"),
            org_id: org_id.to_string(),
            name: name.to_string(),
            created_at: now_ms(),
        };
        sqlx::query("INSERT INTO projects (id, org_id, name, created_at) VALUES ($1, $2, $3, $4)")
            .bind(&row.id)
            .bind(&row.org_id)
            .bind(&row.name)
            .bind(row.created_at)
            .execute(&self.pool)
            .await?;
        Ok(row)
    }

    pub async fn project_by_name(&self, org_id: &str, name: &str) -> Result<Option<ProjectRow>> {
        let row = sqlx::query_as(
            "SELECT id, org_id, name, created_at FROM projects WHERE org_id = $1 AND name = $2",
        )
        .bind(org_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    pub async fn list_projects(&self, org_id: &str) -> Result<Vec<ProjectRow>> {
        let rows = sqlx::query_as(
            "SELECT id, org_id, name, created_at FROM projects WHERE org_id = $1 ORDER BY name",
        )
        .bind(org_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Creates an app in `project` (which must belong to `org_id`).
    pub async fn create_app(
        &self,
        org_id: &str,
        project: &ProjectRow,
        name: &str,
    ) -> Result<AppRow> {
        debug_assert_eq!(project.org_id, org_id);
        let row = AppRow {
            id: new_id("app"),
            org_id: org_id.to_string(),
            project_id: project.id.clone(),
            project: project.name.clone(),
            name: name.to_string(),
            created_at: now_ms(),
        };
        sqlx::query(
            "INSERT INTO apps (id, org_id, project_id, name, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&row.id)
        .bind(&row.org_id)
        .bind(&row.project_id)
        .bind(&row.name)
        .bind(row.created_at)
        .execute(&self.pool)
        .await?;
        Ok(row)
    }

    pub async fn app_by_name(&self, org_id: &str, name: &str) -> Result<Option<AppRow>> {
        let sql = format!("SELECT {APP_COLUMNS} WHERE a.org_id = $1 AND a.name = $2");
        let row = sqlx::query_as(&sql)
            .bind(org_id)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    /// Apps of an org, of one project when `project_id` is given, by name.
    pub async fn list_apps(&self, org_id: &str, project_id: Option<&str>) -> Result<Vec<AppRow>> {
        let sql = format!(
            "SELECT {APP_COLUMNS} WHERE a.org_id = $1 AND ($2 IS NULL OR a.project_id = $2) \
             ORDER BY a.name"
        );
        let rows = sqlx::query_as(&sql)
            .bind(org_id)
            .bind(project_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows)
    }

    pub async fn create_env(&self, app: &AppRow, name: &str) -> Result<EnvRow> {
        let row = EnvRow {
            id: new_id("env"),
            app_id: app.id.clone(),
            name: name.to_string(),
            created_at: now_ms(),
        };
        sqlx::query("INSERT INTO envs (id, app_id, name, created_at) VALUES ($1, $2, $3, $4)")
            .bind(&row.id)
            .bind(&row.app_id)
            .bind(&row.name)
            .bind(row.created_at)
            .execute(&self.pool)
            .await?;
        Ok(row)
    }

    pub async fn list_envs(&self, app_id: &str) -> Result<Vec<EnvRow>> {
        let rows = sqlx::query_as(
            "SELECT id, app_id, name, created_at FROM envs WHERE app_id = $1 ORDER BY name",
        )
        .bind(app_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}

impl Store {
    pub async fn env_by_name(&self, app_id: &str, name: &str) -> Result<Option<EnvRow>> {
        let row = sqlx::query_as(
            "SELECT id, app_id, name, created_at FROM envs WHERE app_id = $1 AND name = $2",
        )
        .bind(app_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }
}
