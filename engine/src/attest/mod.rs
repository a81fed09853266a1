//! Attestations: SLSA provenance and SPDX SBOMs, stored in the image index the way BuildKit
//! stores them, so the tools that read BuildKit's attestations read these.
//!
//! # Storage (BuildKit's `docs/attestations/attestation-storage.md`)
//!
//! For each platform manifest the index gains, after all platform manifests, one attestation
//! manifest: platform `unknown/unknown` (no runtime picks it), annotations
//! `vnd.docker.reference.type: attestation-manifest` and `vnd.docker.reference.digest: <the
//! platform manifest's digest>`. Its layers are in-toto statements
//! (`application/vnd.in-toto+json`, annotated `in-toto.io/predicate-type`), each with the
//! platform manifest as subject. With OCI media types the manifest is an OCI artifact
//! (`artifactType` `application/vnd.docker.attestation.manifest.v1+json`, the empty config,
//! a `subject`), as BuildKit writes by default; with `--format docker` it is the older form, a
//! Docker manifest whose config is an `unknown/unknown` image config.
//!
//! # Reproducibility
//!
//! Statements are canonical JSON made from the plan's keys, the resolved base digests, the
//! build files and the layers: no clock, host name or path of the machine. Platform manifests
//! do not change; only the index gains entries.

pub(crate) mod provenance;
pub(crate) mod sbom;

use std::collections::BTreeMap;

use graphbuild_lang::platform::Platform;
use serde_json::{Value, json};

use crate::digest::Digest;

pub const IN_TOTO_MEDIA_TYPE: &str = "application/vnd.in-toto+json";
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PROVENANCE_PREDICATE: &str = "https://slsa.dev/provenance/v1";
pub const SPDX_PREDICATE: &str = "https://spdx.dev/Document";
pub const REFERENCE_TYPE_ANNOTATION: &str = "vnd.docker.reference.type";
pub const REFERENCE_DIGEST_ANNOTATION: &str = "vnd.docker.reference.digest";
pub const ATTESTATION_MANIFEST: &str = "attestation-manifest";
pub const PREDICATE_TYPE_ANNOTATION: &str = "in-toto.io/predicate-type";
pub const ATTESTATION_ARTIFACT_TYPE: &str = "application/vnd.docker.attestation.manifest.v1+json";
pub const OCI_EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";

/// `--provenance=mode=min|max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProvenanceMode {
    /// The build file and context digests, base images, args, the graph's step keys.
    #[default]
    Min,
    /// Also each step's description and location and the build files' text.
    Max,
}

/// Which attestations to attach, and what the user asked for (recorded in the provenance).
#[derive(Debug, Clone)]
pub struct AttestOptions {
    /// `None`: no provenance (`--provenance=false`).
    pub provenance: Option<ProvenanceMode>,
    pub sbom: bool,
    pub request: BuildRequest,
}

impl Default for AttestOptions {
    fn default() -> Self {
        AttestOptions {
            provenance: Some(ProvenanceMode::Min),
            sbom: false,
            request: BuildRequest::default(),
        }
    }
}

/// The request as the user made it: what the provenance's `externalParameters.request` says.
#[derive(Debug, Clone, Default)]
pub struct BuildRequest {
    /// `graphbuild run` (a KDL build file) or `graphbuild build` (a Dockerfile).
    pub frontend: String,
    /// `--arg` / `--build-arg` values, as given.
    pub args: BTreeMap<String, String>,
    /// `--secret` ids. Their values are never recorded.
    pub secrets: Vec<String>,
}

/// A `--provenance` or `--sbom` value graphbuild cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, miette::Diagnostic)]
pub enum AttestFlagError {
    #[error(
        "--provenance: version `{version}` is not supported; graphbuild writes SLSA provenance v1 (version=v1)"
    )]
    #[diagnostic(code(graphbuild::attest::flag))]
    ProvenanceVersion { version: String },

    #[error("--provenance: cannot read `{part}`; write true, false, mode=min or mode=max")]
    #[diagnostic(code(graphbuild::attest::flag))]
    Provenance { part: String },

    #[error("--sbom: cannot read `{value}`; write true or false")]
    #[diagnostic(code(graphbuild::attest::flag))]
    Sbom { value: String },
}

/// Parse buildx's `--provenance` spellings: a boolean (`true`, `false`, `1`, `0`), or
/// `key=value` pairs: `mode=min|max`, `disabled=true|false`, `version=v1`.
pub fn parse_provenance(value: &str) -> Result<Option<ProvenanceMode>, AttestFlagError> {
    if let Some(enabled) = parse_bool(value) {
        return Ok(enabled.then_some(ProvenanceMode::Min));
    }
    let mut mode = ProvenanceMode::Min;
    let mut disabled = false;
    for part in value.split(',') {
        match part.split_once('=') {
            Some(("mode", "min")) => mode = ProvenanceMode::Min,
            Some(("mode", "max")) => mode = ProvenanceMode::Max,
            Some(("disabled", flag)) if parse_bool(flag).is_some() => {
                disabled = parse_bool(flag) == Some(true);
            }
            Some(("version", "v1")) => {}
            Some(("version", other)) => {
                return Err(AttestFlagError::ProvenanceVersion {
                    version: other.to_string(),
                });
            }
            _ => {
                return Err(AttestFlagError::Provenance {
                    part: part.to_string(),
                });
            }
        }
    }
    Ok((!disabled).then_some(mode))
}

