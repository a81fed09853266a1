//! `graphbuild cache du`, `prune`, `verify` and `serve`.

use std::path::PathBuf;

use graphbuild_engine::store::Store;

use crate::render;
use crate::{CliError, ExitStatus};

use super::*;

pub(crate) fn cache_du(cache_dir: Option<PathBuf>) -> Result<ExitStatus, CliError> {
    // Measuring creates nothing: a missing store is reported, not made.
    let root = cache_dir.clone().unwrap_or_else(Store::default_root);
    let root = std::path::absolute(&root).unwrap_or(root);
    if !root.exists() {
        println!("{}", root.display());
        println!("  no store here yet (nothing cached)");
        println!("  total          {:>10}", render::bytes(0));
        return Ok(ExitStatus::Success);
    }
    let store = open_store(cache_dir)?;
    match store.usage() {
        Ok(usage) => {
            println!("{}", store.root().display());
            println!(
                "  blobs          {:>10}  ({} entries)",
                render::bytes(usage.blobs.bytes),
                usage.blobs.count
            );
            println!(
                "  actions        {:>10}  ({} entries)",
                render::bytes(usage.actions.bytes),
                usage.actions.count
            );
            println!(
                "  snapshots      {:>10}  ({} entries)",
                render::bytes(usage.snapshots.bytes),
                usage.snapshots.count
            );
            println!(
                "  cache mounts   {:>10}  ({} entries)",
                render::bytes(usage.cache_mounts.bytes),
                usage.cache_mounts.count
            );
            println!("  total          {:>10}", render::bytes(usage.total));
            Ok(ExitStatus::Success)
        }
        Err(error) => Err(CliError::environment(format!(
            "cannot measure the store: {error}"
        ))),
    }
}

pub(crate) fn cache_verify(
    cache_dir: Option<PathBuf>,
    repair: bool,
) -> Result<ExitStatus, CliError> {
    let root = cache_dir.clone().unwrap_or_else(Store::default_root);
    let root = std::path::absolute(&root).unwrap_or(root);
    if !root.exists() {
        println!("{}: no store here yet, nothing to verify", root.display());
        return Ok(ExitStatus::Success);
    }
    let store = open_store(cache_dir)?;
    let report = store
        .verify(repair)
        .map_err(|error| CliError::environment(format!("cannot verify the store: {error}")))?;
    for problem in &report.problems {
        println!(
            "{}: {}{}",
            problem.path.display(),
            problem.what,
            if problem.removed { " (removed)" } else { "" }
        );
    }
    let unrepaired = report
        .problems
        .iter()
        .filter(|problem| !problem.removed)
        .count();
    println!(
        "checked {} blobs, {} snapshots, {} action records: {} problems{}",
        report.blobs,
        report.snapshots,
        report.actions,
        report.problems.len(),
        if repair {
            format!(", {} removed", report.problems.len() - unrepaired)
        } else {
            String::new()
        }
    );
    // Problems found are the command's answer, printed above: no error to add.
    if unrepaired == 0 {
        Ok(ExitStatus::Success)
    } else {
        if !repair {
            eprintln!("run `graphbuild cache verify --repair` to remove them");
        }
        Ok(ExitStatus::BuildFailed)
    }
}

pub(crate) fn cache_prune(
    cache_dir: Option<PathBuf>,
    keep_bytes: &str,
) -> Result<ExitStatus, CliError> {
    let Some(keep) = graphbuild_engine::unpack::parse_size(keep_bytes) else {
        return Err(
            CliError::invalid_input(format!("`--keep-bytes {keep_bytes}` is not a size"))
                .hint("write a number of bytes, or with K, M, G: 10G"),
        );
    };
    let store = open_store(cache_dir)?;
    match store.prune(keep) {
        Ok(report) => {
            println!(
                "removed {} entries ({}); the store now holds {}",
                report.removed_entries,
                render::bytes(report.removed_bytes),
                render::bytes(report.remaining_bytes)
            );
            Ok(ExitStatus::Success)
        }
        Err(error) => Err(CliError::environment(format!(
            "cannot prune the store: {error}"
        ))),
    }
}

pub(crate) fn cache_serve(
    listen: &str,
    dir: PathBuf,
    max_size: Option<&str>,
    tokens: Option<PathBuf>,
    allow_anonymous_read: bool,
) -> Result<ExitStatus, CliError> {
    let Ok(listen) = listen.parse() else {
        return Err(
            CliError::invalid_input(format!("`--listen {listen}` is not an address"))
                .hint("write HOST:PORT, for example 127.0.0.1:7070"),
        );
    };
    let max_size = match max_size.map(graphbuild_engine::unpack::parse_size) {
        Some(None) => {
            return Err(CliError::invalid_input("`--max-size` is not a size")
                .hint("write a number of bytes, or with K, M, G: 50G"));
        }
        Some(Some(size)) => Some(size),
        None => None,
    };
    let config = graphbuild_cache_server::ServerConfig {
        listen,
        dir,
        max_size,
        tokens_file: tokens,
        allow_anonymous_read,
        timeouts: graphbuild_cache_server::Timeouts::default(),
    };
    let runtime = tokio_runtime().map_err(|error| {
        CliError::environment(format!("cannot start the server runtime: {error}"))
    })?;
    let result = runtime.block_on(async {
        let server = graphbuild_cache_server::bind(config).await?;
        // The address goes to stdout first thing, so scripts can start the server on port 0.
        println!("listening on http://{}", server.local_addr());
        use std::io::Write;
        let _ = std::io::stdout().flush();
        server.run(shutdown_signal()).await
    });
    match result {
        Ok(()) => Ok(ExitStatus::Success),
        Err(error) => {
            let help = miette::Diagnostic::help(&error).map(|help| help.to_string());
            Err(help.into_iter().fold(
                CliError::environment(format!("the cache server stopped: {error}")),
                CliError::hint,
            ))
        }
    }
}

pub(super) fn tokio_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
