//! Running an image test: the command in the finished image's filesystem, contained like a
//! `run` step, on a throwaway upper directory so the image never changes; then its exit code
//! and output checked. A passed test is recorded in the store under its key (and in the team
//! cache, like a step's result), so a warm build, or a merge of platforms built elsewhere, does
//! not run it again; a failed one is not recorded.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::events::{Event, StepStatus};
use crate::plan::{DEFAULT_TEST_TIMEOUT_MS, TestOp, TestPlan};
use crate::sandbox::{self, ExitStatusKind, NetworkMode, RunTask, SandboxSpec, Stream, Task};

use super::faults::TestFault;
use super::step_cache::CacheError;
use super::{DepOutputs, Executor, NodeFailure, StepError, Subject};

/// How much of a test's output is kept for its `output` checks: beyond this, the rest is
/// dropped (the checks see the first part), so a test cannot fill memory.
const MAX_CHECKED_OUTPUT: usize = 1 << 20;

/// How many of stderr's last lines a failure shows when they did not arrive last.
const STDERR_TAIL_LINES: usize = 5;

/// What the store records for a passed test.
#[derive(Serialize, Deserialize)]
struct TestRecord {
    passed: bool,
}

impl Executor<'_> {
    /// Whether this test passed before with this key (unless `--no-cache`): recorded in the
    /// store, or in the team cache (`--cache-from`), whose record is then kept locally. A
    /// local pass the team cache lacks is published to it, as a step's result is.
    pub(super) fn test_passed_before(&self, test: &TestPlan) -> Result<bool, Box<NodeFailure>> {
        if self.options.no_cache {
            return Ok(false);
        }
        let fail = |error: CacheError| self.test_failure(test, error, Vec::new());
        let passed = |bytes: &[u8]| {
            serde_json::from_slice::<TestRecord>(bytes).is_ok_and(|record| record.passed)
        };
        if self
            .store
            .get_action(&test.key)
            .is_some_and(|bytes| passed(&bytes))
        {
            self.publish_test(test).map_err(fail)?;
            return Ok(true);
        }
        let Some(remote) = self.usable_remote(self.options.remote.from.as_ref()) else {
            return Ok(false);
        };
        let fetched = (|| -> Result<Option<Vec<u8>>, CacheError> {
            let temp = self
                .store
                .temp_dir()
                .map_err(|source| CacheError::TempDir { source })?;
            let fetched = remote.get_step_record(&test.key.hex(), temp.path());
            self.remote_entry(remote, fetched, None)
        })();
        match fetched {
            Ok(Some(bytes)) if passed(&bytes) => {
                self.store.put_action(&test.key, &bytes).map_err(|source| {
                    fail(CacheError::Record {
                        what: "test",
                        source,
                    })
                })?;
                Ok(true)
            }
            Ok(Some(_)) => {
                self.warn_bad_remote_entry(remote, "an image test record is not valid");
                Ok(false)
            }
            Ok(None) => Ok(false),
            Err(error) => self
                .remote_trouble(remote, error)
                .map(|()| false)
                .map_err(fail),
        }
    }

    /// Publish a passed test to the team cache (`--cache-to`) unless it has it.
    fn publish_test(&self, test: &TestPlan) -> Result<(), CacheError> {
        let Some(remote) = self.usable_remote(self.options.remote.to.as_ref()) else {
            return Ok(());
        };
        let result = (|| -> Result<(), CacheError> {
            let key = test.key.hex();
            if self
                .remote_entry(remote, remote.get_action(&key), None)?
                .is_some()
            {
                return Ok(());
            }
            let bytes = serde_json::to_vec(&TestRecord { passed: true }).map_err(|source| {
                CacheError::Encode {
                    what: "test",
                    source,
                }
            })?;
            let digest = remote.put_blob_bytes(&bytes)?;
            remote.put_action(
                &key,
                &crate::remote::ActionResult::for_step_record(digest, bytes.len() as u64),
            )?;
            Ok(())
        })();
        match result {
            Ok(()) => Ok(()),
            Err(error) => self.remote_trouble(remote, error),
        }
    }

    pub(super) fn run_test(
        &self,
        test: &TestPlan,
        inputs: &DepOutputs<'_>,
    ) -> Result<(), Box<NodeFailure>> {
        let platform = test.platform.to_string();
        self.events.emit(Event::TestStarted {
            test: test.id,
            image: test.image.clone(),
            platform: platform.clone(),
            name: test.name.clone(),
        });
        let started = Instant::now();
        let result = self.execute_test(test, inputs);
        self.events.emit(Event::Test {
            test: test.id,
            image: test.image.clone(),
            platform,
            name: test.name.clone(),
            status: if result.is_ok() {
                StepStatus::Executed
            } else {
                StepStatus::Failed
            },
            duration_ms: Some(started.elapsed().as_millis() as u64),
        });
        result?;
        let record = serde_json::to_vec(&TestRecord { passed: true }).unwrap_or_default();
        self.store
            .put_action(&test.key, &record)
            .map_err(|source| {
                let error = CacheError::Record {
                    what: "test",
                    source,
                };
                self.test_failure(test, error, Vec::new())
            })?;
        self.publish_test(test)
            .map_err(|error| self.test_failure(test, error, Vec::new()))
    }

    fn execute_test(
        &self,
        test: &TestPlan,
        inputs: &DepOutputs<'_>,
    ) -> Result<(), Box<NodeFailure>> {
        let fail = |error: StepError| self.test_failure(test, error, Vec::new());
        let image = inputs.output_of(test.node).map_err(fail)?;
        let lowerdirs = self
            .snapshots(&image.layers)
            .map_err(|error| fail(error.into()))?;
        // The test's changes land here and are thrown away with it.
        let temp = self
            .store
            .temp_dir()
            .map_err(|source| fail(StepError::TempDir { source }))?;
        let upperdir = temp.path().join("upper");
        let overlay_workdir = temp.path().join("work");
        for dir in [&upperdir, &overlay_workdir] {
            std::fs::create_dir_all(dir).map_err(|source| {
                fail(StepError::Io {
                    action: "create",
                    path: dir.clone(),
                    source,
                })
            })?;
        }
        let op = &test.op;
        let task = RunTask {
            argv: op.argv.clone(),
            env: op.env.clone(),
            cwd: op.workdir.clone(),
            user: op.user.clone(),
            script: None,
            cache_mounts: Vec::new(),
            tmpfs_mounts: Vec::new(),
            bind_mounts: Vec::new(),
            ssh_sockets: Vec::new(),
            stage_binds: Vec::new(),
            secret_files: Vec::new(),
            // A test checks the image, not the network: it runs without one, so its result is
            // worth caching.
            network: NetworkMode::None,
            hostname: String::new(),
            timeout_ms: Some(
                op.timeout_ms
                    .or(self.options.step_timeout_ms)
                    .unwrap_or(DEFAULT_TEST_TIMEOUT_MS),
            ),
            max_processes: self.options.step_max_processes,
            insecure: false,
            separate_stderr: true,
        };
        let overlay = self
            .overlay()
            .map_err(|unavailable| fail(unavailable.into()))?
            .overlay;
        let spec = SandboxSpec {
            lowerdirs,
            upperdir,
            overlay_workdir,
            overlay,
            task: Task::Run(task),
        };
        let sandbox_exe = self.sandbox_exe();
        let mut output = Captured::default();
        let outcome = sandbox::run_sandbox_streams(&sandbox_exe, &spec, &mut |stream, line| {
            output.push(stream, line);
        });
        drop(temp);
        let outcome = outcome.map_err(|error| fail(error.into()))?;
        match check(op, outcome.status, &output) {
            Ok(()) => Ok(()),
            Err(fault) => Err(self.test_failure(test, fault, output.tail(outcome.tail))),
        }
    }

    fn test_failure(
        &self,
        test: &TestPlan,
        error: impl Into<StepError>,
        tail: Vec<String>,
    ) -> Box<NodeFailure> {
        Box::new(NodeFailure {
            subject: Subject::Test(test.name.clone()),
            stage: test.image.clone(),
            platform: test.platform.to_string(),
            at: Some(test.at),
            step: None,
            error: std::sync::Arc::new(error.into()),
            tail,
        })
    }
}

