//! The `graphbuild` command: parse arguments, call the engine, render progress and diagnostics.
//!
//! Exit codes: 0 success, 1 build failure, 2 invalid input or usage, 3 environment problem.

mod commands;
mod doctor;
mod error;
mod inspect;
mod progress;
mod render;
mod worker;

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub(crate) use error::{CliError, ExitStatus};

#[derive(Parser)]
#[command(
    name = "graphbuild",
    version,
    about = "Build multi-platform OCI images from a declarative KDL build graph",
    long_about = "graphbuild expands the stages, images and platform matrix of a KDL build file into a \
content-addressed graph of (stage × platform) nodes, runs it in parallel with every step cached by \
content, and writes one OCI image index per image.",
    after_help = "Examples:\n  graphbuild run images.kdl\n  graphbuild plan images.kdl --format json\n  graphbuild run images.kdl app --platform linux/arm64"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build images: run the graph and write one OCI layout per image
    #[command(
        after_help = "Examples:\n  graphbuild run images.kdl\n  graphbuild run images.kdl app --platform linux/amd64 --output out/\n  graphbuild run images.kdl --arg APP_VERSION=2.0 --progress plain"
    )]
    Run(Box<RunArgs>),
    /// Build a Dockerfile, with the flags of `docker buildx build`
    #[command(
        after_help = "Examples:\n  graphbuild build --platform linux/amd64,linux/arm64 -t user/app:1.0 --push .\n  graphbuild build -f docker/Dockerfile --target runtime --build-arg VERSION=2 .\n  graphbuild build -o type=oci,dest=out/app ."
    )]
    Build(Box<commands::BuildArgs>),
    /// Write Dockerfiles as an equivalent images.kdl (stages, args, platforms, tags)
    #[command(
        after_help = "Examples:\n  graphbuild convert Dockerfile --platform linux/amd64,linux/arm64 -t user/app:1.0 > images.kdl\n  graphbuild convert api/Dockerfile worker/Dockerfile -o images.kdl"
    )]
    Convert(commands::ConvertArgs),
    /// Show the graph: nodes, keys, what is cached, and each image's platforms; runs nothing
    #[command(
        after_help = "Examples:\n  graphbuild plan images.kdl\n  graphbuild plan images.kdl --explain\n  graphbuild plan images.kdl --format json\n  graphbuild plan images.kdl --format dot | dot -Tsvg > graph.svg"
    )]
    Plan(PlanArgs),
    /// Resolve every registry base to a digest per platform and write graphbuild.lock beside FILE
    #[command(after_help = "Example:\n  graphbuild lock images.kdl && git add graphbuild.lock")]
    Lock {
        #[command(flatten)]
        select: SelectArgs,
    },
    /// Build twice from scratch in separate stores and compare: exit 0 only when bit-for-bit equal
    #[command(after_help = "Example:\n  graphbuild verify images.kdl app")]
    Verify {
        #[command(flatten)]
        inputs: BuildInputArgs,
    },
    /// Check that this machine can build: namespaces, overlayfs, emulators, store, credentials
    #[command(after_help = "Examples:\n  graphbuild doctor\n  graphbuild doctor images.kdl --fix")]
    Doctor {
        /// Check the emulators for the platforms this build file names
        file: Option<PathBuf>,
        /// Mount binfmt_misc and register qemu-user handlers (as root)
        #[arg(long)]
        fix: bool,
        #[arg(long, value_name = "DIR", env = "GRAPHBUILD_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Show an OCI layout: tags, index digest, per-platform manifests, sizes and config
    #[command(
        after_help = "Examples:\n  graphbuild inspect graphbuild-out/app\n  graphbuild inspect graphbuild-out/app:1.0 --format json\n  graphbuild inspect registry.example.com/app:1.0"
    )]
    Inspect {
        /// PATH or PATH:TAG of an OCI layout, or a registry reference (REGISTRY/REPO:TAG)
        target: String,
        #[arg(long, value_enum, default_value = "text")]
        format: InspectFormat,
        /// Allow plain HTTP to this registry (localhost and 127.0.0.0/8 always are)
        #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
        insecure_registries: Vec<String>,
    },
    /// Inspect or manage the local cache, or serve a team cache
    #[command(
        subcommand,
        after_help = "Examples:\n  graphbuild cache du\n  graphbuild cache prune --keep-bytes 10G\n  graphbuild cache serve --listen 0.0.0.0:7070 --dir /var/cache/graphbuild"
    )]
    Cache(CacheCommand),
    /// Print shell completions
    #[command(
        after_help = "Example:\n  graphbuild completions bash > /etc/bash_completion.d/graphbuild"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Execute build steps for a remote execution cluster (a Remote Workers API bot)
    #[command(
        after_help = "Example:\n  graphbuild worker --executor grpc://buildgrid:50051 --platform linux/arm64"
    )]
    Worker(worker::WorkerArgs),
    /// Run a remote step in an action's input root (what a cluster's workers execute)
    #[command(hide = true)]
    WorkerStep {
        step_file: PathBuf,
        #[arg(long, value_name = "DIR", env = "GRAPHBUILD_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
pub struct SelectArgs {
    /// The build file
    pub file: PathBuf,
    /// Images to build (default: all)
    pub images: Vec<String>,
    /// Build only these platforms (repeatable), replacing each image's list
    #[arg(long = "platform", value_name = "OS/ARCH[/VARIANT]")]
    pub platforms: Vec<String>,
    /// Override an arg (repeatable); `--arg NAME` takes NAME from the environment
    #[arg(long = "arg", value_name = "NAME[=VALUE]")]
    pub args: Vec<String>,
    /// The build context (default: the build file's directory)
    #[arg(long, value_name = "DIR")]
    pub context: Option<PathBuf>,
    /// The local store (default: $XDG_CACHE_HOME/graphbuild)
    #[arg(long, value_name = "DIR", env = "GRAPHBUILD_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Allow plain HTTP to this registry (HOST[:PORT]; localhost and 127.0.0.0/8 always are)
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// Resolve registry tags afresh instead of using graphbuild.lock, and refresh the lock file
    #[arg(long)]
    pub pull: bool,
    /// Never use the network: registry bases come from graphbuild.lock and the local store only
    #[arg(long, conflicts_with = "pull")]
    pub offline: bool,
}

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub select: SelectArgs,
    #[arg(long, value_enum, default_value = "text")]
    pub format: PlanFormat,
    /// For each node: cached or not, and for a miss, which input changed since its last build
    #[arg(long)]
    pub explain: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PlanFormat {
    Text,
    Json,
    Dot,
}

/// Everything that decides what a build produces: shared by `run` and `verify`, so `verify`
/// can rebuild whatever `run` builds.
#[derive(Args, Clone)]
pub struct BuildInputArgs {
    #[command(flatten)]
    pub select: SelectArgs,
    /// Nodes to run at once (default: the number of cores)
    #[arg(long, short)]
    pub jobs: Option<usize>,
    /// Layer compression
    #[arg(long, value_enum, default_value = "gzip")]
    pub compression: CompressionArg,
    /// A secret for `secret` in run steps: id=ID,src=PATH or id=ID,env=VAR (repeatable)
    #[arg(long = "secret", value_name = "id=ID,src=PATH|env=VAR")]
    pub secrets: Vec<String>,
    /// An ssh agent for `ssh` in run steps: default (SSH_AUTH_SOCK's), ID, ID=SOCKET or ID=KEY[,KEY] (repeatable)
    #[arg(long = "ssh", value_name = "default|ID[=SOCKET|KEY[,KEY]]")]
    pub ssh: Vec<String>,
    /// Clamp file times and set `created` to this Unix time
    #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
    pub source_date_epoch: i64,
    /// Manifest media types: OCI (default) or Docker's manifest list and schema 2
    #[arg(long, value_enum, default_value = "oci")]
    pub format: FormatArg,
    /// Kill and fail a run step after this long (e.g. 30m), unless it sets its own `timeout`
    #[arg(long, value_name = "DURATION", value_parser = parse_step_timeout)]
    pub step_timeout: Option<u64>,
    /// The most processes (and threads) a run step may have at once; 0: no limit
    #[arg(long, value_name = "N", default_value_t = graphbuild_engine::sandbox::DEFAULT_MAX_PROCESSES)]
    pub step_max_processes: u32,
    /// SLSA provenance in each image index: true (mode=min, the default), false, mode=min or mode=max
    #[arg(long, value_name = "true|false|mode=min|mode=max", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub provenance: Option<String>,
    /// An SPDX SBOM of each platform's filesystem in the image index (--sbom or --sbom=true)
    #[arg(long, value_name = "true|false", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub sbom: Option<String>,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub inputs: BuildInputArgs,
    /// Where images go: DIR for OCI layouts (one per image), or type=local|tar|oci,dest=PATH (repeatable)
    #[arg(long, short, value_name = "DIR|type=TYPE,dest=PATH")]
    pub output: Vec<String>,
    /// Load the image (one platform: the host's, or the one --platform names) into Podman or Docker
    #[arg(long)]
    pub load: bool,
    /// Write buildx's metadata JSON (containerimage.digest, containerimage.descriptor, image.name)
    #[arg(long, value_name = "FILE")]
    pub metadata_file: Option<PathBuf>,
    /// Fail (exit 1) when a file the build added is an ELF binary for another architecture
    #[arg(long)]
    pub strict: bool,
    /// Ignore cached results (results are still recorded)
    #[arg(long)]
    pub no_cache: bool,
    /// Do not run the images' tests (`test` in an image)
    #[arg(long)]
    pub skip_tests: bool,
    /// How progress is shown (default: tty on a terminal, plain otherwise)
    #[arg(long, value_enum)]
    pub progress: Option<ProgressMode>,
    /// Print only errors and the final digests
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub cache: RemoteCacheArgs,
    /// Push every image's tags after building (images with push=#true are always pushed)
    #[arg(long, conflicts_with = "offline")]
    pub push: bool,
}

/// `--step-timeout`: a Go-style duration, in milliseconds.
fn parse_step_timeout(text: &str) -> Result<u64, String> {
    match graphbuild_engine::plan::parse_duration(text) {
        Some(ns) if ns >= 1_000_000 => Ok(ns / 1_000_000),
        _ => Err(format!(
            "`{text}` is not a duration: write it like \"30m\", \"1h30m\" or \"90s\""
        )),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Oci,
    Docker,
}

#[derive(Args, Clone)]
pub struct RemoteCacheArgs {
    /// Read results missing locally from this cache (http://HOST:PORT[/INSTANCE], or grpc://HOST:PORT[/INSTANCE] for an REAPI cache)
    #[arg(long, value_name = "URL")]
    pub cache_from: Option<String>,
    /// Upload new results to this cache
    #[arg(long, value_name = "URL")]
    pub cache_to: Option<String>,
    /// Both --cache-from and --cache-to, unless those are given
    #[arg(
        long = "cache",
        value_name = "URL",
        env = "GRAPHBUILD_CACHE",
        hide_env_values = true
    )]
    pub cache: Option<String>,
    /// Bearer token for the cache server
    #[arg(
        long,
        value_name = "TOKEN",
        env = "GRAPHBUILD_CACHE_TOKEN",
        hide_env_values = true
    )]
    pub cache_token: Option<String>,
    /// Fail when the cache server is unreachable or failing, instead of warning and building locally
    #[arg(long)]
    pub cache_required: bool,
    /// Execute run steps on this Remote Execution API cluster (grpc://HOST:PORT[/INSTANCE])
    #[arg(long, value_name = "URL", env = "GRAPHBUILD_REMOTE_EXECUTOR")]
    pub remote_executor: Option<String>,
    /// Bearer token for the remote executor
    #[arg(
        long,
        value_name = "TOKEN",
        env = "GRAPHBUILD_REMOTE_TOKEN",
        hide_env_values = true
    )]
    pub remote_token: Option<String>,
    /// Fail when the remote executor is unreachable or failing, instead of warning and executing locally
    #[arg(long, requires = "remote_executor")]
    pub remote_required: bool,
    /// The platform property names the executor's workers are matched on
    #[arg(long, value_name = "OS_KEY,ARCH_KEY", default_value = "OSFamily,ISA")]
    pub remote_platform_keys: String,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InspectFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum CompressionArg {
    Gzip,
    Zstd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    Tty,
    Plain,
    Json,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Show how much space the local store uses
    #[command(after_help = "Example:\n  graphbuild cache du --cache-dir ~/.cache/graphbuild")]
    Du {
        #[arg(long, value_name = "DIR", env = "GRAPHBUILD_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Remove least recently used entries until the store fits
    #[command(
        after_help = "Examples:\n  graphbuild cache prune --keep-bytes 10G\n  graphbuild cache prune              # empty the store"
    )]
    Prune {
        #[arg(long, value_name = "DIR", env = "GRAPHBUILD_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        /// Keep at most this many bytes (suffixes K, M, G allowed); 0 empties the store
        #[arg(long, value_name = "BYTES", default_value = "0")]
        keep_bytes: String,
    },
    /// Check every blob's digest, every snapshot and every action record of the local store
    #[command(
        after_help = "Exits 1 when it finds a problem (unless --repair removed them all).\n\nExamples:\n  graphbuild cache verify\n  graphbuild cache verify --repair   # remove what is bad; the next build fetches or rebuilds it"
    )]
    Verify {
        #[arg(long, value_name = "DIR", env = "GRAPHBUILD_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        /// Remove every bad entry (needs the store to itself, like prune)
        #[arg(long)]
        repair: bool,
    },
    /// Serve a team cache over HTTP (bazel-remote compatible)
    #[command(
        after_help = "Example:\n  graphbuild cache serve --listen 0.0.0.0:7070 --dir /var/cache/graphbuild --max-size 50G --tokens tokens.txt"
    )]
    Serve {
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: String,
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Evict least recently used entries above this size (suffixes K, M, G allowed)
        #[arg(long, value_name = "BYTES")]
        max_size: Option<String>,
        /// Bearer tokens, one per line: TOKEN ro|rw [INSTANCE]
        #[arg(long, value_name = "FILE")]
        tokens: Option<PathBuf>,
        /// Let reads through without a token
        #[arg(long)]
        allow_anonymous_read: bool,
    },
}

