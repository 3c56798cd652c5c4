//! Checking a manifest: walk the spanned TOML tree, collect every problem
//! with its position, build the typed [`Manifest`] only when there is none.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{Manifest, Rollout, defaults};

/// One problem, at `file:line:column` (both 1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Every problem of a file, in the order they appear in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for ManifestErrors {}

impl ManifestErrors {
    /// The failure a deploy reports, on either side of the API: `FILE: N
    /// errors`, one detail line per error, and what to do.
    pub fn detail(&self, file: &str) -> crate::ErrorDetail {
        let n = self.0.len();
        let s = if n == 1 { "" } else { "s" };
        let mut d = crate::ErrorDetail::new(
            crate::ErrorKind::BadRequest,
            format!("{file}: {n} error{s}"),
        )
        .with_next("fix them and deploy again; every key is described in docs/manifest.md");
        d.details = self.0.iter().map(ToString::to_string).collect();
        d
    }
}

/// Parses and checks the manifest `text` read from `file` (used in messages).
pub fn parse(file: &str, text: &str) -> Result<Manifest, ManifestErrors> {
    let mut cx = Cx {
        file,
        text,
        errors: Vec::new(),
    };
    let (doc, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        // A recovered tree would only add noise: report the syntax errors.
        for e in &syntax {
            let at = e.span().map_or(0, |s| s.start);
            cx.error(at..at, format!("invalid TOML: {}", e.message().trim()));
        }
        return Err(cx.finish());
    }
    let manifest = cx.manifest(doc.get_ref(), doc.span());
    match manifest {
        Some(m) if cx.errors.is_empty() => Ok(m),
        _ => Err(cx.finish()),
    }
}

pub(super) type Value<'i> = Spanned<DeValue<'i>>;

pub(super) struct Cx<'a> {
    file: &'a str,
    text: &'a str,
    errors: Vec<ManifestError>,
}

