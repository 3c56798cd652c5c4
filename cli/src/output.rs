//! Rendering: human tables by default, one JSON document with `-o json`.
//! Failures print one line of cause plus next actions on stderr (as
//! `{"error": {...}}` under `-o json`).

use comfy_table::{Table, presets};
use serde::Serialize;

use crate::args::Format;
use crate::commands::Failure;

#[derive(Debug, Clone, Copy)]
pub struct Output {
    format: Format,
}

impl Output {
    pub fn new(format: Format) -> Self {
        Output { format }
    }

    pub fn is_json(&self) -> bool {
        self.format == Format::Json
    }

    /// A list: a JSON array, or a table with `headers` and one row per item.
    pub fn list<T: Serialize>(
        &self,
        items: &[T],
        headers: &[&str],
        row: impl Fn(&T) -> Vec<String>,
    ) {
        if self.is_json() {
            return self.json(&items);
        }
        if items.is_empty() {
            println!("(none)");
            return;
        }
        println!("{}", table(headers, items.iter().map(row)));
    }

    /// One object: JSON, or the human text `human` makes of it.
    pub fn one<T: Serialize>(&self, item: &T, human: impl FnOnce(&T) -> String) {
        if self.is_json() {
            self.json(item);
        } else {
            println!("{}", human(item));
        }
    }

    /// One item of a stream: a compact JSON line (NDJSON), or `human`'s
    /// line. Flushed at once: a reader on a pipe sees each item as it comes.
    pub fn stream_item<T: Serialize>(&self, item: &T, human: impl FnOnce(&T) -> String) {
        use std::io::Write as _;
        let line = if self.is_json() {
            serde_json::to_string(item).expect("API types serialise")
        } else {
            human(item)
        };
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
    }

    fn json<T: Serialize + ?Sized>(&self, value: &T) {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("API types serialise")
        );
    }

    pub fn error(&self, failure: &Failure) {
        let d = &failure.0;
        if self.is_json() {
            let body = verge_api::ErrorBody { error: d.clone() };
            eprintln!(
                "{}",
                serde_json::to_string(&body).expect("error body serialises")
            );
            return;
        }
        eprintln!("error: {}", d.message.replace('\n', " "));
        for detail in &d.details {
            eprintln!("  - {detail}");
        }
        for next in &d.next {
            eprintln!("  try: {next}");
        }
    }
}

/// A borderless table with upper-case `headers`, trailing blanks trimmed,
/// without a final newline.
pub fn table(headers: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(headers.iter().map(|h| h.to_uppercase()));
    for row in rows {
        table.add_row(row);
    }
    let text = table.to_string();
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    lines.join("\n")
}
