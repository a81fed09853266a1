//! The typed causes of a failed step, image or test that are not the sandbox's or a cache's:
//! a layer that cannot be used ([`LayerFault`]), a copy or bind mount that cannot be laid out
//! ([`CopyFault`]), an image test's check ([`TestFault`]), an image that cannot be exported
//! ([`ExportError`]) or attested ([`AttestError`]). Each reaches [`super::StepError`]
//! transparently, so its message, code and help are what the CLI renders; a variant with a
//! `#[source]` has its causes appended (`super::error::message`).

use std::path::PathBuf;

use crate::digest::Digest;
use crate::layer::LayerError;
use crate::oci::OciError;
use crate::store::StoreError;
use crate::unpack::UnpackError;

use super::step_cache::CacheError;

/// A layer that cannot be used: its content is not what its descriptor claims, its blob is
/// corrupt, or it cannot be unpacked. `origin` says where the layer comes from (` of base
/// image `REF` for PLATFORM`), or is empty.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum LayerFault {
    #[error(
        "layer {digest}{origin} is refused: its uncompressed content hashes to {actual}, but the \
         image config claims the diff_id {diff_id}; the image is malformed or forged, and nothing \
         of it was stored"
    )]
    #[diagnostic(code(graphbuild::layer::forged))]
    Forged {
        digest: Digest,
        origin: String,
        actual: Digest,
        diff_id: Digest,
    },

    #[error(
        "layer {digest}{origin} is corrupt in the store (its content hashes to {actual}); it was \
         removed"
    )]
    #[diagnostic(
        code(graphbuild::layer::corrupt),
        help("run the build again: the blob will be fetched or rebuilt")
    )]
    Corrupt {
        digest: Digest,
        origin: String,
        actual: Digest,
    },

    #[error("cannot unpack layer {digest}{origin}")]
    #[diagnostic(code(graphbuild::layer::unpack))]
    Unpack {
        digest: Digest,
        origin: String,
        #[source]
        source: Box<UnpackError>,
    },

    #[error(
        "cannot unpack layer {digest}{origin}: this build has unpacked more than {budget} bytes of \
         layers, the limit per build; raise it with {env}=SIZE (for example 200G) if the images \
         are legitimate"
    )]
    #[diagnostic(code(graphbuild::layer::build_limit))]
    BuildLimit {
        digest: Digest,
        origin: String,
        budget: u64,
        env: &'static str,
    },

    #[error("cannot open layer {digest}")]
    #[diagnostic(code(graphbuild::layer::io))]
    Open {
        digest: Digest,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot make the snapshot of layer {digest}")]
    #[diagnostic(code(graphbuild::layer::snapshot))]
    Snapshot {
        digest: Digest,
        #[source]
        source: StoreError,
    },
}

/// A copy written straight into its layer, a bind mount or the build file's inline files that
/// could not be laid out.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum CopyFault {
    #[error("cannot {action} {}", path.display())]
    #[diagnostic(code(graphbuild::copy::io))]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot look into the base")]
    #[diagnostic(code(graphbuild::copy::io))]
    Base {
        #[source]
        source: std::io::Error,
    },

    #[error("cannot look into the files copied from")]
    #[diagnostic(code(graphbuild::copy::io))]
    Source {
        #[source]
        source: std::io::Error,
    },

    #[error("{} contains a NUL byte", path.display())]
    #[diagnostic(code(graphbuild::copy::path))]
    NulByte { path: PathBuf },

    #[error("a copy worker panicked")]
    #[diagnostic(code(graphbuild::copy::internal))]
    Panicked,

    #[error("cannot write the layer")]
    #[diagnostic(code(graphbuild::step::layer))]
    WriteLayer {
        #[source]
        source: LayerError,
    },

    #[error("cannot store the layer")]
    #[diagnostic(code(graphbuild::step::store))]
    StoreLayer {
        #[source]
        source: StoreError,
    },

    #[error("cannot write the inline file {name}")]
    #[diagnostic(code(graphbuild::copy::io))]
    Inline {
        name: String,
        #[source]
        source: std::io::Error,
    },

    #[error("bind mount {target}: cannot {action} {}", path.display())]
    #[diagnostic(code(graphbuild::bind::io))]
    Bind {
        target: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "bind mount {target}: {} changed in the build context since the build was planned; run \
         the build again",
        path.display()
    )]
    #[diagnostic(code(graphbuild::bind::changed))]
    BindChanged { target: String, path: PathBuf },

    #[error("cannot create a temporary directory")]
    #[diagnostic(code(graphbuild::step::io))]
    TempDir {
        #[source]
        source: std::io::Error,
    },

    /// An `add` source could not be downloaded, checked out or extracted; `reason` says
    /// which and why (credentials in a URL are already redacted).
    #[error("{reason}")]
    #[diagnostic(code(graphbuild::add::source))]
    Add { reason: String },

    #[error("internal error: an `add` step without its files")]
    #[diagnostic(code(graphbuild::copy::internal))]
    AddWithoutFiles,

    /// An `exclude` pattern that does not compile (checked when planned: met only by a plan
    /// changed under the build); `reason` is the pattern compiler's.
    #[error("`exclude` pattern `{pattern}`: {reason}")]
    #[diagnostic(code(graphbuild::copy::select))]
    Exclude { pattern: String, reason: String },

    #[error(transparent)]
    #[diagnostic(transparent)]
    Layer(Box<LayerFault>),
}

