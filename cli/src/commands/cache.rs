//! `graphbuild cache du`, `prune`, `verify` and `serve`.

use std::path::PathBuf;

use graphbuild_engine::store::Store;

use crate::ExitStatus;
use crate::render;

use super::*;

pub(crate) fn cache_du(cache_dir: Option<PathBuf>) -> ExitStatus {
    // Measuring creates nothing: a missing store is reported, not made.
    let root = cache_dir.clone().unwrap_or_else(Store::default_root);
    let root = std::path::absolute(&root).unwrap_or(root);
    if !root.exists() {
        println!("{}", root.display());
        println!("  no store here yet (nothing cached)");
        println!("  total          {:>10}", render::bytes(0));
        return ExitStatus::Success;
    }
    let store = match open_store(cache_dir) {
        Ok(store) => store,
        Err(code) => return code,
    };
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
            ExitStatus::Success
        }
        Err(error) => {
            render::error(&format!("cannot measure the store: {error}"), &[]);
            ExitStatus::Environment
        }
    }
}

pub(crate) fn cache_verify(cache_dir: Option<PathBuf>, repair: bool) -> ExitStatus {
    let root = cache_dir.clone().unwrap_or_else(Store::default_root);
    let root = std::path::absolute(&root).unwrap_or(root);
    if !root.exists() {
        println!("{}: no store here yet, nothing to verify", root.display());
        return ExitStatus::Success;
    }
    let store = match open_store(cache_dir) {
        Ok(store) => store,
        Err(code) => return code,
    };
    let report = match store.verify(repair) {
        Ok(report) => report,
        Err(error) => {
            render::error(&format!("cannot verify the store: {error}"), &[]);
            return ExitStatus::Environment;
        }
    };
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
    if unrepaired == 0 {
        ExitStatus::Success
    } else {
        if !repair {
            eprintln!("run `graphbuild cache verify --repair` to remove them");
        }
        ExitStatus::BuildFailed
    }
}

pub(crate) fn cache_prune(cache_dir: Option<PathBuf>, keep_bytes: &str) -> ExitStatus {
    let Some(keep) = graphbuild_engine::unpack::parse_size(keep_bytes) else {
        render::error(
            &format!("`--keep-bytes {keep_bytes}` is not a size"),
            &["write a number of bytes, or with K, M, G: 10G"],
        );
        return ExitStatus::InvalidInput;
    };
    let store = match open_store(cache_dir) {
        Ok(store) => store,
        Err(code) => return code,
    };
    match store.prune(keep) {
        Ok(report) => {
            println!(
                "removed {} entries ({}); the store now holds {}",
                report.removed_entries,
                render::bytes(report.removed_bytes),
                render::bytes(report.remaining_bytes)
            );
            ExitStatus::Success
        }
        Err(error) => {
            render::error(&format!("cannot prune the store: {error}"), &[]);
            ExitStatus::Environment
        }
    }
}

pub(crate) fn cache_serve(
    listen: &str,
    dir: PathBuf,
    max_size: Option<&str>,
    tokens: Option<PathBuf>,
    allow_anonymous_read: bool,
) -> ExitStatus {
    let Ok(listen) = listen.parse() else {
        render::error(
            &format!("`--listen {listen}` is not an address"),
            &["write HOST:PORT, for example 127.0.0.1:7070"],
        );
        return ExitStatus::InvalidInput;
    };
    let max_size = match max_size.map(graphbuild_engine::unpack::parse_size) {
        Some(None) => {
            render::error(
                "`--max-size` is not a size",
                &["write a number of bytes, or with K, M, G: 50G"],
            );
            return ExitStatus::InvalidInput;
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
    let runtime = match tokio_runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            render::error(&format!("cannot start the server runtime: {error}"), &[]);
            return ExitStatus::Environment;
        }
    };
    let result = runtime.block_on(async {
        let server = graphbuild_cache_server::bind(config).await?;
        // The address goes to stdout first thing, so scripts can start the server on port 0.
        println!("listening on http://{}", server.local_addr());
        use std::io::Write;
        let _ = std::io::stdout().flush();
        server.run(shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitStatus::Success,
        Err(error) => {
            let help = miette::Diagnostic::help(&error).map(|help| help.to_string());
            render::error(
                &format!("the cache server stopped: {error}"),
                &help.as_deref().into_iter().collect::<Vec<_>>(),
            );
            ExitStatus::Environment
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
