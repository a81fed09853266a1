//! The client side of remote execution: a step's action uploaded, executed, followed to its
//! end, and its layer put into the local store, verified.

use std::collections::HashSet;
use std::io::Read;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning::{self as lro, operation};
use prost::Message;

use super::{LAYER_PATH, OUTCOME_PATH, PlatformKeys, RemoteStep, StepOutcome, action};
use crate::digest::Digest;
use crate::reapi::{MAX_STREAM_MESSAGE, ReapiCache, SHA256, parse_proto_digest, proto_digest};
use crate::remote::{RemoteCache, RemoteError};
use crate::sandbox::ExitStatusKind;
use crate::state::LayerDesc;
use crate::store::Store;
use crate::unpack;

/// The largest outcome file read back from a worker.
const MAX_OUTCOME_SIZE: u64 = 64 * 1024;
/// How long a whole remote step may take, at most (the cluster's own timeout is shorter).
const MAX_STEP_TIME: Duration = Duration::from_secs(24 * 3600);

/// A cluster that executes steps: `--remote-executor grpc(s)://HOST:PORT[/INSTANCE]`.
pub struct RemoteExecutor {
    cache: ReapiCache,
    keys: PlatformKeys,
    queue_timeout: Duration,
    required: bool,
    /// Set once the executor failed: reported once, not asked again in this build.
    failed: AtomicBool,
    /// Platforms no worker took within the queue timeout: their steps run locally.
    without_workers: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for RemoteExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteExecutor")
            .field("url", &self.cache.url())
            .finish()
    }
}

/// How a remote step ended.
#[derive(Debug)]
pub enum RemoteRun {
    /// It ran on `worker`: its status, its output's last lines, and the layer it made (now in
    /// the local store, verified).
    Ran {
        worker: String,
        status: ExitStatusKind,
        tail: Vec<String>,
        layer: Option<LayerDesc>,
    },
    /// No worker of the platform took it within the queue timeout (it was cancelled).
    NoWorker,
}

impl RemoteExecutor {
    /// `url` as for an REAPI cache; `token` sent as `authorization: Bearer`. With `required`,
    /// a failing executor fails the build instead of degrading to local execution. An action
    /// still queued after `queue_timeout` runs locally.
    pub fn new(
        url: &str,
        token: Option<String>,
        keys: PlatformKeys,
        required: bool,
        queue_timeout: Duration,
        cancel: Option<std::sync::Arc<AtomicBool>>,
    ) -> Result<RemoteExecutor, RemoteError> {
        let mut cache = ReapiCache::new(url, token)?;
        if let Some(flag) = cancel {
            cache = cache.with_cancel(flag);
        }
        Ok(RemoteExecutor {
            cache,
            keys,
            queue_timeout,
            required,
            failed: AtomicBool::new(false),
            without_workers: Mutex::new(HashSet::new()),
        })
    }

    pub fn url(&self) -> &str {
        self.cache.url()
    }

    /// How long an action may wait for a worker before its step runs locally.
    pub fn queue_timeout(&self) -> Duration {
        self.queue_timeout
    }

    /// `--remote-required`: a failing executor fails the build.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Whether steps of `platform` should be sent: the executor has not failed, and the
    /// platform has not been found without workers.
    pub fn accepts(&self, platform: &str) -> bool {
        !self.failed.load(Ordering::Relaxed)
            && !self
                .without_workers
                .lock()
                .map(|set| set.contains(platform))
                .unwrap_or(false)
    }

    /// Record that the executor failed; `true` the first time (warn then).
    pub fn mark_failed(&self) -> bool {
        !self.failed.swap(true, Ordering::Relaxed)
    }

    /// Record that `platform` has no workers; `true` the first time.
    pub fn mark_without_workers(&self, platform: &str) -> bool {
        self.without_workers
            .lock()
            .map(|mut set| set.insert(platform.to_string()))
            .unwrap_or(false)
    }

