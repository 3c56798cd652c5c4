//! `verge orgs|projects|apps|envs create NAME / list`.

use verge_api::names;
use verge_api::{ErrorDetail, ErrorKind};

use super::{Failure, Result};
use crate::args::NounCmd;
use crate::context::Context;
use crate::output::Output;

/// Checks a name before sending it, with the same rule the server applies.
fn valid(kind: &str, name: &str) -> Result {
    names::validate(kind, name).map_err(|m| Failure(ErrorDetail::new(ErrorKind::BadRequest, m)))
}

pub async fn orgs(ctx: &Context, cmd: NounCmd, out: &Output) -> Result {
    match cmd {
        NounCmd::Create { name } => {
            valid("org", &name)?;
            let org = ctx.client.create_org(&name).await?;
            out.one(&org, |o| {
                format!(
                    "created org {} ({})\nnext: verge projects create NAME --org {}",
                    o.name, o.id, o.name
                )
            });
        }
        NounCmd::List => {
            let orgs = ctx.client.list_orgs().await?;
            out.list(&orgs, &["name", "id", "created"], |o| {
                vec![o.name.clone(), o.id.clone(), o.created_at.clone()]
            });
        }
    }
    Ok(())
}

pub async fn projects(ctx: &Context, cmd: NounCmd, out: &Output) -> Result {
    let org = ctx.org().await?;
    match cmd {
        NounCmd::Create { name } => {
            valid("project", &name)?;
            let p = ctx.client.create_project(&org, &name).await?;
            out.one(&p, |p| {
                format!(
                    "created project {} in org {} ({})\nnext: verge apps create NAME --project {}",
                    p.name, p.org, p.id, p.name
                )
            });
        }
        NounCmd::List => {
            let ps = ctx.client.list_projects(&org).await?;
            out.list(&ps, &["name", "org", "id", "created"], |p| {
                vec![
                    p.name.clone(),
                    p.org.clone(),
                    p.id.clone(),
                    p.created_at.clone(),
                ]
            });
        }
    }
    Ok(())
}

pub async fn apps(ctx: &Context, cmd: NounCmd, out: &Output) -> Result {
    let org = ctx.org().await?;
    match cmd {
        NounCmd::Create { name } => {
            valid("app", &name)?;
            let project = ctx.project()?;
            let a = ctx.client.create_app(&org, &project, &name).await?;
            out.one(&a, |a| {
                format!("created app {} in project {} of org {} ({})\nnext: verge envs create prod --app {}", a.name, a.project, a.org, a.id, a.name)
            });
        }
        NounCmd::List => {
            // Every app of the org, unless a project is asked for explicitly.
            let project = ctx.explicit_project();
            let apps = ctx.client.list_apps(&org, project.as_deref()).await?;
            out.list(&apps, &["name", "project", "org", "id", "created"], |a| {
                vec![
                    a.name.clone(),
                    a.project.clone(),
                    a.org.clone(),
                    a.id.clone(),
                    a.created_at.clone(),
                ]
            });
        }
    }
    Ok(())
}

pub async fn envs(ctx: &Context, cmd: NounCmd, out: &Output) -> Result {
    let org = ctx.org().await?;
    let app = ctx.app()?;
    match cmd {
        NounCmd::Create { name } => {
            valid("env", &name)?;
            let e = ctx.client.create_env(&org, &app, &name).await?;
            out.one(&e, |e| {
                format!("created env {} of app {} ({})", e.name, e.app, e.id)
            });
        }
        NounCmd::List => {
            let envs = ctx.client.list_envs(&org, &app).await?;
            out.list(&envs, &["name", "app", "org", "id", "created"], |e| {
                vec![
                    e.name.clone(),
                    e.app.clone(),
                    e.org.clone(),
                    e.id.clone(),
                    e.created_at.clone(),
                ]
            });
        }
    }
    Ok(())
}
