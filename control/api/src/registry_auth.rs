//! Registry credentials files (`--registry-auth-file`), read the same way by
//! the control plane (pinning tags to digests) and by nodes (pulling):
//!
//! ```text
//! # HOST[:PORT] basic USER PASSWORD   (also used for the registry's token service)
//! registry.example.com basic ci s3cret
//! # HOST[:PORT] bearer TOKEN          (sent as is)
//! ghcr.io bearer ghp_xxx
//! ```
//!
//! Blank lines and lines starting with `#` are skipped.

use std::fmt;

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Basic { username: String, password: String },
    Bearer { token: String },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credential::Bearer { .. } => write!(f, "Bearer(<redacted>)"),
        }
    }
}

/// Parses a credentials file; `Err` names the first bad line (`name:LINE:
/// ...`) without echoing it, since it may hold a secret.
pub fn parse(name: &str, text: &str) -> Result<Vec<(String, Credential)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let credential = match fields.as_slice() {
            [] => continue,
            [first, ..] if first.starts_with('#') => continue,
            [_, "basic", user, password] => Credential::Basic {
                username: user.to_string(),
                password: password.to_string(),
            },
            [_, "bearer", token] => Credential::Bearer {
                token: token.to_string(),
            },
            _ => {
                return Err(format!(
                    "{name}:{}: expected `HOST basic USER PASSWORD` or `HOST bearer TOKEN`",
                    n + 1
                ));
            }
        };
        out.push((fields[0].to_string(), credential));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_comments_and_errors() {
        let auth = parse(
            "auth",
            "# comment\n\nreg.example:5000 basic ci s3cret\nghcr.io bearer tok\n",
        )
        .unwrap();
        assert_eq!(auth[0].0, "reg.example:5000");
        assert_eq!(
            auth[0].1,
            Credential::Basic {
                username: "ci".into(),
                password: "s3cret".into()
            }
        );
        assert_eq!(
            auth[1],
            (
                "ghcr.io".into(),
                Credential::Bearer {
                    token: "tok".into()
                }
            )
        );
        assert!(!format!("{auth:?}").contains("s3cret"));
        let err = parse("auth", "reg basic only-user-s3cret\n").unwrap_err();
        assert!(
            err.starts_with("auth:1: expected `HOST basic USER PASSWORD`"),
            "{err}"
        );
        assert!(!err.contains("s3cret"));
    }
}