    /// Execute `step` on the cluster; its layer blobs are in `store`, and so is the layer it
    /// makes once this returns [`RemoteRun::Ran`]. With `fresh` (`--no-cache`), the cluster
    /// executes it even when its action cache has the result.
    pub fn execute(
        &self,
        step: &RemoteStep,
        store: &Store,
        fresh: bool,
    ) -> Result<RemoteRun, RemoteError> {
        let platform =
            graphbuild_lang::platform::Platform::parse(&step.platform).map_err(|error| {
                RemoteError::Rpc {
                    method: "Execute",
                    url: self.url().to_string(),
                    code: "invalid step",
                    message: error.to_string(),
                }
            })?;
        let encoded = action::encode(step, &self.keys.properties(&platform));
        self.upload(&encoded, store)?;
        let Some(response) = self.run_operation(&encoded, fresh)? else {
            return Ok(RemoteRun::NoWorker);
        };
        // The layer's media type goes into the manifest: it must be the one the step's
        // compression gives, whatever the worker says.
        let media_type = step
            .layer_options()
            .map(|options| options.compression.media_type())
            .unwrap_or_default();
        self.take_result(response, store, media_type)
    }

    /// Put into the CAS what the action names and the cluster lacks.
    fn upload(&self, encoded: &action::EncodedAction, store: &Store) -> Result<(), RemoteError> {
        self.cache.check_capabilities()?;
        let mut small: Vec<(Digest, &[u8])> = encoded
            .small_blobs
            .iter()
            .map(|bytes| (Digest::of(bytes), bytes.as_slice()))
            .collect();
        small.push((encoded.action_digest, encoded.action.as_slice()));
        let wanted: Vec<(Digest, u64)> = small
            .iter()
            .map(|(digest, bytes)| (*digest, bytes.len() as u64))
            .chain(encoded.layers.iter().copied())
            .collect();
        let missing: HashSet<Digest> = self.cache.find_missing(&wanted)?.into_iter().collect();
        for (digest, bytes) in &small {
            if missing.contains(digest) {
                self.cache.put_blob_bytes(bytes)?;
            }
        }
        for (digest, _) in &encoded.layers {
            if missing.contains(digest) {
                self.cache.put_blob_from(digest, &store.blob_path(digest))?;
            }
        }
        Ok(())
    }