impl Command {
    /// Commands that unpack layers, run steps or touch the store: a non-root user runs them
    /// in a user namespace where it is root.
    fn needs_root(&self) -> bool {
        matches!(
            self,
            Command::Run(_)
                | Command::Build(_)
                | Command::Plan(_)
                | Command::Verify { .. }
                | Command::Lock { .. }
                | Command::Doctor { .. }
                | Command::Worker(_)
                | Command::WorkerStep { .. }
                | Command::Cache(
                    CacheCommand::Du { .. }
                        | CacheCommand::Prune { .. }
                        | CacheCommand::Verify { .. }
                )
        )
    }
}

fn main() -> ExitCode {
    // The sandbox child: must run before anything starts a thread.
    if std::env::args_os().nth(1).as_deref()
        == Some(OsStr::new(graphbuild_engine::sandbox::SANDBOX_ARG))
    {
        graphbuild_engine::sandbox::child_main();
    }
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new(doctor::PROBE_ARG)) {
        doctor::probe_namespaces();
    }
    render::install_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let code = if error.use_stderr() {
                ExitStatus::InvalidInput
            } else {
                ExitStatus::Success
            };
            let _ = error.print();
            return code.into();
        }
    };
    // An ordinary user builds in a user namespace of its own (docs/security.md, Rootless).
    if cli.command.needs_root()
        && !nix::unistd::geteuid().is_root()
        && !graphbuild_engine::rootless::in_user_namespace()
    {
        return exit(commands::rootless_reexec());
    }
    let result = match cli.command {
        Command::Run(args) => commands::run(*args),
        Command::Build(args) => commands::build(*args),
        Command::Convert(args) => commands::convert(args),
        Command::Plan(args) => commands::plan(args),
        Command::Verify { inputs } => commands::verify(inputs),
        Command::Lock { select } => commands::lock(select),
        Command::Doctor {
            file,
            fix,
            cache_dir,
        } => doctor::doctor(file, fix, cache_dir),
        Command::Inspect {
            target,
            format,
            insecure_registries,
        } => inspect::inspect(&target, format == InspectFormat::Json, &insecure_registries),
        Command::Worker(args) => worker::worker(args),
        Command::WorkerStep {
            step_file,
            cache_dir,
        } => worker::worker_step(step_file, cache_dir),
        Command::Cache(CacheCommand::Du { cache_dir }) => commands::cache_du(cache_dir),
        Command::Cache(CacheCommand::Prune {
            cache_dir,
            keep_bytes,
        }) => commands::cache_prune(cache_dir, &keep_bytes),
        Command::Cache(CacheCommand::Verify { cache_dir, repair }) => {
            commands::cache_verify(cache_dir, repair)
        }
        Command::Cache(CacheCommand::Serve {
            listen,
            dir,
            max_size,
            tokens,
            allow_anonymous_read,
        }) => commands::cache_serve(
            &listen,
            dir,
            max_size.as_deref(),
            tokens,
            allow_anonymous_read,
        ),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "graphbuild",
                &mut std::io::stdout(),
            );
            Ok(ExitStatus::Success)
        }
    };
    exit(result)
}

/// The one place a command's end becomes the process's: its diagnostic rendered once, then
/// its status.
fn exit(result: Result<ExitStatus, CliError>) -> ExitCode {
    match result {
        Ok(status) => status.into(),
        Err(error) => {
            error.render();
            error.exit.into()
        }
    }
}
