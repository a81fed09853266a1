//! What the engine's integration tests need from the machine (root, an emulator, a tool), in
//! one place. A missing prerequisite skips the test with a note on a developer machine and
//! fails it under CI (`CI=true`), so a CI run never passes without checking.

use std::fmt::Display;

/// Whether CI asked for every test to really run.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// `true` when the prerequisite holds. Otherwise panics with `reason` under `CI=true`, and
/// elsewhere prints that the test is skipped and returns `false` (the caller returns).
pub(crate) fn prerequisite(holds: bool, reason: impl Display) -> bool {
    if holds {
        return true;
    }
    if in_ci() {
        panic!("a prerequisite is missing under CI=true: {reason}");
    }
    eprintln!("skipping: {reason}");
    false
}

/// [`prerequisite`] for running as root; `what` says what needs it.
pub(crate) fn require_root(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    prerequisite(root, format_args!("{what} needs root"))
}
