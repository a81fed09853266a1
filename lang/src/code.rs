//! Every diagnostic code graphbuild reports: a stable identifier `graphbuild::area::problem`
//! for each kind of problem, listed in docs/cli.md (a test keeps the list and this enum equal).
//! Codes are what scripts match on; messages may change wording, codes do not.

use std::fmt;

/// A diagnostic's code. See [`Code::ALL`] and docs/cli.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Code {
    ArgAutomatic,
    ArgInvalidName,
    ArgMissing,
    ArgSeveralInStage,
    BaseImage,
    BaseImageUnavailable,
    BuildFailed,
    Chmod,
    CommandShellForm,
    Convert,
    Copy,
    CopyArguments,
    CopyChmod,
    CopyFromScratch,
    Cycle,
    DockerfileFlag,
    DockerfileNoStage,
    DockerfileSyntax,
    DockerfileTarget,
    DockerfileUnknownInstruction,
    DockerfileUnsupported,
    DuplicateArg,
    DuplicateFrom,
    DuplicateImage,
    DuplicateMatrixKey,
    DuplicateNetwork,
    DuplicateOutput,
    DuplicateParam,
    DuplicatePlatform,
    DuplicatePlatforms,
    DuplicateStage,
    DuplicateTemplate,
    DuplicateTest,
    Duration,
    ImageNoStage,
    ImageProvenance,
    ImageTwoStages,
    ImportAlias,
    ImportCycle,
    ImportLocalFromStd,
    ImportMissing,
    ImportMissingFile,
    ImportUnknownStdModule,
    Internal,
    KdlParser,
    KdlSyntax,
    LimitsFileSize,
    LimitsImages,
    LimitsImportDepth,
    LimitsMatrix,
    LimitsNesting,
    LimitsStages,
    LoadRead,
    MatrixEmpty,
    MatrixKey,
    MatrixNoValues,
    ModuleImage,
    ModulePlatforms,
    NodeExpectedProperty,
    NodeExtraArgument,
    NodeInvalidName,
    NodeMissingName,
    NodeMissingValue,
    NodeUnexpectedChildren,
    Platform,
    PlatformInvalid,
    PlatformMissing,
    RunCacheMount,
    RunCacheMountSharing,
    RunNetwork,
    RunSecret,
    RunTmpfs,
    RunBind,
    RunSsh,
    StageCycle,
    StageMissingFrom,
    StageRules,
    StepFailed,
    Substitution,
    SubstitutionMalformed,
    SubstitutionUnsafeValue,
    TemplateMissingParam,
    TemplateNoStage,
    TemplateUnknownParam,
    TestCommand,
    TestExit,
    TestOutput,
    TestSetting,
    TypeExpectedBoolean,
    TypeExpectedInteger,
    TypeExpectedString,
    UnknownNode,
    UnknownProperty,
    UnknownStage,
    UnknownTemplate,
    UnknownImage,
    Group,
    Annotation,
    VariableUndefined,
    WhenDynamicPlatform,
    WhenMissingPlatform,
}

impl Code {
    /// Every code, in the order of their names.
    pub const ALL: &[Code] = &[
        Code::ArgAutomatic,
        Code::ArgInvalidName,
        Code::ArgMissing,
        Code::ArgSeveralInStage,
        Code::BaseImage,
        Code::BaseImageUnavailable,
        Code::BuildFailed,
        Code::Chmod,
        Code::CommandShellForm,
        Code::Convert,
        Code::Copy,
        Code::CopyArguments,
        Code::CopyChmod,
        Code::CopyFromScratch,
        Code::Cycle,
        Code::DockerfileFlag,
        Code::DockerfileNoStage,
        Code::DockerfileSyntax,
        Code::DockerfileTarget,
        Code::DockerfileUnknownInstruction,
        Code::DockerfileUnsupported,
        Code::DuplicateArg,
        Code::DuplicateFrom,
        Code::DuplicateImage,
        Code::DuplicateMatrixKey,
        Code::DuplicateNetwork,
        Code::DuplicateOutput,
        Code::DuplicateParam,
        Code::DuplicatePlatform,
        Code::DuplicatePlatforms,
        Code::DuplicateStage,
        Code::DuplicateTemplate,
        Code::DuplicateTest,
        Code::Duration,
        Code::ImageNoStage,
        Code::ImageProvenance,
        Code::ImageTwoStages,
        Code::ImportAlias,
        Code::ImportCycle,
        Code::ImportLocalFromStd,
        Code::ImportMissing,
        Code::ImportMissingFile,
        Code::ImportUnknownStdModule,
        Code::Internal,
        Code::KdlParser,
        Code::KdlSyntax,
        Code::LimitsFileSize,
        Code::LimitsImages,
        Code::LimitsImportDepth,
        Code::LimitsMatrix,
        Code::LimitsNesting,
        Code::LimitsStages,
        Code::LoadRead,
        Code::MatrixEmpty,
        Code::MatrixKey,
        Code::MatrixNoValues,
        Code::ModuleImage,
        Code::ModulePlatforms,
        Code::NodeExpectedProperty,
        Code::NodeExtraArgument,
        Code::NodeInvalidName,
        Code::NodeMissingName,
        Code::NodeMissingValue,
        Code::NodeUnexpectedChildren,
        Code::Platform,
        Code::PlatformInvalid,
        Code::PlatformMissing,
        Code::RunCacheMount,
        Code::RunCacheMountSharing,
        Code::RunNetwork,
        Code::RunSecret,
        Code::RunTmpfs,
        Code::RunBind,
        Code::RunSsh,
        Code::StageCycle,
        Code::StageMissingFrom,
        Code::StageRules,
        Code::StepFailed,
        Code::Substitution,
        Code::SubstitutionMalformed,
        Code::SubstitutionUnsafeValue,
        Code::TemplateMissingParam,
        Code::TemplateNoStage,
        Code::TemplateUnknownParam,
        Code::TestCommand,
        Code::TestExit,
        Code::TestOutput,
        Code::TestSetting,
        Code::TypeExpectedBoolean,
        Code::TypeExpectedInteger,
        Code::TypeExpectedString,
        Code::UnknownNode,
        Code::UnknownProperty,
        Code::UnknownTemplate,
        Code::UnknownImage,
        Code::Group,
        Code::Annotation,
        Code::UnknownStage,
        Code::VariableUndefined,
        Code::WhenDynamicPlatform,
        Code::WhenMissingPlatform,
    ];

