//! `graphbuild worker` (a Remote Workers API bot) and `graphbuild worker-step` (what any REAPI
//! worker runs for a graphbuild step); the engine's `execution` module does the work.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::Args;
use graphbuild_engine::execution::{self, PlatformKeys, worker};
use graphbuild_engine::sandbox::overlay::{self, OverlayMode};
use graphbuild_engine::store::Store;
use graphbuild_lang::platform::Platform;

use crate::{CliError, ExitStatus};

#[derive(Args)]
pub(crate) struct WorkerArgs {
    /// The cluster's Bots service: grpc://HOST:PORT[/INSTANCE] or grpcs://HOST[:PORT][/INSTANCE]
    #[arg(long, value_name = "URL")]
    executor: String,
    /// The platform this worker executes steps of (natively, or through binfmt_misc's qemu)
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: String,
    /// The worker's name in the cluster (default: HOSTNAME-OS-ARCH-PID)
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Bearer token for the cluster
    #[arg(
        long,
        value_name = "TOKEN",
        env = "GRAPHBUILD_REMOTE_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// The platform property names the cluster matches workers on
    #[arg(long, value_name = "OS_KEY,ARCH_KEY", default_value = "OSFamily,ISA")]
    platform_keys: String,
    /// The worker's store: layers it unpacked, kept between steps
    #[arg(long, value_name = "DIR", env = "GRAPHBUILD_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Kill and fail a step after this long (e.g. 30m): the timeout of a step that sets none,
    /// and the most a step's own `timeout` gets here
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_time_limit)]
    step_timeout: std::time::Duration,
}

/// `--step-timeout`: a Go-style duration of at least a second.
fn parse_time_limit(text: &str) -> Result<std::time::Duration, String> {
    match graphbuild_engine::plan::parse_duration(text) {
        Some(ns) if ns >= 1_000_000_000 => Ok(std::time::Duration::from_nanos(ns)),
        Some(_) => Err("give at least 1s".into()),
        None => Err(format!(
            "`{text}` is not a duration; write e.g. 90s, 30m or 2h"
        )),
    }
}

/// The store and the overlay a worker's sandboxes use.
fn sandbox_setup(
    cache_dir: Option<PathBuf>,
) -> Result<(Store, PathBuf, overlay::Overlay), CliError> {
    let root = cache_dir.unwrap_or_else(Store::default_root);
    // Absolute: sandboxes run elsewhere and get store paths as overlay layers.
    let root = std::path::absolute(&root).unwrap_or(root);
    let store = Store::open(&root).map_err(|error| {
        CliError::environment(format!(
            "cannot open the store at {}: {error}",
            root.display()
        ))
        .hint("choose another directory with --cache-dir DIR")
    })?;
    let exe = std::env::current_exe().map_err(|error| {
        CliError::environment(format!("cannot find the graphbuild binary: {error}"))
    })?;
    let mode = std::env::var("GRAPHBUILD_OVERLAY")
        .ok()
        .map(|value| OverlayMode::parse(&value))
        .transpose()
        .map_err(|error| {
            CliError::invalid_input(error.to_string())
                .hint("GRAPHBUILD_OVERLAY is auto, native or fuse")
        })?
        .unwrap_or_default();
    let scratch = store
        .temp_dir()
        .map_err(|error| CliError::environment(format!("cannot use the store: {error}")))?;
    let selection = overlay::select(mode, &exe, scratch.path(), false)
        .map_err(|unavailable| CliError::environment(unavailable.to_string()))?;
    Ok((store, exe, selection.overlay))
}

pub(crate) fn worker(args: WorkerArgs) -> Result<ExitStatus, CliError> {
    let platform = Platform::parse(&args.platform).map_err(|error| {
        CliError::invalid_input(format!("--platform {}: {error}", args.platform))
            .hint("write it as OS/ARCH[/VARIANT], e.g. linux/arm64")
    })?;
    let keys = PlatformKeys::parse(&args.platform_keys)
        .map_err(|error| CliError::invalid_input(error.to_string()))?;
    // A malformed URL is refused before the sandbox is probed.
    if let Err(error) = graphbuild_engine::reapi::ReapiCache::new(&args.executor, None) {
        return Err(CliError::invalid_input(format!("--executor: {error}")));
    }
    let (store, exe, overlay) = sandbox_setup(args.cache_dir)?;
    let bot_id = args.name.unwrap_or_else(|| {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .unwrap_or_else(|| "worker".into());
        format!(
            "{host}-{}-{}",
            platform.to_string().replace('/', "-"),
            std::process::id()
        )
    });
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(signal, stop.clone());
    }
    let options = worker::WorkerOptions {
        url: args.executor,
        token: args.token,
        platform,
        keys,
        bot_id,
        exe,
        overlay,
        step_time_limit: args.step_timeout,
    };
    let log = |line: &str| eprintln!("{line}");
    match worker::serve(&options, &store, &stop, &log) {
        Ok(()) => Ok(ExitStatus::Success),
        Err(error) => {
            let exit = match error {
                graphbuild_engine::remote::RemoteError::InvalidUrl { .. } => {
                    ExitStatus::InvalidInput
                }
                _ => ExitStatus::Environment,
            };
            Err(CliError::new(exit, format!("--executor: {error}")).hint(
                "check the --executor URL, and that the cluster serves the Bots service there",
            ))
        }
    }
}

/// `graphbuild worker-step step.json` in an action's input root (the working directory):
/// exits with the step's exit code; 3 when the step could not run.
pub(crate) fn worker_step(
    step_file: PathBuf,
    cache_dir: Option<PathBuf>,
) -> Result<ExitStatus, CliError> {
    if step_file.as_os_str() != execution::STEP_FILE {
        return Err(CliError::invalid_input(format!(
            "worker-step reads {} in the input root",
            execution::STEP_FILE
        )));
    }
    let (store, exe, overlay) = sandbox_setup(cache_dir)?;
    let root = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let mut print = |line: &str| println!("{line}");
    match execution::step::run_in_input_root(&root, &store, &exe, &overlay, &mut print) {
        Ok(0) => Ok(ExitStatus::Success),
        Ok(code) => Ok(ExitStatus::external(code)),
        Err(error) => Err(CliError::environment(error.to_string())),
    }
}

/// `--remote-executor` and its flags: the executor a build sends its steps to, if any.
pub(crate) fn remote_executor(
    args: &crate::RemoteCacheArgs,
    cancel: &graphbuild_engine::scheduler::CancelToken,
) -> Result<Option<Arc<execution::RemoteExecutor>>, CliError> {
    let Some(url) = args
        .remote_executor
        .as_deref()
        .filter(|url| !url.is_empty())
    else {
        return Ok(None);
    };
    let keys = PlatformKeys::parse(&args.remote_platform_keys)
        .map_err(|message| CliError::invalid_input(format!("--remote-platform-keys: {message}")))?;
    let queue_timeout = execution::queue_timeout_from_env().map_err(|error| {
        CliError::invalid_input(error.to_string()).hint("give it in seconds, e.g. 30")
    })?;
    execution::RemoteExecutor::new(
        url,
        args.remote_token.clone(),
        keys,
        args.remote_required,
        queue_timeout,
        Some(cancel.flag().clone()),
    )
    .map(|executor| Some(Arc::new(executor)))
    .map_err(|error| {
        CliError::invalid_input(format!("--remote-executor: {error}")).hint(
            "write the executor URL as grpc://HOST:PORT[/INSTANCE] or grpcs://HOST[:PORT][/INSTANCE]",
        )
    })
}
