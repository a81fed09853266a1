//! Lowering an image's `test NAME { … }` nodes: the command, the settings it overrides and
//! what it must return and print.

use kdl::{KdlNode, KdlValue};

use crate::Code;
use crate::ir::{
    Command, FileId, ImageTest, Loc, OutputCheck, OutputStream, PlatformSpec, TestCommand,
};

use super::*;

impl Loader {
    /// `test NAME { … }` in an image; `None` after reporting a problem.
    pub(super) fn lower_test(&mut self, node: &KdlNode, file: FileId) -> Option<ImageTest> {
        let node_at = Self::loc(file, node.name().span());
        self.check_no_properties(node, file, "test");
        let name = self.node_name(node, file, "test")?;
        let children: Vec<KdlNode> = node
            .children()
            .map(|children| children.nodes().to_vec())
            .unwrap_or_default();
        let mut command = TestCommand::Image;
        let mut command_at: Option<(Loc, &str)> = None;
        let mut entrypoint: Option<(Command, Loc)> = None;
        let mut user = None;
        let mut workdir = None;
        let mut env = Vec::new();
        let mut exit_code = 0;
        let mut output = Vec::new();
        let mut timeout = None;
        let mut platforms = None;
        let mut seen: Vec<(String, Loc)> = Vec::new();
        let mut failed = false;
        for child in &children {
            let child_at = Self::loc(file, child.name().span());
            let kind = child.name().value();
            let Some(child_spec) = spec::find(spec::TEST, kind) else {
                self.unknown_node(child, file, kind, &spec::names(spec::TEST), "in `test`");
                failed = true;
                continue;
            };
            // Every setting but `env` and the output checks is given once.
            if !matches!(kind, "env" | "output" | "stdout" | "stderr") {
                if let Some((_, first)) = seen.iter().find(|(seen, _)| seen == kind) {
                    let diagnostic = Diagnostic::error(
                        Code::TestSetting,
                        format!("`{kind}` is set twice in test `{}`", name.raw),
                    )
                    .with_label(&self.sources, child_at, "set again")
                    .with_label(&self.sources, *first, "first set here")
                    .with_help(
                        "a test has one of each setting; write another test for another command",
                    );
                    self.diagnostics.push(diagnostic);
                    failed = true;
                    continue;
                }
                seen.push((kind.to_string(), child_at));
            }
            match kind {
                "run" | "cmd" => {
                    if let Some((first, first_kind)) = command_at {
                        let diagnostic = Diagnostic::error(
                            Code::TestCommand,
                            "a test has either `run` or `cmd`",
                        )
                        .with_label(&self.sources, child_at, "second command")
                        .with_label(&self.sources, first, format!("`{first_kind}` here"))
                        .with_help("`run \"…\"` runs a command on its own; `cmd \"…\"` gives arguments to the image's entrypoint, as `docker run IMAGE ARGS…` does");
                        self.diagnostics.push(diagnostic);
                        failed = true;
                        continue;
                    }
                    let lowered = if kind == "run" {
                        self.check_no_children(child, file, kind);
                        self.check_no_properties(child, file, kind);
                        self.run_command(child, file, kind).map(TestCommand::Run)
                    } else {
                        self.argv_command(child, file, child_spec)
                            .map(TestCommand::Cmd)
                    };
                    match lowered {
                        Some(lowered) => {
                            command = lowered;
                            command_at =
                                Some((child_at, if kind == "run" { "run" } else { "cmd" }));
                        }
                        None => failed = true,
                    }
                }
                "entrypoint" => match self.argv_command(child, file, child_spec) {
                    Some(lowered) => entrypoint = Some((lowered, child_at)),
                    None => failed = true,
                },
                "user" => user = self.single(child, file, child_spec),
                "workdir" => workdir = self.single(child, file, child_spec),
                "timeout" => timeout = self.single(child, file, child_spec),
                "env" => {
                    self.check_no_children(child, file, kind);
                    env.extend(self.key_values(child, file, kind));
                }
                "exit" => match self.exit_code(child, file) {
                    Some(code) => exit_code = code,
                    None => failed = true,
                },
                "output" | "stdout" | "stderr" => {
                    match self.output_check(child, file, child_spec) {
                        Some(check) => output.push(check),
                        None => failed = true,
                    }
                }
                "platforms" => {
                    self.check_no_children(child, file, kind);
                    self.check_no_properties(child, file, kind);
                    let mut literal = Vec::new();
                    for spec in self.platform_list(child, file) {
                        match spec {
                            PlatformSpec::Literal(platform, _) => literal.push(platform),
                            PlatformSpec::Dynamic(text) => {
                                self.error(
                                    Code::TestSetting,
                                    "a test's `platforms` must be literal platforms",
                                    text.at,
                                    "contains a variable",
                                    Some("list the platforms the test runs on, for example platforms \"linux/amd64\" \"linux/arm64\"".into()),
                                );
                                failed = true;
                            }
                        }
                    }
                    platforms = Some(literal);
                }
                _ => {}
            }
        }
        if let (TestCommand::Run(_), Some((_, at))) = (&command, &entrypoint) {
            let diagnostic = Diagnostic::error(
                Code::TestCommand,
                "`run` in a test does not use an entrypoint",
            )
            .with_label(&self.sources, *at, "entrypoint given here")
            .with_help("`run \"…\"` runs its command as it is; to call another entrypoint with arguments, write `entrypoint \"…\"` with `cmd \"…\"`");
            self.diagnostics.push(diagnostic);
            failed = true;
        }
        if failed {
            return None;
        }
        Some(ImageTest {
            name,
            at: node_at,
            command,
            entrypoint: entrypoint.map(|(command, _)| command),
            user,
            workdir,
            env,
            exit_code,
            output,
            timeout,
            platforms,
        })
    }

