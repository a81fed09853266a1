//! Platforms (`os/architecture[/variant]`) with Docker's and containerd's normalization.
//!
//! Users write platforms in many spellings (`linux/aarch64`, `linux/x86_64`, `linux/armhf`,
//! `Linux/ARM64/v8`). graphbuild normalizes them exactly as containerd's `platforms.Normalize`
//! does, so that the value in an image index, the `TARGET*` automatic args and every cache key
//! agree with what Docker and BuildKit would produce for the same input:
//!
//! | written | normalized |
//! |---|---|
//! | `linux/x86_64`, `linux/x86-64` | `linux/amd64` |
//! | `linux/aarch64`, `linux/arm64/v8` | `linux/arm64` (no variant) |
//! | `linux/arm`, `linux/armhf` | `linux/arm/v7` |
//! | `linux/armel` | `linux/arm/v6` |
//! | `linux/i386`, `linux/i686` | `linux/386` |
//! | `linux/amd64/v1` | `linux/amd64` |
//!
//! The operating system and architecture must be known to Go (`GOOS`/`GOARCH`), which is what
//! OCI image indexes use; anything else is rejected with the reason.

use std::fmt;

/// The eight automatic build args, with Docker's names, in the order they are documented.
pub const AUTOMATIC_ARGS: [&str; 8] = [
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETARCH",
    "TARGETVARIANT",
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDARCH",
    "BUILDVARIANT",
];

/// Go's `GOOS` values (`go tool dist list`), plus `macos` accepted as a spelling of `darwin`.
const KNOWN_OPERATING_SYSTEMS: &[&str] = &[
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "hurd",
    "illumos",
    "ios",
    "js",
    "linux",
    "nacl",
    "netbsd",
    "openbsd",
    "plan9",
    "solaris",
    "wasip1",
    "windows",
    "zos",
];

/// Go's `GOARCH` values.
const KNOWN_ARCHITECTURES: &[&str] = &[
    "386",
    "amd64",
    "amd64p32",
    "arm",
    "armbe",
    "arm64",
    "arm64be",
    "loong64",
    "mips",
    "mipsle",
    "mips64",
    "mips64le",
    "mips64p32",
    "mips64p32le",
    "ppc",
    "ppc64",
    "ppc64le",
    "riscv",
    "riscv64",
    "s390",
    "s390x",
    "sparc",
    "sparc64",
    "wasm",
];

/// A normalized OCI platform.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    /// `v7` for `linux/arm/v7`; `None` when the platform has no variant.
    pub variant: Option<String>,
}

/// Why a platform string was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, miette::Diagnostic)]
pub enum PlatformError {
    #[error("empty platform")]
    #[diagnostic(
        code(graphbuild::platform::empty),
        help("write a platform as os/architecture[/variant], for example \"linux/amd64\"")
    )]
    Empty,

    #[error("platform `{input}` has {parts} parts, at most 3 are allowed")]
    #[diagnostic(
        code(graphbuild::platform::too_many_parts),
        help("write a platform as os/architecture[/variant], for example \"linux/arm/v7\"")
    )]
    TooManyParts { input: String, parts: usize },

    #[error("platform `{input}` has an empty part")]
    #[diagnostic(
        code(graphbuild::platform::empty_part),
        help("write a platform as os/architecture[/variant], for example \"linux/arm64\"")
    )]
    EmptyPart { input: String },

    #[error("platform `{input}` is missing the architecture")]
    #[diagnostic(code(graphbuild::platform::missing_architecture), help("{help}"))]
    MissingArchitecture { input: String, help: String },

    #[error("unknown operating system `{os}` in platform `{input}`")]
    #[diagnostic(code(graphbuild::platform::unknown_os), help("{help}"))]
    UnknownOs {
        input: String,
        os: String,
        help: String,
    },

    #[error("unknown architecture `{architecture}` in platform `{input}`")]
    #[diagnostic(code(graphbuild::platform::unknown_architecture), help("{help}"))]
    UnknownArchitecture {
        input: String,
        architecture: String,
        help: String,
    },

    #[error("invalid variant `{variant}` in platform `{input}`")]
    #[diagnostic(
        code(graphbuild::platform::invalid_variant),
        help(
            "a variant is letters, digits and dots, for example v7 (arm), v2 (amd64) or v8.2 (arm64)"
        )
    )]
    InvalidVariant { input: String, variant: String },
}

