//! The loader never panics: arbitrary bytes, and byte-level mutations (flips, insertions,
//! deletions) of the golden inputs and the stdlib modules, all come back as a project or as
//! diagnostics — which must also render. Bounded so it runs in a few seconds in `cargo test`;
//! raise `PROPTEST_CASES` for a longer fuzzing session.
//!
//! The `graphbuild` binary is checked too (`binary_*` tests): crafted inputs — deep nesting,
//! huge matrices, long stage chains, bad UTF-8, a non-KDL import — and mutated corpus files
//! must make `graphbuild plan FILE` exit 0 or 2 within a time bound, never crash on a signal.
//! This file is also compiled as the cli crate's `never_panics` test, where Cargo builds the
//! binary first (`cargo test -p graphbuild --test never_panics`); the binary checks run only
//! there (see [`binary`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use graphbuild_lang::load_source;
use proptest::prelude::*;

/// `lang/tests/cases/input`, from the lang crate or from the cli crate that shares this file.
fn input_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lang/tests/cases/input")
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

/// The `graphbuild` binary, which Cargo builds for this file's copy in the cli crate. The
/// lang crate's copy has none (it cannot depend on the binary, and a `target/debug` one may be
/// stale): there the `binary_*` tests say so and return; `cargo test --workspace` and
/// `cargo test -p graphbuild --test never_panics` run them.
fn binary() -> Option<PathBuf> {
    let path = option_env!("CARGO_BIN_EXE_graphbuild").map(PathBuf::from);
    if path.is_none() {
        eprintln!("the binary checks run in the cli crate's copy of this test");
    }
    path
}

/// `text` with every quoted string that names a registry image (a host with a `.` or `:`
/// before the first `/`, or `NAME:TAG`) replaced by a missing local layout, so planning a
/// mutation of it never waits on the network. `std:` modules default to registry images, so
/// files importing them are left out by the caller.
fn offline(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('"').unwrap_or(after.len());
        let value = &after[..close];
        let host = value.split('/').next().unwrap_or("");
        let name_tag = !value.contains('/')
            && value.split_once(':').is_some_and(|(name, tag)| {
                !name.is_empty()
                    && !tag.is_empty()
                    && !value.contains(['$', ' ', '{'])
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            });
        let registry = value.contains('/') && host.contains(['.', ':']) && !host.starts_with('.');
        let local = value.starts_with("oci:") || value.starts_with("std:");
        if (registry || name_tag) && !local {
            out.push_str("\"oci:./missing:1\"");
        } else {
            out.push('"');
            out.push_str(value);
            if close < after.len() {
                out.push('"');
            }
        }
        rest = after.get(close + 1..).unwrap_or("");
    }
    out.push_str(rest);
    out
}

/// How long one `graphbuild plan` may take on a crafted input.
const TIME_BOUND: Duration = Duration::from_secs(60);

/// Runs `graphbuild plan FILE` and asserts it exits 0 or 2, on its own, in time. Returns the
/// exit code and stderr.
fn plan(binary: &Path, file: &Path) -> (i32, String) {
    use std::os::unix::process::ExitStatusExt;
    let cache = tempfile::tempdir().expect("tempdir");
    let stderr_path = cache.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut child = Command::new(binary)
        .arg("plan")
        .arg(file)
        .env("GRAPHBUILD_CACHE_DIR", cache.path().join("store"))
        .env("NO_COLOR", "1")
        .env_remove("GRAPHBUILD_CACHE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn graphbuild");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > TIME_BOUND {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "graphbuild plan {} took more than {TIME_BOUND:?}",
                file.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let tail: String = stderr.chars().take(2_000).collect();
    if let Some(signal) = status.signal() {
        panic!(
            "graphbuild plan {} was killed by signal {signal}:\n{tail}",
            file.display()
        );
    }
    let code = status.code().expect("an exit code");
    assert!(
        code == 0 || code == 2,
        "graphbuild plan {} exited {code}:\n{tail}",
        file.display()
    );
    (code, stderr)
}

/// Writes `files` (name, bytes) into a fresh directory and plans the first one.
fn plan_files(binary: &Path, files: &[(&str, Vec<u8>)]) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).expect("write");
    }
    plan(binary, &dir.path().join(files[0].0))
}

fn expect_invalid(binary: &Path, what: &str, files: &[(&str, Vec<u8>)], message: &str) {
    let (code, stderr) = plan_files(binary, files);
    assert_eq!(code, 2, "{what}: {stderr}");
    assert!(
        stderr.contains(message),
        "{what}: no `{message}` in\n{stderr}"
    );
}

const HEADER: &str = "platforms \"linux/amd64\"\nstage s0 { from \"scratch\"; }\n";

#[test]
fn offline_replaces_registry_images_only() {
    let text = "from \"docker.io/library/alpine:3\"\nfrom \"python:3.12-slim\" x=\"localhost:5000/a\"\n\
                copy \"src/\" \"/app/\"; platforms \"linux/arm/v7\"; from \"oci:../f:1\"; env A=\"${B:-x}\" q=\"a:b c\"";
    assert_eq!(
        offline(text),
        "from \"oci:./missing:1\"\nfrom \"oci:./missing:1\" x=\"oci:./missing:1\"\n\
         copy \"src/\" \"/app/\"; platforms \"linux/arm/v7\"; from \"oci:../f:1\"; env A=\"${B:-x}\" q=\"a:b c\""
    );
}

