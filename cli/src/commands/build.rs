//! `graphbuild build`: a Dockerfile with the command line of `docker buildx build`. The
//! Dockerfile becomes the same IR as a KDL file (lang::dockerfile), then builds like `run`.

use std::path::PathBuf;

use clap::Args;
use graphbuild_lang::dockerfile;

use crate::render;
use crate::{
    BuildInputArgs, CliError, CompressionArg, ExitStatus, FormatArg, ProgressMode, RunArgs,
    SelectArgs,
};

use super::run::build_loaded;
use super::*;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum BuildProgress {
    Auto,
    Plain,
    Tty,
    Json,
    Quiet,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum NetworkMode {
    Default,
    Host,
    None,
}

#[derive(Args)]
pub(crate) struct BuildArgs {
    /// The build context: a directory
    pub(crate) context: PathBuf,
    /// The Dockerfile (default: CONTEXT/Dockerfile)
    #[arg(long, short = 'f', value_name = "PATH")]
    pub(crate) file: Option<PathBuf>,
    /// Platforms to build, comma-separated or repeated (default: this machine's)
    #[arg(long = "platform", value_name = "OS/ARCH[,…]")]
    pub(crate) platforms: Vec<String>,
    /// A name for the image, REGISTRY/REPO:TAG (repeatable); the first names the output
    #[arg(long = "tag", short = 't', value_name = "NAME:TAG")]
    pub(crate) tags: Vec<String>,
    /// Push every tag after building (as -o type=registry)
    #[arg(long)]
    pub(crate) push: bool,
    /// The stage to build (default: the last)
    #[arg(long, value_name = "STAGE")]
    pub(crate) target: Option<String>,
    /// Set a build arg (repeatable)
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub(crate) build_args: Vec<String>,
    /// A secret for RUN --mount=type=secret: id=ID,src=PATH or id=ID,env=VAR (repeatable)
    #[arg(long = "secret", value_name = "id=ID,src=PATH|env=VAR")]
    pub(crate) secrets: Vec<String>,
    /// An ssh agent for RUN --mount=type=ssh: default (SSH_AUTH_SOCK's), ID, ID=SOCKET or ID=KEY[,KEY] (repeatable)
    #[arg(long = "ssh", value_name = "default|ID[=SOCKET|KEY[,KEY]]")]
    pub(crate) ssh: Vec<String>,
    #[command(flatten)]
    pub(crate) cache: crate::RemoteCacheArgs,
    /// Execute every step (results are still recorded)
    #[arg(long)]
    pub(crate) no_cache: bool,
    /// Resolve base image tags afresh instead of using graphbuild.lock
    #[arg(long)]
    pub(crate) pull: bool,
    /// How progress is shown
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) progress: BuildProgress,
    /// Print only errors and the final digest
    #[arg(long, short)]
    pub(crate) quiet: bool,
    /// type=oci,dest=DIR (an OCI layout directory) or type=registry (push)
    #[arg(long, short, value_name = "type=oci,dest=DIR|type=registry")]
    pub(crate) output: Vec<String>,
    /// Add a label to the image config (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub(crate) labels: Vec<String>,
    /// Add an annotation to the index and manifests (repeatable)
    #[arg(long = "annotation", value_name = "KEY=VALUE")]
    pub(crate) annotations: Vec<String>,
    /// The network of RUN steps without their own --network
    #[arg(long, value_enum, value_name = "MODE")]
    pub(crate) network: Option<NetworkMode>,
    /// Load the image into Podman or Docker (one platform), as `run --load`
    #[arg(long)]
    pub(crate) load: bool,
    /// Fail (instead of warning) when an ELF file in the image is for another architecture
    #[arg(long)]
    pub(crate) strict: bool,
    /// Write the image index's digest to FILE
    #[arg(long, value_name = "FILE")]
    pub(crate) iidfile: Option<PathBuf>,
    /// Write the image's digest and names as JSON to FILE
    #[arg(long, value_name = "FILE")]
    pub(crate) metadata_file: Option<PathBuf>,
    /// The local store (default: $XDG_CACHE_HOME/graphbuild)
    #[arg(long, value_name = "DIR", env = "GRAPHBUILD_CACHE_DIR")]
    pub(crate) cache_dir: Option<PathBuf>,
    /// Allow plain HTTP to this registry (HOST[:PORT]; localhost and 127.0.0.0/8 always are)
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub(crate) insecure_registries: Vec<String>,
    /// Clamp file times and set `created` to this Unix time
    #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
    pub(crate) source_date_epoch: i64,
    /// SLSA provenance in the image index: true (mode=min, the default), false, mode=min or mode=max
    #[arg(long, value_name = "true|false|mode=min|mode=max", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub(crate) provenance: Option<String>,
    /// An SPDX SBOM of each platform's filesystem in the image index (--sbom or --sbom=true)
    #[arg(long, value_name = "true|false", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub(crate) sbom: Option<String>,

    // `docker buildx build` flags graphbuild does not support: refused by name, not ignored.
    #[arg(long, hide = true)]
    pub(crate) check: bool,
    #[arg(long, hide = true)]
    pub(crate) builder: Vec<String>,
    #[arg(long, hide = true)]
    pub(crate) add_host: Vec<String>,
    #[arg(long, hide = true)]
    pub(crate) allow: Vec<String>,
    #[arg(long, hide = true)]
    pub(crate) attest: Vec<String>,
    #[arg(long, hide = true)]
    pub(crate) shm_size: Vec<String>,
    #[arg(long, hide = true)]
    pub(crate) ulimit: Vec<String>,
    #[arg(long, hide = true)]
    pub(crate) cgroup_parent: Vec<String>,
    #[arg(long, hide = true)]
    pub(crate) build_context: Vec<String>,
    #[arg(long, hide = true)]
    pub(crate) call: Vec<String>,
    #[arg(long, hide = true)]
    pub(crate) no_cache_filter: Vec<String>,
}