impl Platform {
    /// Parses and normalizes `os/architecture[/variant]` (case-insensitive).
    pub fn parse(input: &str) -> Result<Platform, PlatformError> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(PlatformError::Empty);
        }
        let parts: Vec<&str> = trimmed.split('/').collect();
        if parts.len() > 3 {
            return Err(PlatformError::TooManyParts {
                input: input.to_string(),
                parts: parts.len(),
            });
        }
        if parts.iter().any(|part| part.trim().is_empty()) {
            return Err(PlatformError::EmptyPart {
                input: input.to_string(),
            });
        }
        let lowered: Vec<String> = parts.iter().map(|part| part.to_ascii_lowercase()).collect();
        if lowered.len() == 1 {
            let only = &lowered[0];
            let help = if is_known_architecture(&normalize_architecture(only, None).0) {
                format!(
                    "did you mean \"linux/{only}\"? A platform starts with the operating system"
                )
            } else {
                format!("add the architecture, for example \"{only}/amd64\" or \"{only}/arm64\"")
            };
            return Err(PlatformError::MissingArchitecture {
                input: input.to_string(),
                help,
            });
        }
        let os = match lowered[0].as_str() {
            "macos" => "darwin".to_string(),
            other => other.to_string(),
        };
        if !KNOWN_OPERATING_SYSTEMS.contains(&os.as_str()) {
            return Err(PlatformError::UnknownOs {
                input: input.to_string(),
                help: suggestion_help(&os, KNOWN_OPERATING_SYSTEMS, "operating systems"),
                os,
            });
        }
        let variant_written = lowered.get(2).map(String::as_str);
        if let Some(variant) = variant_written
            && !variant
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
        {
            return Err(PlatformError::InvalidVariant {
                input: input.to_string(),
                variant: variant.to_string(),
            });
        }
        let (architecture, variant) = normalize_architecture(&lowered[1], variant_written);
        if !is_known_architecture(&architecture) {
            return Err(PlatformError::UnknownArchitecture {
                input: input.to_string(),
                help: suggestion_help(&lowered[1], KNOWN_ARCHITECTURES, "architectures"),
                architecture: lowered[1].clone(),
            });
        }
        Ok(Platform {
            os,
            architecture,
            variant,
        })
    }

    /// The platform this process runs on (what `BUILDPLATFORM` means).
    pub fn host() -> Platform {
        let os = match std::env::consts::OS {
            "macos" => "darwin",
            other => other,
        };
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "powerpc64" => ("ppc64", None),
            "powerpc" => ("ppc", None),
            "loongarch64" => ("loong64", None),
            "mips64" if cfg!(target_endian = "little") => ("mips64le", None),
            "mips" if cfg!(target_endian = "little") => ("mipsle", None),
            "sparc64" => ("sparc64", None),
            other => (other, None),
        };
        Platform {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
        }
    }

    /// The four automatic args for this platform with the given prefix (`TARGET` or `BUILD`),
    /// with Docker's exact values: `linux/arm/v7` gives `TARGETPLATFORM=linux/arm/v7`,
    /// `TARGETOS=linux`, `TARGETARCH=arm`, `TARGETVARIANT=v7`; the variant is the empty string
    /// when the platform has none.
    pub fn automatic_args(&self, prefix: &str) -> [(String, String); 4] {
        [
            (format!("{prefix}PLATFORM"), self.to_string()),
            (format!("{prefix}OS"), self.os.clone()),
            (format!("{prefix}ARCH"), self.architecture.clone()),
            (
                format!("{prefix}VARIANT"),
                self.variant.clone().unwrap_or_default(),
            ),
        ]
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(formatter, "/{variant}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Platform {
    type Err = PlatformError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        Platform::parse(input)
    }
}

fn is_known_architecture(architecture: &str) -> bool {
    KNOWN_ARCHITECTURES.contains(&architecture)
}

/// containerd's `normalizeArch`, plus `i686` and `armv7l`-style spellings: lenient, for
/// platforms read from image indexes as well as written ones (expects lowercase input).
pub fn normalize_architecture(
    architecture: &str,
    variant: Option<&str>,
) -> (String, Option<String>) {
    let variant = variant.filter(|variant| !variant.is_empty());
    let (architecture, variant): (&str, Option<String>) = match architecture {
        "i386" | "i486" | "i586" | "i686" | "x86" => ("386", None),
        "x86_64" | "x86-64" | "amd64" => match variant {
            None | Some("v1") => ("amd64", None),
            Some(other) => ("amd64", Some(other.to_string())),
        },
        "aarch64" | "arm64" => match variant {
            None | Some("8") | Some("v8") | Some("v8.0") => ("arm64", None),
            Some(other) => ("arm64", Some(other.to_string())),
        },
        "armhf" => ("arm", Some("v7".to_string())),
        "armel" => ("arm", Some("v6".to_string())),
        "armv7" | "armv7l" => ("arm", Some("v7".to_string())),
        "armv6" | "armv6l" => ("arm", Some("v6".to_string())),
        "arm" => match variant {
            None | Some("7") => ("arm", Some("v7".to_string())),
            Some(number @ ("5" | "6" | "8")) => ("arm", Some(format!("v{number}"))),
            Some(other) => ("arm", Some(other.to_string())),
        },
        other => (other, variant.map(str::to_string)),
    };
    (architecture.to_string(), variant)
}