/// A test's output: each stream, and both together in the order lines arrived. Lines are
/// joined by newlines with none after the last, so `$` ends a stream.
#[derive(Default)]
struct Captured {
    output: String,
    stdout: String,
    stderr: String,
}

impl Captured {
    fn push(&mut self, stream: Stream, line: &str) {
        let own = match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        };
        for text in [&mut self.output, own] {
            // Beyond the cap the checks see the first part: a test cannot fill memory.
            if text.len() < MAX_CHECKED_OUTPUT {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(line);
            }
        }
    }

    /// The tail to show for a failure: the last lines as they arrived; and, since lines of
    /// the two streams can arrive out of order, stderr's last lines after them when they are
    /// not among those already.
    fn tail(&self, mut tail: Vec<String>) -> Vec<String> {
        let last_errors: Vec<&str> = {
            let lines: Vec<&str> = self.stderr.lines().collect();
            lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].to_vec()
        };
        let shown = last_errors
            .iter()
            .all(|line| tail.iter().any(|seen| seen == line));
        if !shown {
            tail.push("── stderr, last lines ──".to_string());
            tail.extend(last_errors.iter().map(|line| line.to_string()));
        }
        tail
    }

    fn stream(&self, name: &str) -> &str {
        match name {
            "stdout" => &self.stdout,
            "stderr" => &self.stderr,
            _ => &self.output,
        }
    }
}

