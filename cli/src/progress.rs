//! Progress rendering: a live view on terminals, plain lines for CI logs, JSON events for tools.
//!
//! The engine emits [`Event`]s from many threads; [`Progress`] turns them into one of three
//! displays:
//!
//! - **tty** (stderr is a terminal): finished steps scroll by as one line each (`✓` executed
//!   with its duration, `CACHED`, `✗` failed), and below them a live region, redrawn a few
//!   times a second, with a header (`[+] Building 4.2s (5/15 steps)`) and, per running node,
//!   its stage, platform, elapsed time and step, then the last line the step printed. Every
//!   line is cut to the terminal's width, so a narrow terminal never wraps and the region can
//!   be erased exactly. Colors only when `NO_COLOR` is unset.
//! - **plain** (CI logs): one line per step start, output line and step end, never colored,
//!   never cut: logs are read with grep, not on a screen.
//! - **json**: one event per line on stdout, exactly the engine's events (docs/cli.md).
//!
//! Human modes end with a table per image on stdout: platforms, manifest digests, sizes,
//! steps executed and cached, and the build's time. `--quiet` replaces all of it with failed
//! steps only and the final `NAME DIGEST` lines.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use graphbuild_engine::events::{Event, EventSink, StepStatus, Summary};

use crate::ProgressMode;
use crate::render;

/// A node with a step executing.
struct Running {
    stage: String,
    platform: String,
    step: String,
    started: Instant,
    last_line: String,
}

struct State {
    running: BTreeMap<usize, Running>,
    /// Image tests running, by test id.
    running_tests: BTreeMap<usize, Running>,
    /// Lines of the live region drawn last time, to move back over them.
    drawn: usize,
    /// Filesystem steps in the plan, and how many have finished (any status).
    total_steps: usize,
    finished_steps: usize,
    started: Instant,
    summary: Option<Summary>,
    done: bool,
}

