//! The loader never panics: arbitrary bytes, and byte-level mutations (flips, insertions,
//! deletions) of the golden inputs and the stdlib modules, all come back as a project or as
//! diagnostics — which must also render. Bounded so it runs in a few seconds in `cargo test`;
//! raise `PROPTEST_CASES` for a longer fuzzing session.

use std::path::{Path, PathBuf};

use graphbuild_lang::load_source;
use proptest::prelude::*;

fn input_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases/input")
}

fn corpus() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(input_dir())
        .expect("cases/input exists")
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .collect();
    files.extend(
        graphbuild_lang::stdlib::MODULES
            .iter()
            .map(|(_, source)| source.to_string()),
    );
    files.sort();
    files
}

fn check(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    match load_source("fuzz.kdl", &text, &input_dir()) {
        Ok(project) => {
            for warning in &project.warnings {
                render(warning);
            }
        }
        Err(diagnostics) => {
            assert!(
                !diagnostics.0.is_empty(),
                "an error result carries diagnostics"
            );
            render(&diagnostics);
        }
    }
}

fn render(diagnostic: &dyn miette::Diagnostic) {
    let mut out = String::new();
    let handler = miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::none());
    handler
        .render_report(&mut out, diagnostic)
        .expect("diagnostics render");
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize, usize),
    Duplicate(usize, usize, usize),
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        let length = bytes.len().max(1);
        match *mutation {
            Mutation::Flip(at, mask) => {
                if let Some(byte) = bytes.get_mut(at % length) {
                    *byte ^= mask;
                }
            }
            Mutation::Insert(at, byte) => {
                let at = at % (bytes.len() + 1);
                bytes.insert(at, byte);
            }
            Mutation::Delete(at, count) => {
                let at = at % length;
                let end = (at + count % 16).min(bytes.len());
                if at < end {
                    bytes.drain(at..end);
                }
            }
            Mutation::Duplicate(from, count, to) => {
                let from = from % length;
                let end = (from + count % 64).min(bytes.len());
                let piece: Vec<u8> = bytes.get(from..end).map(<[u8]>::to_vec).unwrap_or_default();
                let to = to % (bytes.len() + 1);
                bytes.splice(to..to, piece);
            }
        }
    }
    bytes
}

/// Bytes that matter to KDL and to graphbuild, so mutations reach deep into the grammar.
fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        prop::sample::select(b"{}()\";=#$/\\\n \t:.@-0123456789rsx".to_vec()),
        any::<u8>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, mask)| Mutation::Flip(at, mask)),
        (any::<usize>(), interesting_byte()).prop_map(|(at, byte)| Mutation::Insert(at, byte)),
        (any::<usize>(), any::<usize>()).prop_map(|(at, count)| Mutation::Delete(at, count)),
        (any::<usize>(), any::<usize>(), any::<usize>())
            .prop_map(|(from, count, to)| Mutation::Duplicate(from, count, to)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&bytes);
    }

    #[test]
    fn kdl_like_text_never_panics(text in "[a-z{}\";=#$/\\\\ \n:.\\-0-9]{0,200}") {
        check(text.as_bytes());
    }

    #[test]
    fn mutated_corpus_never_panics(
        pick in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..8),
    ) {
        let corpus = corpus();
        let original = corpus[pick.index(corpus.len())].clone().into_bytes();
        check(&apply(original, &mutations));
    }
}

/// Each corpus file with each single byte deleted: a systematic sweep that catches panics
/// at every position of real inputs (truncated strings, dangling `{`, broken `${`).
#[test]
fn every_single_byte_deletion_of_the_design_sketch_is_handled() {
    let sketch = std::fs::read(input_dir().join("design_sketch.kdl")).expect("sketch");
    for at in 0..sketch.len() {
        let mut bytes = sketch.clone();
        bytes.remove(at);
        check(&bytes);
    }
}
