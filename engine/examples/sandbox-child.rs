//! A minimal binary that acts as the sandbox child, as the graphbuild CLI does, so the
//! engine's tests can run sandboxes without the CLI crate. Its copy handler writes one file:
//! `{"path": "relative/path", "content": "text"}` (tests use it to check `Task::Copy`).

use std::path::Path;

fn write_file(root: &Path, value: &serde_json::Value) -> Result<(), String> {
    let path = value["path"].as_str().ok_or("missing `path`")?;
    let content = value["content"].as_str().ok_or("missing `content`")?;
    let destination = root.join(path.trim_start_matches('/'));
    std::fs::write(&destination, content)
        .map_err(|error| format!("write {}: {error}", destination.display()))
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some(graphbuild_engine::sandbox::SANDBOX_ARG) {
        graphbuild_engine::sandbox::child_main_with(write_file);
    }
    eprintln!(
        "usage: sandbox-child {} (started by graphbuild_engine::sandbox::run_sandbox)",
        graphbuild_engine::sandbox::SANDBOX_ARG
    );
    std::process::exit(2);
}
