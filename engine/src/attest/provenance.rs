//! The SLSA provenance v1 predicate of one platform of an image.
//!
//! Everything in it comes from data that is already part of the build's keys or outputs —
//! the build files' text, the context files the copies read, the resolved base-image
//! digests, the request's args and the steps' keys — so it is as reproducible as the image:
//! no time, host or absolute path is recorded. The layout of the fields follows BuildKit's
//! (`externalParameters.configSource` and `.request`, `resolvedDependencies` with the base
//! images as Docker package URLs), with graphbuild's own build type.

use std::collections::BTreeSet;

use graphbuild_lang::ir::Sources;
use graphbuild_lang::platform::Platform;
use serde_json::{Value, json};

use crate::digest::Digest;
use crate::plan::{Base, ImagePlan, Plan};
use crate::resolve::BaseSource;

use super::{BuildRequest, ProvenanceMode, docker_purl};

/// What the build type URI names: the meaning of this predicate's parameters, documented in
/// `docs/attestations.md`.
pub(crate) fn build_type() -> String {
    format!(
        "{}/blob/main/docs/attestations.md#build-type-v1",
        env!("CARGO_PKG_REPOSITORY")
    )
}

pub(crate) fn builder_id() -> String {
    format!(
        "{}@v{}",
        env!("CARGO_PKG_REPOSITORY"),
        env!("CARGO_PKG_VERSION")
    )
}

pub(crate) struct Input<'a> {
    pub(crate) mode: ProvenanceMode,
    pub(crate) request: &'a BuildRequest,
    pub(crate) plan: &'a Plan,
    pub(crate) sources: &'a Sources,
    pub(crate) image: &'a ImagePlan,
    pub(crate) platform: &'a Platform,
    /// The node that builds this platform of the image.
    pub(crate) node: usize,
    pub(crate) source_date_epoch: i64,
    /// `oci` or `docker`; `gzip`, `zstd` or `none`.
    pub(crate) format: &'a str,
    pub(crate) compression: &'a str,
}

/// The nodes `node` is built from, itself included, in id order.
fn reachable(plan: &Plan, node: usize) -> Vec<usize> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![node];
    while let Some(id) = stack.pop() {
        if seen.insert(id) {
            stack.extend(plan.nodes[id].deps.iter().copied());
        }
    }
    seen.into_iter().collect()
}

fn sha256(bytes: &[u8]) -> Value {
    json!({ "sha256": Digest::of(bytes).hex() })
}

pub(crate) fn predicate(input: &Input<'_>) -> Value {
    let plan = input.plan;
    let nodes = reachable(plan, input.node);

    // The build files: the first is the one the build was started from. Each is named
    // relative to its directory (no path of this machine), else as written (`std:go`).
    let files = &input.sources.files;
    let root_dir = files
        .first()
        .and_then(|file| file.path.as_deref())
        .and_then(std::path::Path::parent);
    let file_uri = |file: &graphbuild_lang::ir::Source| -> String {
        match (&file.path, root_dir) {
            (Some(path), Some(root)) => match path.strip_prefix(root) {
                Ok(relative) => relative.display().to_string(),
                Err(_) => file.name.clone(),
            },
            _ => file.name.clone(),
        }
    };
    // The build file itself by its name in its directory (`images.kdl`, `Dockerfile`), as
    // BuildKit names the Dockerfile.
    let config_source = files.first().map(|file| {
        let name = file
            .path
            .as_deref()
            .unwrap_or(std::path::Path::new(&file.name));
        json!({
            "uri": name
                .file_name()
                .map_or_else(|| file.name.clone(), |name| name.to_string_lossy().into_owned()),
            "digest": sha256(file.text.as_bytes()),
        })
    });

    let mut dependencies: Vec<Value> = Vec::new();
    // Base images, once each (by reference and digest).
    let mut bases = BTreeSet::new();
    for &id in &nodes {
        if let Base::Image(base) = &plan.nodes[id].base {
            let uri = match &base.source {
                BaseSource::Registry { .. } => docker_purl(&base.reference, Some(&base.platform))
                    .unwrap_or_else(|| base.reference.clone()),
                BaseSource::OciLayout { .. } => base.reference.clone(),
            };
            bases.insert((uri, base.manifest_digest.hex()));
        }
    }
    for (uri, digest) in bases {
        dependencies.push(json!({ "uri": uri, "digest": { "sha256": digest } }));
    }
    // The other build files (imports, modules of the standard library).
    for file in files.iter().skip(1) {
        dependencies.push(json!({
            "uri": file_uri(file),
            "digest": sha256(file.text.as_bytes()),
        }));
    }
    // The build context: the files the copies read, by path, content digest and mode.
    // (The canonical JSON of a map of each path to the set of values it was read with,
    // written from the steps' items: see `file_inputs::context_listing`.)
    let (listing, paths) = crate::plan::file_inputs::context_listing_digest(
        nodes.iter().flat_map(|&id| plan.nodes[id].steps.iter()),
    );
    if paths > 0 {
        dependencies.push(json!({
            "uri": "context",
            "digest": { "sha256": listing.hex() },
            "annotations": { "files": paths },
        }));
    }

    // The graph: every node this platform is built from, with its steps' keys.
    let graph: Vec<Value> = nodes
        .iter()
        .map(|&id| {
            let node = &plan.nodes[id];
            let steps: Vec<Value> = node
                .steps
                .iter()
                .map(|step| match input.mode {
                    ProvenanceMode::Min => json!(step.key.hex()),
                    ProvenanceMode::Max => json!({
                        "key": step.key.hex(),
                        "description": step.description,
                        "location": input.sources.describe(step.at),
                    }),
                })
                .collect();
            json!({
                "stage": node.stage,
                "platform": node.platform.to_string(),
                "key": node.key.hex(),
                "steps": steps,
            })
        })
        .collect();

    let mut request = json!({
        "frontend": input.request.frontend,
        "image": input.image.name,
        "platform": input.platform.to_string(),
    });
    if !input.request.args.is_empty() {
        request["args"] = json!(input.request.args);
    }
    if !input.request.secrets.is_empty() {
        let ids: Vec<Value> = input
            .request
            .secrets
            .iter()
            .map(|id| json!({ "id": id }))
            .collect();
        request["secrets"] = json!(ids);
    }
    if !input.image.tags.is_empty() {
        request["tags"] = json!(input.image.tags);
    }

    let mut external = json!({ "request": request });
    if let Some(config_source) = config_source {
        external["configSource"] = config_source;
    }
    let mut internal = json!({
        "provenanceMode": match input.mode {
            ProvenanceMode::Min => "min",
            ProvenanceMode::Max => "max",
        },
        "keyFormat": crate::key::FORMAT_VERSION,
        "sourceDateEpoch": input.source_date_epoch,
        "manifestFormat": input.format,
        "compression": input.compression,
        "graph": graph,
    });
    if input.mode == ProvenanceMode::Max {
        let texts: Vec<Value> = files
            .iter()
            .map(|file| json!({ "name": file_uri(file), "text": file.text.as_str() }))
            .collect();
        internal["sources"] = json!(texts);
    }
    json!({
        "buildDefinition": {
            "buildType": build_type(),
            "externalParameters": external,
            "internalParameters": internal,
            "resolvedDependencies": dependencies,
        },
        "runDetails": {
            "builder": {
                "id": builder_id(),
                "version": { "graphbuild": env!("CARGO_PKG_VERSION") },
            },
        },
    })
}
