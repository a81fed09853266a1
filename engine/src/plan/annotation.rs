//! Where an annotation goes: buildx's typed keys (`index:KEY`, `manifest:KEY`,
//! `manifest[linux/arm64]:KEY`, `index-descriptor:KEY`, `manifest-descriptor:KEY`, several
//! types separated by commas). An untyped key goes on the index and every manifest, as
//! graphbuild has always done.

use graphbuild_lang::platform::{Platform, PlatformError};

/// A typed annotation key that cannot be placed. Reported at the annotation as a
/// `graphbuild::annotation` diagnostic of the build file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationKeyError {
    #[error("`{key}` has a type but no key")]
    NoKey { key: String },
    #[error("`{kind}`: write `{base}[OS/ARCH]`")]
    UnclosedPlatform { kind: String, base: String },
    #[error("`{kind}`: `{platform}` is not a platform: {source}")]
    Platform {
        kind: String,
        platform: String,
        #[source]
        source: Box<PlatformError>,
    },
    #[error("`{kind}`: an {base} annotation has no platform")]
    PlatformNotAllowed { kind: String, base: String },
    #[error("`{kind}` is not an annotation type")]
    UnknownType { kind: String },
}

/// One place an annotation is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Level {
    /// The image index.
    Index,
    /// Every platform's manifest, or only the named platform's.
    Manifest(Option<Platform>),
    /// The index's descriptor in the layout's `index.json` (and nowhere in a registry).
    IndexDescriptor,
    /// The manifests' descriptors inside the index, or only the named platform's.
    ManifestDescriptor(Option<Platform>),
}

impl Level {
    /// Whether the annotation goes on `platform`'s manifest (`descriptor`: its descriptor).
    pub fn covers_manifest(&self, platform: &Platform, descriptor: bool) -> bool {
        match (self, descriptor) {
            (Level::Manifest(only), false) | (Level::ManifestDescriptor(only), true) => {
                only.as_ref().is_none_or(|only| only == platform)
            }
            _ => false,
        }
    }
}

/// Splits a key into its levels and the annotation's own key. A prefix that is not a list
/// of known types is part of the key (`com.example:tag=…` has no type).
pub fn parse_key(key: &str) -> Result<(Vec<Level>, &str), AnnotationKeyError> {
    let untyped = || (vec![Level::Index, Level::Manifest(None)], key);
    let Some((prefix, name)) = key.split_once(':') else {
        return Ok(untyped());
    };
    let known = |kind: &str| {
        let base = kind.split('[').next().unwrap_or(kind);
        matches!(
            base,
            "index" | "manifest" | "index-descriptor" | "manifest-descriptor"
        )
    };
    // Commas inside `[…]` are not separators (no platform has one, but say so clearly).
    let kinds: Vec<&str> = prefix.split(',').collect();
    if !kinds.iter().all(|kind| known(kind.trim())) {
        return Ok(untyped());
    }
    if name.is_empty() {
        return Err(AnnotationKeyError::NoKey {
            key: key.to_string(),
        });
    }
    let mut levels = Vec::new();
    for kind in kinds {
        let kind = kind.trim();
        let (base, platform) = match kind.split_once('[') {
            Some((base, rest)) => {
                let Some(platform) = rest.strip_suffix(']') else {
                    return Err(AnnotationKeyError::UnclosedPlatform {
                        kind: kind.to_string(),
                        base: base.to_string(),
                    });
                };
                let platform =
                    Platform::parse(platform).map_err(|source| AnnotationKeyError::Platform {
                        kind: kind.to_string(),
                        platform: platform.to_string(),
                        source: Box::new(source),
                    })?;
                (base, Some(platform))
            }
            None => (kind, None),
        };
        levels.push(match (base, platform) {
            ("index", None) => Level::Index,
            ("index-descriptor", None) => Level::IndexDescriptor,
            ("manifest", platform) => Level::Manifest(platform),
            ("manifest-descriptor", platform) => Level::ManifestDescriptor(platform),
            (base, Some(_)) => {
                return Err(AnnotationKeyError::PlatformNotAllowed {
                    kind: kind.to_string(),
                    base: base.to_string(),
                });
            }
            (other, None) => {
                return Err(AnnotationKeyError::UnknownType {
                    kind: other.to_string(),
                });
            }
        });
    }
    Ok((levels, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_levels() {
        let (levels, key) = parse_key("org.example.a").expect("untyped");
        assert_eq!(levels, [Level::Index, Level::Manifest(None)]);
        assert_eq!(key, "org.example.a");
        let (levels, key) = parse_key("index,manifest-descriptor:k").expect("typed");
        assert_eq!(levels, [Level::Index, Level::ManifestDescriptor(None)]);
        assert_eq!(key, "k");
        let (levels, _) = parse_key("manifest[linux/arm/v7]:k").expect("platform");
        let arm = Platform::parse("linux/arm/v7").expect("platform");
        assert_eq!(levels, [Level::Manifest(Some(arm.clone()))]);
        assert!(levels[0].covers_manifest(&arm, false));
        assert!(!levels[0].covers_manifest(&arm, true));
        assert!(!levels[0].covers_manifest(&Platform::parse("linux/arm64").expect("p"), false));
        // A prefix that names no type is part of the key.
        assert_eq!(
            parse_key("com.example:tag").expect("key").1,
            "com.example:tag"
        );
        assert_eq!(
            parse_key("index[linux/amd64]:k").unwrap_err().to_string(),
            "`index[linux/amd64]`: an index annotation has no platform"
        );
        assert!(matches!(
            parse_key("manifest[linux/nope/x/y]:k"),
            Err(AnnotationKeyError::Platform { .. })
        ));
        assert_eq!(
            parse_key("manifest[linux/amd64:k"),
            Err(AnnotationKeyError::UnclosedPlatform {
                kind: "manifest[linux/amd64".into(),
                base: "manifest".into()
            })
        );
        assert_eq!(
            parse_key("index:").unwrap_err().to_string(),
            "`index:` has a type but no key"
        );
    }
}
