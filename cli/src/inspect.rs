//! `graphbuild inspect`: what an image layout holds, per platform.

use std::io::Read;
use std::path::Path;

use graphbuild_engine::oci::{self, ImageIndex, ImageManifest, OciLayout};
use serde_json::json;

use crate::exit;
use crate::render;

/// Uncompressed size of a layer blob (gzip, zstd or plain tar).
fn uncompressed_size(layout: &OciLayout, descriptor: &oci::Descriptor) -> Option<u64> {
    let file = std::fs::File::open(layout.blob_path(&descriptor.digest)).ok()?;
    let mut reader = std::io::BufReader::new(file);
    let mut magic = [0u8; 4];
    let mut head = Vec::new();
    let read = (&mut reader).take(4).read_to_end(&mut head).ok()?;
    magic[..read].copy_from_slice(&head);
    let chained = std::io::Cursor::new(head).chain(reader);
    let mut sink = std::io::sink();
    if magic.starts_with(&[0x1f, 0x8b]) {
        std::io::copy(&mut flate2::read::GzDecoder::new(chained), &mut sink).ok()
    } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
        std::io::copy(&mut ruzstd::decoding::StreamingDecoder::new(chained).ok()?, &mut sink).ok()
    } else {
        Some(descriptor.size)
    }
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
        if oci::media::is_index(&descriptor.media_type) {
            continue;
        }
        let manifest: ImageManifest = layout.read_json(descriptor, "image manifest")?;
        let config = layout.read_config(&manifest)?;
        let compressed: u64 = manifest.layers.iter().map(|layer| layer.size).sum();
        let uncompressed: Option<u64> =
            manifest.layers.iter().map(|layer| uncompressed_size(layout, layer)).sum::<Option<u64>>();
        let platform = descriptor.platform.clone().unwrap_or_else(|| config.platform());
        platforms.push(json!({
            "platform": platform.to_string(),
            "manifest_digest": descriptor.digest.to_string(),
            "layers": manifest.layers.len(),
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

pub fn inspect(target: &str, json_format: bool) -> u8 {
    // PATH or PATH:TAG (a tag never contains '/').
    let (path, tag) = match target.rsplit_once(':') {
        Some((path, tag)) if !tag.contains('/') && Path::new(path).is_dir() => (path, Some(tag)),
        _ => (target, None),
    };
    let layout = match OciLayout::open(Path::new(path)) {
        Ok(layout) => layout,
        Err(error) => {
            if !Path::new(path).exists() && (target.contains('/') || target.contains(':')) {
                render::error(
                    &format!("`{target}` is not an OCI layout on disk"),
                    &["inspect an OCI layout directory (PATH or PATH:TAG); registry references need `skopeo inspect docker://REF` for now"],
                );
            } else {
                render::diagnostic(&error);
            }
            return exit::INVALID_INPUT;
        }
    };
    let tags: Vec<String> = match tag {
        Some(tag) => vec![tag.to_string()],
        None => layout.tags(),
    };
    let mut images = Vec::new();
    if tags.is_empty() {
        match describe(&layout, None) {
            Ok(value) => images.push(value),
            Err(error) => {
                render::diagnostic(&error);
                return exit::INVALID_INPUT;
            }
        }
    }
    for tag in &tags {
        match describe(&layout, Some(tag)) {
            Ok(value) => images.push(value),
            Err(error) => {
                render::diagnostic(&error);
                return exit::INVALID_INPUT;
            }
        }
    }
    if json_format {
        let value = json!({ "layout": path, "tags": layout.tags(), "images": images });
        println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
        return exit::SUCCESS;
    }
    println!("{path}");
    println!("  tags: {}", if layout.tags().is_empty() { "(none)".to_string() } else { layout.tags().join(", ") });
    let mut seen = std::collections::HashSet::new();
    for image in &images {
        let digest = image["digest"].as_str().unwrap_or_default();
        if !seen.insert(digest.to_string()) {
            continue;
        }
        println!("  {}  {digest}", image["tag"].as_str().unwrap_or("(untagged)"));
        for platform in image["platforms"].as_array().into_iter().flatten() {
            let uncompressed = platform["uncompressed_size"].as_u64().map(render::bytes).unwrap_or_else(|| "?".into());
            println!(
                "    {:<16} {}  {} layers  {} compressed, {} uncompressed",
                platform["platform"].as_str().unwrap_or_default(),
                platform["manifest_digest"].as_str().unwrap_or_default(),
                platform["layers"],
                render::bytes(platform["compressed_size"].as_u64().unwrap_or(0)),
                uncompressed,
            );
            let config = &platform["config"];
            let list = |value: &serde_json::Value| {
                value.as_array().filter(|items| !items.is_empty()).map(|items| serde_json::to_string(items).unwrap_or_default())
            };
            if let Some(entrypoint) = list(&config["entrypoint"]) {
                println!("      entrypoint {entrypoint}");
            }
            if let Some(cmd) = list(&config["cmd"]) {
                println!("      cmd        {cmd}");
            }
            if let Some(user) = config["user"].as_str() {
                println!("      user       {user}");
            }
            if let Some(workdir) = config["workdir"].as_str() {
                println!("      workdir    {workdir}");
            }
            for env in config["env"].as_array().into_iter().flatten() {
                println!("      env        {}", env.as_str().unwrap_or_default());
            }
        }
    }
    exit::SUCCESS
}
