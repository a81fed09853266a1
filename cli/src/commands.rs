//! The commands: thin glue between arguments, the language, the engine and the renderers.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use graphbuild_engine::build::{self, BuildOptions, SecretValue};
use graphbuild_engine::explain;
use graphbuild_engine::layer::{Compression, LayerOptions};
use graphbuild_engine::plan::{self, Base, Op, Plan, PlanOptions};
use graphbuild_engine::registry::{ClientOptions, RegistryClient};
use graphbuild_engine::resolve::{DefaultResolver, LockFile, LockMode};
use graphbuild_engine::scheduler::CancelToken;
use graphbuild_engine::store::Store;
use graphbuild_lang::ir::Project;
use graphbuild_lang::platform::Platform;
use serde_json::json;

use crate::exit;
use crate::progress::Progress;
use crate::render;
use crate::{
    BuildInputArgs, CompressionArg, PlanArgs, PlanFormat, ProgressMode, RunArgs, SelectArgs,
};

/// A loaded and expanded build file.
struct Loaded {
    project: Project,
    plan: Plan,
}

fn load(
    select: &SelectArgs,
    store: Option<&Store>,
    resolver: &DefaultResolver,
) -> Result<Loaded, u8> {
    let project = match graphbuild_lang::load(&select.file) {
        Ok(project) => project,
        Err(diagnostics) => {
            render::diagnostic(&diagnostics);
            return Err(exit::INVALID_INPUT);
        }
    };
    for warning in &project.warnings {
        render::diagnostic(warning);
    }
    let mut args = BTreeMap::new();
    for arg in &select.args {
        match arg.split_once('=') {
            Some((key, value)) if !key.is_empty() => {
                args.insert(key.to_string(), value.to_string());
            }
            _ => {
                render::error(
                    &format!("`--arg {arg}` is not KEY=VALUE"),
                    &["write --arg NAME=value"],
                );
                return Err(exit::INVALID_INPUT);
            }
        }
    }
    let mut platforms = Vec::new();
    for platform in &select.platforms {
        match Platform::parse(platform) {
            Ok(platform) => platforms.push(platform),
            Err(error) => {
                render::error(
                    &format!("`--platform {platform}` is not a valid platform: {error}"),
                    &[
                        "write a platform as OS/ARCH[/VARIANT], for example linux/arm64 or linux/arm/v7",
                    ],
                );
                return Err(exit::INVALID_INPUT);
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
            render::diagnostic(&diagnostics);
            // A registry that cannot be reached or refuses us is the environment, not the file.
            let environment = diagnostics
                .0
                .iter()
                .any(|diagnostic| diagnostic.code == graphbuild_engine::resolve::ENVIRONMENT_CODE);
            Err(if environment {
                exit::ENVIRONMENT
            } else {
                exit::INVALID_INPUT
            })
        }
    }
}

fn lock_path(select: &SelectArgs) -> PathBuf {
    project_dir(select).join("graphbuild.lock")
}

fn registry_client(select: &SelectArgs) -> RegistryClient {
    RegistryClient::new(ClientOptions {
        insecure_registries: select.insecure_registries.clone(),
        ..Default::default()
    })
}

/// The store the resolver keeps manifests and configs in (and, offline, reads them from): the
/// command's store, opened again; `None` when it does not exist and `create` is false.
fn manifest_store(select: &SelectArgs, create: bool) -> Option<Store> {
    let root = select.cache_dir.clone().unwrap_or_else(Store::default_root);
    let root = std::path::absolute(&root).unwrap_or(root);
    if !create && !root.exists() {
        return None;
    }
    Store::open(&root).ok()
}

/// The resolver for a command: OCI layouts and registries, pinned by graphbuild.lock unless
/// `refresh` (or `--pull`), offline with `--offline`, keeping manifests in `store`.
fn resolver(
    select: &SelectArgs,
    refresh: bool,
    store: Option<Store>,
) -> Result<DefaultResolver, u8> {
    let resolver = base_resolver(select, refresh)?.offline(select.offline);
    Ok(match store {
        Some(store) => resolver.with_store(store),
        None => resolver,
    })
}

fn base_resolver(select: &SelectArgs, refresh: bool) -> Result<DefaultResolver, u8> {
    let mode = if refresh || select.pull {
        LockMode::Refresh
    } else {
        match LockFile::read(&lock_path(select)) {
            Ok(lock) => LockMode::UseLock(lock.unwrap_or_default()),
            Err(message) => {
                render::error(
                    &message,
                    &["delete it and run `graphbuild lock FILE` to write a new one"],
                );
                return Err(exit::INVALID_INPUT);
            }
        }
    };
    DefaultResolver::new(&project_dir(select), registry_client(select), mode).map_err(|error| {
        render::error(
            &format!("cannot create a temporary directory: {error}"),
            &[],
        );
        exit::ENVIRONMENT
    })
}

/// Write graphbuild.lock: the bases resolved now replace their (reference, platform) entries;
/// entries for platforms or images not built this time are kept.
fn write_lock(select: &SelectArgs, resolver: &DefaultResolver) -> Result<PathBuf, u8> {
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
    merged.write(&path).map(|()| path.clone()).map_err(|error| {
        render::error(&format!("cannot write {}: {error}", path.display()), &[]);
        exit::ENVIRONMENT
    })
}

/// The unresolved bases, one line per reference: its platforms and why.
fn unresolved_lines(plan: &Plan) -> (Vec<String>, Vec<String>) {
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

fn count(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// `run`, `verify` and `lock` need every base: unresolved ones stop them with exit code 3.
fn refuse_unresolved(plan: &Plan, select: &SelectArgs) -> Result<(), u8> {
    let (lines, helps) = unresolved_lines(plan);
    if lines.is_empty() {
        return Ok(());
    }
    eprintln!(
        "error: cannot build: {} unresolved",
        count(lines.len(), "base image is", "base images are")
    );
    for line in &lines {
        eprintln!("{line}");
    }
    for help in helps {
        eprintln!(
            "hint: {}",
            help.replace("FILE", &select.file.display().to_string())
        );
    }
    Err(exit::ENVIRONMENT)
}

/// `plan` shows unresolved bases and pending keys, with one warning.
fn warn_unresolved(plan: &Plan, select: &SelectArgs) {
    let (lines, helps) = unresolved_lines(plan);
    if lines.is_empty() {
        return;
    }
    let mut message = format!(
        "{} unresolved, so the keys that depend on {} are pending:",
        count(lines.len(), "base image is", "base images are"),
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

pub fn lock(select: SelectArgs) -> u8 {
    if select.offline {
        render::error(
            "`graphbuild lock` asks the registries for digests: it cannot run --offline",
            &["run it where the registries are reachable, and commit graphbuild.lock"],
        );
        return exit::INVALID_INPUT;
    }
    let resolver = match resolver(&select, true, manifest_store(&select, true)) {
        Ok(resolver) => resolver,
        Err(code) => return code,
    };
    let loaded = match load(&select, None, &resolver) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    if let Err(code) = refuse_unresolved(&loaded.plan, &select) {
        return code;
    }
    drop(loaded);
    match write_lock(&select, &resolver) {
        Ok(path) => {
            let lock = LockFile::read(&path).ok().flatten().unwrap_or_default();
            println!("wrote {} ({} bases)", path.display(), lock.bases.len());
            exit::SUCCESS
        }
        Err(code) => code,
    }
}

fn project_dir(select: &SelectArgs) -> PathBuf {
    select
        .file
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn open_store(cache_dir: Option<PathBuf>) -> Result<Store, u8> {
    let root = cache_dir.unwrap_or_else(Store::default_root);
    // Absolute: sandboxes run elsewhere and get store paths as overlay layers.
    let root = std::path::absolute(&root).unwrap_or(root);
    Store::open(&root).map_err(|error| {
        render::error(
            &format!("cannot open the store at {}: {error}", root.display()),
            &["choose another directory with --cache-dir DIR"],
        );
        exit::ENVIRONMENT
    })
}

/// Whether a node's result is in the store: its last filesystem step has a record.
fn node_cached(plan: &Plan, node: usize, store: Option<&Store>) -> Option<bool> {
    let store = store?;
    let node = &plan.nodes[node];
    if node.pending {
        return None;
    }
    let last = node
        .steps
        .iter()
        .rev()
        .find(|step| step.op.touches_filesystem());
    Some(match last {
        Some(step) => store.get_action(&step.key).is_some(),
        None => true,
    })
}

pub fn plan(args: PlanArgs) -> u8 {
    let resolver = match resolver(&args.select, false, manifest_store(&args.select, false)) {
        Ok(resolver) => resolver,
        Err(code) => return code,
    };
    let root = args
        .select
        .cache_dir
        .clone()
        .unwrap_or_else(Store::default_root);
    let store = if root.exists() {
        Store::open(&root).ok()
    } else {
        None
    };
    let loaded = match load(&args.select, store.as_ref(), &resolver) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let plan = &loaded.plan;
    warn_unresolved(plan, &args.select);
    if args.explain {
        let describe = |loc| loaded.project.sources.describe(loc);
        let explanations: Vec<_> = plan
            .nodes
            .iter()
            .map(|node| match &store {
                Some(store) => explain::explain(store, plan, node, &describe),
                None => explain::pending(plan, node).unwrap_or(explain::Explanation::NeverBuilt),
            })
            .collect();
        if let PlanFormat::Json = args.format {
            let mut value = plan_json(plan, &loaded.project, store.as_ref());
            if let Some(nodes) = value["nodes"].as_array_mut() {
                for (node, explanation) in nodes.iter_mut().zip(&explanations) {
                    node["explain"] = serde_json::to_value(explanation).unwrap_or_default();
                }
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
        } else {
            print!("{}", explain_text(plan, &explanations));
        }
        return exit::SUCCESS;
    }
    match args.format {
        PlanFormat::Json => {
            let value = plan_json(plan, &loaded.project, store.as_ref());
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
        }
        PlanFormat::Dot => print!("{}", plan_dot(plan)),
        PlanFormat::Text => print!("{}", plan_text(plan, store.as_ref())),
    }
    exit::SUCCESS
}

fn node_id(id: usize) -> String {
    format!("n{id}")
}

fn base_json(base: &Base) -> serde_json::Value {
    match base {
        Base::Scratch => json!({"kind": "scratch"}),
        Base::Stage(id) => json!({"kind": "node", "node": node_id(*id)}),
        Base::Image(image) => json!({
            "kind": "image",
            "reference": image.reference,
            "digest": image.manifest_digest.to_string(),
        }),
        Base::Unresolved(base) => json!({
            "kind": "unresolved",
            "reference": base.reference,
            "digest": base.locked.map(|digest| digest.to_string()),
            "reason": base.reason,
        }),
    }
}

/// The documented JSON shape of `graphbuild plan --format json` (docs/cli.md).
pub fn plan_json(plan: &Plan, project: &Project, store: Option<&Store>) -> serde_json::Value {
    let nodes: Vec<_> = plan
        .nodes
        .iter()
        .map(|node| {
            let steps: Vec<_> = node
                .steps
                .iter()
                .map(|step| {
                    let mut value = json!({
                        "kind": match step.op { Op::Run(_) => "run", Op::Copy(_) => "copy", Op::Config(_) => "config" },
                        "description": step.description,
                        "key": (!step.pending).then(|| step.key.to_string()),
                        "pending": step.pending,
                        "location": project.sources.describe(step.at),
                    });
                    if let Op::Run(run) = &step.op
                        && run.insecure
                    {
                        value["insecure"] = json!(true);
                    }
                    value
                })
                .collect();
            json!({
                "id": node_id(node.id),
                "stage": node.stage,
                "platform": node.platform.to_string(),
                "targets": node.targets.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "key": (!node.pending).then(|| node.key.to_string()),
                "pending": node.pending,
                "deps": node.deps.iter().map(|dep| node_id(*dep)).collect::<Vec<_>>(),
                "base": base_json(&node.base),
                "steps": steps,
                "cached": node_cached(plan, node.id, store),
            })
        })
        .collect();
    let images: Vec<_> = plan
        .images
        .iter()
        .map(|image| {
            json!({
                "name": image.name,
                "platforms": image.platforms.iter().map(|(platform, _)| platform.to_string()).collect::<Vec<_>>(),
                "tags": image.tags,
                "nodes": image.platforms.iter()
                    .map(|(platform, node)| (platform.to_string(), json!(node_id(*node))))
                    .collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    let unresolved: Vec<_> = plan
        .unresolved()
        .into_iter()
        .map(|base| {
            json!({
                "reference": base.reference,
                "platform": base.platform.to_string(),
                "digest": base.locked.map(|digest| digest.to_string()),
                "reason": base.reason,
            })
        })
        .collect();
    json!({ "version": 1, "nodes": nodes, "images": images, "unresolved": unresolved })
}

/// Shown for each `insecure=#true` step by `plan` and when it runs.
const INSECURE_WARNING: &str = graphbuild_engine::build::INSECURE_WARNING;

fn plan_text(plan: &Plan, store: Option<&Store>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} node{}",
        plan.nodes.len(),
        if plan.nodes.len() == 1 { "" } else { "s" }
    );
    for id in plan.topological_order() {
        let node = &plan.nodes[id];
        let targets = if node.targets.len() > 1 || node.targets[0] != node.platform {
            format!(
                " (for {})",
                node.targets
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            String::new()
        };
        let status = match node_cached(plan, id, store) {
            Some(true) => "  cached",
            Some(false) | None => "",
        };
        let _ = writeln!(
            out,
            "  {:<4} {} · {}{}  {}{}",
            node_id(id),
            node.stage,
            node.platform,
            targets,
            if node.pending {
                "pending".to_string()
            } else {
                node.key.short()
            },
            status
        );
        match &node.base {
            Base::Scratch => {}
            Base::Stage(base) => {
                let _ = writeln!(out, "         from {}", node_id(*base));
            }
            Base::Image(image) => {
                let _ = writeln!(
                    out,
                    "         from {} ({})",
                    image.reference, image.manifest_digest
                );
            }
            Base::Unresolved(base) => {
                let _ = match base.locked {
                    Some(digest) => writeln!(
                        out,
                        "         from {} ({digest}, unresolved)",
                        base.reference
                    ),
                    None => writeln!(out, "         from {} (unresolved)", base.reference),
                };
            }
        }
        for step in &node.steps {
            if step.op.touches_filesystem() {
                let _ = writeln!(out, "         {}", truncate(&step.description, 100));
            }
            if let Op::Run(run) = &step.op
                && run.insecure
            {
                let _ = writeln!(out, "         warning: {INSECURE_WARNING}");
            }
        }
        let copies: Vec<String> = node
            .deps
            .iter()
            .filter(|dep| !matches!(node.base, Base::Stage(base) if base == **dep))
            .map(|dep| node_id(*dep))
            .collect();
        if !copies.is_empty() {
            let _ = writeln!(out, "         copies from {}", copies.join(", "));
        }
    }
    let _ = writeln!(
        out,
        "{} image{}",
        plan.images.len(),
        if plan.images.len() == 1 { "" } else { "s" }
    );
    for image in &plan.images {
        let _ = writeln!(out, "  {}", image.name);
        for (platform, node) in &image.platforms {
            let _ = writeln!(out, "    {:<16} {}", platform.to_string(), node_id(*node));
        }
        if !image.tags.is_empty() {
            let _ = writeln!(out, "    tags: {}", image.tags.join(", "));
        }
    }
    out
}

fn explain_text(plan: &Plan, explanations: &[explain::Explanation]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for id in plan.topological_order() {
        let node = &plan.nodes[id];
        let _ = write!(out, "{} · {}: ", node.stage, node.platform);
        match &explanations[id] {
            explain::Explanation::Cached => {
                let _ = writeln!(out, "cached");
            }
            explain::Explanation::NeverBuilt => {
                let _ = writeln!(out, "will run: never built");
            }
            explain::Explanation::Evicted => {
                let _ = writeln!(
                    out,
                    "will run: the inputs are unchanged but the result is no longer in the store"
                );
            }
            explain::Explanation::Pending { bases } => {
                let _ = writeln!(
                    out,
                    "pending: the key waits for the unresolved base {}",
                    bases.join(", ")
                );
            }
            explain::Explanation::Changed {
                step,
                location,
                reasons,
            } => {
                let _ = writeln!(
                    out,
                    "will run from `{}`{}",
                    truncate(step, 80),
                    location
                        .as_ref()
                        .map(|l| format!(" ({l})"))
                        .unwrap_or_default()
                );
                for reason in reasons {
                    let _ = writeln!(out, "    {reason}");
                }
            }
        }
    }
    out
}

fn truncate(text: &str, width: usize) -> String {
    let single_line = text.replace('\n', " ");
    if single_line.chars().count() <= width {
        single_line
    } else {
        let cut: String = single_line.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

fn plan_dot(plan: &Plan) -> String {
    use std::fmt::Write;
    let mut out = String::from(
        "digraph graphbuild {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n",
    );
    for node in &plan.nodes {
        let mut label = format!("{}\\n{}", node.stage, node.platform);
        if let Base::Unresolved(base) = &node.base {
            label.push_str(&format!("\\nfrom {} (unresolved)", base.reference));
        }
        if node.pending {
            label.push_str("\\nkey pending");
        }
        let label = label.replace('"', "\\\"");
        let style = if node.pending { ", style=dashed" } else { "" };
        let _ = writeln!(out, "  {} [label=\"{}\"{style}];", node_id(node.id), label);
        for dep in &node.deps {
            let _ = writeln!(out, "  {} -> {};", node_id(*dep), node_id(node.id));
        }
    }
    for (index, image) in plan.images.iter().enumerate() {
        let _ = writeln!(
            out,
            "  image{index} [shape=folder, label=\"{}\"];",
            image.name.replace('"', "\\\"")
        );
        for (_, node) in &image.platforms {
            let _ = writeln!(out, "  {} -> image{index};", node_id(*node));
        }
    }
    out.push_str("}\n");
    out
}

fn parse_secrets(specs: &[String]) -> Result<HashMap<String, SecretValue>, String> {
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
/// Re-run this command in a user namespace where the invoking (non-root) user is root.
pub fn rootless_reexec() -> u8 {
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
    match graphbuild_engine::rootless::reexec(&plan) {
        Ok(code) => code,
        Err(message) => {
            render::error(&format!("cannot start a rootless build: {message}"), &[]);
            exit::ENVIRONMENT
        }
    }
}

fn preflight(nodes: &[&graphbuild_engine::plan::Node]) -> Result<(), String> {
    let host = Platform::host();
    if !nodes.is_empty() && !nix::unistd::geteuid().is_root() {
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
fn cancel_on_signals() -> CancelToken {
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

struct BuildSettings {
    format: build::ManifestFormat,
    remote: build::RemoteOptions,
    output: PathBuf,
    no_cache: bool,
    jobs: Option<usize>,
    compression: Compression,
    secrets: HashMap<String, SecretValue>,
    source_date_epoch: i64,
    step_timeout_ms: Option<u64>,
    step_max_processes: Option<u32>,
}

/// Build a loaded plan into `settings.output`; returns the report or an exit code.
fn execute(
    loaded: &Loaded,
    store: &Store,
    resolver: &DefaultResolver,
    settings: BuildSettings,
    cancel: &CancelToken,
    progress: &Progress,
) -> build::BuildReport {
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
        cancel: cancel.clone(),
        // Ctrl-C/SIGTERM also stops transfers waiting on the cache.
        remote: build::RemoteOptions {
            from: (settings.remote.from).map(|cache| cache.with_cancel(cancel.flag().clone())),
            to: (settings.remote.to).map(|cache| cache.with_cancel(cancel.flag().clone())),
            required: settings.remote.required,
        },
        format: settings.format,
        preflight: Some(Box::new(preflight)),
        step_timeout_ms: settings.step_timeout_ms,
        step_max_processes: settings.step_max_processes,
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
    if report.failures.is_empty() && !report.cancelled && report.environment_error.is_none() {
        explain::record(store, &loaded.plan);
    }
    report
}

/// Base layers that could not be downloaded for lack of network (or because of `--offline`):
/// an environment problem, exit code 3.
fn refuse_unavailable_layers(resolver: &DefaultResolver, select: &SelectArgs) -> Result<(), u8> {
    let unavailable = resolver.unavailable();
    if unavailable.is_empty() {
        return Ok(());
    }
    for message in &unavailable {
        eprintln!("error: cannot get the layers of {message}");
    }
    let file = select.file.display();
    if resolver.is_offline() {
        eprintln!(
            "hint: run `graphbuild run {file}` once with network access to download them into the local store, or drop --offline"
        );
    } else {
        eprintln!(
            "hint: check the network and that the registry is running; once the layers are in the local store, `graphbuild run {file} --offline` needs no network"
        );
    }
    Err(exit::ENVIRONMENT)
}

fn report_failures(report: &build::BuildReport) -> u8 {
    if let Some(message) = &report.environment_error {
        eprintln!("{message}");
        return exit::ENVIRONMENT;
    }
    if report.cancelled {
        // Steps stopped by the cancel are not failures worth listing.
        render::error("the build was cancelled", &[]);
        return 130;
    }
    if !report.failures.is_empty() {
        for failure in &report.failures {
            // A failure carries the tail of the step's output: made safe like progress lines.
            let text = failure.to_string();
            let lines: Vec<String> = text.lines().map(crate::progress::sanitize).collect();
            eprintln!("error: {}", lines.join("\n"));
        }
        eprintln!(
            "error: {} of the build failed",
            if report.failures.len() == 1 {
                "1 node".to_string()
            } else {
                format!("{} nodes", report.failures.len())
            }
        );
        return exit::BUILD_FAILED;
    }
    if report.cancelled {
        render::error("the build was cancelled", &[]);
        return 130;
    }
    exit::SUCCESS
}

fn remote_options(args: &crate::RemoteCacheArgs) -> Result<build::RemoteOptions, u8> {
    let open = |url: &str| {
        graphbuild_engine::remote::RemoteCache::new(url, args.cache_token.clone()).map_err(
            |error| {
                let help = miette::Diagnostic::help(&error).map(|help| help.to_string());
                render::error(
                    &error.to_string(),
                    &[help.as_deref().unwrap_or(
                        "write the cache URL as http://HOST:PORT or http://HOST:PORT/INSTANCE",
                    )],
                );
                exit::INVALID_INPUT
            },
        )
    };
    let from = args
        .cache_from
        .as_deref()
        .or(args.cache.as_deref())
        .map(open)
        .transpose()?;
    let to = args
        .cache_to
        .as_deref()
        .or(args.cache.as_deref())
        .map(open)
        .transpose()?;
    Ok(build::RemoteOptions {
        from,
        to,
        required: args.cache_required,
    })
}

/// The settings for one build from the shared build inputs; an exit code for a bad `--secret`.
fn build_settings(
    inputs: &BuildInputArgs,
    output: PathBuf,
    no_cache: bool,
    remote: build::RemoteOptions,
) -> Result<BuildSettings, u8> {
    let secrets = match parse_secrets(&inputs.secrets) {
        Ok(secrets) => secrets,
        Err(message) => {
            render::error(&message, &[]);
            return Err(exit::INVALID_INPUT);
        }
    };
    Ok(BuildSettings {
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
        source_date_epoch: inputs.source_date_epoch,
        step_timeout_ms: inputs.step_timeout,
        step_max_processes: (inputs.step_max_processes > 0).then_some(inputs.step_max_processes),
    })
}

pub fn run(args: RunArgs) -> u8 {
    let select = &args.inputs.select;
    let store = match open_store(select.cache_dir.clone()) {
        Ok(store) => store,
        Err(code) => return code,
    };
    let resolver = match resolver(select, false, manifest_store(select, true)) {
        Ok(resolver) => resolver,
        Err(code) => return code,
    };
    let loaded = match load(select, Some(&store), &resolver) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    if let Err(code) = refuse_unresolved(&loaded.plan, select) {
        return code;
    }
    let cancel = cancel_on_signals();
    let mode = args.progress.unwrap_or_else(|| {
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressMode::Tty
        } else {
            ProgressMode::Plain
        }
    });
    let mut remote = match remote_options(&args.cache) {
        Ok(remote) => remote,
        Err(code) => return code,
    };
    if select.offline && (remote.from.is_some() || remote.to.is_some()) {
        render::warning("--offline: the team cache is not used");
        remote = build::RemoteOptions::default();
    }
    let settings = match build_settings(&args.inputs, args.output.clone(), args.no_cache, remote) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    let progress = Progress::new(mode, args.quiet);
    let report = execute(&loaded, &store, &resolver, settings, &cancel, &progress);
    if let Err(code) = refuse_unavailable_layers(&resolver, select) {
        return code;
    }
    let code = report_failures(&report);
    if code != exit::SUCCESS {
        return code;
    }
    if select.pull
        && let Err(code) = write_lock(select, &resolver)
    {
        return code;
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
            render::error(
                &format!("cannot push `{}`: it has no tags", plan.name),
                &["give the image `tags \"registry.example.com/NAME:TAG\"`"],
            );
            return exit::INVALID_INPUT;
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
            Err(message) => {
                render::error(&format!("pushing `{}` failed: {message}", plan.name), &[]);
                return exit::ENVIRONMENT;
            }
        }
    }
    exit::SUCCESS
}

/// `graphbuild verify`: two clean builds, compared.
pub fn verify(inputs: BuildInputArgs) -> u8 {
    let select = &inputs.select;
    let scratch = match tempfile::Builder::new()
        .prefix("graphbuild-verify-")
        .tempdir()
    {
        Ok(dir) => dir,
        Err(error) => {
            render::error(
                &format!("cannot create a temporary directory: {error}"),
                &[],
            );
            return exit::ENVIRONMENT;
        }
    };
    let cancel = cancel_on_signals();
    let mut outputs = Vec::new();
    for round in ["first", "second"] {
        let store = match open_store(Some(scratch.path().join(format!("store-{round}")))) {
            Ok(store) => store,
            Err(code) => return code,
        };
        let resolver = match resolver(select, false, manifest_store(select, false)) {
            Ok(resolver) => resolver,
            Err(code) => return code,
        };
        let loaded = match load(select, Some(&store), &resolver) {
            Ok(loaded) => loaded,
            Err(code) => return code,
        };
        if let Err(code) = refuse_unresolved(&loaded.plan, select) {
            return code;
        }
        eprintln!("verify: {round} build from scratch…");
        let output = scratch.path().join(format!("out-{round}"));
        let settings = match build_settings(&inputs, output, true, build::RemoteOptions::default())
        {
            Ok(settings) => settings,
            Err(code) => return code,
        };
        let progress = Progress::silent();
        let report = execute(&loaded, &store, &resolver, settings, &cancel, &progress);
        if let Err(code) = refuse_unavailable_layers(&resolver, select) {
            return code;
        }
        let code = report_failures(&report);
        if code != exit::SUCCESS {
            return code;
        }
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
    if reproducible {
        exit::SUCCESS
    } else {
        exit::BUILD_FAILED
    }
}

pub fn cache_du(cache_dir: Option<PathBuf>) -> u8 {
    // Measuring creates nothing: a missing store is reported, not made.
    let root = cache_dir.clone().unwrap_or_else(Store::default_root);
    let root = std::path::absolute(&root).unwrap_or(root);
    if !root.exists() {
        println!("{}", root.display());
        println!("  no store here yet (nothing cached)");
        println!("  total          {:>10}", render::bytes(0));
        return exit::SUCCESS;
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
            exit::SUCCESS
        }
        Err(error) => {
            render::error(&format!("cannot measure the store: {error}"), &[]);
            exit::ENVIRONMENT
        }
    }
}

pub fn cache_verify(cache_dir: Option<PathBuf>, repair: bool) -> u8 {
    let root = cache_dir.clone().unwrap_or_else(Store::default_root);
    let root = std::path::absolute(&root).unwrap_or(root);
    if !root.exists() {
        println!("{}: no store here yet, nothing to verify", root.display());
        return exit::SUCCESS;
    }
    let store = match open_store(cache_dir) {
        Ok(store) => store,
        Err(code) => return code,
    };
    let report = match store.verify(repair) {
        Ok(report) => report,
        Err(error) => {
            render::error(&format!("cannot verify the store: {error}"), &[]);
            return exit::ENVIRONMENT;
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
        exit::SUCCESS
    } else {
        if !repair {
            eprintln!("run `graphbuild cache verify --repair` to remove them");
        }
        exit::BUILD_FAILED
    }
}

pub fn cache_prune(cache_dir: Option<PathBuf>, keep_bytes: &str) -> u8 {
    let Some(keep) = graphbuild_engine::unpack::parse_size(keep_bytes) else {
        render::error(
            &format!("`--keep-bytes {keep_bytes}` is not a size"),
            &["write a number of bytes, or with K, M, G: 10G"],
        );
        return exit::INVALID_INPUT;
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
            exit::SUCCESS
        }
        Err(error) => {
            render::error(&format!("cannot prune the store: {error}"), &[]);
            exit::ENVIRONMENT
        }
    }
}

pub fn cache_serve(
    listen: &str,
    dir: PathBuf,
    max_size: Option<&str>,
    tokens: Option<PathBuf>,
    allow_anonymous_read: bool,
) -> u8 {
    let Ok(listen) = listen.parse() else {
        render::error(
            &format!("`--listen {listen}` is not an address"),
            &["write HOST:PORT, for example 127.0.0.1:7070"],
        );
        return exit::INVALID_INPUT;
    };
    let max_size = match max_size.map(graphbuild_engine::unpack::parse_size) {
        Some(None) => {
            render::error(
                "`--max-size` is not a size",
                &["write a number of bytes, or with K, M, G: 50G"],
            );
            return exit::INVALID_INPUT;
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
            return exit::ENVIRONMENT;
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
        Ok(()) => exit::SUCCESS,
        Err(error) => {
            let help = miette::Diagnostic::help(&error).map(|help| help.to_string());
            render::error(
                &format!("the cache server stopped: {error}"),
                &help.as_deref().into_iter().collect::<Vec<_>>(),
            );
            exit::ENVIRONMENT
        }
    }
}

fn tokio_runtime() -> std::io::Result<tokio::runtime::Runtime> {
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
