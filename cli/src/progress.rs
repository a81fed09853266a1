//! Progress rendering: a live view on terminals, plain lines for CI logs, JSON events for tools.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use graphbuild_engine::events::{Event, EventSink, StepStatus, Summary};

use crate::ProgressMode;
use crate::render;

struct Running {
    label: String,
    step: String,
    started: Instant,
    last_line: String,
}

struct State {
    running: BTreeMap<usize, Running>,
    /// Lines of the live region drawn last time, to erase them.
    drawn: usize,
    summary: Option<Summary>,
    done: bool,
}

pub struct Progress {
    mode: ProgressMode,
    quiet: bool,
    color: bool,
    state: Arc<Mutex<State>>,
    ticker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Progress {
    pub fn new(mode: ProgressMode, quiet: bool) -> Self {
        let state = Arc::new(Mutex::new(State { running: BTreeMap::new(), drawn: 0, summary: None, done: false }));
        let progress = Progress { mode, quiet, color: render::color_enabled(), state, ticker: Mutex::new(None) };
        if mode == ProgressMode::Tty && !quiet {
            let state = progress.state.clone();
            let color = progress.color;
            let handle = std::thread::spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_millis(120));
                    let Ok(mut state) = state.lock() else { return };
                    if state.done {
                        return;
                    }
                    redraw(&mut state, color);
                }
            });
            if let Ok(mut ticker) = progress.ticker.lock() {
                *ticker = Some(handle);
            }
        }
        progress
    }

    /// Stop the live view and print the final table.
    pub fn finish(&self) {
        let summary = {
            let Ok(mut state) = self.state.lock() else { return };
            state.done = true;
            clear(&mut state);
            state.summary.take()
        };
        if let Some(handle) = self.ticker.lock().ok().and_then(|mut ticker| ticker.take()) {
            let _ = handle.join();
        }
        if self.mode == ProgressMode::Json {
            return;
        }
        if let Some(summary) = summary {
            print_summary(&summary, self.quiet);
        }
    }

    fn dim(&self, text: &str) -> String {
        if self.color { format!("\x1b[2m{text}\x1b[0m") } else { text.to_string() }
    }
}

fn clear(state: &mut State) {
    if state.drawn > 0 {
        let mut err = std::io::stderr().lock();
        for _ in 0..state.drawn {
            let _ = write!(err, "\x1b[1A\x1b[2K");
        }
        let _ = err.flush();
        state.drawn = 0;
    }
}

fn redraw(state: &mut State, color: bool) {
    clear(state);
    let width = render::terminal_width().unwrap_or(100).max(40);
    let mut err = std::io::stderr().lock();
    let mut lines = 0;
    for running in state.running.values() {
        let elapsed = running.started.elapsed().as_secs_f64();
        let head = format!(" ⠿ {} {} {:.1}s", running.label, running.step, elapsed);
        let _ = writeln!(err, "{}", fit(&head, width));
        lines += 1;
        if !running.last_line.is_empty() {
            let tail = format!("   │ {}", running.last_line);
            let tail = fit(&tail, width);
            let _ = writeln!(err, "{}", if color { format!("\x1b[2m{tail}\x1b[0m") } else { tail });
            lines += 1;
        }
    }
    let _ = err.flush();
    state.drawn = lines;
}

fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let cut: String = text.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

fn print_summary(summary: &Summary, quiet: bool) {
    let mut out = std::io::stdout().lock();
    if quiet {
        for image in &summary.images {
            let _ = writeln!(out, "{} {}", image.name, image.index_digest);
        }
        return;
    }
    for image in &summary.images {
        let _ = writeln!(out, "{}  {}  → {}", image.name, image.index_digest, image.output);
        for platform in &image.platforms {
            let _ = writeln!(
                out,
                "  {:<16} {}  {:>10}",
                platform.platform,
                platform.manifest_digest,
                render::bytes(platform.size)
            );
        }
        let _ = writeln!(out, "  steps: {} executed, {} cached", image.executed, image.cached);
    }
    let _ = writeln!(
        out,
        "{} steps executed, {} cached, {} failed in {}",
        summary.executed,
        summary.cached,
        summary.failed,
        render::duration(summary.duration_ms)
    );
}

impl EventSink for Progress {
    fn emit(&self, event: Event) {
        if self.mode == ProgressMode::Json {
            if matches!(event, Event::Output { .. }) && self.quiet {
                return;
            }
            if let Ok(line) = serde_json::to_string(&event) {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
            }
            if let Event::Summary(summary) = event {
                if let Ok(mut state) = self.state.lock() {
                    state.summary = Some(summary);
                }
            }
            return;
        }
        let Ok(mut state) = self.state.lock() else { return };
        match event {
            Event::StepStarted { node, stage, platform, step } => {
                let label = format!("[{stage} {platform}]");
                if self.mode == ProgressMode::Plain && !self.quiet {
                    eprintln!("{label} {step}");
                }
                state.running.insert(node, Running { label, step, started: Instant::now(), last_line: String::new() });
            }
            Event::Output { node, line } => {
                if self.mode == ProgressMode::Plain && !self.quiet {
                    if let Some(running) = state.running.get(&node) {
                        eprintln!("{} │ {line}", running.label);
                    }
                }
                if let Some(running) = state.running.get_mut(&node) {
                    running.last_line = line;
                }
            }
            Event::Step { node, stage, platform, step, status, duration_ms } => {
                state.running.remove(&node);
                if self.quiet && status != StepStatus::Failed {
                    return;
                }
                if self.mode == ProgressMode::Tty {
                    clear(&mut state);
                }
                let label = format!("[{stage} {platform}]");
                let line = match status {
                    StepStatus::Cached => format!("{label} {} {}", self.dim("CACHED"), fit(&step, 100)),
                    StepStatus::Executed => format!(
                        "{label} DONE {} {}",
                        render::duration(duration_ms.unwrap_or(0)),
                        fit(&step, 100)
                    ),
                    StepStatus::Failed => format!("{label} FAILED {}", fit(&step, 100)),
                };
                eprintln!("{line}");
            }
            Event::Warning { message } => {
                if self.mode == ProgressMode::Tty {
                    clear(&mut state);
                }
                render::warning(&message);
            }
            Event::Summary(summary) => state.summary = Some(summary),
            _ => {}
        }
    }
}