fn suggestion_help(written: &str, known: &[&str], what: &str) -> String {
    let closest = known
        .iter()
        .map(|candidate| (strsim::jaro_winkler(written, candidate), *candidate))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match closest {
        Some((_, candidate)) => format!(
            "did you mean `{candidate}`? known {what}: {}",
            known.join(", ")
        ),
        None => format!("known {what}: {}", known.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(input: &str) -> String {
        Platform::parse(input)
            .map(|platform| platform.to_string())
            .unwrap_or_else(|error| format!("error: {error}"))
    }

    #[test]
    fn normalizes_like_containerd() {
        let cases = [
            ("linux/amd64", "linux/amd64"),
            ("linux/x86_64", "linux/amd64"),
            ("linux/x86-64", "linux/amd64"),
            ("linux/amd64/v1", "linux/amd64"),
            ("linux/amd64/v3", "linux/amd64/v3"),
            ("linux/aarch64", "linux/arm64"),
            ("linux/arm64/v8", "linux/arm64"),
            ("linux/arm64/8", "linux/arm64"),
            ("linux/arm64/v9", "linux/arm64/v9"),
            ("linux/arm", "linux/arm/v7"),
            ("linux/arm/7", "linux/arm/v7"),
            ("linux/arm/6", "linux/arm/v6"),
            ("linux/arm/v5", "linux/arm/v5"),
            ("linux/armhf", "linux/arm/v7"),
            ("linux/armel", "linux/arm/v6"),
            ("linux/i386", "linux/386"),
            ("linux/i686", "linux/386"),
            ("Linux/ARM64", "linux/arm64"),
            ("LINUX/ARM/V7", "linux/arm/v7"),
            ("windows/amd64", "windows/amd64"),
            ("macos/arm64", "darwin/arm64"),
            ("linux/riscv64", "linux/riscv64"),
            ("linux/s390x", "linux/s390x"),
            ("linux/ppc64le", "linux/ppc64le"),
        ];
        for (input, expected) in cases {
            assert_eq!(parsed(input), expected, "input {input}");
        }
    }

    #[test]
    fn rejects_malformed_platforms_with_the_reason() {
        assert!(matches!(
            Platform::parse("linux/arm64/v9/x"),
            Err(PlatformError::TooManyParts { parts: 4, .. })
        ));
        assert!(matches!(
            Platform::parse("linux"),
            Err(PlatformError::MissingArchitecture { .. })
        ));
        match Platform::parse("plan9/foo") {
            Err(PlatformError::UnknownArchitecture { architecture, .. }) => {
                assert_eq!(architecture, "foo")
            }
            other => panic!("unexpected {other:?}"),
        }
        match Platform::parse("linus/amd64") {
            Err(PlatformError::UnknownOs { os, help, .. }) => {
                assert_eq!(os, "linus");
                assert!(help.starts_with("did you mean `linux`?"), "{help}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(Platform::parse(""), Err(PlatformError::Empty));
        assert!(matches!(
            Platform::parse("linux//v7"),
            Err(PlatformError::EmptyPart { .. })
        ));
        assert!(matches!(
            Platform::parse("linux/arm/v 7"),
            Err(PlatformError::InvalidVariant { .. })
        ));
        match Platform::parse("arm64") {
            Err(PlatformError::MissingArchitecture { help, .. }) => {
                assert!(help.contains("linux/arm64"), "{help}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn automatic_args_match_docker() {
        let arm = Platform::parse("linux/arm/v7").unwrap();
        let args = arm.automatic_args("TARGET");
        assert_eq!(
            args,
            [
                ("TARGETPLATFORM".to_string(), "linux/arm/v7".to_string()),
                ("TARGETOS".to_string(), "linux".to_string()),
                ("TARGETARCH".to_string(), "arm".to_string()),
                ("TARGETVARIANT".to_string(), "v7".to_string()),
            ]
        );
        let amd = Platform::parse("linux/amd64").unwrap();
        let args = amd.automatic_args("BUILD");
        assert_eq!(
            args[0],
            ("BUILDPLATFORM".to_string(), "linux/amd64".to_string())
        );
        assert_eq!(args[3], ("BUILDVARIANT".to_string(), String::new()));
        for (name, _) in arm
            .automatic_args("TARGET")
            .iter()
            .chain(amd.automatic_args("BUILD").iter())
        {
            assert!(AUTOMATIC_ARGS.contains(&name.as_str()), "{name}");
        }
    }

    #[test]
    fn host_is_a_valid_normalized_platform() {
        let host = Platform::host();
        assert_eq!(Platform::parse(&host.to_string()), Ok(host));
    }
}
