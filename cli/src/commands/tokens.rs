//! `verge tokens create --org O [--name N] / list / revoke ID`.

use verge_api::{ErrorDetail, ErrorKind};

use super::{Failure, Result};
use crate::args::TokensCmd;
use crate::context::Context;
use crate::output::Output;

pub async fn run(ctx: &Context, cmd: TokensCmd, out: &Output) -> Result {
    match cmd {
        TokensCmd::Create { name } => {
            // Explicit on purpose: a token is a credential, never minted for a default.
            let org = ctx.explicit_org().ok_or_else(|| {
                Failure(
                    ErrorDetail::new(ErrorKind::BadRequest, "verge tokens create needs --org ORG")
                        .with_next("verge tokens create --org ORG [--name NAME]")
                        .with_next("verge orgs list"),
                )
            })?;
            let t = ctx.client.create_token(&org, name.as_deref()).await?;
            out.one(&t, |t| {
                format!(
                    "created token {} for org {}\n\n    {}\n\nIt is shown only now: store it in a secret manager.\nnext: verge login --server {} --token <TOKEN>",
                    t.id, t.org, t.token, ctx.client.server()
                )
            });
        }
        TokensCmd::List => {
            // An admin listing without --org sees every token.
            let tokens = ctx
                .client
                .list_tokens(ctx.explicit_org().as_deref())
                .await?;
            out.list(&tokens, &["id", "name", "org", "created", "revoked"], |t| {
                vec![
                    t.id.clone(),
                    t.name.clone(),
                    t.org.clone().unwrap_or_else(|| "(admin)".into()),
                    t.created_at.clone(),
                    t.revoked_at.clone().unwrap_or_else(|| "-".into()),
                ]
            });
        }
        TokensCmd::Revoke { id } => {
            let t = ctx.client.revoke_token(&id).await?;
            out.one(&t, |t| {
                format!("revoked token {} ({}); it stops working now", t.id, t.name)
            });
        }
    }
    Ok(())
}
