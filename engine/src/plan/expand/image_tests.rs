//! Image tests: one [`TestPlan`] per (image × platform × test), keyed by the image node's key
//! and the test's own [`TestOp`].
//!
//! The command follows `docker run`: a test without `run` or `cmd` runs the image's entrypoint
//! and cmd; `cmd` replaces the cmd after the entrypoint; `entrypoint` replaces the entrypoint
//! and drops the image's cmd (as `--entrypoint` does); `run` runs its command alone. Runtime
//! commands are substituted as the image's own `cmd` is: build variables at plan time, checked
//! so that no value brings shell syntax, everything else left to the container's shell.

use graphbuild_lang::Code;
use graphbuild_lang::ir::{self, TestCommand};
use graphbuild_lang::platform::Platform;
use graphbuild_lang::subst::Mode;

use super::{Expander, Vars, automatic_args, parse_duration};
use crate::plan::{ImagePlan, OutputCheckOp, StepInputs, TestOp, TestPlan};
use crate::state::ImageSettings;

impl Expander<'_> {
    /// The tests of `image` for each of the plan's platforms, appended to the plan's tests.
    pub(super) fn image_tests(
        &mut self,
        image: &ir::Image,
        plan: &ImagePlan,
        matrix: &[(String, String)],
    ) {
        for test in &image.tests {
            for (platform, node) in &plan.platforms {
                if let Some(only) = &test.platforms
                    && !only.contains(platform)
                {
                    continue;
                }
                if let Some(mut planned) = self.image_test(test, plan, platform, *node, matrix) {
                    planned.id = self.tests.len();
                    self.tests.push(planned);
                }
            }
        }
    }

    fn image_test(
        &mut self,
        test: &ir::ImageTest,
        plan: &ImagePlan,
        platform: &Platform,
        node: usize,
        matrix: &[(String, String)],
    ) -> Option<TestPlan> {
        let host = self.options.host.clone();
        let globals = self.globals(platform, matrix);
        let vars = Vars::new(matrix.to_vec(), globals, automatic_args(platform, &host));
        let settings = self.nodes[node].settings.clone();
        let argv = self.test_argv(test, &vars, &settings);
        if argv.is_empty() {
            // Reported once for all the image's platforms (`error` drops repeats).
            self.error(
                test.at,
                Code::TestCommand,
                format!(
                    "test `{}` of image `{}` has no command: the image has no entrypoint or cmd",
                    test.name.raw, plan.name
                ),
                "what does it run?",
                Some("give the test `run \"…\"`, or the image an `entrypoint` or `cmd`".into()),
            );
            return None;
        }
        let mut env = settings.clone();
        for (name, value) in &test.env {
            let value = self.substitute(value, Mode::Strict, &vars, Some(&env));
            env.set_env(name, value);
        }
        let workdir = match &test.workdir {
            Some(text) => {
                let value = self.substitute(text, Mode::Strict, &vars, Some(&env));
                if value.starts_with('/') {
                    value
                } else {
                    format!("{}/{value}", settings.workdir().trim_end_matches('/'))
                }
            }
            None => settings.workdir().to_string(),
        };
        let user = match &test.user {
            Some(text) => self.substitute(text, Mode::Strict, &vars, Some(&env)),
            None => settings.user.clone(),
        };
        let mut output = Vec::new();
        for check in &test.output {
            let contains = check
                .contains
                .as_ref()
                .map(|text| self.substitute(text, Mode::Strict, &vars, Some(&env)));
            let matches = check.matches.as_ref().map(|text| text.raw.clone());
            if let (Some(pattern), Some(text)) = (&matches, &check.matches)
                && let Err(error) = regex::Regex::new(pattern)
            {
                self.error(
                    text.at,
                    Code::TestOutput,
                    format!("`{pattern}` is not a regular expression: {error}"),
                    "this pattern",
                    Some("the syntax is the Rust regex crate's (docs.rs/regex); escape a literal `.` or `(` with `\\\\`".into()),
                );
            }
            let stream = match check.stream {
                ir::OutputStream::Output => "output",
                ir::OutputStream::Stdout => "stdout",
                ir::OutputStream::Stderr => "stderr",
            };
            output.push(OutputCheckOp {
                stream: stream.to_string(),
                contains,
                matches,
            });
        }
        let timeout_ms = test.timeout.as_ref().and_then(|text| {
            let value = self.substitute(text, Mode::Strict, &vars, Some(&env));
            match parse_duration(&value) {
                Some(ns) if ns >= 1_000_000 => Some(ns / 1_000_000),
                _ => {
                    self.error(
                        text.at,
                        Code::Duration,
                        format!("`{value}` is not a test timeout"),
                        "this duration",
                        Some("write durations like \"30s\", \"2m\" or \"1m30s\"".into()),
                    );
                    None
                }
            }
        });
        let op = TestOp {
            platform: platform.to_string(),
            argv,
            env: env.env.clone(),
            workdir,
            user,
            exit_code: test.exit_code,
            output,
            timeout_ms,
        };
        let image_node = &self.nodes[node];
        let key = op.key(&image_node.key);
        let inputs = StepInputs {
            op: serde_json::to_value(&op).unwrap_or_default(),
            vars: vars.take_reads(),
            files: Default::default(),
            base: format!("image `{}` (node key {})", plan.name, image_node.key),
        };
        Some(TestPlan {
            id: 0,
            image: plan.name.clone(),
            name: test.name.raw.clone(),
            platform: platform.clone(),
            node,
            key,
            pending: image_node.pending,
            description: format!("TEST {} {:?}", test.name.raw, op.argv),
            op,
            at: test.at,
            inputs,
        })
    }

    /// The test's argv as `docker run` would make it from the image's settings.
    fn test_argv(
        &mut self,
        test: &ir::ImageTest,
        vars: &Vars,
        settings: &ImageSettings,
    ) -> Vec<String> {
        if let TestCommand::Run(command) = &test.command {
            return self.runtime_command(command, vars, settings);
        }
        let entrypoint: Vec<String> = match &test.entrypoint {
            Some(command) => self.runtime_command(command, vars, settings),
            None => settings.entrypoint.clone().unwrap_or_default(),
        };
        let arguments: Vec<String> = match &test.command {
            TestCommand::Cmd(command) => self.runtime_command(command, vars, settings),
            // `--entrypoint` resets the image's cmd.
            _ if test.entrypoint.is_some() => Vec::new(),
            _ => settings.cmd.clone().unwrap_or_default(),
        };
        entrypoint.into_iter().chain(arguments).collect()
    }
}
