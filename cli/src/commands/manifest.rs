//! `verge init`: the manifest, written for a new app.

use std::io::Write as _;

use verge_api::{ErrorDetail, ErrorKind};

use super::{Failure, Result};
use crate::output::Output;

/// Writes `verge_api::manifest::EXAMPLE` to `./verge.toml`; an existing file
/// is kept unless `force`.
pub fn init(force: bool, out: &Output) -> Result {
    let path = std::path::Path::new("verge.toml");
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|e| {
        let detail = if e.kind() == std::io::ErrorKind::AlreadyExists {
            ErrorDetail::new(
                ErrorKind::Conflict,
                "verge.toml already exists here; it was left as it is",
            )
            .with_next("verge init --force to replace it")
        } else {
            ErrorDetail::new(
                ErrorKind::BadRequest,
                format!("cannot write verge.toml: {e}"),
            )
        };
        Failure(detail)
    })?;
    file.write_all(verge_api::manifest::EXAMPLE.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| {
            Failure(ErrorDetail::new(
                ErrorKind::Internal,
                format!("cannot write verge.toml: {e}"),
            ))
        })?;
    let written = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    out.one(&serde_json::json!({ "path": written }), |_| {
        format!(
            "wrote {}: a commented example for app \"hello\"\nnext: edit it (every key: docs/manifest.md), then `verge apps create hello`",
            written.display()
        )
    });
    Ok(())
}