impl Cx<'_> {
    pub(super) fn error(&mut self, span: Range<usize>, message: String) {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        self.errors.push(ManifestError {
            file: self.file.to_string(),
            line,
            column,
            message,
        });
    }

    pub(super) fn finish(mut self) -> ManifestErrors {
        self.errors.sort_by_key(|e| (e.line, e.column));
        ManifestErrors(self.errors)
    }

    /// `path: expected WHAT, found X`.
    pub(super) fn expected(&mut self, path: &str, what: &str, v: &Value<'_>) {
        self.error(
            v.span(),
            format!("{path}: expected {what}, found {}", describe(v.get_ref())),
        );
    }

    /// Reports keys of `table` not in `allowed`, with a did-you-mean.
    pub(super) fn known_keys(&mut self, path: &str, table: &DeTable<'_>, allowed: &[&str]) {
        for key in table.keys() {
            let name: &str = key.get_ref();
            if allowed.contains(&name) {
                continue;
            }
            let full = join(path, name);
            let hint = match closest(name, allowed) {
                Some(best) => format!("did you mean {best:?}?"),
                None => format!("expected one of: {}", allowed.join(", ")),
            };
            self.error(key.span(), format!("{full}: unknown key; {hint}"));
        }
    }

    pub(super) fn table<'t, 'i>(
        &mut self,
        path: &str,
        v: &'t Value<'i>,
    ) -> Option<&'t DeTable<'i>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => {
                self.expected(path, "a table", v);
                None
            }
        }
    }

    pub(super) fn string(&mut self, path: &str, v: &Value<'_>) -> Option<String> {
        match v.get_ref() {
            DeValue::String(s) => Some(s.to_string()),
            _ => {
                self.expected(path, "a string", v);
                None
            }
        }
    }

    pub(super) fn integer(
        &mut self,
        path: &str,
        v: &Value<'_>,
        range: Range<i64>,
        what: &str,
    ) -> Option<i64> {
        let n = match v.get_ref() {
            DeValue::Integer(i) => {
                i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()).ok()
            }
            _ => None,
        };
        match n.filter(|n| range.contains(n)) {
            Some(n) => Some(n),
            None => {
                self.expected(path, what, v);
                None
            }
        }
    }

    pub(super) fn port(&mut self, path: &str, v: &Value<'_>) -> Option<u16> {
        self.integer(path, v, 1..65536, "a port from 1 to 65535")
            .map(|n| n as u16)
    }

    pub(super) fn boolean(&mut self, path: &str, v: &Value<'_>) -> Option<bool> {
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.expected(path, "true or false", v);
                None
            }
        }
    }

    pub(super) fn array<'t, 'i>(
        &mut self,
        path: &str,
        v: &'t Value<'i>,
        what: &str,
    ) -> Option<&'t [Value<'i>]> {
        match v.get_ref() {
            DeValue::Array(a) => Some(a.as_ref()),
            _ => {
                self.expected(path, what, v);
                None
            }
        }
    }

    /// An array of strings, each satisfying `check` (`no_check` for any).
    pub(super) fn strings(
        &mut self,
        path: &str,
        v: &Value<'_>,
        check: impl Fn(&str) -> Result<(), String>,
    ) -> Option<Vec<String>> {
        let items = self.array(path, v, "an array of strings")?;
        let out: Vec<Option<String>> = items
            .iter()
            .enumerate()
            .map(|(i, s)| self.checked(&format!("{path}[{i}]"), s, &check))
            .collect();
        out.into_iter().collect()
    }

    /// A string that must satisfy `check` (which says what it should look like).
    pub(super) fn checked(
        &mut self,
        path: &str,
        v: &Value<'_>,
        check: impl Fn(&str) -> Result<(), String>,
    ) -> Option<String> {
        let s = self.string(path, v)?;
        match check(&s) {
            Ok(()) => Some(s),
            Err(why) => {
                self.error(v.span(), format!("{path}: {why}"));
                None
            }
        }
    }

    /// One of `choices`, mapped to its value.
    pub(super) fn choice<T: Copy>(
        &mut self,
        path: &str,
        v: &Value<'_>,
        choices: &[(&str, T)],
    ) -> Option<T> {
        let s = self.string(path, v)?;
        match choices.iter().find(|(name, _)| *name == s) {
            Some((_, t)) => Some(*t),
            None => {
                let names: Vec<String> = choices.iter().map(|(n, _)| format!("{n:?}")).collect();
                self.expected(path, &format!("one of {}", names.join(", ")), v);
                None
            }
        }
    }

    pub(super) fn cpu(&mut self, path: &str, v: &Value<'_>) -> Option<f64> {
        let n = match v.get_ref() {
            DeValue::Float(f) => f.as_str().replace('_', "").parse::<f64>().ok(),
            DeValue::Integer(i) => i.as_str().replace('_', "").parse::<f64>().ok(),
            _ => None,
        };
        match n.filter(|c| c.is_finite() && *c > 0.0 && *c <= 1024.0) {
            Some(c) => Some(c),
            None => {
                self.expected(path, "a number of cores like 0.5", v);
                None
            }
        }
    }

    pub(super) fn duration_ms(&mut self, path: &str, v: &Value<'_>) -> Option<u64> {
        let s = self.string(path, v)?;
        match humantime::parse_duration(&s) {
            Ok(d) if !d.is_zero() => Some(d.as_millis() as u64),
            _ => {
                self.error(
                    v.span(),
                    format!("{path}: expected a duration like \"2s\" or \"500ms\", found {s:?}"),
                );
                None
            }
        }
    }

    /// A required string `key` of table `t` (at `v`), checked by `check`.
    pub(super) fn required(
        &mut self,
        path: &str,
        v: &Value<'_>,
        t: &DeTable<'_>,
        key: &str,
        check: impl Fn(&str) -> Result<(), String>,
    ) -> Option<String> {
        match t.get(key) {
            Some(value) => self.checked(&join(path, key), value, check),
            None => {
                self.error(v.span(), format!("{}: missing", join(path, key)));
                None
            }
        }
    }

    /// A table of strings whose keys satisfy `check_key` (`no_check` for any).
    pub(super) fn string_table(
        &mut self,
        path: &str,
        v: &Value<'_>,
        check_key: impl Fn(&str) -> Result<(), String>,
    ) -> Option<BTreeMap<String, String>> {
        let t = self.table(path, v)?;
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (key, value) in t.iter() {
            let kpath = join(path, key.get_ref());
            if let Err(why) = check_key(key.get_ref()) {
                self.error(key.span(), format!("{kpath}: {why}"));
                ok = false;
            }
            match self.string(&kpath, value) {
                Some(s) => {
                    out.insert(key.get_ref().to_string(), s);
                }
                None => ok = false,
            }
        }
        ok.then_some(out)
    }
}

/// The check that accepts everything.
pub(super) fn no_check(_: &str) -> Result<(), String> {
    Ok(())
}

/// `default` when `v` is absent, else what `read` makes of it.
pub(super) fn opt<T>(
    v: Option<&Value<'_>>,
    default: T,
    read: impl FnOnce(&Value<'_>) -> Option<T>,
) -> Option<T> {
    match v {
        None => Some(default),
        Some(v) => read(v),
    }
}

pub(super) fn default_rollout() -> Rollout {
    Rollout {
        max_surge: defaults::MAX_SURGE,
        max_unavailable: defaults::MAX_UNAVAILABLE,
        auto_rollback: false,
        deadline_ms: defaults::ROLLOUT_DEADLINE_MS,
    }
}

pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// What a value is, for "found ...".
fn describe(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => format!("{:?}", s.as_ref()),
        DeValue::Integer(i) => i.as_str().to_string(),
        DeValue::Float(f) => f.as_str().to_string(),
        DeValue::Boolean(b) => b.to_string(),
        DeValue::Datetime(d) => d.to_string(),
        DeValue::Array(_) => "an array".to_string(),
        DeValue::Table(_) => "a table".to_string(),
    }
}

/// The allowed key most like `key`, if one is close enough to be a typo.
fn closest<'a>(key: &str, allowed: &[&'a str]) -> Option<&'a str> {
    allowed
        .iter()
        .map(|a| (strsim::jaro_winkler(key, a), *a))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|x, y| x.0.total_cmp(&y.0))
        .map(|(_, a)| a)
}

pub(super) use crate::names::env_var as env_var_name;
