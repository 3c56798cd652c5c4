//! Live progress of a wait (`verge wait`, `--wait`), on stderr: a progress
//! bar when stderr is a terminal; otherwise the env's new events as lines
//! and a progress line whenever the counts change; nothing under `-o json`,
//! which keeps stderr for the one JSON error line.

use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};
use verge_api::status::Event;

use crate::output::Output;

enum Display {
    Bar(Bar),
    Lines { shown: String },
    Quiet,
}

/// A spinner with a message until the first counts, then a bar.
struct Bar {
    bar: ProgressBar,
    /// The style once there are counts.
    counting: ProgressStyle,
    /// Drawn yet (it is hidden until there is something to show)?
    shown: bool,
    counts: bool,
}

impl Bar {
    fn show(&mut self) {
        if !self.shown {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            self.bar.enable_steady_tick(Duration::from_millis(120));
            self.shown = true;
        }
    }
}

/// Where progress goes while a command waits.
pub struct Progress {
    display: Display,
}

impl Progress {
    /// Says the control plane is unreachable and the wait retries, once
    /// per distinct error (`last` keeps the one said).
    pub fn retrying(&mut self, error: &verge_api::client::ClientError, last: &mut String) {
        let now = error.to_string();
        if now != *last {
            self.note(&format!("{now}; retrying"));
            *last = now;
        }
    }

    /// A bar titled `prefix` on a terminal, lines elsewhere, nothing under
    /// `-o json`. The bar reads `POS/LEN UNIT` (`1/2 done`) with the
    /// message on a second line. It has no colours; a dumb terminal gets
    /// lines.
    pub fn new(out: &Output, prefix: &str, unit: &str) -> Self {
        let display = if out.is_json() {
            Display::Quiet
        } else if std::io::stderr().is_terminal()
            && std::env::var_os("TERM").is_none_or(|t| t != "dumb")
        {
            let template = format!(
                "{{spinner}} {{prefix}} [{{bar:25}}] {{pos}}/{{len}} {unit}\n  {{wide_msg}}"
            );
            let counting = ProgressStyle::with_template(&template)
                .expect("the template is valid")
                .progress_chars("=> ");
            let waiting = ProgressStyle::with_template("{spinner} {prefix}: {wide_msg}")
                .expect("the template is valid");
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden())
                .with_style(waiting)
                .with_prefix(prefix.to_string())
                .with_finish(ProgressFinish::AndClear);
            Display::Bar(Bar {
                bar,
                counting,
                shown: false,
                counts: false,
            })
        } else {
            Display::Lines {
                shown: String::new(),
            }
        };
        Progress { display }
    }

    /// The bar's title, once known (`v3 to hello/prod`).
    pub fn set_prefix(&self, prefix: &str) {
        if let Display::Bar(b) = &self.display {
            b.bar.set_prefix(prefix.to_string());
        }
    }

    /// Whether events should be fetched for [`Progress::event`]: only
    /// lines show them.
    pub fn wants_events(&self) -> bool {
        matches!(self.display, Display::Lines { .. })
    }

    /// One event of the env, as `verge events --follow` prints it.
    pub fn event(&self, e: &Event) {
        if let Display::Lines { .. } = self.display {
            eprintln!("{}", event_line(e, false));
        }
    }

    /// Counts now: the bar moves to `done` of `total` with `message`;
    /// lines print `line` when `key` (what counts as a change) changed.
    pub fn update(&mut self, done: u64, total: u64, message: &str, key: &str, line: &str) {
        match &mut self.display {
            Display::Bar(b) => {
                if !b.counts {
                    b.bar.set_style(b.counting.clone());
                    b.counts = true;
                }
                b.bar.set_length(total);
                b.bar.set_position(done.min(total));
                b.bar.set_message(message.to_string());
                b.show();
            }
            Display::Lines { shown } => {
                if shown != key {
                    eprintln!("{line}");
                    *shown = key.to_string();
                }
            }
            Display::Quiet => {}
        }
    }

    /// No counts yet (`waiting for the rollout to start`): a spinner with
    /// `message`, or `line` once.
    pub fn waiting(&mut self, message: &str, line: &str) {
        match &mut self.display {
            Display::Bar(b) if !b.counts => {
                b.bar.set_message(message.to_string());
                b.show();
            }
            Display::Bar(b) => b.bar.set_message(message.to_string()),
            Display::Lines { shown } => {
                if shown != line {
                    eprintln!("{line}");
                    *shown = line.to_string();
                }
            }
            Display::Quiet => {}
        }
    }

    /// A one-off note (`cannot reach ...; retrying`), above the bar.
    pub fn note(&self, text: &str) {
        match &self.display {
            Display::Bar(b) if b.shown => b.bar.println(text),
            Display::Bar(_) | Display::Lines { .. } => eprintln!("{text}"),
            Display::Quiet => {}
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Display::Bar(b) = &self.display {
            b.bar.finish_and_clear();
        }
    }
}

/// `TIME KIND [ORG/APP/ENV] MESSAGE [release ID]`: an event on one line.
pub fn event_line(e: &Event, all: bool) -> String {
    let mut text = format!("{} {}", e.time, e.kind);
    if all {
        text = format!("{text} {}", super::observe::where_(e));
    }
    text = format!("{text} {}", e.message);
    if let Some(r) = &e.release {
        text = format!("{text} [release {r}]");
    }
    text
}