/// Renders the engine's events; see the module docs.
pub(crate) struct Progress {
    /// Shows nothing at all (`verify` builds quietly and reports on its own).
    silent: bool,
    mode: ProgressMode,
    quiet: bool,
    /// ANSI styles (tty mode, `NO_COLOR` unset, stderr a terminal).
    color: bool,
    state: Arc<Mutex<State>>,
    ticker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

const SPINNER: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/// Narrowest width we lay out for; below it lines are still cut, just very short.
const MIN_WIDTH: usize = 20;

impl Progress {
    pub(crate) fn new(mode: ProgressMode, quiet: bool) -> Self {
        let state = Arc::new(Mutex::new(State {
            running: BTreeMap::new(),
            running_tests: BTreeMap::new(),
            drawn: 0,
            total_steps: 0,
            finished_steps: 0,
            started: Instant::now(),
            summary: None,
            done: false,
        }));
        let color = mode == ProgressMode::Tty && render::color_enabled();
        let progress = Progress {
            silent: false,
            mode,
            quiet,
            color,
            state,
            ticker: Mutex::new(None),
        };
        if mode == ProgressMode::Tty && !quiet {
            let state = progress.state.clone();
            let handle = std::thread::spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_millis(100));
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

    /// A progress that shows nothing.
    pub(crate) fn silent() -> Self {
        let mut progress = Progress::new(ProgressMode::Plain, true);
        progress.silent = true;
        progress
    }

    /// Stop the live view and print the final table.
    pub(crate) fn finish(&self) {
        let summary = {
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            state.done = true;
            erase(&mut state);
            state.summary.take()
        };
        if let Some(handle) = self.ticker.lock().ok().and_then(|mut ticker| ticker.take()) {
            let _ = handle.join();
        }
        if self.mode == ProgressMode::Json || self.silent {
            return;
        }
        if let Some(summary) = summary {
            let stdout = std::io::stdout();
            let width = if stdout.is_terminal() {
                render::terminal_width()
            } else {
                None
            };
            let _ = stdout
                .lock()
                .write_all(summary_table(&summary, self.quiet, width).as_bytes());
        }
    }
}

fn style(color: bool, code: &str, text: &str) -> String {
    if color {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// The line for a finished step: marks and colors on a terminal, words in logs.
fn step_line(
    mode: ProgressMode,
    color: bool,
    stage: &str,
    platform: &str,
    step: &str,
    status: StepStatus,
    duration_ms: Option<u64>,
) -> String {
    let label = format!("[{stage} {platform}]");
    let duration = render::duration(duration_ms.unwrap_or(0));
    let step = sanitize(&step.replace('\n', " "));
    match (mode, status) {
        (ProgressMode::Tty, StepStatus::Executed) => {
            format!(
                "{} {label} {} {step}",
                style(color, "32", "✓"),
                style(color, "2", &duration)
            )
        }
        (ProgressMode::Tty, StepStatus::Cached) => {
            format!(
                "{} {label} {} {step}",
                style(color, "36", "✓"),
                style(color, "36", "CACHED")
            )
        }
        (ProgressMode::Tty, StepStatus::Failed) => {
            format!(
                "{} {label} {} {step}",
                style(color, "31", "✗"),
                style(color, "31;1", "FAILED")
            )
        }
        (_, StepStatus::Executed) => format!("{label} DONE {duration} {step}"),
        (_, StepStatus::Cached) => format!("{label} CACHED {step}"),
        (_, StepStatus::Failed) => format!("{label} FAILED after {duration} {step}"),
    }
}

/// A finished step's line on a terminal, cut to `width`. The step text is cut before styling,
/// so an escape sequence is never cut in half.
fn tty_step_line(
    color: bool,
    width: usize,
    stage: &str,
    platform: &str,
    step: &str,
    status: StepStatus,
    duration_ms: Option<u64>,
) -> String {
    let unstyled = step_line(
        ProgressMode::Tty,
        false,
        stage,
        platform,
        step,
        status,
        duration_ms,
    );
    let length = unstyled.chars().count();
    if length <= width {
        return step_line(
            ProgressMode::Tty,
            color,
            stage,
            platform,
            step,
            status,
            duration_ms,
        );
    }
    let room = width.saturating_sub(length - step.chars().count()).max(2);
    let cut = fit(step, room);
    fit(
        &step_line(
            ProgressMode::Tty,
            color,
            stage,
            platform,
            &cut,
            status,
            duration_ms,
        ),
        if color { usize::MAX } else { width },
    )
}

/// Cut `text` to `width` characters, ending with `…` when cut. ANSI sequences must not be in
/// `text` (they would be counted and could be cut in half): style after fitting.
fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let cut: String = text.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

fn live_width() -> usize {
    render::terminal_width().unwrap_or(80).max(MIN_WIDTH)
}

/// Move the cursor back to the top of the live region and clear it.
fn erase(state: &mut State) {
    if state.drawn > 0 {
        let mut frame = String::new();
        for _ in 0..state.drawn {
            frame.push_str("\x1b[1A\x1b[2K");
        }
        frame.push('\r');
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(frame.as_bytes());
        let _ = err.flush();
        state.drawn = 0;
    }
}

/// The live region: a header, then per running node its step and last output line.
fn live_lines(state: &State, width: usize, color: bool) -> Vec<String> {
    let dim = |text: String| {
        if color {
            format!("\x1b[2m{text}\x1b[0m")
        } else {
            text
        }
    };
    let elapsed = state.started.elapsed();
    let mut lines = Vec::new();
    let mut header = format!(
        "[+] Building {}",
        render::duration(elapsed.as_millis() as u64)
    );
    if state.total_steps > 0 {
        let _ = write!(
            header,
            " ({}/{} steps",
            state.finished_steps.min(state.total_steps),
            state.total_steps
        );
        let running = state.running.len() + state.running_tests.len();
        if running > 0 {
            let _ = write!(header, ", {running} running");
        }
        header.push(')');
    }
    lines.push(fit(&header, width));
    let frame = (elapsed.as_millis() / 100) as usize % SPINNER.len();
    for running in state.running.values().chain(state.running_tests.values()) {
        let seconds = running.started.elapsed().as_secs_f64();
        // Elapsed time before the step text, so cutting a long command never hides it.
        let head = format!(
            " {} [{} {}] {seconds:.1}s {}",
            SPINNER[frame], running.stage, running.platform, running.step
        );
        lines.push(fit(&head.replace('\n', " "), width));
        if !running.last_line.is_empty() {
            lines.push(dim(fit(&format!("   │ {}", running.last_line), width)));
        }
    }
    lines
}

fn redraw(state: &mut State, color: bool) {
    let width = live_width();
    let lines = live_lines(state, width, color);
    // One write per frame: move up over the old region, rewrite each line, clear leftovers.
    let mut frame = String::new();
    for _ in 0..state.drawn {
        frame.push_str("\x1b[1A");
    }
    frame.push('\r');
    for line in &lines {
        frame.push_str("\x1b[2K");
        frame.push_str(line);
        frame.push('\n');
    }
    for _ in lines.len()..state.drawn {
        frame.push_str("\x1b[2K\n");
    }
    // Leave the cursor just below the new region.
    for _ in lines.len()..state.drawn {
        frame.push_str("\x1b[1A");
    }
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(frame.as_bytes());
    let _ = err.flush();
    state.drawn = lines.len();
}

/// `sha256:0123456789ab` when the full digest does not fit.
fn short_digest(digest: &str) -> String {
    match digest.split_once(':') {
        Some((algorithm, hex)) if hex.len() > 12 => format!("{algorithm}:{}", &hex[..12]),
        _ => digest.to_string(),
    }
}

/// The final report: per image its index digest, output, a row per platform (manifest
/// digest, compressed size) and its steps; then the totals. With a `width` (stdout is a
/// terminal) digests are shortened when full ones would not fit.
fn summary_table(summary: &Summary, quiet: bool, width: Option<usize>) -> String {
    let mut out = String::new();
    if quiet {
        for image in &summary.images {
            let _ = writeln!(out, "{} {}", image.name, image.index_digest);
        }
        return out;
    }
    let platform_width = summary
        .images
        .iter()
        .flat_map(|image| &image.platforms)
        .map(|p| p.platform.len())
        .max()
        .unwrap_or(8)
        .max(8);
    // "  " + platform + "  " + digest (71) + "  " + size (10)
    let full_row = 2 + platform_width + 2 + 71 + 2 + 10;
    let shorten = width.is_some_and(|width| width < full_row);
    let digest = |digest: &str| {
        if shorten {
            short_digest(digest)
        } else {
            digest.to_string()
        }
    };
    for image in &summary.images {
        let _ = writeln!(
            out,
            "\n{}  {}  → {}",
            image.name,
            digest(&image.index_digest),
            image.output
        );
        let digest_width = if shorten { 19 } else { 71 };
        let _ = writeln!(
            out,
            "  {:<platform_width$}  {:<digest_width$}  {:>10}",
            "PLATFORM", "MANIFEST", "SIZE"
        );
        for platform in &image.platforms {
            let _ = writeln!(
                out,
                "  {:<platform_width$}  {:<digest_width$}  {:>10}",
                platform.platform,
                digest(&platform.manifest_digest),
                render::bytes(platform.size)
            );
        }
        let _ = writeln!(
            out,
            "  steps: {} executed, {} cached",
            image.executed, image.cached
        );
        if !image.tags.is_empty() {
            let _ = writeln!(out, "  tags:  {}", image.tags.join(", "));
        }
    }
    let images = match summary.images.len() {
        1 => "1 image".to_string(),
        count => format!("{count} images"),
    };
    let _ = writeln!(
        out,
        "\n{images} in {}: {} steps executed, {} cached, {} failed",
        render::duration(summary.duration_ms),
        summary.executed,
        summary.cached,
        summary.failed,
    );
    if summary.tests_executed + summary.tests_cached > 0 {
        let _ = writeln!(
            out,
            "image tests: {} passed, {} passed before (cached)",
            summary.tests_executed, summary.tests_cached
        );
    }
    out
}

impl EventSink for Progress {
    fn emit(&self, event: Event) {
        if self.silent {
            return;
        }
        if self.mode == ProgressMode::Json {
            if matches!(event, Event::Output { .. }) && self.quiet {
                return;
            }
            if let Ok(line) = serde_json::to_string(&event) {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
            }
            if let Event::Summary(summary) = event
                && let Ok(mut state) = self.state.lock()
            {
                state.summary = Some(summary);
            }
            return;
        }
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let plain = self.mode == ProgressMode::Plain;
        match event {
            Event::Plan { steps, .. } => state.total_steps = steps,
            Event::StepStarted {
                node,
                stage,
                platform,
                step,
            } => {
                let step = sanitize(&step);
                if plain && !self.quiet {
                    eprintln!("[{stage} {platform}] {step}");
                }
                state.running.insert(
                    node,
                    Running {
                        stage,
                        platform,
                        step,
                        started: Instant::now(),
                        last_line: String::new(),
                    },
                );
            }
            Event::Output { node, line } => {
                let line = sanitize(&line);
                if plain
                    && !self.quiet
                    && let Some(running) = state.running.get(&node)
                {
                    eprintln!("[{} {}] │ {line}", running.stage, running.platform);
                }
                if let Some(running) = state.running.get_mut(&node) {
                    running.last_line = line;
                }
            }
            Event::Step {
                node,
                stage,
                platform,
                step,
                status,
                duration_ms,
                ran_on,
            } => {
                state.running.remove(&node);
                state.finished_steps += 1;
                // A step a remote worker executed says which.
                let step = match ran_on.as_deref() {
                    Some(worker) if worker != "local" => {
                        format!("{step} (on {})", sanitize(worker))
                    }
                    _ => step,
                };
                if self.quiet && status != StepStatus::Failed {
                    return;
                }
                if self.mode == ProgressMode::Tty {
                    // Finished steps scroll above the live region, cut to the screen.
                    erase(&mut state);
                    eprintln!(
                        "{}",
                        tty_step_line(
                            self.color,
                            live_width(),
                            &stage,
                            &platform,
                            &step,
                            status,
                            duration_ms
                        )
                    );
                } else {
                    eprintln!(
                        "{}",
                        step_line(
                            self.mode,
                            false,
                            &stage,
                            &platform,
                            &step,
                            status,
                            duration_ms
                        )
                    );
                }
            }
            Event::TestStarted {
                test,
                image,
                platform,
                name,
            } => {
                let step = format!("test {}", sanitize(&name));
                if plain && !self.quiet {
                    eprintln!("[{image} {platform}] {step}");
                }
                state.running_tests.insert(
                    test,
                    Running {
                        stage: image,
                        platform,
                        step,
                        started: Instant::now(),
                        last_line: String::new(),
                    },
                );
            }
            Event::Test {
                test,
                image,
                platform,
                name,
                status,
                duration_ms,
            } => {
                state.running_tests.remove(&test);
                if self.quiet && status != StepStatus::Failed {
                    return;
                }
                let step = format!("test {name}");
                if self.mode == ProgressMode::Tty {
                    erase(&mut state);
                    eprintln!(
                        "{}",
                        tty_step_line(
                            self.color,
                            live_width(),
                            &image,
                            &platform,
                            &step,
                            status,
                            duration_ms
                        )
                    );
                } else {
                    eprintln!(
                        "{}",
                        step_line(
                            self.mode,
                            false,
                            &image,
                            &platform,
                            &step,
                            status,
                            duration_ms
                        )
                    );
                }
            }
            Event::Warning { message } => {
                if self.mode == ProgressMode::Tty {
                    erase(&mut state);
                }
                render::warning(&message);
            }
            Event::Summary(summary) => state.summary = Some(summary),
            _ => {}
        }
    }
}

/// A line of step output made safe for a terminal or a log: every control character except
/// tab is shown escaped (`\x1b`, `\u{9b}`), so a step cannot move the cursor, recolor, retitle
/// or clear the screen. A carriage return keeps only what a terminal would show: the text after
/// the last one (a trailing one, as in CRLF, is dropped). Other text, UTF-8 included, is kept.
pub(crate) fn sanitize(line: &str) -> String {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let line = line.rsplit('\r').next().unwrap_or(line);
    if !line.chars().any(|c| c.is_control() && c != '\t') {
        return line.to_string();
    }
    let mut out = String::with_capacity(line.len() + 8);
    for character in line.chars() {
        match character {
            '\t' => out.push('\t'),
            c if (c as u32) < 0x80 && c.is_control() => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use graphbuild_engine::events::{ImageSummary, PlatformSummary};

    fn summary() -> Summary {
        Summary {
            executed: 3,
            cached: 1,
            failed: 0,
            tests_executed: 0,
            tests_cached: 0,
            duration_ms: 4200,
            images: vec![ImageSummary {
                name: "app".into(),
                index_digest: format!("sha256:{}", "a".repeat(64)),
                output: "out/app".into(),
                tags: vec!["app:1.0".into()],
                platforms: vec![
                    PlatformSummary {
                        platform: "linux/amd64".into(),
                        manifest_digest: format!("sha256:{}", "b".repeat(64)),
                        size: 2048,
                        attestation_digest: None,
                        sbom: None,
                    },
                    PlatformSummary {
                        platform: "linux/arm/v7".into(),
                        manifest_digest: format!("sha256:{}", "c".repeat(64)),
                        size: 10,
                        attestation_digest: None,
                        sbom: None,
                    },
                ],
                executed: 3,
                cached: 1,
            }],
        }
    }

    #[test]
    fn the_table_lists_platforms_digests_sizes_steps_and_time() {
        let table = summary_table(&summary(), false, None);
        assert!(
            table.contains(&format!("app  sha256:{}  → out/app", "a".repeat(64))),
            "{table}"
        );
        assert!(
            table.contains(&format!("linux/arm/v7  sha256:{}", "c".repeat(64))),
            "{table}"
        );
        assert!(table.contains("2.0 KiB"), "{table}");
        assert!(table.contains("steps: 3 executed, 1 cached"), "{table}");
        assert!(
            table.contains("1 image in 4.2s: 3 steps executed, 1 cached, 0 failed"),
            "{table}"
        );
    }

    #[test]
    fn a_narrow_terminal_gets_short_digests_that_fit() {
        let table = summary_table(&summary(), false, Some(60));
        assert!(table.contains("sha256:bbbbbbbbbbbb "), "{table}");
        assert!(!table.contains(&"b".repeat(13)), "{table}");
        for line in table.lines().filter(|line| line.starts_with("  linux")) {
            assert!(line.chars().count() <= 60, "{line}");
        }
    }

    #[test]
    fn quiet_prints_name_and_digest_only() {
        assert_eq!(
            summary_table(&summary(), true, None),
            format!("app sha256:{}\n", "a".repeat(64))
        );
    }

    #[test]
    fn live_lines_fit_the_width_and_show_platform_elapsed_and_output() {
        let mut running = BTreeMap::new();
        running.insert(
            0,
            Running {
                stage: "build".into(),
                platform: "linux/arm64".into(),
                step: format!("RUN /bin/sh -c {}", "x".repeat(200)),
                started: Instant::now(),
                last_line: "compiling 3 of 7".into(),
            },
        );
        let state = State {
            running,
            running_tests: BTreeMap::new(),
            drawn: 0,
            total_steps: 5,
            finished_steps: 2,
            started: Instant::now(),
            summary: None,
            done: false,
        };
        let lines = live_lines(&state, 40, false);
        assert!(lines[0].starts_with("[+] Building"), "{lines:?}");
        assert!(lines[0].contains("(2/5 steps, 1 running)"), "{lines:?}");
        assert!(
            lines[1].contains("[build linux/arm64] 0.0s RUN"),
            "{lines:?}"
        );
        assert!(lines[2].contains("│ compiling 3 of 7"), "{lines:?}");
        assert!(
            lines.iter().all(|line| line.chars().count() <= 40),
            "{lines:?}"
        );
        assert!(
            lines.iter().all(|line| !line.contains('\x1b')),
            "no color asked: {lines:?}"
        );
    }

    #[test]
    fn finished_steps_fit_a_narrow_terminal_with_or_without_color() {
        let step = format!("RUN /bin/sh -c {}", "y".repeat(100));
        let line = tty_step_line(
            false,
            50,
            "build",
            "linux/arm/v7",
            &step,
            StepStatus::Executed,
            Some(2700),
        );
        assert_eq!(line.chars().count(), 50, "{line}");
        assert!(
            line.starts_with("✓ [build linux/arm/v7] 2.7s RUN"),
            "{line}"
        );
        let colored = tty_step_line(
            true,
            50,
            "build",
            "linux/arm/v7",
            &step,
            StepStatus::Cached,
            None,
        );
        assert!(colored.contains("\x1b[36mCACHED\x1b[0m"), "{colored:?}");
        let visible: String = colored.replace("\x1b[36m", "").replace("\x1b[0m", "");
        assert_eq!(visible.chars().count(), 50, "{visible}");
        assert_eq!(
            step_line(
                ProgressMode::Plain,
                false,
                "b",
                "linux/amd64",
                "COPY a b",
                StepStatus::Cached,
                None
            ),
            "[b linux/amd64] CACHED COPY a b"
        );
    }

    #[test]
    fn control_characters_in_step_output_are_escaped() {
        assert_eq!(
            sanitize("\x1b[2J\x1b]0;pwned\x07red\x1b[31m"),
            "\\x1b[2J\\x1b]0;pwned\\x07red\\x1b[31m"
        );
        assert_eq!(
            sanitize("tab\tkept, ünïcödé ✓ kept"),
            "tab\tkept, ünïcödé ✓ kept"
        );
        assert_eq!(sanitize("\u{9b}2J \u{7f}"), "\\u{9b}2J \\x7f");
        assert_eq!(sanitize("10%\r50%\r100%"), "100%");
        assert_eq!(sanitize("crlf line\r"), "crlf line");
        assert_eq!(sanitize("bell\x07\u{0}"), "bell\\x07\\x00");
    }

    #[test]
    fn fit_cuts_with_an_ellipsis() {
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(fit("abc", 4), "abc");
    }
}
