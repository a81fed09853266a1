//! `run`'s outputs once the images are built: `--output` (an OCI layout directory, or
//! buildx's `type=…,dest=…` form), the architecture check (`--strict`), `--load` and
//! `--metadata-file`. The exporters themselves are in `graphbuild_engine::exporter`.

use std::path::{Path, PathBuf};
use std::process::Command;

use graphbuild_engine::events::ImageSummary;
use graphbuild_engine::exporter;
use graphbuild_engine::oci::{OciLayout, OciPlatform};
use graphbuild_engine::plan::{ImagePlan, Plan};
use graphbuild_lang::platform::Platform;

use crate::render;
use crate::{CliError, ExitStatus};

/// One `--output` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum OutputSpec {
    /// `DIR` or `type=oci,dest=DIR`: one OCI layout per image in `DIR/<image name>`.
    Layouts(PathBuf),
    /// An image's own `output "type=oci,dest=DIR"`: its layout in `DIR` itself.
    LayoutAt(PathBuf),
    /// `type=local,dest=DIR`: the image's filesystem.
    Local(PathBuf),
    /// `type=tar,dest=FILE`: the image's filesystem as a tar.
    Tar(PathBuf),
    /// `type=oci,dest=FILE.tar`: the OCI layout as a tar (`oci-archive:`).
    OciArchive(PathBuf),
}

const TYPES: &str = "local, tar or oci";

/// Parses `--output`: a plain value is a directory for the layouts, a value with `type=` is
/// buildx's CSV form (`type=local,dest=out`).
pub(super) fn parse_output(value: &str) -> Result<OutputSpec, String> {
    if !value.contains("type=") {
        if value.is_empty() {
            return Err("--output needs a directory, or type=TYPE,dest=PATH".into());
        }
        return Ok(OutputSpec::Layouts(PathBuf::from(value)));
    }
    let mut kind = None;
    let mut dest = None;
    for part in value.split(',') {
        match part.split_once('=') {
            Some(("type", v)) => kind = Some(v.to_string()),
            Some(("dest", v)) if !v.is_empty() => dest = Some(PathBuf::from(v)),
            _ => {
                return Err(format!(
                    "--output `{value}`: cannot read `{part}`; write type=TYPE,dest=PATH (TYPE: {TYPES})"
                ));
            }
        }
    }
    let kind = kind.unwrap_or_default();
    // buildx's types graphbuild reaches another way.
    let instead = match kind.as_str() {
        "docker" => Some("--load (into Docker or Podman)"),
        "registry" | "image" => Some("--push, or push=#true on the image"),
        "cacheonly" => Some("--cache-to"),
        _ => None,
    };
    if let Some(instead) = instead {
        return Err(format!(
            "--output `{value}`: type `{kind}` is not an output here; use {instead}"
        ));
    }
    if !matches!(kind.as_str(), "local" | "tar" | "oci") {
        return Err(format!(
            "--output `{value}`: unknown type `{kind}`; graphbuild writes {TYPES}"
        ));
    }
    let Some(dest) = dest else {
        return Err(format!(
            "--output `{value}`: dest is missing; write type={kind},dest=PATH"
        ));
    };
    match kind.as_str() {
        "local" => Ok(OutputSpec::Local(dest)),
        "tar" => Ok(OutputSpec::Tar(dest)),
        "oci" if dest.extension().is_some_and(|extension| extension == "tar") => {
            Ok(OutputSpec::OciArchive(dest))
        }
        "oci" => Ok(OutputSpec::Layouts(dest)),
        other => Err(format!(
            "--output `{value}`: unknown type `{other}`; graphbuild writes {TYPES}"
        )),
    }
}

/// The flags' outputs, parsed; the layouts' directory (when one is given) comes first.
pub(super) struct Outputs {
    pub layouts: Option<PathBuf>,
    pub exports: Vec<OutputSpec>,
}

pub(super) fn parse_outputs(values: &[String]) -> Result<Outputs, CliError> {
    let mut layouts = None;
    let mut exports = Vec::new();
    for value in values {
        match parse_output(value) {
            Ok(OutputSpec::Layouts(dir)) => {
                if layouts.is_some() {
                    return Err(CliError::invalid_input(
                        "--output: two directories for the OCI layouts",
                    ));
                }
                layouts = Some(dir);
            }
            Ok(spec) => exports.push(spec),
            Err(message) => {
                return Err(
                    CliError::invalid_input(message).hint(format!("TYPE is one of {TYPES}"))
                );
            }
        }
    }
    if values.is_empty() {
        layouts = Some(PathBuf::from("graphbuild-out"));
    }
    Ok(Outputs { layouts, exports })
}

