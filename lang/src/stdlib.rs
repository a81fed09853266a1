//! The standard library of stage modules, embedded in the binary and loaded with
//! `import "std:NAME"`. The sources live in the crate's `stdlib/` folder
//! (`lang/stdlib/`), so the crate packages on its own.

/// Every module, by name, with its KDL source.
pub const MODULES: &[(&str, &str)] = &[
    ("busybox", include_str!("../stdlib/busybox.kdl")),
    ("go", include_str!("../stdlib/go.kdl")),
    ("python", include_str!("../stdlib/python.kdl")),
    ("rust", include_str!("../stdlib/rust.kdl")),
    ("static", include_str!("../stdlib/static.kdl")),
];

/// The source of `std:NAME`, if such a module exists.
pub fn module(name: &str) -> Option<&'static str> {
    MODULES
        .iter()
        .find(|(module, _)| *module == name)
        .map(|(_, source)| *source)
}

/// The names of every module, for messages and `--help`.
pub fn module_names() -> Vec<&'static str> {
    MODULES.iter().map(|(name, _)| *name).collect()
}
