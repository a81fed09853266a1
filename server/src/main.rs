//! `graphbuild-cache-server`: the cache server on its own, for hosts without the full
//! `graphbuild` binary (the same server runs as `graphbuild cache serve`).

use std::path::PathBuf;
use std::process::ExitCode;

use graphbuild_cache_server::{ServerConfig, bind};

const USAGE: &str = "usage: graphbuild-cache-server --dir DIR [--listen ADDR] [--max-size BYTES] [--tokens FILE] [--allow-anonymous-read]";

fn parse_args() -> Result<ServerConfig, String> {
    let mut config = ServerConfig::new(PathBuf::new());
    let mut dir = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--dir" => dir = Some(PathBuf::from(value("--dir")?)),
            "--listen" => {
                let text = value("--listen")?;
                config.listen = text.parse().map_err(|_| {
                    format!("--listen: `{text}` is not an address like 127.0.0.1:7070")
                })?;
            }
            "--max-size" => {
                let text = value("--max-size")?;
                config.max_size = Some(
                    text.parse()
                        .map_err(|_| format!("--max-size: `{text}` is not a number of bytes"))?,
                );
            }
            "--tokens" => config.tokens_file = Some(PathBuf::from(value("--tokens")?)),
            "--allow-anonymous-read" => config.allow_anonymous_read = true,
            "--help" | "-h" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    config.dir = dir.ok_or_else(|| format!("--dir is required\n{USAGE}"))?;
    Ok(config)
}

/// Ctrl-C (SIGINT) or SIGTERM: stop accepting, finish in-flight requests, exit.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

fn main() -> ExitCode {
    let config = match parse_args() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let server = bind(config).await?;
        // Tests and scripts read this line to learn the port when listening on port 0.
        println!("listening on http://{}", server.local_addr());
        server.run(shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            if let Some(help) = miette::Diagnostic::help(&error) {
                eprintln!("hint: {help}");
            }
            ExitCode::FAILURE
        }
    }
}