    /// `exit N`, N from 0 to 255.
    fn exit_code(&mut self, node: &KdlNode, file: FileId) -> Option<i32> {
        self.check_no_children(node, file, "exit");
        self.check_no_properties(node, file, "exit");
        let node_at = Self::loc(file, node.name().span());
        let arguments = positional(node);
        let [entry] = arguments.as_slice() else {
            self.error(
                Code::TestExit,
                "`exit` takes one exit code",
                node_at,
                "one number expected",
                Some("write `exit 0` (the default) or the code the command must end with, for example `exit 1`".into()),
            );
            return None;
        };
        let at = Self::loc(file, entry.span());
        match entry.value() {
            KdlValue::Integer(code) if (0..=255).contains(code) => Some(*code as i32),
            KdlValue::Integer(code) => {
                self.error(
                    Code::TestExit,
                    format!("exit code {code} is out of range"),
                    at,
                    "not from 0 to 255",
                    Some("a process's exit code is a number from 0 to 255".into()),
                );
                None
            }
            _ => {
                self.error(
                    Code::TestExit,
                    "`exit` takes a number",
                    at,
                    "not a number",
                    Some("write the exit code unquoted, for example `exit 1`".into()),
                );
                None
            }
        }
    }

    /// `output|stdout|stderr contains="…" matches="…"`: at least one of the two.
    fn output_check(
        &mut self,
        node: &KdlNode,
        file: FileId,
        spec: &spec::NodeSpec,
    ) -> Option<OutputCheck> {
        let kind = spec.name;
        self.check_no_arguments(node, file, kind);
        let at = Self::loc(file, node.name().span());
        let props = self.node_properties(node, file, spec);
        let contains = props.text("contains");
        let matches = props.text("matches");
        if contains.is_none() && matches.is_none() {
            self.error(
                Code::TestOutput,
                format!("`{kind}` needs contains=\"…\" or matches=\"…\""),
                at,
                "nothing to check",
                Some(format!("write `{kind} contains=\"1.2.3\"`, or `{kind} matches=\"^v[0-9]+\"` for a regular expression")),
            );
            return None;
        }
        let stream = match kind {
            "stdout" => OutputStream::Stdout,
            "stderr" => OutputStream::Stderr,
            _ => OutputStream::Output,
        };
        Some(OutputCheck {
            stream,
            contains,
            matches,
            at,
        })
    }
}