    /// `Execute`, followed until the operation is done (`WaitExecution` when the stream ends
    /// early); `None` when it stayed queued past the queue timeout and was cancelled.
    fn run_operation(
        &self,
        encoded: &action::EncodedAction,
        fresh: bool,
    ) -> Result<Option<re::ExecuteResponse>, RemoteError> {
        let method = "Execute";
        let cache = &self.cache;
        let stall = cache.timeout() * 2;
        let queue_timeout = self.queue_timeout;
        let action_digest = proto_digest(&encoded.action_digest, encoded.action.len() as u64);
        // The operation's name, kept outside the call so a cancelled build can cancel it.
        let named = std::sync::Mutex::new(String::new());
        let result = cache.run(method, MAX_STEP_TIME, async {
            let mut client = re::execution_client::ExecutionClient::new(cache.channel())
                .max_decoding_message_size(MAX_STREAM_MESSAGE);
            let mut name = String::new();
            // Since when the action has been waiting for a worker (from the start: nothing
            // has taken it yet); `None` while a worker executes it. A worker that dies puts it
            // back in the queue, and the wait starts again.
            let mut queued_since = Some(Instant::now());
            loop {
                let stream = if name.is_empty() {
                    let request = cache.request(
                        re::ExecuteRequest {
                            instance_name: cache.instance().to_string(),
                            skip_cache_lookup: fresh,
                            action_digest: Some(action_digest.clone()),
                            digest_function: SHA256,
                            ..Default::default()
                        },
                        MAX_STEP_TIME,
                    );
                    client.execute(request).await
                } else {
                    let request = cache.request(
                        re::WaitExecutionRequest { name: name.clone() },
                        MAX_STEP_TIME,
                    );
                    client.wait_execution(request).await
                };
                let mut stream = stream
                    .map_err(|status| cache.status_error(method, &status))?
                    .into_inner();
                let mut messages = 0;
                loop {
                    // Wait for the next update, but not past the queue timeout while queued.
                    let wait = match queued_since {
                        Some(since) => queue_timeout
                            .saturating_sub(since.elapsed())
                            .min(stall)
                            .max(Duration::from_millis(1)),
                        None => stall,
                    };
                    let message = match tokio::time::timeout(wait, stream.message()).await {
                        Ok(message) => {
                            message.map_err(|status| cache.status_error(method, &status))?
                        }
                        Err(_) => None,
                    };
                    if queued_since.is_some_and(|since| since.elapsed() >= queue_timeout) {
                        if !name.is_empty() {
                            let request = cache.request(
                                lro::CancelOperationRequest { name: name.clone() },
                                cache.small_deadline(),
                            );
                            // The build goes on locally either way.
                            let _ = lro::operations_client::OperationsClient::new(cache.channel())
                                .cancel_operation(request)
                                .await;
                        }
                        return Ok(None);
                    }
                    let Some(operation) = message else {
                        break;
                    };
                    messages += 1;
                    name.clone_from(&operation.name);
                    if let Ok(mut named) = named.lock() {
                        named.clone_from(&name);
                    }
                    if operation.done {
                        return operation_response(cache, operation).map(Some);
                    }
                    let stage = operation
                        .metadata
                        .as_ref()
                        .and_then(|any| {
                            re::ExecuteOperationMetadata::decode(any.value.as_slice()).ok()
                        })
                        .map(|metadata| metadata.stage)
                        .unwrap_or(0);
                    let queued = stage == re::execution_stage::Value::Queued as i32
                        || stage == re::execution_stage::Value::CacheCheck as i32
                        || stage == re::execution_stage::Value::Unknown as i32;
                    if !queued {
                        queued_since = None;
                    } else if queued_since.is_none() {
                        queued_since = Some(Instant::now());
                    }
                }
                if messages == 0 {
                    // A stream that ended (or stalled) without a word: do not spin.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if name.is_empty() {
                    return Err(RemoteError::Rpc {
                        method,
                        url: cache.url().to_string(),
                        code: "unexpected answer",
                        message: "the operation stream ended before naming the operation".into(),
                    });
                }
            }
        });
        // Ctrl-C/SIGTERM: the build stops, and so does its action on the cluster (a worker
        // executing it is told to stop); an unknown operation has nothing to cancel.
        if let Err(RemoteError::Cancelled) = &result {
            let name = named.lock().map(|name| name.clone()).unwrap_or_default();
            if !name.is_empty() {
                let request =
                    cache.request(lro::CancelOperationRequest { name }, cache.small_deadline());
                let _ = cache.run_despite_cancel(cache.small_deadline(), async {
                    lro::operations_client::OperationsClient::new(cache.channel())
                        .cancel_operation(request)
                        .await
                });
            }
        }
        result
    }

    /// The step's outcome and layer from a finished action.
    fn take_result(
        &self,
        response: re::ExecuteResponse,
        store: &Store,
        media_type: &str,
    ) -> Result<RemoteRun, RemoteError> {
        let bad = |message: String| RemoteError::Rpc {
            method: "Execute",
            url: self.url().to_string(),
            code: "bad result",
            message,
        };
        let result = response
            .result
            .ok_or_else(|| bad("the finished action has no result".into()))?;
        let worker = result
            .execution_metadata
            .as_ref()
            .map(|metadata| metadata.worker.clone())
            .filter(|worker| !worker.is_empty())
            .unwrap_or_else(|| "a remote worker".into());
        let worker: String = worker
            .chars()
            .filter(|c| !c.is_control())
            .take(128)
            .collect();
        let output = |path: &str| {
            result
                .output_files
                .iter()
                .find(|file| file.path == path)
                .map(|file| parse_proto_digest(file.digest.as_ref()))
                .transpose()
                .map_err(|error| bad(format!("{path}: {error}")))
        };
        let tail: Vec<String> = String::from_utf8_lossy(&result.stdout_raw)
            .lines()
            .rev()
            .take(crate::sandbox::TAIL_LINES)
            .map(str::to_string)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let Some((outcome_digest, outcome_size)) = output(OUTCOME_PATH)? else {
            return Err(bad(format!(
                "the worker wrote no {OUTCOME_PATH} (exit code {}): {}",
                result.exit_code,
                tail.join(" / ")
            )));
        };
        if outcome_size > MAX_OUTCOME_SIZE {
            return Err(bad(format!("{OUTCOME_PATH} is {outcome_size} bytes")));
        }
        let temp = store.temp_dir().map_err(|source| RemoteError::Io {
            action: "cannot create a temp directory in",
            path: store.root().to_path_buf(),
            source,
        })?;
        let outcome_path = temp.path().join("outcome.json");
        if !self
            .cache
            .get_blob_to(&outcome_digest, outcome_size, &outcome_path)?
        {
            return Err(bad(format!("{OUTCOME_PATH} is not in the CAS")));
        }
        let outcome: StepOutcome = std::fs::read(&outcome_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| bad(format!("{OUTCOME_PATH} is not a step outcome")))?;
        if let Some(layer) = &outcome.layer {
            let Some((digest, size)) = output(LAYER_PATH)? else {
                return Err(bad(format!(
                    "the outcome names a layer but {LAYER_PATH} is missing"
                )));
            };
            if layer.media_type != media_type {
                return Err(bad(format!(
                    "the layer's media type is `{}`, not `{media_type}`",
                    layer.media_type.chars().take(128).collect::<String>()
                )));
            }
            if digest != layer.digest || size != layer.size {
                return Err(bad(format!(
                    "{LAYER_PATH} is not the layer the outcome names"
                )));
            }
            self.fetch_layer(layer, store, &temp)?;
        }
        Ok(RemoteRun::Ran {
            worker,
            status: outcome.status,
            tail,
            layer: outcome.layer,
        })
    }