/// Whether a finished test passed; why not otherwise.
fn check(op: &TestOp, status: ExitStatusKind, captured: &Captured) -> Result<(), TestFault> {
    match status {
        ExitStatusKind::Exited(code) if code == op.exit_code => {}
        ExitStatusKind::Exited(code) => {
            return Err(TestFault::ExitCode {
                expected: op.exit_code,
                actual: code,
                argv: op.argv.clone(),
            });
        }
        other => {
            return Err(TestFault::Ended {
                expected: op.exit_code,
                how: other.to_string(),
                argv: op.argv.clone(),
            });
        }
    }
    for check in &op.output {
        let output = captured.stream(&check.stream);
        let what = match check.stream.as_str() {
            "stdout" => "stdout",
            "stderr" => "stderr",
            _ => "the output",
        };
        if let Some(text) = &check.contains
            && !output.contains(text.as_str())
        {
            return Err(TestFault::Missing {
                stream: what,
                text: text.clone(),
            });
        }
        if let Some(pattern) = &check.matches {
            // Checked when the plan was made; a failure here is still a clear failure.
            let regex = regex::Regex::new(pattern).map_err(|source| TestFault::Pattern {
                pattern: pattern.clone(),
                source,
            })?;
            if !regex.is_match(output) {
                return Err(TestFault::NoMatch {
                    stream: what,
                    pattern: pattern.clone(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::OutputCheckOp;

    fn op(exit_code: i32, contains: Option<&str>, matches: Option<&str>) -> TestOp {
        op_on("output", exit_code, contains, matches)
    }

    fn op_on(
        stream: &str,
        exit_code: i32,
        contains: Option<&str>,
        matches: Option<&str>,
    ) -> TestOp {
        TestOp {
            platform: "linux/amd64".into(),
            argv: vec!["app".into()],
            env: Vec::new(),
            workdir: "/".into(),
            user: String::new(),
            exit_code,
            output: vec![OutputCheckOp {
                stream: stream.into(),
                contains: contains.map(str::to_string),
                matches: matches.map(str::to_string),
            }],
            timeout_ms: None,
        }
    }

    #[test]
    fn exit_code_and_output_decide() {
        let mut output = Captured::default();
        output.push(Stream::Stdout, "app 1.2.3");
        output.push(Stream::Stderr, "warning: old");
        output.push(Stream::Stdout, "ready");
        let output = &output;
        assert!(check(&op(0, Some("1.2"), None), ExitStatusKind::Exited(0), output).is_ok());
        assert!(
            check(
                &op(0, None, Some(r"(?m)^ready$")),
                ExitStatusKind::Exited(0),
                output
            )
            .is_ok()
        );
        let wrong_code = check(&op(0, None, None), ExitStatusKind::Exited(3), output)
            .unwrap_err()
            .to_string();
        assert!(
            wrong_code.contains("expected exit code 0, got 3"),
            "{wrong_code}"
        );
        assert!(check(&op(3, None, None), ExitStatusKind::Exited(3), output).is_ok());
        let missing = check(&op(0, Some("2.0"), None), ExitStatusKind::Exited(0), output)
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("the output does not contain \"2.0\""),
            "{missing}"
        );
        let unmatched = check(&op(0, None, Some("^v")), ExitStatusKind::Exited(0), output)
            .unwrap_err()
            .to_string();
        assert!(unmatched.contains("does not match"), "{unmatched}");
        let killed = check(
            &op(0, None, None),
            ExitStatusKind::TimedOut { millis: 1000 },
            output,
        )
        .unwrap_err()
        .to_string();
        assert!(killed.contains("timeout"), "{killed}");
        // Each stream on its own; `output` has both, `$` ends each.
        assert!(
            check(
                &op(0, Some("warning"), Some("ready$")),
                ExitStatusKind::Exited(0),
                output
            )
            .is_ok()
        );
        assert!(
            check(
                &op_on("stdout", 0, Some("ready"), Some(r"\A(?s)app.*ready\z")),
                ExitStatusKind::Exited(0),
                output
            )
            .is_ok()
        );
        let not_on_stdout = check(
            &op_on("stdout", 0, Some("warning"), None),
            ExitStatusKind::Exited(0),
            output,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(not_on_stdout, "stdout does not contain \"warning\"");
        assert!(
            check(
                &op_on("stderr", 0, None, Some("^warning: old$")),
                ExitStatusKind::Exited(0),
                output
            )
            .is_ok()
        );
    }
}
