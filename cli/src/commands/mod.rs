//! The commands: thin glue between arguments, the language, the engine and the renderers.

mod build;
mod cache;
mod convert;
mod convert_bake;
mod outputs;
mod plan_cmd;
mod run;
mod ssh;

pub(crate) use build::{BuildArgs, build};
pub(crate) use cache::{cache_du, cache_prune, cache_serve, cache_verify};
pub(crate) use convert::{ConvertArgs, convert};
pub(crate) use plan_cmd::plan;
pub(crate) use run::{rootless_reexec, run, verify};

use std::collections::BTreeMap;
use std::path::PathBuf;

use graphbuild_engine::plan::{self, Plan, PlanOptions};
use graphbuild_engine::registry::{ClientOptions, RegistryClient};
use graphbuild_engine::resolve::{DefaultResolver, LockFile, LockMode};
use graphbuild_engine::store::Store;
use graphbuild_lang::ir::Project;
use graphbuild_lang::platform::Platform;

use crate::SelectArgs;
use crate::render;
use crate::{CliError, ExitStatus};

/// A loaded and expanded build file.
pub(super) struct Loaded {
    project: Project,
    plan: Plan,
}

pub(super) fn load(
    select: &SelectArgs,
    store: Option<&Store>,
    resolver: &DefaultResolver,
) -> Result<Loaded, CliError> {
    let project = if is_dockerfile(&select.file) {
        // `plan Dockerfile`, `lock Dockerfile`: the Dockerfile front end, its directory the
        // build context, as `graphbuild build DIR` reads it.
        let context = select
            .file
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let options = graphbuild_lang::dockerfile::Options {
            image: "image".into(),
            ..graphbuild_lang::dockerfile::Options::default()
        };
        graphbuild_lang::dockerfile::load(&select.file, context, &options)
    } else {
        graphbuild_lang::load(&select.file)
    }
    .map_err(|diagnostics| CliError::report(ExitStatus::InvalidInput, diagnostics))?;
    expand(project, select, store, resolver)
}

/// Whether a build file is a Dockerfile by its name, as Docker names them: `Dockerfile`,
/// `Dockerfile.NAME`, `NAME.Dockerfile`, `Containerfile`.
fn is_dockerfile(path: &std::path::Path) -> bool {
    let name = path
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    name == "dockerfile"
        || name == "containerfile"
        || name.starts_with("dockerfile.")
        || name.ends_with(".dockerfile")
}