    /// Download a layer into the store unless it is there, checking its digest, size and
    /// diff_id (the uncompressed tar's digest, which the image config will claim).
    fn fetch_layer(
        &self,
        layer: &LayerDesc,
        store: &Store,
        temp: &tempfile::TempDir,
    ) -> Result<(), RemoteError> {
        let check = unpack::LayerCheck::layer(layer.digest, layer.diff_id, layer.size);
        let verify = |path: &std::path::Path| -> Result<(), RemoteError> {
            let file = std::fs::File::open(path).map_err(|source| RemoteError::Io {
                action: "cannot read",
                path: path.to_path_buf(),
                source,
            })?;
            let mut reader = std::io::BufReader::new(file);
            unpack::verify_layer(reader.by_ref(), &check)
                .map(|_| ())
                .map_err(|error| RemoteError::Rpc {
                    method: "Execute",
                    url: self.url().to_string(),
                    code: "bad result",
                    message: format!("layer {}: {error}", layer.digest),
                })
        };
        if store.verified_diff_id(&layer.digest) == Some(layer.diff_id) {
            return Ok(());
        }
        let path = temp.path().join("layer");
        if store.has_blob(&layer.digest) {
            verify(&store.blob_path(&layer.digest))?;
        } else {
            if !self.cache.get_blob_to(&layer.digest, layer.size, &path)? {
                return Err(RemoteError::Rpc {
                    method: "Execute",
                    url: self.url().to_string(),
                    code: "bad result",
                    message: format!("the step's layer {} is not in the CAS", layer.digest),
                });
            }
            verify(&path)?;
            store
                .put_blob_file(&path, Some(layer.digest))
                .map_err(|error| RemoteError::Io {
                    action: "cannot store",
                    path: path.clone(),
                    source: std::io::Error::other(error.to_string()),
                })?;
        }
        let _ = store.record_verified_layer(layer);
        Ok(())
    }
}

/// A finished operation's `ExecuteResponse`, or its error.
fn operation_response(
    cache: &ReapiCache,
    operation: lro::Operation,
) -> Result<re::ExecuteResponse, RemoteError> {
    let method = "Execute";
    let response = match operation.result {
        Some(operation::Result::Response(any)) => re::ExecuteResponse::decode(any.value.as_slice())
            .map_err(|error| RemoteError::Rpc {
                method,
                url: cache.url().to_string(),
                code: "unexpected answer",
                message: format!("undecodable ExecuteResponse: {error}"),
            })?,
        Some(operation::Result::Error(status)) => {
            let code = tonic::Code::from_i32(status.code);
            return Err(cache.status_error(method, &tonic::Status::new(code, status.message)));
        }
        None => {
            return Err(RemoteError::Rpc {
                method,
                url: cache.url().to_string(),
                code: "unexpected answer",
                message: "a finished operation without a result".into(),
            });
        }
    };
    if let Some(status) = response.status.as_ref().filter(|status| status.code != 0) {
        let code = tonic::Code::from_i32(status.code);
        return Err(cache.status_error(method, &tonic::Status::new(code, status.message.clone())));
    }
    Ok(response)
}
