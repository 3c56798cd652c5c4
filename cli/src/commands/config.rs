//! `verge env set|unset|list` and `verge secrets set|list|unset`: an env's
//! versioned env vars and secret bundles. Secret values go to the server
//! and nowhere else: not to stdout, not into any error message.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;

use verge_api::config::{ConfigReceipt, SecretReceipt};
use verge_api::names;
use verge_api::requests::{ChangeConfig, ChangeSecrets};

use verge_api::{ErrorDetail, ErrorKind};

use super::{Failure, Result, bad_request, next_lines, short_digest};
use crate::args::{EnvCmd, SecretsCmd};
use crate::context::{Context, EnvNames};
use crate::output::{Output, table};

pub async fn env(ctx: &Context, cmd: EnvCmd, out: &Output) -> Result {
    // Input is checked before anything is sent.
    let change = match cmd {
        EnvCmd::Set { pairs } => {
            let mut set = BTreeMap::new();
            for arg in &pairs {
                let (key, value) = arg
                    .split_once('=')
                    .ok_or_else(|| bad_request(format!("{arg:?} is not KEY=VALUE")))?;
                names::env_var(key).map_err(bad_request)?;
                if set.insert(key.to_string(), value.to_string()).is_some() {
                    return Err(bad_request(format!("{key} is given twice")));
                }
            }
            Some(ChangeConfig {
                set,
                unset: Vec::new(),
            })
        }
        EnvCmd::Unset { keys } => {
            for key in &keys {
                names::env_var(key).map_err(bad_request)?;
            }
            Some(ChangeConfig {
                set: BTreeMap::new(),
                unset: keys,
            })
        }
        EnvCmd::List => None,
    };
    let names = ctx.env_names().await?;
    match change {
        Some(change) => {
            let r = ctx.client.change_config(names.scope(), &change).await?;
            out.one(&r, |r| config_receipt(&names, r));
        }
        None => {
            let config = ctx.client.get_config(names.scope()).await?;
            out.one(&config, |c| {
                let vars = if c.vars.is_empty() {
                    "(none)".to_string()
                } else {
                    table(
                        &["name", "value"],
                        c.vars.iter().map(|(k, v)| vec![k.clone(), v.clone()]),
                    )
                };
                format!("{vars}\nconfig version {}", c.version)
            });
        }
    }
    Ok(())
}

fn config_receipt(names: &EnvNames, r: &ConfigReceipt) -> String {
    let label = names.label();
    if r.unchanged {
        return format!(
            "unchanged: {label}: env config stays at v{}{}",
            r.version,
            next_lines(&r.follow_ups)
        );
    }
    let mut what = Vec::new();
    if !r.set.is_empty() {
        what.push(format!("set {}", r.set.join(", ")));
    }
    if !r.unset.is_empty() {
        what.push(format!("unset {}", r.unset.join(", ")));
    }
    let default_next = ["verge deploy to use it: releases pin the config version".to_string()];
    let next = if r.follow_ups.is_empty() {
        &default_next[..]
    } else {
        &r.follow_ups[..]
    };
    format!(
        "{label}: env config v{} (was v{}): {}{}",
        r.version,
        r.previous_version,
        what.join("; "),
        next_lines(next)
    )
}

pub async fn secrets(ctx: &Context, cmd: SecretsCmd, out: &Output) -> Result {
    match cmd {
        SecretsCmd::Set {
            bundle,
            pairs,
            from_file,
        } => {
            names::validate("secret bundle", &bundle).map_err(bad_request)?;
            let mut set = match &from_file {
                Some(path) => read_dotenv(path)?,
                None => BTreeMap::new(),
            };
            let mut given = BTreeMap::new();
            for (i, arg) in pairs.iter().enumerate() {
                // Only ever the key is named: the rest may be a secret.
                let (key, value) = arg.split_once('=').ok_or_else(|| {
                    bad_request(format!(
                        "argument {} after the bundle name is not KEY=VALUE (it is not shown: it may be a secret)",
                        i + 1
                    ))
                })?;
                names::env_var(key).map_err(bad_request)?;
                if given.insert(key.to_string(), value.to_string()).is_some() {
                    return Err(bad_request(format!("{key} is given twice")));
                }
            }
            set.extend(given);
            if set.is_empty() {
                return Err(Failure(
                    ErrorDetail::new(ErrorKind::BadRequest, "no secret to set")
                        .with_next(format!("verge secrets set {bundle} KEY=VALUE ..."))
                        .with_next(format!("verge secrets set {bundle} --from-file .env")),
                ));
            }
            let names = ctx.env_names().await?;
            let change = ChangeSecrets {
                set,
                unset: Vec::new(),
            };
            let r = ctx
                .client
                .change_secrets(names.scope(), &bundle, &change)
                .await?;
            out.one(&r, |r| secret_receipt(&names, r));
        }
        SecretsCmd::List => {
            let names = ctx.env_names().await?;
            let bundles = ctx.client.list_secrets(names.scope()).await?;
            out.list(&bundles, &["bundle", "version", "keys", "digest"], |b| {
                vec![
                    b.name.clone(),
                    b.version
                        .map_or_else(|| "(deleted)".into(), |v| format!("v{v}")),
                    b.keys.join(","),
                    b.digest.as_deref().map_or_else(|| "-".into(), short_digest),
                ]
            });
        }
        SecretsCmd::Unset {
            bundle,
            keys,
            version,
        } => {
            names::validate("secret bundle", &bundle).map_err(bad_request)?;
            for key in &keys {
                names::env_var(key).map_err(bad_request)?;
            }
            let names = ctx.env_names().await?;
            let r = if keys.is_empty() {
                ctx.client
                    .delete_secrets(names.scope(), &bundle, version)
                    .await?
            } else {
                let change = ChangeSecrets {
                    set: BTreeMap::new(),
                    unset: keys,
                };
                ctx.client
                    .change_secrets(names.scope(), &bundle, &change)
                    .await?
            };
            out.one(&r, |r| secret_receipt(&names, r));
        }
    }
    Ok(())
}

