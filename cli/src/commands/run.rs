//! `graphbuild run` and `graphbuild verify`: build settings from flags, the preflight checks,
//! executing the plan and reporting failures.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use graphbuild_engine::build::{self, BuildOptions, SecretValue};
use graphbuild_engine::explain;
use graphbuild_engine::layer::{Compression, LayerOptions};
use graphbuild_engine::plan::Op;
use graphbuild_engine::resolve::DefaultResolver;
use graphbuild_engine::sandbox::overlay::OverlayMode;
use graphbuild_engine::scheduler::CancelToken;
use graphbuild_engine::store::Store;
use graphbuild_lang::ir::Sources;
use graphbuild_lang::platform::Platform;

use crate::progress::Progress;
use crate::render;
use crate::{BuildInputArgs, CompressionArg, ProgressMode, RunArgs, SelectArgs};
use crate::{CliError, ExitStatus};

use super::*;

pub(super) fn parse_secrets(specs: &[String]) -> Result<HashMap<String, SecretValue>, String> {
    let mut secrets = HashMap::new();
    for spec in specs {
        let mut id = None;
        let mut value = None;
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("src" | "source", v)) => value = Some(SecretValue::File(PathBuf::from(v))),
                Some(("env", v)) => {
                    let content = std::env::var(v).map_err(|_| {
                        format!("--secret: the environment variable `{v}` is not set")
                    })?;
                    value = Some(SecretValue::Bytes(content.into_bytes()));
                }
                _ => {
                    return Err(format!(
                        "--secret: cannot read `{part}`; write id=ID,src=PATH or id=ID,env=VAR"
                    ));
                }
            }
        }
        match (id, value) {
            (Some(id), Some(value)) => {
                secrets.insert(id, value);
            }
            _ => return Err("--secret needs id=ID and src=PATH or env=VAR".into()),
        }
    }
    Ok(secrets)
}

/// The check made once the cache is consulted and before anything executes: the nodes that
/// will run need root (namespaces, overlayfs) and, for foreign platforms with `run` steps, a
/// qemu-user handler. A fully cached build needs neither. The message is printed as is.
/// Re-run this command in a user namespace where the invoking (non-root) user is root; the
/// exit code is the namespaced run's own.
pub(crate) fn rootless_reexec() -> Result<ExitStatus, CliError> {
    let plan = graphbuild_engine::rootless::Plan::for_current_user();
    if !plan.maps_subordinate_ids() {
        let missing = if plan.subuid.is_none() || plan.subgid.is_none() {
            format!(
                "/etc/subuid and /etc/subgid have no range for user `{}`",
                plan.user
            )
        } else {
            "newuidmap/newgidmap are missing (package uidmap)".to_string()
        };
        eprintln!(
            "note: rootless build with only your uid mapped ({missing}): images whose files \
             all belong to root build; others fail naming the file"
        );
    }
    graphbuild_engine::rootless::reexec(&plan)
        .map(ExitStatus::External)
        .map_err(|message| {
            CliError::environment(format!("cannot start a rootless build: {message}"))
        })
}

