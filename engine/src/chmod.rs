//! A copy's `chmod` as the engine keys and applies it: [`graphbuild_lang::chmod::Chmod`],
//! serialized as the octal number the keys of octal modes always had, or as its canonical text
//! for a symbolic mode (which no number equals).

use graphbuild_lang::chmod::Chmod as Spec;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chmod(pub Spec);

impl Chmod {
    /// The mode an entry with `mode` gets.
    pub fn apply(&self, mode: u32, is_dir: bool) -> u32 {
        self.0.apply(mode, is_dir)
    }
}

/// The mode of an entry copied with `chmod` (its own when none).
pub(crate) fn apply(chmod: Option<&Chmod>, mode: u32, is_dir: bool) -> u32 {
    chmod.map_or(mode, |chmod| chmod.apply(mode, is_dir))
}

impl Serialize for Chmod {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Spec::Octal(mode) => serializer.serialize_u32(*mode),
            symbolic => serializer.serialize_str(&symbolic.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Chmod {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Octal(u32),
            Symbolic(String),
        }
        match Form::deserialize(deserializer)? {
            Form::Octal(mode) if mode <= 0o7777 => Ok(Chmod(Spec::Octal(mode))),
            Form::Octal(mode) => Err(serde::de::Error::custom(format!(
                "mode {mode:o} is not a file mode"
            ))),
            Form::Symbolic(text) => Spec::parse(&text)
                .map(Chmod)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_modes_serialize_as_the_number_they_always_did() {
        let octal = Chmod(Spec::parse("0755").unwrap());
        assert_eq!(serde_json::to_string(&octal).unwrap(), "493");
        let symbolic = Chmod(Spec::parse("u+x,g-w").unwrap());
        assert_eq!(serde_json::to_string(&symbolic).unwrap(), "\"u+x,g-w\"");
        for chmod in [octal, symbolic] {
            let text = serde_json::to_string(&chmod).unwrap();
            assert_eq!(serde_json::from_str::<Chmod>(&text).unwrap(), chmod);
        }
    }
}
