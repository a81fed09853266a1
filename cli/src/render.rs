//! Rendering diagnostics and messages for people: miette's graphical reports, without color
//! when `NO_COLOR` is set or stderr is not a terminal.

use std::io::IsTerminal;

pub(crate) fn color_enabled() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
        && std::io::stderr().is_terminal()
}

pub(crate) fn install_hook() {
    let color = color_enabled();
    let _ = miette::set_hook(Box::new(move |_| {
        let width = terminal_width().unwrap_or(100).clamp(60, 160);
        Box::new(
            miette::MietteHandlerOpts::new()
                .color(color)
                .unicode(color)
                .terminal_links(false)
                .width(width)
                .build(),
        )
    }));
}

/// The terminal's width from `COLUMNS` or the tty.
pub(crate) fn terminal_width() -> Option<usize> {
    if let Some(columns) = std::env::var("COLUMNS")
        .ok()
        .and_then(|value| value.parse().ok())
    {
        return Some(columns);
    }
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we pass.
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_col > 0).then_some(size.ws_col as usize)
}

/// Print a diagnostic (error or warning) to stderr.
pub(crate) fn diagnostic(diagnostic: &dyn miette::Diagnostic) {
    print_report(diagnostic, true);
}

/// Print a build failure's diagnostic to stderr, its message on one line however long: it
/// quotes commands, paths and the output of tools, which stay searchable in a log.
pub(crate) fn failure(diagnostic: &dyn miette::Diagnostic) {
    print_report(diagnostic, false);
}

fn print_report(diagnostic: &dyn miette::Diagnostic, wrap_lines: bool) {
    let mut out = String::new();
    let handler = miette::GraphicalReportHandler::new_themed(if color_enabled() {
        miette::GraphicalTheme::unicode()
    } else {
        miette::GraphicalTheme::unicode_nocolor()
    })
    .with_width(terminal_width().unwrap_or(100).clamp(60, 160))
    .with_wrap_lines(wrap_lines);
    if handler.render_report(&mut out, diagnostic).is_ok() {
        eprint!("{out}");
    }
}

/// `error: message` with optional `hint:` lines, for problems that have no source location.
pub(crate) fn error(message: &str, hints: &[&str]) {
    eprintln!("error: {message}");
    for hint in hints {
        eprintln!("hint: {hint}");
    }
}

pub(crate) fn warning(message: &str) {
    eprintln!("warning: {message}");
}

/// `12.3 MiB`.
pub(crate) fn bytes(size: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = size as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{size} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `1.2s`, `350ms`, `2m05s`.
pub(crate) fn duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}