/// The first unsupported buildx flag given, with why.
fn unsupported(args: &BuildArgs) -> Option<(String, &'static str)> {
    let checks: [(bool, &str, &'static str); 11] = [
        (
            args.check,
            "--check",
            "graphbuild has no Dockerfile linter; `graphbuild plan` shows what would be built",
        ),
        (
            !args.builder.is_empty(),
            "--builder",
            "graphbuild is its own builder",
        ),
        (!args.add_host.is_empty(), "--add-host", "not supported yet"),
        (
            !args.allow.is_empty(),
            "--allow",
            "write RUN --security=insecure; no entitlement is needed",
        ),
        (
            !args.attest.is_empty(),
            "--attest",
            "write --provenance=mode=min|max and --sbom",
        ),
        (!args.shm_size.is_empty(), "--shm-size", "not supported yet"),
        (!args.ulimit.is_empty(), "--ulimit", "not supported yet"),
        (
            !args.cgroup_parent.is_empty(),
            "--cgroup-parent",
            "not supported yet",
        ),
        (
            !args.build_context.is_empty(),
            "--build-context",
            "not supported yet",
        ),
        (!args.call.is_empty(), "--call", "not supported yet"),
        (
            !args.no_cache_filter.is_empty(),
            "--no-cache-filter",
            "not supported yet: --no-cache reruns every step",
        ),
    ];
    checks
        .into_iter()
        .find(|(given, _, _)| *given)
        .map(|(_, flag, why)| (flag.to_string(), why))
}

/// What `-o` asks for: an OCI layout directory (`type=oci,dest=DIR`), a push
/// (`type=registry`), and the rest for `run`'s exporters (`type=local`, `type=tar`,
/// `type=oci,dest=FILE.tar`), which report what they do not support.
struct OutputRequest {
    layout_dir: Option<String>,
    push: bool,
    /// `-o type=docker`: buildx's long form of `--load`.
    load: bool,
    exports: Vec<String>,
}

fn outputs(specs: &[String]) -> Result<OutputRequest, String> {
    let mut request = OutputRequest {
        layout_dir: None,
        push: false,
        load: false,
        exports: Vec::new(),
    };
    for spec in specs {
        let fields: Vec<(&str, &str)> = spec
            .split(',')
            .map(|part| part.split_once('=').unwrap_or((part, "")))
            .collect();
        let get = |key: &str| {
            fields
                .iter()
                .find(|(name, _)| *name == key)
                .map(|(_, value)| *value)
        };
        match get("type") {
            Some("registry") => {
                if let Some((key, _)) = fields.iter().find(|(key, _)| *key != "type") {
                    return Err(format!(
                        "-o {spec}: `{key}` is not supported; the image is pushed to its -t tags"
                    ));
                }
                request.push = true;
            }
            Some("docker") => {
                if let Some((key, _)) = fields.iter().find(|(key, _)| *key != "type") {
                    return Err(format!(
                        "-o {spec}: `{key}` is not supported; type=docker loads the image as --load does"
                    ));
                }
                request.load = true;
            }
            Some("oci")
                if get("tar") == Some("false")
                    || get("dest").is_some_and(|dest| !dest.ends_with(".tar")) =>
            {
                if let Some((key, _)) = fields
                    .iter()
                    .find(|(key, _)| !matches!(*key, "type" | "dest" | "tar"))
                {
                    return Err(format!("-o {spec}: `{key}` is not supported"));
                }
                match get("dest") {
                    Some(dir) if !dir.is_empty() && dir != "-" => {
                        request.layout_dir = Some(dir.to_string());
                    }
                    _ => return Err(format!("-o {spec}: needs dest=DIR")),
                }
            }
            None => {
                return Err(format!(
                    "-o {spec}: write buildx's form, type=oci|local|tar|registry,dest=…"
                ));
            }
            Some(_) => request.exports.push(spec.clone()),
        }
    }
    Ok(request)
}

/// The image's name: the repository's last part of the first tag (`user/app:1.0` → `app`).
pub(super) fn image_name(tags: &[String]) -> String {
    let Some(tag) = tags.first() else {
        return "image".into();
    };
    let without_digest = tag.split('@').next().unwrap_or(tag);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    let name = last.split(':').next().unwrap_or(last);
    if name.is_empty() {
        "image".into()
    } else {
        name.to_string()
    }
}

pub(crate) fn build(args: BuildArgs) -> Result<ExitStatus, CliError> {
    if let Some((flag, why)) = unsupported(&args) {
        return Err(
            CliError::invalid_input(format!("graphbuild build does not support `{flag}`"))
                .hint(why),
        );
    }
    let request = outputs(&args.output).map_err(CliError::invalid_input)?;
    for spec in [&args.cache.cache_from, &args.cache.cache_to]
        .into_iter()
        .flatten()
    {
        if spec.starts_with("type=") {
            return Err(CliError::invalid_input(format!(
                "`{spec}`: graphbuild's --cache-from/--cache-to take a team cache URL"
            ))
            .hint(
                "write http://HOST:PORT[/INSTANCE] of a `graphbuild cache serve` (docs/cache-server.md) or grpc://HOST:PORT[/INSTANCE] of an REAPI cache (docs/remote.md); graphbuild has no registry or gha cache",
            ));
        }
    }
    if !args.context.is_dir() {
        return Err(CliError::invalid_input(format!(
            "the build context `{}` is not a directory",
            args.context.display()
        ))
        .hint("pass a directory, usually `.`; URLs and `-` are not supported"));
    }
    let push = args.push || request.push;
    let file = args
        .file
        .clone()
        .unwrap_or_else(|| args.context.join("Dockerfile"));
    let platforms: Vec<String> = args
        .platforms
        .iter()
        .flat_map(|list| list.split(','))
        .map(str::trim)
        .filter(|platform| !platform.is_empty())
        .map(str::to_string)
        .collect();
    if args.file.as_deref() == Some(std::path::Path::new("-")) {
        return Err(CliError::invalid_input(
            "`-f -` (a Dockerfile on standard input) is not supported",
        )
        .hint("write it to a file and pass -f PATH"));
    }
    // `--build-arg NAME` takes NAME's value from the environment, or is left out, as buildx.
    let build_args: Vec<String> = args
        .build_args
        .iter()
        .filter_map(|arg| {
            if arg.contains('=') {
                Some(arg.clone())
            } else {
                std::env::var(arg)
                    .ok()
                    .map(|value| format!("{arg}={value}"))
            }
        })
        .collect();
    let select = SelectArgs {
        file: file.clone(),
        images: Vec::new(),
        platforms,
        args: build_args,
        context: Some(args.context.clone()),
        cache_dir: args.cache_dir.clone(),
        insecure_registries: args.insecure_registries.clone(),
        pull: args.pull,
        offline: false,
    };
    let mut pairs = Vec::new();
    for (flag, list) in [
        ("--label", &args.labels),
        ("--annotation", &args.annotations),
    ] {
        let mut parsed = Vec::new();
        for item in list {
            match item.split_once('=') {
                Some((key, value)) if !key.is_empty() => {
                    parsed.push((key.to_string(), value.to_string()));
                }
                _ => {
                    return Err(CliError::invalid_input(format!(
                        "`{flag} {item}` is not KEY=VALUE"
                    ))
                    .hint("write KEY=VALUE (annotations: [TYPE:]KEY=VALUE, as buildx)"));
                }
            }
        }
        pairs.push(parsed);
    }
    let annotations = pairs.pop().unwrap_or_default();
    let labels = pairs.pop().unwrap_or_default();
    let name = image_name(&args.tags);
    let options = dockerfile::Options {
        image: name.clone(),
        tags: args.tags.clone(),
        target: args.target.clone(),
        push,
        network_none: args.network == Some(NetworkMode::None),
        labels,
        annotations,
        output: request.layout_dir.as_ref().map(|dir| {
            std::path::absolute(dir)
                .unwrap_or_else(|_| PathBuf::from(&dir))
                .display()
                .to_string()
        }),
    };
    let project = dockerfile::load(&file, &args.context, &options)
        .map_err(|diagnostics| CliError::report(ExitStatus::InvalidInput, diagnostics))?;
    // Docker warns about build args no ARG declares; so does graphbuild.
    for arg in &args.build_args {
        let name = arg.split('=').next().unwrap_or(arg);
        let declared = project.args.iter().any(|decl| decl.name == name)
            || project.stages.iter().any(|stage| {
                stage.steps.iter().any(|step| {
                    matches!(&step.kind, graphbuild_lang::ir::StepKind::Arg(decl) if decl.name == name)
                })
            });
        if !declared {
            render::warning(&format!(
                "--build-arg {name}: no ARG in the Dockerfile declares it, so it is not used"
            ));
        }
    }
    let store = open_store(select.cache_dir.clone())?;
    let resolver = resolver(&select, false, manifest_store(&select, true))?;
    let loaded = expand(project, &select, Some(&store), &resolver)?;
    refuse_unresolved(&loaded.plan, &select)?;
    if push && args.tags.is_empty() {
        return Err(CliError::invalid_input("--push needs a name to push to")
            .hint("give one with -t REGISTRY/REPO:TAG"));
    }
    let (progress, quiet) = match args.progress {
        BuildProgress::Auto => (None, args.quiet),
        BuildProgress::Plain => (Some(ProgressMode::Plain), args.quiet),
        BuildProgress::Tty => (Some(ProgressMode::Tty), args.quiet),
        BuildProgress::Json => (Some(ProgressMode::Json), args.quiet),
        BuildProgress::Quiet => (None, true),
    };
    // `--iidfile` reads the digest from the metadata `run` writes.
    let scratch = tempfile::tempdir().map_err(|error| {
        CliError::environment(format!("cannot create a temporary directory: {error}"))
    })?;
    let metadata_file = args.metadata_file.clone().or_else(|| {
        args.iidfile
            .as_ref()
            .map(|_| scratch.path().join("metadata.json"))
    });
    let run_args = RunArgs {
        inputs: BuildInputArgs {
            select: select.clone(),
            jobs: None,
            compression: CompressionArg::Gzip,
            secrets: args.secrets.clone(),
            ssh: args.ssh.clone(),
            source_date_epoch: args.source_date_epoch,
            format: FormatArg::Oci,
            step_timeout: None,
            step_max_processes: graphbuild_engine::sandbox::DEFAULT_MAX_PROCESSES,
            provenance: args.provenance.clone(),
            sbom: args.sbom.clone(),
        },
        output: request.exports,
        load: args.load || request.load,
        metadata_file: metadata_file.clone(),
        strict: args.strict,
        no_cache: args.no_cache,
        // A Dockerfile declares no image tests.
        skip_tests: true,
        progress,
        quiet,
        cache: args.cache.clone(),
        push,
    };
    let code = build_loaded(&run_args, &store, &resolver, &loaded)?;
    if code != ExitStatus::Success {
        return Ok(code);
    }
    if let (Some(iidfile), Some(metadata)) = (&args.iidfile, &metadata_file) {
        let digest = std::fs::read_to_string(metadata)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|json| json["containerimage.digest"].as_str().map(str::to_string));
        let written = digest.map(|digest| std::fs::write(iidfile, digest));
        if !matches!(written, Some(Ok(()))) {
            return Err(CliError::environment(format!(
                "cannot write {}",
                iidfile.display()
            )));
        }
    }
    Ok(ExitStatus::Success)
}
