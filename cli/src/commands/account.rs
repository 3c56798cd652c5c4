//! `verge login`, `verge whoami`, `verge profiles list|use`.

use serde::Serialize;
use verge_api::client::Client;
use verge_api::{ErrorDetail, ErrorKind};

use super::{Failure, Result};
use crate::args::{LoginArgs, ProfilesCmd, Target};
use crate::context::{Context, read_ca_cert};
use crate::output::Output;
use crate::profile::{Profile, ProfileFile};

/// Checks the token with the server first: a bad token writes nothing.
pub async fn login(target: &Target, args: LoginArgs, out: &Output) -> Result {
    let need = |what: &str, flag: &str| {
        Failure(
            ErrorDetail::new(ErrorKind::BadRequest, format!("verge login needs {what}"))
                .with_next(format!("verge login {flag}")),
        )
    };
    let server = target
        .server
        .clone()
        .ok_or_else(|| need("--server", "--server URL --token TOKEN"))?;
    let token = target
        .token
        .clone()
        .ok_or_else(|| need("--token", "--server URL --token TOKEN"))?;
    let ca = target.ca_cert.as_deref().map(read_ca_cert).transpose()?;
    for (kind, name) in [("org", &target.org), ("project", &target.project)] {
        if let Some(name) = name {
            verge_api::names::validate(kind, name)
                .map_err(|m| Failure(ErrorDetail::new(ErrorKind::BadRequest, m)))?;
        }
    }
    let client = Client::new(&server, Some(&token), ca.as_deref())?;
    let who = client.whoami().await?;
    // Defaults are checked now, not at the first command that uses them.
    let org = target.org.clone().or(who.org.clone());
    if target.project.is_some() && org.is_none() {
        return Err(Failure(
            ErrorDetail::new(
                ErrorKind::BadRequest,
                "--project needs --org with a cluster admin token",
            )
            .with_next("verge login --server URL --token TOKEN --org ORG --project PROJECT"),
        ));
    }
    if let Some(org) = &org {
        let projects = client.list_projects(org).await?;
        if let Some(p) = &target.project
            && !projects.iter().any(|x| &x.name == p)
        {
            return Err(Failure(
                ErrorDetail::new(
                    ErrorKind::NotFound,
                    format!("project {p:?} not found in org {org:?}"),
                )
                .with_next(format!("verge projects list --org {org}")),
            ));
        }
    }
    // Saved absolute, so the profile works from any directory.
    // (`read_ca_cert` above proved the file readable.)
    let ca_cert = target
        .ca_cert
        .as_ref()
        .and_then(|p| std::fs::canonicalize(p).ok());
    let profile = Profile {
        server: client.server().to_string(),
        token,
        ca_cert,
        org,
        project: target.project.clone(),
    };
    let path = ProfileFile::save_current(&args.profile_name, profile)?;
    #[derive(Serialize)]
    struct LoggedIn<'a> {
        profile: &'a str,
        server: &'a str,
        admin: bool,
        org: Option<&'a str>,
    }
    let done = LoggedIn {
        profile: &args.profile_name,
        server: client.server(),
        admin: who.admin,
        org: who.org.as_deref(),
    };
    out.one(&done, |d| {
        let who = match d.org {
            Some(org) => format!("a token of org {org}"),
            None => "a cluster admin token".to_string(),
        };
        format!(
            "logged in to {} with {who}; saved as profile {:?} in {}",
            d.server,
            d.profile,
            path.display()
        )
    });
    Ok(())
}

pub async fn whoami(ctx: &Context, out: &Output) -> Result {
    let who = ctx.client.whoami().await?;
    out.one(&who, |w| match &w.org {
        Some(org) => format!(
            "token {} ({}) of org {org} at {}",
            w.token_name,
            w.token_id,
            ctx.client.server()
        ),
        None => format!(
            "cluster admin token {} ({}) at {}",
            w.token_name,
            w.token_id,
            ctx.client.server()
        ),
    });
    Ok(())
}

pub fn profiles(target: &Target, cmd: ProfilesCmd, out: &Output) -> Result {
    let file = ProfileFile::load()?;
    match cmd {
        ProfilesCmd::List => {
            #[derive(Serialize)]
            struct Row {
                name: String,
                current: bool,
                server: String,
                org: Option<String>,
                project: Option<String>,
            }
            let current = target.profile.clone().or(file.current.clone());
            let rows: Vec<Row> = file
                .profiles
                .iter()
                .map(|(name, p)| Row {
                    current: Some(name) == current.as_ref(),
                    name: name.clone(),
                    server: p.server.clone(),
                    org: p.org.clone(),
                    project: p.project.clone(),
                })
                .collect();
            out.list(&rows, &["", "name", "server", "org", "project"], |r| {
                vec![
                    if r.current { "*" } else { "" }.into(),
                    r.name.clone(),
                    r.server.clone(),
                    r.org.clone().unwrap_or_default(),
                    r.project.clone().unwrap_or_default(),
                ]
            });
        }
        ProfilesCmd::Use { name } => {
            ProfileFile::update(|file| {
                if !file.profiles.contains_key(&name) {
                    return Err(Failure(
                        ErrorDetail::new(
                            ErrorKind::NotFound,
                            format!("profile {name:?} not found"),
                        )
                        .with_next("verge profiles list")
                        .with_next("verge login --server URL --token TOKEN --name NAME"),
                    ));
                }
                file.current = Some(name.clone());
                Ok(())
            })?;
            out.one(&serde_json::json!({"current": name}), |_| {
                format!("now using profile {name:?}")
            });
        }
    }
    Ok(())
}