/// The exporters of each image: the flags' (for every image) and its own `output "type=…"`.
/// Files (tar, oci-archive) take one image: with several images, an error before building.
pub(super) fn exports_per_image(
    plan: &Plan,
    root_dir: &Path,
    exports: &[OutputSpec],
) -> Result<Vec<Vec<OutputSpec>>, CliError> {
    let several = plan.images.len() > 1;
    let mut per_image = Vec::new();
    for image in &plan.images {
        let mut specs = Vec::new();
        for spec in exports {
            specs.push(match spec {
                OutputSpec::Local(dir) if several => OutputSpec::Local(dir.join(&image.name)),
                OutputSpec::Tar(file) | OutputSpec::OciArchive(file) if several => {
                    return Err(CliError::invalid_input(format!(
                        "--output: {} is one file, and {} images are selected",
                        file.display(),
                        plan.images.len()
                    ))
                    .hint("select one image: `graphbuild run FILE IMAGE`, or use type=local"));
                }
                other => other.clone(),
            });
        }
        if let Some(value) = &image.export {
            match parse_output(value) {
                Ok(OutputSpec::Layouts(dir) | OutputSpec::LayoutAt(dir)) => {
                    specs.push(OutputSpec::LayoutAt(root_dir.join(dir)))
                }
                Ok(OutputSpec::Local(dir)) => specs.push(OutputSpec::Local(root_dir.join(dir))),
                Ok(OutputSpec::Tar(file)) => specs.push(OutputSpec::Tar(root_dir.join(file))),
                Ok(OutputSpec::OciArchive(file)) => {
                    specs.push(OutputSpec::OciArchive(root_dir.join(file)))
                }
                Err(message) => {
                    return Err(CliError::invalid_input(format!(
                        "image `{}`: {}",
                        image.name,
                        message.replacen("--output", "output", 1)
                    )));
                }
            }
        }
        for spec in &specs {
            if let OutputSpec::Local(dir) = spec {
                refuse_replacing(dir, root_dir)?;
            }
        }
        per_image.push(specs);
    }
    Ok(per_image)
}

/// `type=local` replaces its `dest`: refuse a directory that holds the current directory, the
/// build file or the home directory (`dest=.`, `dest=..`, `dest=/`).
fn refuse_replacing(dest: &Path, root_dir: &Path) -> Result<(), CliError> {
    let Ok(dest_canonical) = dest.canonicalize() else {
        return Ok(());
    };
    let mut precious: Vec<PathBuf> = vec![root_dir.to_path_buf()];
    precious.extend(std::env::current_dir().ok());
    precious.extend(std::env::var_os("HOME").map(PathBuf::from));
    for path in precious {
        if let Ok(path) = path.canonicalize()
            && path.starts_with(&dest_canonical)
        {
            return Err(CliError::invalid_input(format!(
                "--output type=local,dest={}: the destination is replaced, and it holds {}",
                dest.display(),
                path.display()
            ))
            .hint("give a directory of its own, e.g. dest=rootfs"));
        }
    }
    Ok(())
}

/// Writes each image's exports from its layout.
pub(super) fn export(
    plan: &Plan,
    summaries: &[ImageSummary],
    per_image: &[Vec<OutputSpec>],
    quiet: bool,
) -> Result<(), CliError> {
    for ((image, summary), specs) in plan.images.iter().zip(summaries).zip(per_image) {
        let layout = open_layout(summary)?;
        for spec in specs {
            let written = match spec {
                OutputSpec::Layouts(dir) => copy_layout(&layout, &dir.join(&image.name)),
                OutputSpec::LayoutAt(dir) => copy_layout(&layout, dir),
                OutputSpec::Local(dir) => exporter::export_local(&layout, dir),
                OutputSpec::Tar(file) => exporter::export_rootfs_tar(&layout, file),
                OutputSpec::OciArchive(file) => exporter::export_oci_archive(&layout, file),
            };
            let dest = match spec {
                OutputSpec::Layouts(path)
                | OutputSpec::LayoutAt(path)
                | OutputSpec::Local(path)
                | OutputSpec::Tar(path)
                | OutputSpec::OciArchive(path) => path,
            };
            if let Err(message) = written {
                return Err(CliError::environment(format!(
                    "cannot export `{}` to {}: {message}",
                    image.name,
                    dest.display()
                )));
            }
            if !quiet {
                eprintln!("exported {} to {}", image.name, dest.display());
            }
        }
    }
    Ok(())
}