    /// The code as written in diagnostics and docs.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::ArgAutomatic => "graphbuild::arg::automatic",
            Code::ArgInvalidName => "graphbuild::arg::invalid_name",
            Code::ArgMissing => "graphbuild::arg::missing",
            Code::ArgSeveralInStage => "graphbuild::arg::several_in_stage",
            Code::BaseImage => "graphbuild::base_image",
            Code::BaseImageUnavailable => "graphbuild::base_image::unavailable",
            Code::BuildFailed => "graphbuild::build::failed",
            Code::Chmod => "graphbuild::chmod",
            Code::CommandShellForm => "graphbuild::command::shell_form",
            Code::Convert => "graphbuild::convert",
            Code::Copy => "graphbuild::copy",
            Code::CopyArguments => "graphbuild::copy::arguments",
            Code::CopyChmod => "graphbuild::copy::chmod",
            Code::CopyFromScratch => "graphbuild::copy::from_scratch",
            Code::Cycle => "graphbuild::cycle",
            Code::DockerfileFlag => "graphbuild::dockerfile::flag",
            Code::DockerfileNoStage => "graphbuild::dockerfile::no_stage",
            Code::DockerfileSyntax => "graphbuild::dockerfile::syntax",
            Code::DockerfileTarget => "graphbuild::dockerfile::target",
            Code::DockerfileUnknownInstruction => "graphbuild::dockerfile::unknown_instruction",
            Code::DockerfileUnsupported => "graphbuild::dockerfile::unsupported",
            Code::DuplicateArg => "graphbuild::duplicate::arg",
            Code::DuplicateFrom => "graphbuild::duplicate::from",
            Code::DuplicateImage => "graphbuild::duplicate::image",
            Code::DuplicateMatrixKey => "graphbuild::duplicate::matrix_key",
            Code::DuplicateNetwork => "graphbuild::duplicate::network",
            Code::DuplicateOutput => "graphbuild::duplicate::output",
            Code::DuplicateParam => "graphbuild::duplicate::param",
            Code::DuplicatePlatform => "graphbuild::duplicate::platform",
            Code::DuplicatePlatforms => "graphbuild::duplicate::platforms",
            Code::DuplicateStage => "graphbuild::duplicate::stage",
            Code::DuplicateTemplate => "graphbuild::duplicate::template",
            Code::DuplicateTest => "graphbuild::duplicate::test",
            Code::Duration => "graphbuild::duration",
            Code::ImageNoStage => "graphbuild::image::no_stage",
            Code::ImageProvenance => "graphbuild::image::provenance",
            Code::ImageTwoStages => "graphbuild::image::two_stages",
            Code::ImportAlias => "graphbuild::import::alias",
            Code::ImportCycle => "graphbuild::import::cycle",
            Code::ImportLocalFromStd => "graphbuild::import::local_from_std",
            Code::ImportMissing => "graphbuild::import::missing",
            Code::ImportMissingFile => "graphbuild::import::missing_file",
            Code::ImportUnknownStdModule => "graphbuild::import::unknown_std_module",
            Code::Internal => "graphbuild::internal",
            Code::KdlParser => "graphbuild::kdl::parser",
            Code::KdlSyntax => "graphbuild::kdl::syntax",
            Code::LimitsFileSize => "graphbuild::limits::file_size",
            Code::LimitsImages => "graphbuild::limits::images",
            Code::LimitsImportDepth => "graphbuild::limits::import_depth",
            Code::LimitsMatrix => "graphbuild::limits::matrix",
            Code::LimitsNesting => "graphbuild::limits::nesting",
            Code::LimitsStages => "graphbuild::limits::stages",
            Code::LoadRead => "graphbuild::load::read",
            Code::MatrixEmpty => "graphbuild::matrix::empty",
            Code::MatrixKey => "graphbuild::matrix::key",
            Code::MatrixNoValues => "graphbuild::matrix::no_values",
            Code::ModuleImage => "graphbuild::module::image",
            Code::ModulePlatforms => "graphbuild::module::platforms",
            Code::NodeExpectedProperty => "graphbuild::node::expected_property",
            Code::NodeExtraArgument => "graphbuild::node::extra_argument",
            Code::NodeInvalidName => "graphbuild::node::invalid_name",
            Code::NodeMissingName => "graphbuild::node::missing_name",
            Code::NodeMissingValue => "graphbuild::node::missing_value",
            Code::NodeUnexpectedChildren => "graphbuild::node::unexpected_children",
            Code::Platform => "graphbuild::platform",
            Code::PlatformInvalid => "graphbuild::platform::invalid",
            Code::PlatformMissing => "graphbuild::platform::missing",
            Code::RunCacheMount => "graphbuild::run::cache_mount",
            Code::RunCacheMountSharing => "graphbuild::run::cache_mount_sharing",
            Code::RunNetwork => "graphbuild::run::network",
            Code::RunSecret => "graphbuild::run::secret",
            Code::RunTmpfs => "graphbuild::run::tmpfs",
            Code::RunBind => "graphbuild::run::bind",
            Code::RunSsh => "graphbuild::run::ssh",
            Code::StageCycle => "graphbuild::stage::cycle",
            Code::StageMissingFrom => "graphbuild::stage::missing_from",
            Code::StageRules => "graphbuild::stage::rules",
            Code::StepFailed => "graphbuild::step::failed",
            Code::Substitution => "graphbuild::substitution",
            Code::SubstitutionMalformed => "graphbuild::substitution::malformed",
            Code::SubstitutionUnsafeValue => "graphbuild::substitution::unsafe_value",
            Code::TemplateMissingParam => "graphbuild::template::missing_param",
            Code::TemplateNoStage => "graphbuild::template::no_stage",
            Code::TemplateUnknownParam => "graphbuild::template::unknown_param",
            Code::TestCommand => "graphbuild::test::command",
            Code::TestExit => "graphbuild::test::exit",
            Code::TestOutput => "graphbuild::test::output",
            Code::TestSetting => "graphbuild::test::setting",
            Code::TypeExpectedBoolean => "graphbuild::type::expected_boolean",
            Code::TypeExpectedInteger => "graphbuild::type::expected_integer",
            Code::TypeExpectedString => "graphbuild::type::expected_string",
            Code::UnknownNode => "graphbuild::unknown::node",
            Code::UnknownProperty => "graphbuild::unknown::property",
            Code::UnknownStage => "graphbuild::unknown::stage",
            Code::UnknownTemplate => "graphbuild::unknown::template",
            Code::UnknownImage => "graphbuild::unknown::image",
            Code::Group => "graphbuild::group",
            Code::Annotation => "graphbuild::annotation",
            Code::VariableUndefined => "graphbuild::variable::undefined",
            Code::WhenDynamicPlatform => "graphbuild::when::dynamic_platform",
            Code::WhenMissingPlatform => "graphbuild::when::missing_platform",
        }
    }

    /// A problem of the machine or the network rather than of the build file: the CLI exits
    /// with its environment status (3) instead of invalid input (2).
    pub fn is_environment(self) -> bool {
        matches!(self, Code::BaseImageUnavailable)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_list_every_code_and_nothing_else() {
        let docs = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli.md"),
        )
        .expect("docs/cli.md");
        let section = docs
            .split("## Diagnostic codes")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("docs/cli.md has a `## Diagnostic codes` section");
        let mut listed: Vec<&str> = section
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|word| word.starts_with("graphbuild::") && word.contains("::"))
            .filter(|word| !word.ends_with(".rs"))
            .collect();
        listed.sort();
        listed.dedup();
        let mut known: Vec<&str> = Code::ALL.iter().map(|code| code.as_str()).collect();
        known.sort();
        assert_eq!(
            listed, known,
            "docs/cli.md's list of codes and lang/src/code.rs differ"
        );
    }

    #[test]
    fn codes_are_unique_and_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for code in Code::ALL {
            let text = code.as_str();
            assert!(seen.insert(text), "{text} twice");
            assert!(text.starts_with("graphbuild::"), "{text}");
            assert!(
                text.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c == ':'),
                "{text}"
            );
        }
    }
}