/// `v3`, or `no live version`.
fn version(v: Option<i64>) -> String {
    v.map_or_else(|| "no live version".into(), |v| format!("v{v}"))
}

/// Names, versions and the digest: a receipt carries no value.
fn secret_receipt(names: &EnvNames, r: &SecretReceipt) -> String {
    let label = names.label();
    let bundle = &r.bundle;
    let mut text = if r.unchanged {
        format!(
            "unchanged: {label}: secret bundle {bundle} stays at {}",
            version(r.version)
        )
    } else if !r.deleted_versions.is_empty() {
        let deleted: Vec<String> = r.deleted_versions.iter().map(|v| format!("v{v}")).collect();
        let now = match r.version {
            Some(v) => format!("newest live version is now v{v}"),
            None => "no live version is left".into(),
        };
        format!(
            "{label}: deleted secret bundle {bundle} {}; {now}",
            deleted.join(", ")
        )
    } else {
        let mut what = Vec::new();
        if !r.set.is_empty() {
            what.push(format!("set {}", r.set.join(", ")));
        }
        if !r.unset.is_empty() {
            what.push(format!("unset {}", r.unset.join(", ")));
        }
        let was = match r.previous_version {
            Some(v) => format!("was v{v}"),
            None => "new".into(),
        };
        format!(
            "{label}: secret bundle {bundle} {} ({was}): {}",
            version(r.version),
            what.join("; ")
        )
    };
    if r.version.is_some() {
        text.push_str(&format!("\nkeys: {}", r.keys.join(", ")));
        if let Some(d) = &r.digest {
            text.push_str(&format!("\ndigest: {d}"));
        }
    }
    text + &next_lines(&r.follow_ups)
}

/// Keys and values of a dotenv file (`-`: stdin). Errors name the file, a
/// line number and a key at most, never a value.
fn read_dotenv(path: &Path) -> Result<BTreeMap<String, String>> {
    let shown = if path == Path::new("-") {
        "stdin".to_string()
    } else {
        path.display().to_string()
    };
    let mut text = String::new();
    let read = if path == Path::new("-") {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(path).map(|t| text = t)
    };
    read.map_err(|e| bad_request(format!("cannot read {shown}: {e}")))?;
    parse_dotenv(&text).map_err(|(line, m)| bad_request(format!("{shown}:{line}: {m}")))
}

/// `KEY=VALUE` lines; blank lines, `# comments` and an `export ` prefix are
/// allowed; a value in single or double quotes loses its quotes (`\"`,
/// `\\` and `\n` are unescaped inside double quotes). Unlike the dotenv
/// crates, `$NAME` is never expanded: a secret containing `$` stays as
/// written, and nothing of the local environment leaks into a bundle.
/// Errors carry the line number and never the line's text.
fn parse_dotenv(text: &str) -> std::result::Result<BTreeMap<String, String>, (usize, String)> {
    let mut vars = BTreeMap::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err((
                n + 1,
                "not a KEY=VALUE line (not shown: it may hold a secret)".into(),
            ));
        };
        let key = key.trim();
        names::env_var(key).map_err(|m| (n + 1, m))?;
        let value = value.trim();
        let value = if value.len() >= 2 && value.starts_with('\'') && value.ends_with('\'') {
            value[1..value.len() - 1].to_string()
        } else if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
            unescape(&value[1..value.len() - 1])
        } else {
            value.to_string()
        };
        if vars.insert(key.to_string(), value).is_some() {
            return Err((n + 1, format!("{key} is set twice")));
        }
    }
    Ok(vars)
}

fn unescape(quoted: &str) -> String {
    let mut out = String::with_capacity(quoted.len());
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        match (c, c == '\\') {
            (_, true) => match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            },
            (c, false) => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::parse_dotenv;

    #[test]
    fn dotenv_values_are_taken_literally() {
        let vars =
            parse_dotenv("# db\nexport A=pa$$word\nB = 'single $HOME'\nC=\"x\\\"y\\nz\"\n\n")
                .unwrap();
        assert_eq!(vars["A"], "pa$$word");
        assert_eq!(vars["B"], "single $HOME");
        assert_eq!(vars["C"], "x\"y\nz");
        let err = parse_dotenv("A=1\nhunter2\n").unwrap_err();
        assert_eq!(err.0, 2);
        assert!(!err.1.contains("hunter2"));
        assert_eq!(parse_dotenv("A=1\nA=2").unwrap_err().0, 2);
    }
}