#[test]
fn binary_rejects_crafted_inputs_cleanly() {
    let Some(binary) = binary() else { return };
    let deep = format!("{HEADER}{}{}", "a {".repeat(2_000), "}".repeat(2_000));
    expect_invalid(
        &binary,
        "deep nesting",
        &[("b.kdl", deep.into_bytes())],
        "b.kdl:3:",
    );
    let comments = format!("{HEADER}{}{}", "/*".repeat(5_000), "*/".repeat(5_000));
    expect_invalid(
        &binary,
        "nested comments",
        &[("b.kdl", comments.into_bytes())],
        "comments are nested",
    );
    let long_comment = format!("{HEADER}/*{}*/", "*a".repeat(200_000));
    expect_invalid(
        &binary,
        "long comment",
        &[("b.kdl", long_comment.into_bytes())],
        "comment is too long",
    );
    // kdl-rs restarts itself recursively after each place it gives up: stray `}` and bad
    // tokens by the hundred thousand.
    for (what, text) in [
        ("stray closing braces", "}".repeat(150_000)),
        ("bad tokens", "a 1 )\n(t)\n".repeat(60_000)),
        (
            "chained slashdashes",
            format!("{}a 1", "/- ".repeat(100_000)),
        ),
    ] {
        let (code, stderr) = plan_files(&binary, &[("b.kdl", text.into_bytes())]);
        assert_eq!(code, 2, "{what}: {stderr}");
    }
    let huge = format!("{HEADER}{}", "// padding\n".repeat(200_000));
    expect_invalid(
        &binary,
        "huge file",
        &[("b.kdl", huge.into_bytes())],
        "a build file may have at most",
    );
    let axes: String = (0..9)
        .map(|key| {
            let values: Vec<String> = (0..10).map(|value| format!("\"{value}\"")).collect();
            format!("K{key} {}; ", values.join(" "))
        })
        .collect();
    let matrix = format!("{HEADER}image x {{\n  stage s0\n  matrix {{ {axes}}}\n}}\n");
    expect_invalid(
        &binary,
        "huge matrix",
        &[("b.kdl", matrix.into_bytes())],
        "b.kdl:5:3",
    );
    let substitution = format!(
        "{HEADER}stage t {{ from s0; env X=\"{}x{}\"; }}\nimage t {{ stage t; }}\n",
        "${A:-".repeat(50_000),
        "}".repeat(50_000)
    );
    let (code, _) = plan_files(&binary, &[("b.kdl", substitution.into_bytes())]);
    assert_eq!(code, 2, "nested substitution");
    let many_stages: String = (1..=10_001)
        .map(|index| format!("stage s{index} {{ from \"scratch\"; }}\n"))
        .collect();
    expect_invalid(
        &binary,
        "too many stages",
        &[("b.kdl", format!("{HEADER}{many_stages}").into_bytes())],
        "more than 10000 stages",
    );
    let mut bad_utf8 = HEADER.as_bytes().to_vec();
    bad_utf8.extend_from_slice(b"stage x { run \"\xff\xfe\"; }\n");
    expect_invalid(
        &binary,
        "bad UTF-8",
        &[("b.kdl", bad_utf8.clone())],
        "b.kdl",
    );
    expect_invalid(
        &binary,
        "bad UTF-8 import",
        &[
            (
                "b.kdl",
                format!("import \"./m.kdl\"\n{HEADER}").into_bytes(),
            ),
            ("m.kdl", bad_utf8),
        ],
        "b.kdl:1:8",
    );
    let json = b"{\n  \"name\": \"x\",\n  \"list\": [1, 2]\n}\n".to_vec();
    expect_invalid(
        &binary,
        "non-KDL import",
        &[
            (
                "b.kdl",
                format!("import \"./m.json\"\n{HEADER}").into_bytes(),
            ),
            ("m.json", json),
        ],
        "is imported here",
    );
    let mut chain: Vec<(String, Vec<u8>)> = (0..40)
        .map(|index| {
            (
                format!("m{index}.kdl"),
                format!("import \"./m{}.kdl\"\n", index + 1).into_bytes(),
            )
        })
        .collect();
    chain.push(("m40.kdl".into(), HEADER.as_bytes().to_vec()));
    let files: Vec<(&str, Vec<u8>)> = chain
        .iter()
        .map(|(name, bytes)| (name.as_str(), bytes.clone()))
        .collect();
    expect_invalid(
        &binary,
        "import chain",
        &files,
        "imports are chained more than",
    );
}

/// 2,000 stages, each `from` the previous one: planning must end cleanly (the engine's
/// expansion used to recurse once per stage and overflow the stack here).
#[test]
fn binary_plans_a_long_stage_chain_without_crashing() {
    let Some(binary) = binary() else { return };
    let mut text = String::from(HEADER);
    for index in 1..2_000 {
        text.push_str(&format!("stage s{index} {{ from s{}; }}\n", index - 1));
    }
    text.push_str("image chain { stage s1999; }\n");
    plan_files(&binary, &[("b.kdl", text.into_bytes())]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// Mutated corpus files through the whole binary: load, expand, render.
    #[test]
    fn binary_never_crashes_on_mutated_corpus(
        pick in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..8),
    ) {
        let Some(binary) = binary() else { return Ok(()) };
        let corpus: Vec<String> = corpus()
            .into_iter()
            .filter(|text| !text.contains("std:"))
            .map(|text| offline(&text))
            .collect();
        let original = corpus[pick.index(corpus.len())].clone().into_bytes();
        // Relative imports of corpus files do not resolve here: that is one more error path.
        plan_files(&binary, &[("fuzz.kdl", apply(original, &mutations))]);
    }
}