fn copy_layout(layout: &OciLayout, dest: &Path) -> Result<(), exporter::ExporterError> {
    let index = layout.index().clone();
    let (top, inner) = exporter::layout_index(layout)?;
    let mut blobs = vec![top.digest];
    for image in exporter::platform_images(layout)? {
        blobs.push(image.descriptor.digest);
        blobs.push(image.manifest.config.digest);
        blobs.extend(image.manifest.layers.iter().map(|layer| layer.digest));
    }
    drop(inner);
    blobs.sort();
    blobs.dedup();
    graphbuild_engine::oci::write_layout(
        dest,
        &index,
        blobs.iter().map(|digest| {
            (
                *digest,
                graphbuild_engine::oci::BlobSource::Path(layout.blob_path(digest)),
            )
        }),
    )?;
    Ok(())
}

fn open_layout(summary: &ImageSummary) -> Result<OciLayout, CliError> {
    OciLayout::open(Path::new(&summary.output))
        .map_err(|error| CliError::environment(format!("cannot read the image layout: {error}")))
}

/// The architecture check: every ELF file the build added to each platform's image, against
/// that platform. Mismatches are warnings, or errors (exit 1) with `--strict` or an image's
/// `strict-arch=#true`.
pub(super) fn check_architectures(
    plan: &Plan,
    summaries: &[ImageSummary],
    strict: bool,
    store: &graphbuild_engine::store::Store,
) -> Result<(), CliError> {
    let mut failed = false;
    let mut index = exporter::ElfIndex::new(Some(store));
    for (image, summary) in plan.images.iter().zip(summaries) {
        let layout = open_layout(summary)?;
        let platforms = exporter::platform_images(&layout)
            .map_err(|error| CliError::environment(error.to_string()))?;
        let strict = strict || image.strict_arch;
        for (platform_image, (_, node)) in platforms.iter().zip(&image.platforms) {
            let skip = exporter::base_layer_count(plan, *node);
            let mismatches =
                exporter::check_architecture(&layout, platform_image, skip, &mut index)
                    .map_err(|error| CliError::environment(error.to_string()))?;
            for mismatch in mismatches {
                let message = format!(
                    "image `{}` for {}: {} is an ELF file for {}, expected {}",
                    image.name, mismatch.platform, mismatch.path, mismatch.found, mismatch.expected
                );
                if strict {
                    // Each mismatch as it is found; the check's verdict is the error below.
                    render::error(&message, &[]);
                    failed = true;
                } else {
                    render::warning(&message);
                }
            }
        }
    }
    if failed {
        return Err(
            CliError::new(ExitStatus::BuildFailed, "the architecture check failed").hint(
                "build the file for the image's platform (TARGETARCH), or drop --strict / strict-arch=#true",
            ),
        );
    }
    Ok(())
}

/// The platform `--load` loads: the one `--platform` names, else the host's.
pub(super) fn load_platform(requested: &[String]) -> Result<Platform, CliError> {
    match requested {
        [] => Ok(Platform::host()),
        [one] => Platform::parse(one)
            .map_err(|error| CliError::invalid_input(format!("--platform {one}: {error}"))),
        several => Err(CliError::invalid_input(format!(
            "--load loads one platform, and {} are selected ({})",
            several.len(),
            several.join(", ")
        ))
        .hint("choose one with a single --platform, or use --output type=oci,dest=FILE.tar")),
    }
}

/// `--load`: each image's manifest for `platform` into Podman, or Docker when Podman is not
/// installed and a Docker daemon answers; tagged with the image's tags (its name without).
pub(super) fn load(
    plan: &Plan,
    summaries: &[ImageSummary],
    platform: &Platform,
    quiet: bool,
) -> Result<(), CliError> {
    let wanted = OciPlatform::from(platform);
    let tool = if command_exists("podman") {
        "podman"
    } else if Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|output| output.status.success())
    {
        "docker"
    } else {
        return Err(
            CliError::environment("--load needs Podman, or Docker with a running daemon")
                .hint("install podman, or write the image with --output type=oci,dest=FILE.tar"),
        );
    };
    for (image, summary) in plan.images.iter().zip(summaries) {
        load_one(tool, image, summary, &wanted, quiet)?;
    }
    Ok(())
}

