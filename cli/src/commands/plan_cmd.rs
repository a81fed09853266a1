//! `graphbuild plan`: the graph as text, JSON or dot, and `--explain`.

use graphbuild_engine::explain;
use graphbuild_engine::plan::{Base, Op, Plan, TestPlan};
use graphbuild_engine::store::Store;
use graphbuild_lang::ir::Project;
use serde_json::json;

use crate::{CliError, ExitStatus};
use crate::{PlanArgs, PlanFormat};

use super::*;

/// Whether a node's result is in the store: its last filesystem step has a record.
pub(super) fn node_cached(plan: &Plan, node: usize, store: Option<&Store>) -> Option<bool> {
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

pub(crate) fn plan(args: PlanArgs) -> Result<ExitStatus, CliError> {
    let resolver = resolver(&args.select, false, manifest_store(&args.select, false))?;
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
    let loaded = load(&args.select, store.as_ref(), &resolver)?;
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
        let test_explanations: Vec<_> = plan
            .tests
            .iter()
            .map(|test| match &store {
                Some(store) => explain::explain_test(store, plan, test),
                None if test.pending => explain::pending(plan, &plan.nodes[test.node])
                    .unwrap_or(explain::Explanation::NeverBuilt),
                None => explain::Explanation::NeverBuilt,
            })
            .collect();
        if let PlanFormat::Json = args.format {
            let mut value = plan_json(plan, &loaded.project, store.as_ref());
            if let Some(nodes) = value["nodes"].as_array_mut() {
                for (node, explanation) in nodes.iter_mut().zip(&explanations) {
                    node["explain"] = serde_json::to_value(explanation).unwrap_or_default();
                }
            }
            if let Some(tests) = value["tests"].as_array_mut() {
                for (test, explanation) in tests.iter_mut().zip(&test_explanations) {
                    test["explain"] = serde_json::to_value(explanation).unwrap_or_default();
                }
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
        } else {
            print!("{}", explain_text(plan, &explanations));
            print!("{}", explain_tests_text(plan, &test_explanations));
        }
        return Ok(ExitStatus::Success);
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
    Ok(ExitStatus::Success)
}

pub(super) fn node_id(id: usize) -> String {
    format!("n{id}")
}

pub(super) fn test_id(id: usize) -> String {
    format!("t{id}")
}

/// Whether an image test passed before with the same key; `None` when unknown.
fn test_cached(test: &TestPlan, store: Option<&Store>) -> Option<bool> {
    let store = store?;
    (!test.pending).then(|| explain::test_cached(store, test))
}

pub(super) fn base_json(base: &Base) -> serde_json::Value {
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
pub(super) fn plan_json(
    plan: &Plan,
    project: &Project,
    store: Option<&Store>,
) -> serde_json::Value {
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
    let tests: Vec<_> = plan
        .tests
        .iter()
        .map(|test| {
            json!({
                "id": test_id(test.id),
                "image": test.image,
                "platform": test.platform.to_string(),
                "name": test.name,
                "node": node_id(test.node),
                "argv": test.op.argv,
                "key": (!test.pending).then(|| test.key.to_string()),
                "pending": test.pending,
                "location": project.sources.describe(test.at),
                "cached": test_cached(test, store),
            })
        })
        .collect();
    json!({ "version": 1, "nodes": nodes, "images": images, "tests": tests, "unresolved": unresolved })
}

/// Shown for each `insecure=#true` step by `plan` and when it runs.
pub(super) const INSECURE_WARNING: &str = graphbuild_engine::build::INSECURE_WARNING;

pub(super) fn plan_text(plan: &Plan, store: Option<&Store>) -> String {
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
    if !plan.tests.is_empty() {
        let _ = writeln!(
            out,
            "{} image test{}",
            plan.tests.len(),
            if plan.tests.len() == 1 { "" } else { "s" }
        );
    }
    for test in &plan.tests {
        let status = match test_cached(test, store) {
            Some(true) => "  cached",
            Some(false) | None => "",
        };
        let _ = writeln!(
            out,
            "  {:<4} {} · {} · test {}  after {}  {}{}",
            test_id(test.id),
            test.image,
            test.platform,
            test.name,
            node_id(test.node),
            if test.pending {
                "pending".to_string()
            } else {
                test.key.short()
            },
            status
        );
        let _ = writeln!(out, "         {}", truncate(&test.op.argv.join(" "), 100));
    }
    out
}

fn explain_tests_text(plan: &Plan, explanations: &[explain::Explanation]) -> String {
    let mut out = String::new();
    for (test, explanation) in plan.tests.iter().zip(explanations) {
        let heading = format!("{} · {} · test {}", test.image, test.platform, test.name);
        match explanation {
            // A test runs whole: there is no step to run from.
            explain::Explanation::Changed { reasons, .. } => {
                out.push_str(&format!(
                    "{heading}: will run: changed since it last passed\n"
                ));
                for reason in reasons {
                    out.push_str(&format!("    {reason}\n"));
                }
            }
            explain::Explanation::NeverBuilt => {
                out.push_str(&format!("{heading}: will run: never passed\n"));
            }
            other => out.push_str(&explanation_text(&heading, other)),
        }
    }
    out
}

pub(super) fn explain_text(plan: &Plan, explanations: &[explain::Explanation]) -> String {
    let mut out = String::new();
    for id in plan.topological_order() {
        let node = &plan.nodes[id];
        let heading = format!("{} · {}", node.stage, node.platform);
        out.push_str(&explanation_text(&heading, &explanations[id]));
    }
    out
}

/// `HEADING: why`, and the reasons below, indented.
fn explanation_text(heading: &str, explanation: &explain::Explanation) -> String {
    use std::fmt::Write;
    let mut out = format!("{heading}: ");
    match explanation {
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
    out
}

pub(super) fn truncate(text: &str, width: usize) -> String {
    let single_line = text.replace('\n', " ");
    if single_line.chars().count() <= width {
        single_line
    } else {
        let cut: String = single_line.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

pub(super) fn plan_dot(plan: &Plan) -> String {
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
    for test in &plan.tests {
        let label = format!("test {}\\n{}", test.name, test.platform).replace('"', "\\\"");
        let _ = writeln!(
            out,
            "  {} [shape=ellipse, label=\"{label}\"];",
            test_id(test.id)
        );
        let _ = writeln!(out, "  {} -> {};", node_id(test.node), test_id(test.id));
    }
    out.push_str("}\n");
    out
}