/// Expands a loaded project (KDL or Dockerfile) with the selection's args and platforms.
pub(super) fn expand(
    project: Project,
    select: &SelectArgs,
    store: Option<&Store>,
    resolver: &DefaultResolver,
) -> Result<Loaded, CliError> {
    for warning in &project.warnings {
        render::diagnostic(warning);
    }
    let mut args = BTreeMap::new();
    let valid_name = |name: &str| {
        name.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    for arg in &select.args {
        match arg.split_once('=') {
            Some((key, value)) if !key.is_empty() => {
                args.insert(key.to_string(), value.to_string());
            }
            // `--arg NAME`: NAME's value from the environment, or left out when it is unset,
            // as `docker build --build-arg NAME`.
            None if valid_name(arg) => {
                if let Ok(value) = std::env::var(arg) {
                    args.insert(arg.clone(), value);
                }
            }
            _ => {
                return Err(CliError::invalid_input(format!(
                    "`--arg {arg}` is not NAME=VALUE or NAME"
                ))
                .hint("write --arg NAME=value, or --arg NAME to take NAME from the environment"));
            }
        }
    }
    // Args declared `(env)` take the environment's value when no --arg sets them.
    let from_env = project
        .args
        .iter()
        .chain(project.stages.iter().flat_map(|stage| {
            stage.steps.iter().filter_map(|step| match &step.kind {
                graphbuild_lang::ir::StepKind::Arg(arg) => Some(arg),
                _ => None,
            })
        }));
    for arg in from_env.filter(|arg| arg.from_env) {
        if !args.contains_key(&arg.name)
            && let Ok(value) = std::env::var(&arg.name)
        {
            args.insert(arg.name.clone(), value);
        }
    }
    let mut platforms = Vec::new();
    for platform in &select.platforms {
        match Platform::parse(platform) {
            Ok(platform) => platforms.push(platform),
            Err(error) => {
                return Err(CliError::invalid_input(format!(
                    "`--platform {platform}` is not a valid platform: {error}"
                ))
                .hint(
                    "write a platform as OS/ARCH[/VARIANT], for example linux/arm64 or linux/arm/v7",
                ));
            }
        }
    }
    let options = PlanOptions {
        images: select.images.clone(),
        platforms,
        args,
        host: Platform::host(),
        context_dir: select.context.clone(),
        resolver,
        store,
    };
    match plan::expand(&project, &options) {
        Ok(plan) => Ok(Loaded { project, plan }),
        Err(diagnostics) => {
            // A registry that cannot be reached or refuses us is the environment, not the file.
            let environment = diagnostics
                .0
                .iter()
                .any(|diagnostic| diagnostic.code.is_environment());
            let exit = if environment {
                ExitStatus::Environment
            } else {
                ExitStatus::InvalidInput
            };
            Err(CliError::report(exit, diagnostics))
        }
    }
}

pub(super) fn lock_path(select: &SelectArgs) -> PathBuf {
    project_dir(select).join("graphbuild.lock")
}

pub(super) fn registry_client(select: &SelectArgs) -> RegistryClient {
    RegistryClient::new(ClientOptions {
        insecure_registries: select.insecure_registries.clone(),
        ..Default::default()
    })
}

/// The store the resolver keeps manifests and configs in (and, offline, reads them from): the
/// command's store, opened again; `None` when it does not exist and `create` is false.
pub(super) fn manifest_store(select: &SelectArgs, create: bool) -> Option<Store> {
    let root = select.cache_dir.clone().unwrap_or_else(Store::default_root);
    let root = std::path::absolute(&root).unwrap_or(root);
    if !create && !root.exists() {
        return None;
    }
    Store::open(&root).ok()
}

/// The resolver for a command: OCI layouts and registries, pinned by graphbuild.lock unless
/// `refresh` (or `--pull`), offline with `--offline`, keeping manifests in `store`.
pub(super) fn resolver(
    select: &SelectArgs,
    refresh: bool,
    store: Option<Store>,
) -> Result<DefaultResolver, CliError> {
    let resolver = base_resolver(select, refresh)?.offline(select.offline);
    Ok(match store {
        Some(store) => resolver.with_store(store),
        None => resolver,
    })
}

pub(super) fn base_resolver(
    select: &SelectArgs,
    refresh: bool,
) -> Result<DefaultResolver, CliError> {
    let mode = if refresh || select.pull {
        LockMode::Refresh
    } else {
        match LockFile::read(&lock_path(select)) {
            Ok(lock) => LockMode::UseLock(lock.unwrap_or_default()),
            Err(error) => {
                return Err(CliError::invalid_input(error.to_string())
                    .hint("delete it and run `graphbuild lock FILE` to write a new one"));
            }
        }
    };
    DefaultResolver::new(&project_dir(select), registry_client(select), mode).map_err(|error| {
        CliError::environment(format!("cannot create a temporary directory: {error}"))
    })
}

/// Write graphbuild.lock: the bases resolved now replace their (reference, platform) entries;
/// entries for platforms or images not built this time are kept.
pub(super) fn write_lock(
    select: &SelectArgs,
    resolver: &DefaultResolver,
) -> Result<PathBuf, CliError> {
    let path = lock_path(select);
    let fresh = resolver.lock_file();
    let mut merged = LockFile::read(&path).ok().flatten().unwrap_or_default();
    merged.bases.retain(|old| {
        !fresh
            .bases
            .iter()
            .any(|new| new.reference == old.reference && new.platform == old.platform)
    });
    merged.bases.extend(fresh.bases);
    merged
        .write(&path)
        .map(|()| path.clone())
        .map_err(|error| CliError::environment(format!("cannot write {}: {error}", path.display())))
}

/// The unresolved bases, one line per reference: its platforms and why.
pub(super) fn unresolved_lines(plan: &Plan) -> (Vec<String>, Vec<String>) {
    let mut grouped: Vec<(&str, Vec<String>, &str)> = Vec::new();
    let mut helps: Vec<String> = Vec::new();
    for base in plan.unresolved() {
        let help = base.help();
        if !helps.contains(&help) {
            helps.push(help);
        }
        match grouped
            .iter_mut()
            .find(|(reference, _, _)| *reference == base.reference)
        {
            Some((_, platforms, _)) => platforms.push(base.platform.to_string()),
            None => grouped.push((
                &base.reference,
                vec![base.platform.to_string()],
                &base.reason,
            )),
        }
    }
    let lines = grouped
        .into_iter()
        .map(|(reference, platforms, reason)| {
            format!("  {reference} ({}): {reason}", platforms.join(", "))
        })
        .collect();
    (lines, helps)
}

pub(super) fn count(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// "1 base image is", or "2 base images or `add` sources are" when downloads or repositories
/// are among them.
fn unresolved_what(plan: &Plan, n: usize) -> String {
    let sources = plan.unresolved().iter().any(|unresolved| {
        unresolved.reference.contains("://") || unresolved.reference.starts_with("git@")
    });
    if sources {
        count(
            n,
            "base image or `add` source is",
            "base images or `add` sources are",
        )
    } else {
        count(n, "base image is", "base images are")
    }
}

/// `run`, `verify` and `lock` need every base: unresolved ones stop them with exit code 3.
pub(super) fn refuse_unresolved(plan: &Plan, select: &SelectArgs) -> Result<(), CliError> {
    let (lines, helps) = unresolved_lines(plan);
    if lines.is_empty() {
        return Ok(());
    }
    let mut message = format!(
        "cannot build: {} unresolved",
        unresolved_what(plan, lines.len())
    );
    for line in &lines {
        message.push('\n');
        message.push_str(line);
    }
    let file = select.file.display().to_string();
    Err(helps
        .into_iter()
        .fold(CliError::environment(message), |error, help| {
            error.hint(help.replace("FILE", &file))
        }))
}

/// `plan` shows unresolved bases and pending keys, with one warning.
pub(super) fn warn_unresolved(plan: &Plan, select: &SelectArgs) {
    let (lines, helps) = unresolved_lines(plan);
    if lines.is_empty() {
        return;
    }
    let mut message = format!(
        "{} unresolved, so the keys that depend on {} are pending:",
        unresolved_what(plan, lines.len()),
        if lines.len() == 1 { "it" } else { "them" }
    );
    for line in &lines {
        message.push('\n');
        message.push_str(line);
    }
    render::warning(&message);
    for help in helps {
        eprintln!(
            "hint: {}",
            help.replace("FILE", &select.file.display().to_string())
        );
    }
}

pub(crate) fn lock(select: SelectArgs) -> Result<ExitStatus, CliError> {
    if select.offline {
        return Err(CliError::invalid_input(
            "`graphbuild lock` asks the registries for digests: it cannot run --offline",
        )
        .hint("run it where the registries are reachable, and commit graphbuild.lock"));
    }
    let resolver = resolver(&select, true, manifest_store(&select, true))?;
    let loaded = load(&select, None, &resolver)?;
    refuse_unresolved(&loaded.plan, &select)?;
    drop(loaded);
    let path = write_lock(&select, &resolver)?;
    let lock = LockFile::read(&path).ok().flatten().unwrap_or_default();
    println!("wrote {} ({} bases)", path.display(), lock.bases.len());
    Ok(ExitStatus::Success)
}

pub(super) fn project_dir(select: &SelectArgs) -> PathBuf {
    select
        .file
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub(super) fn open_store(cache_dir: Option<PathBuf>) -> Result<Store, CliError> {
    let root = cache_dir.unwrap_or_else(Store::default_root);
    // Absolute: sandboxes run elsewhere and get store paths as overlay layers.
    let root = std::path::absolute(&root).unwrap_or(root);
    Store::open(&root).map_err(|error| {
        CliError::environment(format!(
            "cannot open the store at {}: {error}",
            root.display()
        ))
        .hint("choose another directory with --cache-dir DIR")
    })
}
