//! Naming rules for orgs, projects, apps, envs, secret bundles and env vars
//! (and which registry names are on loopback), checked by the CLI before
//! sending and by the server before storing.
//!
//! A name is a DNS label: 1–63 characters of `a-z`, `0-9` and `-`, starting
//! with a letter and not ending with `-`. Names end up in hostnames, paths
//! and log lines, so they stay boring.

/// Checks `name` as the name of a `kind` ("org", "app", ...). The error says
/// what is wrong and what a valid name looks like.
pub fn validate(kind: &str, name: &str) -> Result<(), String> {
    let problem = if name.is_empty() {
        Some("is empty".to_string())
    } else if name.len() > 63 {
        Some(format!("is {} characters long (at most 63)", name.len()))
    } else if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        Some("must start with a lower-case letter".to_string())
    } else if name.ends_with('-') {
        Some("must not end with '-'".to_string())
    } else {
        name.chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
            .map(|c| format!("contains {c:?}"))
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(format!(
            "{kind} name {name:?} {p}: use lower-case letters, digits and '-', like \"my-{}\"",
            kind.replace(' ', "-")
        )),
    }
}

/// A node label `key=value` (`region=eu-west`): the key 1–63 characters of
/// `a-z`, `0-9`, `-`, `_`, `.` and `/`, the value at most 63 characters of
/// those and upper-case letters.
pub fn label(key: &str, value: &str) -> Result<(), String> {
    let ok = |s: &str, upper: bool| {
        s.len() <= 63
            && s.chars().all(|c| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || matches!(c, '-' | '_' | '.' | '/')
                    || (upper && c.is_ascii_uppercase())
            })
    };
    if key.is_empty() || !ok(key, false) {
        return Err(format!(
            "label key {key:?} is not valid: use 1-63 lower-case letters, digits, '-', '_', '.' or '/', like \"region\""
        ));
    }
    if !ok(value, true) {
        return Err(format!(
            "label value {value:?} of {key} is not valid: use at most 63 letters, digits, '-', '_', '.' or '/', like \"eu-west\""
        ));
    }
    Ok(())
}

/// Environment variable names (and secret keys): `[A-Za-z_][A-Za-z0-9_]*`.
pub fn env_var(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not an environment variable name (letters, digits and _, not starting with a digit)"
        ))
    }
}

/// Whether `registry` (`host`, `host:port`, `[v6]:port`) is on a loopback
/// address: `localhost`, 127.0.0.0/8 or `::1`.
pub fn is_loopback_registry(registry: &str) -> bool {
    use std::net::IpAddr;
    let host = if let Ok(ip) = registry.parse::<IpAddr>() {
        return ip.is_loopback();
    } else if let Some(bracketed) = registry.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        registry
            .rsplit_once(':')
            .map_or(registry, |(host, _port)| host)
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::{is_loopback_registry, validate};

    #[test]
    fn loopback_registries() {
        for yes in [
            "127.0.0.1:5000",
            "127.1.2.3",
            "localhost:5000",
            "LOCALHOST",
            "[::1]:5000",
            "::1",
        ] {
            assert!(is_loopback_registry(yes), "{yes}");
        }
        for no in [
            "10.0.0.1:5000",
            "registry.example.com",
            "ghcr.io:443",
            "[2001:db8::1]:5000",
            "localhost.evil.com",
        ] {
            assert!(!is_loopback_registry(no), "{no}");
        }
    }

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "acme", "web-2", "x1"] {
            assert!(validate("org", ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_with_the_reason() {
        let cases = [
            ("", "is empty"),
            ("Acme", "must start with a lower-case letter"),
            ("1st", "must start with a lower-case letter"),
            ("web-", "must not end with '-'"),
            ("my_app", "contains '_'"),
            ("a.b", "contains '.'"),
        ];
        for (name, why) in cases {
            let err = validate("app", name).unwrap_err();
            assert!(err.contains(why), "{name}: {err}");
            assert!(err.starts_with("app name"), "{err}");
        }
        assert!(
            validate("org", &"a".repeat(64))
                .unwrap_err()
                .contains("64 characters")
        );
    }
}