/// Parse `--sbom`'s value: a boolean (`true`, `false`, `1`, `0`).
pub fn parse_sbom(value: &str) -> Result<bool, AttestFlagError> {
    parse_bool(value).ok_or_else(|| AttestFlagError::Sbom {
        value: value.to_string(),
    })
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "true" | "1" | "True" | "TRUE" => Some(true),
        "false" | "0" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

/// An in-toto statement (v1) about `subjects`.
pub(crate) fn statement(subjects: &[Value], predicate_type: &str, predicate: Value) -> Value {
    json!({
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": predicate_type,
        "predicate": predicate,
    })
}

/// The subjects of a platform's statements, as BuildKit names them: one per tag, a Docker
/// package URL with the platform (`pkg:docker/team/app@1.0?platform=linux%2Farm64`), or the
/// image's name when it has no tag; each with the platform manifest's digest.
pub(crate) fn subjects(
    tags: &[String],
    image_name: &str,
    platform: &Platform,
    manifest: &Digest,
) -> Vec<Value> {
    let digest = json!({ "sha256": manifest.hex() });
    let mut names: Vec<String> = tags
        .iter()
        .filter_map(|tag| docker_purl(tag, Some(platform)))
        .collect();
    if names.is_empty() {
        names.push(
            docker_purl(image_name, Some(platform))
                .unwrap_or_else(|| format!("pkg:docker/{image_name}")),
        );
    }
    names.dedup();
    names
        .into_iter()
        .map(|name| json!({ "name": name, "digest": digest }))
        .collect()
}

/// A Docker package URL for an image reference: the familiar name (Docker Hub's
/// `docker.io/library/` dropped) split into namespace and name, the tag as version.
pub(crate) fn docker_purl(reference: &str, platform: Option<&Platform>) -> Option<String> {
    let (name, tag) = match crate::reference::Reference::parse(reference) {
        Ok(parsed) => {
            let mut name = format!("{}/{}", parsed.registry, parsed.repository);
            if let Some(rest) = name.strip_prefix("docker.io/") {
                name = rest.strip_prefix("library/").unwrap_or(rest).to_string();
            }
            (name, parsed.tag)
        }
        Err(_) => (reference.to_string(), None),
    };
    let (namespace, last) = match name.rsplit_once('/') {
        Some((namespace, last)) => (Some(namespace), last),
        None => (None, name.as_str()),
    };
    let mut purl = packageurl::PackageUrl::new("docker", last.to_string()).ok()?;
    if let Some(namespace) = namespace {
        purl.with_namespace(namespace.to_string()).ok()?;
    }
    if let Some(tag) = tag {
        purl.with_version(tag).ok()?;
    }
    if let Some(platform) = platform {
        purl.add_qualifier("platform", platform.to_string()).ok()?;
    }
    Some(purl.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buildx_provenance_spellings_are_read() {
        assert_eq!(parse_provenance("true"), Ok(Some(ProvenanceMode::Min)));
        assert_eq!(parse_provenance("false"), Ok(None));
        assert_eq!(parse_provenance("0"), Ok(None));
        assert_eq!(parse_provenance("mode=min"), Ok(Some(ProvenanceMode::Min)));
        assert_eq!(parse_provenance("mode=max"), Ok(Some(ProvenanceMode::Max)));
        assert_eq!(
            parse_provenance("mode=max,version=v1"),
            Ok(Some(ProvenanceMode::Max))
        );
        assert_eq!(parse_provenance("mode=max,disabled=true"), Ok(None));
        assert_eq!(
            parse_provenance("mode=huge"),
            Err(AttestFlagError::Provenance {
                part: "mode=huge".into()
            })
        );
        assert_eq!(
            parse_provenance("version=v0.2"),
            Err(AttestFlagError::ProvenanceVersion {
                version: "v0.2".into()
            })
        );
        assert_eq!(
            parse_sbom("maybe").unwrap_err().to_string(),
            "--sbom: cannot read `maybe`; write true or false"
        );
    }

    #[test]
    fn subjects_are_docker_package_urls() {
        let platform: Platform = "linux/arm64".parse().unwrap();
        let digest = Digest::of(b"manifest");
        let subjects = subjects(
            &[
                "localhost:5000/team/app:1.0".into(),
                "docker.io/library/app:2".into(),
            ],
            "app",
            &platform,
            &digest,
        );
        assert_eq!(
            subjects[0]["name"],
            "pkg:docker/localhost:5000/team/app@1.0?platform=linux%2Farm64"
        );
        assert_eq!(
            subjects[1]["name"],
            "pkg:docker/app@2?platform=linux%2Farm64"
        );
        assert_eq!(subjects[0]["digest"]["sha256"], digest.hex());
    }
}