impl From<crate::context::ExcludeError> for CopyFault {
    fn from(error: crate::context::ExcludeError) -> CopyFault {
        CopyFault::Exclude {
            pattern: error.pattern,
            reason: error.reason,
        }
    }
}

impl From<LayerFault> for CopyFault {
    fn from(fault: LayerFault) -> CopyFault {
        CopyFault::Layer(Box::new(fault))
    }
}

impl CopyFault {
    /// `map_err(CopyFault::io("read", path))`: cannot ACTION PATH, with the error as its cause.
    pub(super) fn io(
        action: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> CopyFault + use<> {
        let path = path.to_path_buf();
        move |source| CopyFault::Io {
            action,
            path,
            source,
        }
    }
}

/// Why an image test did not pass.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum TestFault {
    #[error("expected exit code {expected}, got {actual} (command {argv:?})")]
    #[diagnostic(code(graphbuild::test::exit_code))]
    ExitCode {
        expected: i32,
        actual: i32,
        argv: Vec<String>,
    },

    #[error("expected exit code {expected}, but the command was {how} (command {argv:?})")]
    #[diagnostic(code(graphbuild::test::exit_code))]
    Ended {
        expected: i32,
        /// How it ended: killed by a signal, timed out…
        how: String,
        argv: Vec<String>,
    },

    #[error("{stream} does not contain {text:?}")]
    #[diagnostic(code(graphbuild::test::output))]
    Missing { stream: &'static str, text: String },

    #[error("{stream} does not match the regular expression {pattern:?}")]
    #[diagnostic(code(graphbuild::test::output))]
    NoMatch {
        stream: &'static str,
        pattern: String,
    },

    #[error("`{pattern}` is not a regular expression")]
    #[diagnostic(code(graphbuild::test::pattern))]
    Pattern {
        pattern: String,
        #[source]
        source: regex::Error,
    },
}

/// Why an image's layout could not be written.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum ExportError {
    #[error(transparent)]
    #[diagnostic(transparent)]
    Store(#[from] StoreError),

    #[error(
        "a layer of media type {media_type} cannot be described in Docker's manifest format; use \
         --format oci or --compression gzip"
    )]
    #[diagnostic(code(graphbuild::export::media_type))]
    DockerMediaType { media_type: String },

    /// A node ran before a node it needs had finished: a bug in the build's graph.
    #[error("internal error: node {stage} has no output")]
    #[diagnostic(code(graphbuild::export::internal))]
    NoOutput { stage: String },

    #[error(transparent)]
    #[diagnostic(transparent)]
    Layer(#[from] LayerFault),

    #[error(transparent)]
    #[diagnostic(transparent)]
    Attest(#[from] AttestError),

    #[error("cannot write the image layout {}", dir.display())]
    #[diagnostic(code(graphbuild::export::layout))]
    Layout {
        dir: PathBuf,
        #[source]
        source: Box<OciError>,
    },
}

/// Why an image's attestations could not be made.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum AttestError {
    #[error(transparent)]
    #[diagnostic(transparent)]
    Store(#[from] StoreError),

    #[error(transparent)]
    #[diagnostic(transparent)]
    Cache(#[from] CacheError),

    #[error("the SBOM for {platform} is not JSON")]
    #[diagnostic(code(graphbuild::attest::sbom))]
    NotJson {
        platform: String,
        #[source]
        source: serde_json::Error,
    },

    /// The layer scanner (`crate::attest::sbom`) reports its problems as text.
    #[error("cannot scan the filesystem of {platform} for packages")]
    #[diagnostic(code(graphbuild::attest::scan))]
    ScanStore {
        platform: String,
        #[source]
        source: StoreError,
    },

    #[error("cannot scan the filesystem of {platform} for packages: layer {digest}")]
    #[diagnostic(code(graphbuild::attest::scan))]
    ScanLayer {
        platform: String,
        digest: Digest,
        #[source]
        source: std::io::Error,
    },

    #[error("the SBOM for {platform} would be {size} bytes, more than {max}")]
    #[diagnostic(code(graphbuild::attest::sbom_size))]
    TooLarge {
        platform: String,
        size: usize,
        max: usize,
    },
}
