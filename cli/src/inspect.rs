//! `graphbuild inspect`: what an image layout or a registry image holds, per platform.

use std::path::Path;

use graphbuild_engine::oci::{self, ImageIndex, ImageManifest, OciLayout};
use graphbuild_engine::reference::Reference;
use graphbuild_engine::registry::{ClientOptions, RegistryClient};
use serde_json::json;

use crate::render;
use crate::{CliError, ExitStatus};

/// Uncompressed size of a layer blob (gzip, zstd or plain tar), read as a build reads it.
fn uncompressed_size(layout: &OciLayout, descriptor: &oci::Descriptor) -> Option<u64> {
    graphbuild_engine::decompress::uncompressed_size(&layout.blob_path(&descriptor.digest)).ok()
}

fn describe(layout: &OciLayout, tag: Option<&str>) -> Result<serde_json::Value, oci::OciError> {
    let top = layout.resolve(tag)?;
    let index_manifests = if oci::media::is_index(&top.media_type) {
        let index: ImageIndex = layout.read_json(&top, "image index")?;
        index.manifests
    } else {
        vec![top.clone()]
    };
    let mut platforms = Vec::new();
    for descriptor in &index_manifests {
        if oci::media::is_index(&descriptor.media_type) || descriptor.is_attestation() {
            continue;
        }
        let manifest: ImageManifest = layout.read_json(descriptor, "image manifest")?;
        let config = layout.read_config(&manifest)?;
        let compressed: u64 = manifest.layers.iter().map(|layer| layer.size).sum();
        let uncompressed: Option<u64> = manifest
            .layers
            .iter()
            .map(|layer| uncompressed_size(layout, layer))
            .sum::<Option<u64>>();
        let platform = descriptor
            .platform
            .clone()
            .unwrap_or_else(|| config.platform());
        platforms.push(json!({
            "platform": platform.to_string(),
            "manifest_digest": descriptor.digest.to_string(),
            "layers": manifest.layers.len(),
            "layer_media_types": manifest.layers.iter().map(|layer| layer.media_type.clone()).collect::<Vec<_>>(),
            "compressed_size": compressed,
            "uncompressed_size": uncompressed,
            "config": {
                "entrypoint": config.config.entrypoint,
                "cmd": config.config.cmd,
                "user": config.config.user,
                "workdir": config.config.working_dir,
                "env": config.config.env,
                "labels": config.config.labels,
            },
        }));
    }
    Ok(json!({
        "tag": tag,
        "digest": top.digest.to_string(),
        "media_type": top.media_type,
        "platforms": platforms,
    }))
}

