//! How a run tells the user what happens: progress bars on a terminal, plain lines elsewhere
//! (CI logs), or one JSON event per line with `--json` for scripts.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use finetune_core::Reporter;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    StageStarted {
        stage: String,
        uses: String,
        key: String,
        reason: String,
    },
    StageCached {
        stage: String,
        key: String,
        output: String,
    },
    /// Not in the local cache: fetched from the remote (and checked) instead of run.
    StagePulled {
        stage: String,
        key: String,
        output: String,
        remote: String,
        files: usize,
        bytes: u64,
    },
    StageFinished {
        stage: String,
        key: String,
        output: String,
        duration_s: f64,
    },
    StageFailed {
        stage: String,
        error: String,
        duration_s: f64,
    },
    StageSkipped {
        stage: String,
        reason: String,
    },
    StageWouldRun {
        stage: String,
        reason: String,
    },
    Message {
        stage: String,
        text: String,
    },
    /// A message that must stay on screen (printed as a line, not a bar's status).
    Notice {
        stage: String,
        text: String,
    },
    Waiting {
        text: String,
    },
    RunFinished {
        ran: usize,
        cached: usize,
        pulled: usize,
        failed: usize,
        skipped: usize,
        duration_s: f64,
        /// The process's peak resident memory (Linux), in MiB.
        #[serde(skip_serializing_if = "Option::is_none")]
        peak_rss_mib: Option<f64>,
    },
}

/// The peak resident set size of this process so far, from /proc (Linux); `None` elsewhere.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib / 1024.0 * 10.0).round() / 10.0)
}

pub trait Sink: Send + Sync {
    fn emit(&self, event: Event);
    /// Progress of a running stage (rows, steps).
    fn progress(&self, stage: &str, done: u64, total: u64);
}

/// Picks the sink for this process: JSON if asked, bars on a terminal, plain lines otherwise.
pub fn sink_for(json: bool) -> Box<dyn Sink> {
    if json {
        Box::new(JsonSink)
    } else if std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("CI").is_none()
    {
        Box::new(BarSink::default())
    } else {
        Box::new(PlainSink::default())
    }
}

/// The [`Reporter`] a stage's job gets: forwards to the sink under the stage's id.
pub struct StageReporter<'a> {
    pub sink: &'a dyn Sink,
    pub stage: String,
}

impl Reporter for StageReporter<'_> {
    fn message(&self, text: &str) {
        self.sink.emit(Event::Message {
            stage: self.stage.clone(),
            text: text.to_string(),
        });
    }
    fn notice(&self, text: &str) {
        self.sink.emit(Event::Notice {
            stage: self.stage.clone(),
            text: text.to_string(),
        });
    }
    fn progress(&self, done: u64, total: u64) {
        self.sink.progress(&self.stage, done, total);
    }
}

pub struct JsonSink;

impl Sink for JsonSink {
    fn emit(&self, event: Event) {
        let line = serde_json::to_string(&event).unwrap_or_default();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
    fn progress(&self, _stage: &str, _done: u64, _total: u64) {}
}

/// One line per event on stderr; progress at most every few seconds per stage.
#[derive(Default)]
pub struct PlainSink {
    last_progress: Mutex<HashMap<String, Instant>>,
}

const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

impl Sink for PlainSink {
    fn emit(&self, event: Event) {
        if let Some(line) = plain_line(&event) {
            eprintln!("{line}");
        }
    }
    fn progress(&self, stage: &str, done: u64, total: u64) {
        let mut last = self.last_progress.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let due = last
            .get(stage)
            .is_none_or(|t| now.duration_since(*t) >= PLAIN_PROGRESS_EVERY);
        if due || done == total {
            last.insert(stage.to_string(), now);
            eprintln!("[{stage}] {done}/{total}");
        }
    }
}

fn plain_line(event: &Event) -> Option<String> {
    Some(match event {
        Event::StageStarted {
            stage,
            uses,
            reason,
            ..
        } => format!("[{stage}] running {uses} ({reason})"),
        Event::StageCached { stage, key, .. } => format!("[{stage}] cached ({})", short(key)),
        Event::StagePulled {
            stage,
            key,
            remote,
            files,
            bytes,
            ..
        } => format!(
            "[{stage}] pulled from {remote} ({}, {}, {})",
            short(key),
            crate::remote::count(*files, "file"),
            crate::remote::human_bytes(*bytes)
        ),
        Event::StageFinished {
            stage, duration_s, ..
        } => format!("[{stage}] done in {duration_s:.2}s"),
        Event::StageFailed { stage, error, .. } => format!("[{stage}] FAILED: {error}"),
        Event::StageSkipped { stage, reason } => format!("[{stage}] skipped: {reason}"),
        Event::StageWouldRun { stage, reason } => format!("[{stage}] would run: {reason}"),
        Event::Message { stage, text } | Event::Notice { stage, text } => {
            format!("[{stage}] {text}")
        }
        Event::Waiting { text } => text.clone(),
        Event::RunFinished {
            ran,
            cached,
            pulled,
            failed,
            skipped,
            duration_s,
            peak_rss_mib,
        } => {
            let memory =
                peak_rss_mib.map_or(String::new(), |m| format!(", peak memory {m:.0} MiB"));
            let pulled = if *pulled > 0 {
                format!("{pulled} pulled, ")
            } else {
                String::new()
            };
            format!(
                "{ran} ran, {cached} cached, {pulled}{failed} failed, {skipped} skipped in {duration_s:.2}s{memory}"
            )
        }
    })
}

pub fn short(digest: &str) -> &str {
    &digest[..digest.len().min(12)]
}

/// indicatif bars, one per running stage.
#[derive(Default)]
pub struct BarSink {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl BarSink {
    fn bar(&self, stage: &str) -> ProgressBar {
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        bars.entry(stage.to_string())
            .or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new_spinner());
                bar.set_draw_target(ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {prefix:.bold} {wide_msg} {pos}/{len} {elapsed}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_prefix(stage.to_string());
                bar.enable_steady_tick(Duration::from_millis(120));
                bar
            })
            .clone()
    }
}

impl Sink for BarSink {
    fn emit(&self, event: Event) {
        match &event {
            Event::StageStarted { stage, .. } => self.bar(stage).set_message("running"),
            Event::Message { stage, text } => self.bar(stage).set_message(text.clone()),
            Event::StageFinished { stage, .. } | Event::StageFailed { stage, .. } => {
                if let Some(bar) = self
                    .bars
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(stage)
                {
                    bar.finish_and_clear();
                }
                if let Some(line) = plain_line(&event) {
                    let _ = self.multi.println(line);
                }
            }
            _ => {
                if let Some(line) = plain_line(&event) {
                    let _ = self.multi.println(line);
                }
            }
        }
    }
    fn progress(&self, stage: &str, done: u64, total: u64) {
        let bar = self.bar(stage);
        bar.set_length(total);
        bar.set_position(done);
    }
}