fn load_one(
    tool: &str,
    image: &ImagePlan,
    summary: &ImageSummary,
    wanted: &OciPlatform,
    quiet: bool,
) -> Result<(), CliError> {
    let environment =
        |message: String| CliError::environment(format!("--load: `{}`: {message}", image.name));
    let layout = open_layout(summary)?;
    let platforms =
        exporter::platform_images(&layout).map_err(|error| environment(error.to_string()))?;
    let Some(chosen) = platforms
        .iter()
        .find(|candidate| candidate.platform == *wanted)
    else {
        let built: Vec<String> = platforms.iter().map(|p| p.platform.to_string()).collect();
        return Err(CliError::invalid_input(format!(
            "--load: `{}` has no {wanted} image (built: {})",
            image.name,
            built.join(", ")
        ))
        .hint("choose the platform to load with --platform"));
    };
    let tags: Vec<String> = if image.tags.is_empty() {
        vec![format!("{}:latest", image.name)]
    } else {
        image.tags.clone()
    };
    let scratch = tempfile::Builder::new()
        .prefix("graphbuild-load-")
        .tempdir()
        .map_err(|error| environment(error.to_string()))?;
    let archive = scratch.path().join("image.tar");
    exporter::export_platform_archive(&layout, chosen, &tags, &archive)
        .map_err(|error| environment(error.to_string()))?;
    let output = Command::new(tool)
        .arg("load")
        .arg("-i")
        .arg(&archive)
        .output()
        .map_err(|error| environment(format!("cannot run {tool}: {error}")))?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    if !output.status.success() {
        return Err(environment(format!(
            "{tool} load failed: {}{}",
            text.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    if tool == "podman" {
        // Podman names an untagged oci-archive by its image id: tag it.
        let id = text
            .lines()
            .filter_map(|line| line.split_once(": ").map(|(_, id)| id.trim()))
            .next_back()
            .unwrap_or_default()
            .to_string();
        let status = Command::new("podman")
            .arg("tag")
            .arg(&id)
            .args(&tags)
            .output()
            .map_err(|error| environment(error.to_string()))?;
        if !status.status.success() {
            return Err(environment(format!(
                "podman tag {id} failed: {}",
                String::from_utf8_lossy(&status.stderr).trim()
            )));
        }
    }
    if !quiet {
        eprintln!(
            "loaded {} ({wanted}) into {tool} as {}",
            image.name,
            tags.join(", ")
        );
    }
    Ok(())
}

fn command_exists(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

/// `--metadata-file`: buildx's keys per image (top level for one image, by image name for
/// several, as `buildx bake` writes them).
pub(super) fn write_metadata(
    file: &Path,
    plan: &Plan,
    summaries: &[ImageSummary],
) -> Result<(), CliError> {
    let mut entries = serde_json::Map::new();
    for (image, summary) in plan.images.iter().zip(summaries) {
        let layout = open_layout(summary)?;
        let (top, _) = exporter::layout_index(&layout)
            .map_err(|error| CliError::environment(error.to_string()))?;
        let mut descriptor = top.clone();
        descriptor.annotations.clear();
        let value = serde_json::json!({
            "containerimage.digest": summary.index_digest,
            "containerimage.descriptor": descriptor,
            "image.name": image.tags.join(","),
        });
        entries.insert(image.name.clone(), value);
    }
    let json = if entries.len() == 1 {
        entries
            .into_iter()
            .next()
            .map(|(_, value)| value)
            .unwrap_or_default()
    } else {
        serde_json::Value::Object(entries)
    };
    let mut bytes = serde_json::to_vec_pretty(&json).unwrap_or_default();
    bytes.push(b'\n');
    std::fs::write(file, bytes)
        .map_err(|error| CliError::environment(format!("cannot write {}: {error}", file.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_parsed_as_buildx_does() {
        assert_eq!(
            parse_output("out"),
            Ok(OutputSpec::Layouts(PathBuf::from("out")))
        );
        assert_eq!(
            parse_output("type=local,dest=out"),
            Ok(OutputSpec::Local(PathBuf::from("out")))
        );
        assert_eq!(
            parse_output("type=tar,dest=fs.tar"),
            Ok(OutputSpec::Tar(PathBuf::from("fs.tar")))
        );
        assert_eq!(
            parse_output("dest=img.tar,type=oci"),
            Ok(OutputSpec::OciArchive(PathBuf::from("img.tar")))
        );
        assert_eq!(
            parse_output("type=oci,dest=layouts"),
            Ok(OutputSpec::Layouts(PathBuf::from("layouts")))
        );
        assert!(
            parse_output("type=docker")
                .unwrap_err()
                .contains("type `docker` is not an output here; use --load")
        );
        assert!(
            parse_output("type=registry")
                .unwrap_err()
                .contains("use --push")
        );
        assert!(
            parse_output("type=zip,dest=x")
                .unwrap_err()
                .contains("unknown type `zip`")
        );
        assert!(
            parse_output("type=local")
                .unwrap_err()
                .contains("dest is missing")
        );
        assert!(
            parse_output("type=local,dst=x")
                .unwrap_err()
                .contains("cannot read `dst=x`")
        );
    }
}