/// With a remote executor (`remote`), a platform with no emulator here is no error up front:
/// its steps go to workers, and one that must run here fails then, naming the emulator.
pub(super) fn preflight(
    nodes: &[&graphbuild_engine::plan::Node],
    test_platforms: &[Platform],
    remote: bool,
) -> Result<(), String> {
    let host = Platform::host();
    let executes = !nodes.is_empty() || !test_platforms.is_empty();
    if executes && !nix::unistd::geteuid().is_root() {
        return Err("error: graphbuild runs build steps in Linux namespaces on overlayfs, which needs root, \
             or root of a user namespace\n\
             hint: run it as root, or as an ordinary user outside any user namespace (graphbuild \
             then makes its own: see the Rootless section of docs/security.md)"
            .to_string());
    }
    let mut missing: Vec<(Platform, String)> = Vec::new();
    for node in nodes {
        let runs = node.steps.iter().any(|step| matches!(step.op, Op::Run(_)));
        if runs
            && !remote
            && !missing
                .iter()
                .any(|(platform, _)| *platform == node.platform)
            && let Err(error) = graphbuild_engine::binfmt::check_emulation(
                &crate::doctor::binfmt_dir(),
                &node.platform,
                &host,
            )
        {
            missing.push((node.platform.clone(), error.to_string()));
        }
    }
    // An image test runs in the image of its platform.
    for platform in test_platforms {
        if !missing.iter().any(|(known, _)| known == platform)
            && let Err(error) = graphbuild_engine::binfmt::check_emulation(
                &crate::doctor::binfmt_dir(),
                platform,
                &host,
            )
        {
            missing.push((platform.clone(), error.to_string()));
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let mut message = String::new();
    for (platform, error) in &missing {
        message.push_str(&format!(
            "error: cannot run steps for {platform}: {error}\n"
        ));
    }
    message.push_str(&format!(
        "hint: install the emulators with `apt-get install qemu-user-static binfmt-support` and `update-binfmts --enable` (or `graphbuild doctor --fix`), or build only native platforms with --platform {host}"
    ));
    Err(message)
}

/// Cancel the build on SIGINT/SIGTERM: running steps finish or are stopped, nothing is left.
pub(super) fn cancel_on_signals() -> CancelToken {
    let cancel = CancelToken::new();
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(signal, flag.clone());
    }
    let token = cancel.clone();
    std::thread::spawn(move || {
        loop {
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                token.cancel();
                graphbuild_engine::sandbox::terminate_all();
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
    cancel
}

pub(super) struct BuildSettings {
    format: build::ManifestFormat,
    remote: build::RemoteOptions,
    output: PathBuf,
    no_cache: bool,
    jobs: Option<usize>,
    compression: Compression,
    secrets: HashMap<String, SecretValue>,
    /// `--ssh`: alive (agents started for key files running) until the build ends.
    ssh: graphbuild_engine::ssh::Agents,
    source_date_epoch: i64,
    step_timeout_ms: Option<u64>,
    step_max_processes: Option<u32>,
    attest: graphbuild_engine::attest::AttestOptions,
    skip_tests: bool,
    overlay: OverlayMode,
}

/// Build a loaded plan into `settings.output`; returns the report or an exit code.
pub(super) fn execute(
    loaded: &Loaded,
    store: &Store,
    resolver: &DefaultResolver,
    settings: BuildSettings,
    cancel: &CancelToken,
    progress: &Progress,
) -> build::BuildReport {
    let ssh_agents = settings.ssh;
    let remote = settings.remote.executor.is_some();
    let options = BuildOptions {
        jobs: settings
            .jobs
            .unwrap_or_else(graphbuild_engine::scheduler::default_jobs),
        output_dir: settings.output,
        no_cache: settings.no_cache,
        layer: LayerOptions {
            source_date_epoch: settings.source_date_epoch,
            compression: settings.compression,
        },
        sandbox_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
        secrets: settings.secrets,
        ssh: ssh_agents.sockets(),
        cancel: cancel.clone(),
        remote: settings.remote,
        format: settings.format,
        preflight: Some(Box::new(move |nodes, tests| {
            preflight(nodes, tests, remote)
        })),
        step_timeout_ms: settings.step_timeout_ms,
        step_max_processes: settings.step_max_processes,
        attest: graphbuild_engine::attest::AttestOptions {
            request: graphbuild_engine::attest::BuildRequest {
                frontend: if loaded.project.docker_rules {
                    "dockerfile".into()
                } else {
                    "graphbuild".into()
                },
                ..settings.attest.request
            },
            ..settings.attest
        },
        skip_tests: settings.skip_tests,
        overlay: settings.overlay,
    };
    let report = build::build(
        &loaded.plan,
        &loaded.project.sources,
        store,
        resolver,
        &options,
        progress,
    );
    progress.finish();
    drop(ssh_agents);
    if report.failures.is_empty() && !report.cancelled && report.environment_error.is_none() {
        explain::record(store, &loaded.plan);
    }
    report
}

/// Base layers that could not be downloaded for lack of network (or because of `--offline`):
/// an environment problem, exit code 3.
pub(super) fn refuse_unavailable_layers(
    resolver: &DefaultResolver,
    select: &SelectArgs,
) -> Result<(), CliError> {
    let unavailable = resolver.unavailable();
    if unavailable.is_empty() {
        return Ok(());
    }
    let mut lines = String::new();
    for message in &unavailable {
        lines.push_str(&format!("error: cannot get the layers of {message}\n"));
    }
    let file = select.file.display();
    if resolver.is_offline() {
        lines.push_str(&format!(
            "hint: run `graphbuild run {file}` once with network access to download them into the local store, or drop --offline"
        ));
    } else {
        lines.push_str(&format!(
            "hint: check the network and that the registry is running; once the layers are in the local store, `graphbuild run {file} --offline` needs no network"
        ));
    }
    Err(CliError::lines(ExitStatus::Environment, lines))
}

/// Every failure as a diagnostic pointing at its step in the build file, followed by the
/// step's last output lines; then how many nodes failed, as the error.
pub(super) fn report_failures(
    report: &build::BuildReport,
    sources: &Sources,
) -> Result<(), CliError> {
    if let Some(message) = &report.environment_error {
        return Err(CliError::lines(ExitStatus::Environment, message.clone()));
    }
    if report.cancelled {
        // Steps stopped by the cancel are not failures worth listing.
        return Err(CliError::new(
            ExitStatus::Interrupted,
            "the build was cancelled",
        ));
    }
    if !report.failures.is_empty() {
        for failure in &report.failures {
            render::failure(&failure.diagnostic(sources));
            if !failure.tail.is_empty() {
                // The step's own output: made safe like progress lines.
                eprintln!(
                    "  last output of `{}` for {}:",
                    failure.stage, failure.platform
                );
                for line in &failure.tail {
                    eprintln!("  │ {}", crate::progress::sanitize(line));
                }
                eprintln!();
            }
        }
        return Err(CliError::new(
            ExitStatus::BuildFailed,
            format!(
                "{} of the build failed",
                if report.failures.len() == 1 {
                    "1 node".to_string()
                } else {
                    format!("{} nodes", report.failures.len())
                }
            ),
        ));
    }
    Ok(())
}

/// The team caches of `args`; Ctrl-C/SIGTERM (`cancel`) also stops transfers waiting on them.
pub(super) fn remote_options(
    args: &crate::RemoteCacheArgs,
    cancel: &CancelToken,
) -> Result<build::RemoteOptions, CliError> {
    let open = |url: &str| {
        build::open_cache(url, args.cache_token.clone(), Some(cancel.flag().clone())).map_err(
            |error| {
                let help = miette::Diagnostic::help(&error).map(|help| help.to_string());
                CliError::invalid_input(error.to_string()).hint(help.unwrap_or_else(|| {
                    "write the cache URL as http://HOST:PORT[/INSTANCE] or grpc://HOST:PORT[/INSTANCE]"
                        .to_string()
                }))
            },
        )
    };
    let from_url = args.cache_from.as_deref().or(args.cache.as_deref());
    let to_url = args.cache_to.as_deref().or(args.cache.as_deref());
    let from = from_url.map(open).transpose()?;
    // One client (one connection pool) when both directions name the same cache.
    let to = match (&from, to_url) {
        (Some(from), Some(url)) if from_url == Some(url) => Some(from.clone()),
        (_, url) => url.map(open).transpose()?,
    };
    let executor = crate::worker::remote_executor(args, cancel)?;
    Ok(build::RemoteOptions {
        from,
        to,
        required: args.cache_required,
        executor,
        binfmt_dir: Some(crate::doctor::binfmt_dir()),
    })
}

/// The settings for one build from the shared build inputs; an exit code for a bad `--secret`.
pub(super) fn build_settings(
    loaded: &Loaded,
    inputs: &BuildInputArgs,
    output: PathBuf,
    no_cache: bool,
    remote: build::RemoteOptions,
) -> Result<BuildSettings, CliError> {
    let secrets = parse_secrets(&inputs.secrets).map_err(CliError::invalid_input)?;
    let ssh = super::ssh::agents(&inputs.ssh, loaded)?;
    let overlay =
        OverlayMode::from_env().map_err(|error| CliError::invalid_input(error.to_string()))?;
    let attest = attest_options(inputs, &secrets)
        .map_err(|error| CliError::invalid_input(error.to_string()))?;
    Ok(BuildSettings {
        attest,
        format: match inputs.format {
            crate::FormatArg::Oci => build::ManifestFormat::Oci,
            crate::FormatArg::Docker => build::ManifestFormat::Docker,
        },
        remote,
        output,
        no_cache,
        jobs: inputs.jobs,
        compression: match inputs.compression {
            CompressionArg::Gzip => Compression::Gzip,
            CompressionArg::Zstd => Compression::Zstd,
        },
        secrets,
        ssh,
        source_date_epoch: inputs.source_date_epoch,
        step_timeout_ms: inputs.step_timeout,
        step_max_processes: (inputs.step_max_processes > 0).then_some(inputs.step_max_processes),
        skip_tests: false,
        overlay,
    })
}

/// `--provenance` and `--sbom`, and the request the provenance records: the `--arg` values
/// as given and the secrets' ids (never their values).
fn attest_options(
    inputs: &BuildInputArgs,
    secrets: &HashMap<String, SecretValue>,
) -> Result<graphbuild_engine::attest::AttestOptions, graphbuild_engine::attest::AttestFlagError> {
    use graphbuild_engine::attest;
    let provenance = match &inputs.provenance {
        Some(value) => attest::parse_provenance(value)?,
        None => Some(attest::ProvenanceMode::Min),
    };
    let sbom = match &inputs.sbom {
        Some(value) => attest::parse_sbom(value)?,
        None => false,
    };
    let args = inputs
        .select
        .args
        .iter()
        .filter_map(|arg| arg.split_once('='))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    let mut secret_ids: Vec<String> = secrets.keys().cloned().collect();
    secret_ids.sort();
    Ok(attest::AttestOptions {
        provenance,
        sbom,
        request: attest::BuildRequest {
            frontend: String::new(),
            args,
            secrets: secret_ids,
        },
    })
}

pub(crate) fn run(args: RunArgs) -> Result<ExitStatus, CliError> {
    let select = &args.inputs.select;
    let store = open_store(select.cache_dir.clone())?;
    let resolver = resolver(select, false, manifest_store(select, true))?;
    let loaded = load(select, Some(&store), &resolver)?;
    build_loaded(&args, &store, &resolver, &loaded)
}

/// Build a loaded plan as `run` does: exports, `--load`, pushes and metadata included. Shared
/// with `graphbuild build`, whose plan comes from a Dockerfile.
pub(super) fn build_loaded(
    args: &RunArgs,
    store: &Store,
    resolver: &DefaultResolver,
    loaded: &Loaded,
) -> Result<ExitStatus, CliError> {
    let select = &args.inputs.select;
    refuse_unresolved(&loaded.plan, select)?;
    let cancel = cancel_on_signals();
    let mode = args.progress.unwrap_or_else(|| {
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressMode::Tty
        } else {
            ProgressMode::Plain
        }
    });
    let mut remote = remote_options(&args.cache, &cancel)?;
    if select.offline && (remote.from.is_some() || remote.to.is_some()) {
        render::warning("--offline: the team cache is not used");
        remote = build::RemoteOptions::default();
    }
    let outputs = outputs::parse_outputs(&args.output)?;
    let load_platform = if args.load {
        Some(outputs::load_platform(&select.platforms)?)
    } else {
        None
    };
    let exports =
        outputs::exports_per_image(&loaded.plan, &loaded.project.root_dir, &outputs.exports)?;
    // Without a layouts directory, the layouts are written to a scratch directory the
    // exporters read from.
    let scratch = match &outputs.layouts {
        Some(_) => None,
        None => match tempfile::Builder::new()
            .prefix("graphbuild-layouts-")
            .tempdir()
        {
            Ok(dir) => Some(dir),
            Err(error) => {
                return Err(CliError::environment(format!(
                    "cannot create a temporary directory: {error}"
                )));
            }
        },
    };
    let layouts_dir = match (&outputs.layouts, &scratch) {
        (Some(dir), _) => dir.clone(),
        (None, Some(scratch)) => scratch.path().to_path_buf(),
        (None, None) => PathBuf::from("graphbuild-out"),
    };
    let mut settings = build_settings(loaded, &args.inputs, layouts_dir, args.no_cache, remote)?;
    settings.skip_tests = args.skip_tests;
    let progress = Progress::new(mode, args.quiet);
    let report = execute(loaded, store, resolver, settings, &cancel, &progress);
    refuse_unavailable_layers(resolver, select)?;
    report_failures(&report, &loaded.project.sources)?;
    if select.pull {
        write_lock(select, resolver)?;
    }
    outputs::check_architectures(&loaded.plan, &report.images, args.strict, store)?;
    outputs::export(&loaded.plan, &report.images, &exports, args.quiet)?;
    if let Some(platform) = &load_platform {
        outputs::load(&loaded.plan, &report.images, platform, args.quiet)?;
    }
    // Push the images that ask for it, or all with --push.
    for (plan, summary) in loaded.plan.images.iter().zip(&report.images) {
        if !(args.push || plan.push) {
            continue;
        }
        if select.offline {
            render::warning(&format!("--offline: `{}` is not pushed", plan.name));
            continue;
        }
        if plan.tags.is_empty() {
            return Err(CliError::invalid_input(format!(
                "cannot push `{}`: it has no tags",
                plan.name
            ))
            .hint("give the image `tags \"registry.example.com/NAME:TAG\"`"));
        }
        match graphbuild_engine::push::push_layout(
            resolver.registry(),
            std::path::Path::new(&summary.output),
            &plan.tags,
        ) {
            Ok(pushed) => {
                for tag in &pushed.tags {
                    eprintln!("pushed {tag} ({})", summary.index_digest);
                }
            }
            Err(error) => {
                // The registry's help (credentials, TLS) as the hint.
                let help = miette::Diagnostic::help(&error).map(|help| help.to_string());
                return Err(help.into_iter().fold(
                    CliError::environment(format!("pushing `{}` failed: {error}", plan.name)),
                    CliError::hint,
                ));
            }
        }
    }
    if let Some(file) = &args.metadata_file {
        outputs::write_metadata(file, &loaded.plan, &report.images)?;
    }
    Ok(ExitStatus::Success)
}

/// `graphbuild verify`: two clean builds, compared.
pub(crate) fn verify(inputs: BuildInputArgs) -> Result<ExitStatus, CliError> {
    let select = &inputs.select;
    let scratch = tempfile::Builder::new()
        .prefix("graphbuild-verify-")
        .tempdir()
        .map_err(|error| {
            CliError::environment(format!("cannot create a temporary directory: {error}"))
        })?;
    let cancel = cancel_on_signals();
    let mut outputs = Vec::new();
    for round in ["first", "second"] {
        let store = open_store(Some(scratch.path().join(format!("store-{round}"))))?;
        let resolver = resolver(select, false, manifest_store(select, false))?;
        let loaded = load(select, Some(&store), &resolver)?;
        refuse_unresolved(&loaded.plan, select)?;
        eprintln!("verify: {round} build from scratch…");
        let output = scratch.path().join(format!("out-{round}"));
        let mut settings = build_settings(
            &loaded,
            &inputs,
            output,
            true,
            build::RemoteOptions::default(),
        )?;
        // `verify` compares what two builds write; the images' tests do not change it.
        settings.skip_tests = true;
        let progress = Progress::silent();
        let report = execute(&loaded, &store, &resolver, settings, &cancel, &progress);
        refuse_unavailable_layers(&resolver, select)?;
        report_failures(&report, &loaded.project.sources)?;
        outputs.push(report.images);
        // Different wall-clock times for the two builds.
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let mut reproducible = true;
    for (first, second) in outputs[0].iter().zip(&outputs[1]) {
        if first.index_digest == second.index_digest {
            println!("✓ {}: reproducible ({})", first.name, first.index_digest);
            continue;
        }
        reproducible = false;
        println!(
            "✗ {}: the two builds differ ({} vs {})",
            first.name, first.index_digest, second.index_digest
        );
        match graphbuild_engine::verify::compare_layouts(
            std::path::Path::new(&first.output),
            std::path::Path::new(&second.output),
        ) {
            Ok(differences) => {
                for difference in differences {
                    println!("  {} · {}", difference.platform, difference.part);
                    for entry in difference.entries.iter().take(50) {
                        println!("    {entry}");
                    }
                }
            }
            Err(error) => println!("  cannot compare the layouts: {error}"),
        }
    }
    // A difference is the command's answer, printed above: no error to add.
    Ok(if reproducible {
        ExitStatus::Success
    } else {
        ExitStatus::BuildFailed
    })
}