/// A registry image: the same description as for a layout, fetched over the distribution API.
/// Layers are downloaded to a temporary directory to measure their uncompressed size.
fn describe_registry(
    client: &RegistryClient,
    reference: &Reference,
) -> Result<serde_json::Value, String> {
    let text = |error: graphbuild_engine::registry::RegistryError| match miette::Diagnostic::help(
        &error,
    ) {
        Some(help) => format!("{error}\nhint: {help}"),
        None => error.to_string(),
    };
    let top = client.resolve(reference).map_err(text)?;
    let descriptors: Vec<oci::Descriptor> = if top.is_index() {
        let index: ImageIndex =
            serde_json::from_slice(&top.bytes).map_err(|error| error.to_string())?;
        index
            .manifests
            .into_iter()
            .filter(|descriptor| !oci::media::is_index(&descriptor.media_type))
            .collect()
    } else {
        vec![top.descriptor()]
    };
    let scratch = tempfile::tempdir().map_err(|error| error.to_string())?;
    let mut platforms = Vec::new();
    for descriptor in descriptors {
        if descriptor
            .platform
            .as_ref()
            .is_some_and(|platform| platform.os == "unknown")
        {
            continue; // attestation manifests
        }
        let manifest_bytes = if descriptor.digest == top.digest {
            top.bytes.clone()
        } else {
            client
                .resolve(&reference.with_digest(descriptor.digest))
                .map_err(text)?
                .bytes
        };
        let manifest: ImageManifest =
            serde_json::from_slice(&manifest_bytes).map_err(|error| error.to_string())?;
        let config_path = scratch.path().join(manifest.config.digest.hex());
        client
            .fetch_blob(
                reference,
                &manifest.config.digest,
                manifest.config.size,
                &config_path,
            )
            .map_err(text)?;
        let config: oci::ImageConfigFile = serde_json::from_slice(
            &std::fs::read(&config_path).map_err(|error| error.to_string())?,
        )
        .map_err(|error| error.to_string())?;
        let mut uncompressed = Some(0u64);
        for layer in &manifest.layers {
            let path = scratch.path().join(layer.digest.hex());
            client
                .fetch_blob(reference, &layer.digest, layer.size, &path)
                .map_err(text)?;
            uncompressed = uncompressed
                .zip(graphbuild_engine::decompress::uncompressed_size(&path).ok())
                .map(|(a, b)| a + b);
            let _ = std::fs::remove_file(&path);
        }
        let platform = descriptor
            .platform
            .clone()
            .unwrap_or_else(|| config.platform());
        platforms.push(json!({
            "platform": platform.to_string(),
            "manifest_digest": descriptor.digest.to_string(),
            "layers": manifest.layers.len(),
            "layer_media_types": manifest.layers.iter().map(|layer| layer.media_type.clone()).collect::<Vec<_>>(),
            "compressed_size": manifest.layers.iter().map(|layer| layer.size).sum::<u64>(),
            "uncompressed_size": uncompressed,
            "config": {
                "entrypoint": config.config.entrypoint,
                "cmd": config.config.cmd,
                "user": config.config.user,
                "workdir": config.config.working_dir,
                "env": config.config.env,
                "labels": config.config.labels,
            },
        }));
    }
    Ok(json!({
        "tag": reference.tag,
        "digest": top.digest.to_string(),
        "media_type": top.media_type,
        "platforms": platforms,
    }))
}

fn inspect_registry(
    target: &str,
    json_format: bool,
    insecure_registries: &[String],
) -> Result<ExitStatus, CliError> {
    let reference = Reference::parse(target).map_err(|error| {
        CliError::invalid_input(format!(
            "`{target}` is neither an OCI layout on disk nor an image reference: {error}"
        ))
        .hint(
            "give a layout directory (PATH or PATH:TAG) or a reference like registry.example.com/app:1.0",
        )
    })?;
    let client = RegistryClient::new(ClientOptions {
        insecure_registries: insecure_registries.to_vec(),
        ..Default::default()
    });
    let image = describe_registry(&client, &reference).map_err(|message| {
        CliError::environment(format!("cannot inspect `{reference}`: {message}"))
    })?;
    if json_format {
        let value = json!({ "reference": reference.to_string(), "tags": [reference.tag], "images": [image] });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(ExitStatus::Success);
    }
    let tags: Vec<String> = reference.tag.iter().cloned().collect();
    print!("{}", safe(&text(&reference.to_string(), &tags, &[image])));
    Ok(ExitStatus::Success)
}

pub(crate) fn inspect(
    target: &str,
    json_format: bool,
    insecure_registries: &[String],
) -> Result<ExitStatus, CliError> {
    // PATH or PATH:TAG (a tag never contains '/').
    let (path, tag) = match target.rsplit_once(':') {
        Some((path, tag)) if !tag.contains('/') && Path::new(path).is_dir() => (path, Some(tag)),
        _ => (target, None),
    };
    if !Path::new(path).exists() {
        return inspect_registry(target, json_format, insecure_registries);
    }
    let invalid = |error| CliError::report(ExitStatus::InvalidInput, error);
    let layout = OciLayout::open(Path::new(path)).map_err(invalid)?;
    let tags: Vec<String> = match tag {
        Some(tag) => vec![tag.to_string()],
        None => layout.tags(),
    };
    let mut images = Vec::new();
    if tags.is_empty() {
        images.push(describe(&layout, None).map_err(invalid)?);
    }
    for tag in &tags {
        images.push(describe(&layout, Some(tag)).map_err(invalid)?);
    }
    if json_format {
        let value = json!({ "layout": path, "tags": layout.tags(), "images": images });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(ExitStatus::Success);
    }
    print!("{}", safe(&text(path, &layout.tags(), &images)));
    Ok(ExitStatus::Success)
}

