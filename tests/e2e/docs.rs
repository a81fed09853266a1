//! docs/cli.md against the real commands: every long flag of every command (from
//! `graphbuild CMD --help`, i.e. the clap definitions) is in one of that command's flag tables,
//! and every flag in those tables exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// Which commands a `| flag | meaning |` table under a heading describes.
const SECTIONS: &[(&str, &[&str])] = &[
    (
        "## Selecting what to build",
        &["run", "plan", "verify", "lock"],
    ),
    ("## Build inputs", &["run", "verify"]),
    ("## `graphbuild run`", &["run"]),
    ("## `graphbuild build`", &["build"]),
    ("## `graphbuild convert`", &["convert"]),
    ("## `graphbuild plan`", &["plan"]),
    ("## `graphbuild doctor`", &["doctor"]),
    ("## `graphbuild inspect`", &["inspect"]),
    ("## `graphbuild worker`", &["worker"]),
    (
        "## `graphbuild cache du`",
        &["cache du", "cache prune", "cache verify", "cache serve"],
    ),
];

const COMMANDS: &[&str] = &[
    "run",
    "build",
    "convert",
    "plan",
    "verify",
    "lock",
    "doctor",
    "inspect",
    "worker",
    "cache du",
    "cache prune",
    "cache verify",
    "cache serve",
    "completions",
];

fn long_flags(text: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("--") {
        let name: String = rest[at + 2..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
            .collect();
        if !name.is_empty() {
            flags.insert(format!("--{name}"));
        }
        rest = &rest[at + 2 + name.len()..];
    }
    flags
}

/// The long flags `graphbuild CMD --help` lists, without `--help` and `--version`.
fn flags_of(command: &str) -> BTreeSet<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_graphbuild"))
        .args(command.split(' '))
        .arg("--help")
        .env("COLUMNS", "200")
        .output()
        .expect("run graphbuild");
    assert!(output.status.success(), "{command} --help failed");
    let help = String::from_utf8(output.stdout).expect("UTF-8 help");
    help.lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with('-'))
        .filter_map(|line| long_flags(line.split("  ").next().unwrap_or(line)).pop_first())
        .filter(|flag| flag != "--help" && flag != "--version")
        .collect()
}

/// Per command, the flags its tables in docs/cli.md list.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli.md");
    let text = std::fs::read_to_string(&path).expect("docs/cli.md");
    let mut tables: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section: Option<&[&str]> = None;
    let mut heading = String::new();
    let mut in_flag_table = false;
    for line in text.lines() {
        if line.starts_with('#') {
            heading = line.to_string();
            section = SECTIONS
                .iter()
                .find(|(prefix, _)| line.starts_with(prefix))
                .map(|(_, commands)| *commands);
            in_flag_table = false;
            continue;
        }
        if line.starts_with("| flag |") {
            assert!(
                section.is_some(),
                "a flag table under `{heading}`: add the heading to SECTIONS"
            );
            in_flag_table = true;
            continue;
        }
        if !line.starts_with('|') {
            in_flag_table = false;
            continue;
        }
        if !in_flag_table || line.starts_with("|---") {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").collect();
        let flags = long_flags(cells[0]);
        // `(\`du\`, \`prune\`) …`: the row is for those subcommands only.
        let only: Vec<&str> = cells
            .get(1)
            .and_then(|meaning| meaning.trim().strip_prefix('('))
            .and_then(|meaning| meaning.split_once(')'))
            .map(|(inside, _)| {
                inside
                    .split(", ")
                    .map(|word| word.trim_matches('`'))
                    .collect()
            })
            .unwrap_or_default();
        for command in section.unwrap_or_default() {
            let last = command.rsplit(' ').next().unwrap_or(command);
            if only.is_empty() || only.contains(&last) {
                tables
                    .entry(command.to_string())
                    .or_default()
                    .extend(flags.iter().cloned());
            }
        }
    }
    tables
}

#[test]
fn every_flag_is_documented_and_every_documented_flag_exists() {
    let documented = documented();
    let mut problems = Vec::new();
    for command in COMMANDS {
        let real = flags_of(command);
        let written = documented.get(*command).cloned().unwrap_or_default();
        for missing in real.difference(&written) {
            problems.push(format!(
                "`graphbuild {command} {missing}` is not in docs/cli.md"
            ));
        }
        for extra in written.difference(&real) {
            problems.push(format!(
                "docs/cli.md lists `{extra}` for `graphbuild {command}`, which has no such flag"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_help_parser_sees_every_kind_of_flag() {
    let run = flags_of("run");
    for flag in [
        "--output",
        "--jobs",
        "--quiet",
        "--platform",
        "--cache",
        "--cache-from",
    ] {
        assert!(run.contains(flag), "{flag} not found in {run:?}");
    }
    assert!(!run.contains("--help"));
}
