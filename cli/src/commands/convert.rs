//! `graphbuild convert`: Dockerfiles written out as an equivalent `images.kdl`
//! (lang::dockerfile::convert). What the KDL cannot express is a warning at the Dockerfile's
//! line, and the command fails unless `--allow-loss` accepts it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;
use graphbuild_lang::dockerfile::{self, convert};

use crate::render;
use crate::{CliError, ExitStatus};

#[derive(Args)]
pub(crate) struct ConvertArgs {
    /// The Dockerfiles to convert (one image each)
    #[arg(
        value_name = "DOCKERFILE",
        required_unless_present = "bake",
        conflicts_with = "bake"
    )]
    pub(crate) dockerfiles: Vec<PathBuf>,
    /// A bake file to convert instead: its targets, groups, variables and matrices, driving the Dockerfiles it names
    #[arg(long, value_name = "FILE", conflicts_with_all = ["platforms", "tags", "target"])]
    pub(crate) bake: Option<PathBuf>,
    /// The platform matrix of the KDL file, comma-separated or repeated (default: none, i.e. this machine's)
    #[arg(long = "platform", value_name = "OS/ARCH[,…]")]
    pub(crate) platforms: Vec<String>,
    /// The image's tags, REGISTRY/REPO:TAG (repeatable; one Dockerfile only)
    #[arg(long = "tag", short = 't', value_name = "NAME:TAG")]
    pub(crate) tags: Vec<String>,
    /// The stage that is the image (default: the last; one Dockerfile only)
    #[arg(long, value_name = "STAGE")]
    pub(crate) target: Option<String>,
    /// Write the KDL to FILE instead of standard output (put it in the build context: its paths are relative to it)
    #[arg(long, short, value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,
    /// Write the KDL even when some constructs are not expressed exactly (each is still reported)
    #[arg(long)]
    pub(crate) allow_loss: bool,
}

/// The image's name for a Dockerfile: from its first tag, else from the file's name
/// (`api.Dockerfile`, `Dockerfile.api` → `api`), else its directory's.
fn image_name(path: &Path, tags: &[String]) -> String {
    if !tags.is_empty() {
        return super::build::image_name(tags);
    }
    let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let stem = file
        .strip_suffix(".Dockerfile")
        .or_else(|| file.strip_suffix(".dockerfile"))
        .or_else(|| file.strip_prefix("Dockerfile."))
        .map(str::to_string)
        .or_else(|| {
            std::path::absolute(path)
                .ok()?
                .parent()?
                .file_name()?
                .to_str()
                .map(str::to_string)
        })
        .unwrap_or_default();
    let name: String = stem
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_start_matches(['.', '-']).to_string();
    if name.is_empty() { "app".into() } else { name }
}

pub(crate) fn convert(args: ConvertArgs) -> Result<ExitStatus, CliError> {
    if let Some(bake) = &args.bake {
        let header = format!(
            "Converted from {} by `graphbuild convert --bake`.\nBuild it with `graphbuild run FILE`; paths are relative to this file's directory.",
            bake.display()
        );
        let converted = super::convert_bake::convert(bake, &header).map_err(|message| {
            CliError::invalid_input(message).hint("pass a docker-bake.hcl file")
        })?;
        return finish(&args, &converted.kdl, &converted.losses, bake);
    }
    if args.dockerfiles.len() > 1 && (!args.tags.is_empty() || args.target.is_some()) {
        return Err(
            CliError::invalid_input("-t and --target apply to one Dockerfile").hint(
                "convert the Dockerfiles one at a time to tag each, or add tags to the KDL file",
            ),
        );
    }
    let platforms: Vec<String> = args
        .platforms
        .iter()
        .flat_map(|list| list.split(','))
        .map(str::trim)
        .filter(|platform| !platform.is_empty())
        .map(str::to_string)
        .collect();
    for platform in &platforms {
        if let Err(error) = graphbuild_lang::platform::Platform::parse(platform) {
            return Err(
                CliError::invalid_input(format!("--platform {platform}: {error}"))
                    .hint("write OS/ARCH[/VARIANT], for example linux/arm64"),
            );
        }
    }
    let mut projects = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for path in &args.dockerfiles {
        let mut name = image_name(path, &args.tags);
        let base = name.clone();
        let mut count = 1;
        while names.contains(&name) {
            count += 1;
            name = format!("{base}-{count}");
        }
        names.push(name.clone());
        let context = path
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let options = dockerfile::Options {
            image: name,
            tags: args.tags.clone(),
            target: args.target.clone(),
            ..dockerfile::Options::default()
        };
        let project = dockerfile::load(path, context, &options)
            .map_err(|diagnostics| CliError::report(ExitStatus::InvalidInput, diagnostics))?;
        projects.push(project);
    }
    let inputs: Vec<convert::Input> = projects
        .iter()
        .map(|project| convert::Input { project })
        .collect();
    let files: Vec<String> = args
        .dockerfiles
        .iter()
        .map(|path| path.display().to_string())
        .collect();
    let header = format!(
        "Converted from {} by `graphbuild convert`.\nBuild it with `graphbuild run FILE`; paths are relative to this file's directory.",
        files.join(", ")
    );
    let converted = convert::to_kdl(&inputs, &platforms, &header);
    finish(
        &args,
        &converted.kdl,
        &converted.losses,
        &args.dockerfiles[0],
    )
}

/// Reports the losses, then writes the KDL unless a loss was not accepted.
fn finish(
    args: &ConvertArgs,
    kdl: &str,
    losses: &[graphbuild_lang::Diagnostic],
    source: &Path,
) -> Result<ExitStatus, CliError> {
    // The KDL's paths are relative to its own directory, the source's to the source's.
    let dir_of = |path: &Path| {
        let parent = path.parent().filter(|dir| !dir.as_os_str().is_empty());
        std::fs::canonicalize(parent.unwrap_or(Path::new("."))).ok()
    };
    if let Some(output) = &args.output
        && dir_of(output) != dir_of(source)
    {
        render::warning(&format!(
            "{} is not in the directory of {}: the KDL's paths (the build context, oci: layouts) are relative to its own directory",
            output.display(),
            source.display()
        ));
    }
    for loss in losses {
        render::diagnostic(loss);
    }
    if !losses.is_empty() && !args.allow_loss {
        return Err(CliError::invalid_input(format!(
            "{} construct(s) cannot be written exactly in KDL; nothing was written",
            losses.len()
        ))
        .hint("change them as each warning says, or pass --allow-loss to write the KDL anyway"));
    }
    match &args.output {
        None => {
            let mut stdout = std::io::stdout().lock();
            if let Err(error) = stdout
                .write_all(kdl.as_bytes())
                .and_then(|()| stdout.flush())
            {
                return Err(CliError::environment(format!(
                    "cannot write to standard output: {error}"
                )));
            }
        }
        Some(file) => {
            if let Err(error) = write_atomically(file, kdl) {
                return Err(CliError::environment(format!(
                    "cannot write {}: {error}",
                    file.display()
                )));
            }
        }
    }
    Ok(ExitStatus::Success)
}

/// Writes `text` to `path` through a temporary file in the same directory and a rename: a
/// failure leaves nothing half-written.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut temp = tempfile::NamedTempFile::new_in(dir)?;
    temp.write_all(text.as_bytes())?;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|error| error.error)?;
    Ok(())
}