/// `gzip`, `zstd` or `uncompressed` from a layer media type.
fn compression(media_type: &str) -> &'static str {
    if media_type.ends_with("+zstd") {
        "zstd"
    } else if media_type.ends_with("+gzip")
        || media_type.ends_with(".tar.gzip")
        || media_type.ends_with("rootfs.diff.tar.gzip")
    {
        "gzip"
    } else {
        "uncompressed"
    }
}

fn plural(count: u64, one: &str, many: &str) -> String {
    format!("{count} {}", if count == 1 { one } else { many })
}

/// The text form: the layout, then per distinct image (tags pointing at the same digest are
/// listed together) a line per platform and its config summary.
/// The text report with control characters escaped line by line: labels, env and commands
/// come from the image, which may be anyone's.
fn safe(text: &str) -> String {
    text.lines()
        .map(|line| crate::progress::sanitize(line) + "\n")
        .collect()
}

fn text(path: &str, all_tags: &[String], images: &[serde_json::Value]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{path}");
    let _ = writeln!(
        out,
        "  tags: {}",
        if all_tags.is_empty() {
            "(none)".to_string()
        } else {
            all_tags.join(", ")
        }
    );
    // Distinct digests in first-seen order, with every tag that names them.
    let mut groups: Vec<(&str, Vec<&str>, &serde_json::Value)> = Vec::new();
    for image in images {
        let digest = image["digest"].as_str().unwrap_or_default();
        let tag = image["tag"].as_str();
        match groups.iter_mut().find(|(seen, _, _)| *seen == digest) {
            Some((_, tags, _)) => tags.extend(tag),
            None => groups.push((digest, tag.into_iter().collect(), image)),
        }
    }
    for (digest, tags, image) in groups {
        let names = if tags.is_empty() {
            "(untagged)".to_string()
        } else {
            tags.join(", ")
        };
        let kind = if image["media_type"]
            .as_str()
            .is_some_and(|media| media.contains("index"))
        {
            "index"
        } else {
            "manifest"
        };
        let _ = writeln!(out, "\n  {names}");
        let _ = writeln!(out, "    {kind} {digest}");
        for platform in image["platforms"].as_array().into_iter().flatten() {
            let uncompressed = platform["uncompressed_size"]
                .as_u64()
                .map(render::bytes)
                .unwrap_or_else(|| "?".into());
            let mut compressions: Vec<&str> = platform["layer_media_types"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|media| media.as_str())
                .map(compression)
                .collect();
            compressions.dedup();
            let _ = writeln!(
                out,
                "\n    {}",
                platform["platform"].as_str().unwrap_or_default()
            );
            let _ = writeln!(
                out,
                "      manifest   {}",
                platform["manifest_digest"].as_str().unwrap_or_default()
            );
            let _ = writeln!(
                out,
                "      layers     {} ({}), {} compressed, {} uncompressed",
                plural(platform["layers"].as_u64().unwrap_or(0), "layer", "layers"),
                compressions.join(", "),
                render::bytes(platform["compressed_size"].as_u64().unwrap_or(0)),
                uncompressed,
            );
            let config = &platform["config"];
            let list = |value: &serde_json::Value| {
                value
                    .as_array()
                    .filter(|items| !items.is_empty())
                    .map(|items| serde_json::to_string(items).unwrap_or_default())
            };
            if let Some(entrypoint) = list(&config["entrypoint"]) {
                let _ = writeln!(out, "      entrypoint {entrypoint}");
            }
            if let Some(cmd) = list(&config["cmd"]) {
                let _ = writeln!(out, "      cmd        {cmd}");
            }
            let user = config["user"]
                .as_str()
                .filter(|user| !user.is_empty())
                .unwrap_or("(root)");
            let _ = writeln!(out, "      user       {user}");
            if let Some(workdir) = config["workdir"].as_str().filter(|dir| !dir.is_empty()) {
                let _ = writeln!(out, "      workdir    {workdir}");
            }
            for env in config["env"].as_array().into_iter().flatten() {
                let _ = writeln!(out, "      env        {}", env.as_str().unwrap_or_default());
            }
            if let Some(labels) = config["labels"].as_object() {
                for (key, value) in labels {
                    let _ = writeln!(
                        out,
                        "      label      {key}={}",
                        value.as_str().unwrap_or_default()
                    );
                }
            }
        }
    }
    out
}
