//! `graphbuild worker`: a bot of the Remote Workers API for clusters that schedule through it
//! (BuildGrid), executing graphbuild's remote steps with the same sandbox as local steps.
//!
//! # The session
//!
//! The bot opens a session (`CreateBotSession`) declaring one device whose properties are the
//! platform's ([`PlatformKeys::properties`]), then calls `UpdateBotSession` in a loop: the
//! server answers, after a long poll when there is nothing to do, with the leases assigned
//! to it. The bot takes one lease at a time, reports it `ACTIVE` every
//! [`KEEPALIVE`] while it executes it, and then `COMPLETED` with an `ActionResult` (or with
//! an error status: `INTERNAL` for a worker problem, which the server may retry elsewhere,
//! `INVALID_ARGUMENT` for an action it will not run). A session the server has closed (the
//! bot was silent too long) is opened again. A lease missing from the answer to a keepalive
//! was cancelled (the client's build was: BuildGrid drops the lease): its step is stopped and
//! the lease is not reported.
//!
//! # What it runs
//!
//! Only remote steps: a `Command` whose arguments are `graphbuild worker-step step.json`, and
//! a [`RemoteStep`](super::RemoteStep) whose platform is the bot's and that passes
//! [`RemoteStep::check`](super::RemoteStep::check) (no host paths, never `insecure`). Any other
//! action is refused: the bot is not a general-purpose remote shell. A step runs at most
//! [`WorkerOptions::step_time_limit`] (`--step-timeout`, default [`DEFAULT_STEP_TIME_LIMIT`]),
//! whatever timeout it asks for, and is then killed and reported as timed out.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::protobuf::Any;
use bazel_remote_apis::google::rpc::Status;
use graphbuild_lang::platform::Platform;
use prost::Message;
use tonic::codegen::http::uri::PathAndQuery;

use super::bots::{
    self, BotSession, BotStatus, CreateBotSessionRequest, Device, Lease, LeaseState, Property,
    UpdateBotSessionRequest,
};
use super::{LAYER_PATH, OUTCOME_PATH, PlatformKeys, RemoteStep, STEP_FILE, action, step};
use crate::reapi::{ReapiCache, parse_proto_digest, proto_digest};
use crate::remote::{RemoteCache, RemoteError};
use crate::sandbox::overlay::Overlay;
use crate::store::Store;

/// How often a bot executing a lease tells the server it is alive.
pub const KEEPALIVE: Duration = Duration::from_secs(2);
/// The deadline of an idle bot's `UpdateBotSession` (the server long-polls for 80% of it).
const POLL: Duration = Duration::from_secs(10);
/// The largest `Action`, `Command`, `Directory` or `step.json` a bot reads.
const MAX_MESSAGE: u64 = 16 * 1024 * 1024;
/// gRPC status codes a lease can end with.
const INVALID_ARGUMENT: i32 = 3;
const FAILED_PRECONDITION: i32 = 9;
const INTERNAL: i32 = 13;
/// The longest a bot lets a step run by default (`graphbuild worker --step-timeout`).
pub const DEFAULT_STEP_TIME_LIMIT: Duration = Duration::from_secs(60 * 60);

/// `graphbuild worker`'s settings.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// `grpc(s)://HOST:PORT[/INSTANCE]` of the cluster's Bots service.
    pub url: String,
    pub token: Option<String>,
    /// The platform this bot executes (natively, or emulated through binfmt_misc).
    pub platform: Platform,
    pub keys: PlatformKeys,
    /// The bot's name in the cluster.
    pub bot_id: String,
    /// The graphbuild binary, re-executed for each sandbox.
    pub exe: PathBuf,
    /// The overlay sandboxes mount.
    pub overlay: Overlay,
    /// The longest a step may run here: the timeout of a step that sets none, and the ceiling
    /// of one that sets a longer one, so no action holds the bot forever.
    pub step_time_limit: Duration,
}

/// Serve leases until `stop` is set; `log` receives one line per event worth showing.
pub fn serve(
    options: &WorkerOptions,
    store: &Store,
    stop: &Arc<AtomicBool>,
    log: &(dyn Fn(&str) + Sync),
) -> Result<(), RemoteError> {
    let cache = ReapiCache::new(&options.url, options.token.clone())?;
    cache.check_capabilities()?;
    let properties: Vec<Property> = options
        .keys
        .properties(&options.platform)
        .into_iter()
        .map(|(key, value)| Property { key, value })
        .collect();
    let worker = bots::Worker {
        devices: vec![Device {
            handle: options.bot_id.clone(),
            properties: properties.clone(),
        }],
        properties,
    };
    let session = |leases: Vec<Lease>, name: &str, status: BotStatus| BotSession {
        name: name.to_string(),
        bot_id: options.bot_id.clone(),
        status: status as i32,
        worker: Some(worker.clone()),
        leases,
        ..Default::default()
    };
    let mut name = String::new();
    // Leases to report: the one executing (ACTIVE), or the one just finished (COMPLETED).
    let mut held: Vec<Lease> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if name.is_empty() {
            match create_session(&cache, session(Vec::new(), "", BotStatus::Ok)) {
                Ok(created) => {
                    log(&format!(
                        "worker {} ({}) registered as {}",
                        options.bot_id, options.platform, created.name
                    ));
                    name = created.name;
                }
                Err(error) => {
                    log(&format!("cannot open a bot session: {error}; retrying"));
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            }
        }
        let answer = match update_session(
            &cache,
            &name,
            session(held.clone(), &name, BotStatus::Ok),
            POLL,
        ) {
            Ok(answer) => answer,
            Err(error) => {
                log(&format!(
                    "UpdateBotSession failed: {error}; opening a new session"
                ));
                // The server may have closed the session: open another one (a finished lease
                // the server never heard of is lost with it; the server retries its job).
                name.clear();
                held.clear();
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        held.retain(|lease| lease.state != LeaseState::Completed as i32);
        let Some(lease) = answer.leases.into_iter().find(|lease| {
            lease.state == LeaseState::Pending as i32 || lease.state == LeaseState::Active as i32
        }) else {
            continue;
        };
        // A lease the server cancelled is not reported: it dropped it.
        held = run_lease(&cache, options, store, &name, lease, &session, log)
            .into_iter()
            .collect();
    }
    // Say goodbye so the server requeues nothing of ours; it may be gone already.
    if !name.is_empty() {
        let _ = update_session(
            &cache,
            &name,
            session(held, &name, BotStatus::BotTerminating),
            Duration::from_secs(2),
        );
    }
    Ok(())
}

/// Execute one lease in a thread while telling the server every [`KEEPALIVE`] that it is
/// active; the lease, completed, or `None` when the server cancelled it (the client's build
/// was cancelled: the server drops the lease from the session's answer) and its step was
/// stopped.
fn run_lease(
    cache: &ReapiCache,
    options: &WorkerOptions,
    store: &Store,
    name: &str,
    mut lease: Lease,
    session: &dyn Fn(Vec<Lease>, &str, BotStatus) -> BotSession,
    log: &(dyn Fn(&str) + Sync),
) -> Option<Lease> {
    lease.state = LeaseState::Active as i32;
    log(&format!("lease {}: executing", lease.id));
    let mut cancelled = false;
    let (status, result) = std::thread::scope(|scope| {
        let payload = lease.payload.clone();
        let running = scope.spawn(move || execute_lease(cache, options, store, payload, log));
        let mut keepalive = std::time::Instant::now();
        while !running.is_finished() {
            std::thread::sleep(Duration::from_millis(50));
            if !cancelled && keepalive.elapsed() >= KEEPALIVE {
                keepalive = std::time::Instant::now();
                let mut active = lease.clone();
                active.payload = None;
                let answer = update_session(
                    cache,
                    name,
                    session(vec![active], name, BotStatus::Ok),
                    Duration::from_secs(5),
                );
                // The server keeps a lease it still wants in its answer (`CANCELLED` is the
                // other way to say it does not); a failed call says nothing.
                if let Ok(answer) = answer
                    && !answer.leases.iter().any(|held| {
                        held.id == lease.id && held.state != LeaseState::Cancelled as i32
                    })
                {
                    cancelled = true;
                    log(&format!(
                        "lease {}: cancelled by the server; stopping its step",
                        lease.id
                    ));
                    // This bot runs one sandbox at a time: the lease's.
                    crate::sandbox::terminate_all();
                }
            }
        }
        running.join().unwrap_or_else(|_| {
            (
                Status {
                    code: INTERNAL,
                    message: "the worker's executing thread panicked".into(),
                    details: Vec::new(),
                },
                None,
            )
        })
    });
    log(&format!(
        "lease {}: {}",
        lease.id,
        if status.code == 0 {
            "completed".to_string()
        } else {
            format!("failed: {}", status.message)
        }
    ));
    if cancelled {
        return None;
    }
    lease.payload = None;
    lease.state = LeaseState::Completed as i32;
    lease.status = Some(status);
    lease.result = result;
    Some(lease)
}

/// Fetch, check, execute and report one lease's action: the lease's status, and its
/// `ActionResult` when it ran.
fn execute_lease(
    cache: &ReapiCache,
    options: &WorkerOptions,
    store: &Store,
    payload: Option<Any>,
    log: &(dyn Fn(&str) + Sync),
) -> (Status, Option<Any>) {
    let status = |code: i32, message: String| Status {
        code,
        message,
        details: Vec::new(),
    };
    let step = match fetch_step(cache, store, payload) {
        Ok(step) => step,
        Err((code, message)) => return (status(code, message), None),
    };
    match step.check() {
        Ok(platform) if platform == options.platform => {}
        Ok(platform) => {
            return (
                status(
                    FAILED_PRECONDITION,
                    format!(
                        "this worker executes {} steps, not {platform}",
                        options.platform
                    ),
                ),
                None,
            );
        }
        Err(error) => return (status(INVALID_ARGUMENT, error.to_string()), None),
    }
    // The worker's own limits on processes and time hold whatever the client asked for.
    let mut step = step;
    step.task.max_processes = Some(
        step.task
            .max_processes
            .unwrap_or(crate::sandbox::DEFAULT_MAX_PROCESSES)
            .min(crate::sandbox::DEFAULT_MAX_PROCESSES),
    );
    let time_limit = u64::try_from(options.step_time_limit.as_millis()).unwrap_or(u64::MAX);
    step.task.timeout_ms = Some(step.task.timeout_ms.unwrap_or(time_limit).min(time_limit));
    if let Err(message) = fetch_layers(cache, store, &step) {
        return (status(INTERNAL, message), None);
    }
    let executed = match step::execute(&step, store, &options.exe, &options.overlay, &mut |_| {}) {
        Ok(executed) => executed,
        Err(error) => return (status(INTERNAL, error.to_string()), None),
    };
    match upload_result(cache, store, options, &executed) {
        Ok(result) => {
            log(&format!("step ended: {}", executed.outcome.status));
            (
                status(0, String::new()),
                Some(Any {
                    type_url: bots::reapi_type_url("ActionResult"),
                    value: result.encode_to_vec(),
                }),
            )
        }
        Err(message) => (status(INTERNAL, message), None),
    }
}

/// The lease's action, its command (which must be a remote step's) and its `step.json`.
fn fetch_step(
    cache: &ReapiCache,
    store: &Store,
    payload: Option<Any>,
) -> Result<RemoteStep, (i32, String)> {
    let internal = |error: RemoteError| (INTERNAL, error.to_string());
    let payload = payload.ok_or((INVALID_ARGUMENT, "the lease has no payload".to_string()))?;
    let action: re::Action = if payload.type_url == bots::reapi_type_url("Action") {
        re::Action::decode(payload.value.as_slice())
            .map_err(|error| (INVALID_ARGUMENT, format!("undecodable Action: {error}")))?
    } else if payload.type_url == bots::reapi_type_url("Digest") {
        let digest = re::Digest::decode(payload.value.as_slice())
            .map_err(|error| (INVALID_ARGUMENT, format!("undecodable Digest: {error}")))?;
        fetch_message(cache, store, Some(&digest)).map_err(internal)?
    } else {
        return Err((
            INVALID_ARGUMENT,
            format!("a lease payload of type {}", payload.type_url),
        ));
    };
    let command: re::Command =
        fetch_message(cache, store, action.command_digest.as_ref()).map_err(internal)?;
    if !action::is_step_command(&command) {
        return Err((
            INVALID_ARGUMENT,
            "graphbuild worker executes only graphbuild steps (graphbuild worker-step step.json)"
                .to_string(),
        ));
    }
    let root: re::Directory =
        fetch_message(cache, store, action.input_root_digest.as_ref()).map_err(internal)?;
    let file = root
        .files
        .iter()
        .find(|file| file.name == STEP_FILE)
        .ok_or((
            INVALID_ARGUMENT,
            format!("the input root has no {STEP_FILE}"),
        ))?;
    let bytes = fetch_bytes(cache, store, file.digest.as_ref()).map_err(internal)?;
    serde_json::from_slice(&bytes)
        .map_err(|error| (INVALID_ARGUMENT, format!("{STEP_FILE}: {error}")))
}

/// A small blob of the CAS, read whole (at most [`MAX_MESSAGE`] bytes).
fn fetch_bytes(
    cache: &ReapiCache,
    store: &Store,
    digest: Option<&re::Digest>,
) -> Result<Vec<u8>, RemoteError> {
    let (digest, size) = parse_proto_digest(digest).map_err(|source| RemoteError::Decode {
        key: "lease".into(),
        source,
    })?;
    if size > MAX_MESSAGE {
        return Err(RemoteError::SizeMismatch {
            digest,
            expected: MAX_MESSAGE,
            actual: format!("{size} bytes"),
        });
    }
    let temp = temp_dir(store)?;
    let path = temp.path().join("blob");
    if !cache.get_blob_to(&digest, size, &path)? {
        return Err(RemoteError::Rpc {
            method: "BatchReadBlobs",
            url: cache.url().to_string(),
            code: "not found",
            message: format!("blob {digest} is not in the CAS"),
        });
    }
    std::fs::read(&path).map_err(|source| RemoteError::Io {
        action: "cannot read",
        path,
        source,
    })
}

fn fetch_message<M: Message + Default>(
    cache: &ReapiCache,
    store: &Store,
    digest: Option<&re::Digest>,
) -> Result<M, RemoteError> {
    let bytes = fetch_bytes(cache, store, digest)?;
    M::decode(bytes.as_slice()).map_err(|error| RemoteError::Rpc {
        method: "BatchReadBlobs",
        url: cache.url().to_string(),
        code: "undecodable",
        message: error.to_string(),
    })
}

fn temp_dir(store: &Store) -> Result<tempfile::TempDir, RemoteError> {
    store.temp_dir().map_err(|source| RemoteError::Io {
        action: "cannot create a temp directory in",
        path: store.root().to_path_buf(),
        source,
    })
}

/// The step's layer blobs into the worker's store (each checked against its digest).
fn fetch_layers(cache: &ReapiCache, store: &Store, step: &RemoteStep) -> Result<(), String> {
    for layer in &step.layers {
        if store.has_blob(&layer.digest) {
            continue;
        }
        let temp = temp_dir(store).map_err(|error| error.to_string())?;
        let path = temp.path().join("layer");
        match cache.get_blob_to(&layer.digest, layer.size, &path) {
            Ok(true) => {}
            Ok(false) => return Err(format!("layer {} is not in the CAS", layer.digest)),
            Err(error) => return Err(error.to_string()),
        }
        store
            .put_blob_file(&path, Some(layer.digest))
            .map_err(|error| error.to_string())?;
    }
    Ok(())
}

/// Upload the step's outputs and describe them as an `ActionResult`.
fn upload_result(
    cache: &ReapiCache,
    store: &Store,
    options: &WorkerOptions,
    executed: &step::Executed,
) -> Result<re::ActionResult, String> {
    let outcome = serde_json::to_vec(&executed.outcome).unwrap_or_default();
    let outcome_digest = cache
        .put_blob_bytes(&outcome)
        .map_err(|error| error.to_string())?;
    let mut output_files = Vec::new();
    if let Some(layer) = &executed.outcome.layer {
        let path: &Path = &store.blob_path(&layer.digest);
        cache
            .put_blob_from(&layer.digest, path)
            .map_err(|error| error.to_string())?;
        output_files.push(re::OutputFile {
            path: LAYER_PATH.to_string(),
            digest: Some(proto_digest(&layer.digest, layer.size)),
            ..Default::default()
        });
    }
    output_files.push(re::OutputFile {
        path: OUTCOME_PATH.to_string(),
        digest: Some(proto_digest(&outcome_digest, outcome.len() as u64)),
        ..Default::default()
    });
    let mut stdout = executed.tail.join("\n");
    stdout.truncate(64 * 1024);
    Ok(re::ActionResult {
        output_files,
        exit_code: executed.outcome.status.exit_code(),
        stdout_raw: stdout.into_bytes(),
        execution_metadata: Some(re::ExecutedActionMetadata {
            worker: options.bot_id.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn create_session(cache: &ReapiCache, session: BotSession) -> Result<BotSession, RemoteError> {
    let request = CreateBotSessionRequest {
        parent: cache.instance().to_string(),
        bot_session: Some(session),
    };
    unary(
        cache,
        "CreateBotSession",
        bots::CREATE_BOT_SESSION,
        request,
        // The server may long-poll for work here too.
        POLL,
    )
}

fn update_session(
    cache: &ReapiCache,
    name: &str,
    session: BotSession,
    deadline: Duration,
) -> Result<BotSession, RemoteError> {
    let request = UpdateBotSessionRequest {
        name: name.to_string(),
        bot_session: Some(session),
    };
    unary(
        cache,
        "UpdateBotSession",
        bots::UPDATE_BOT_SESSION,
        request,
        deadline,
    )
}

/// One unary call of the Bots service, through tonic's generic client and prost's codec.
fn unary<Request, Response>(
    cache: &ReapiCache,
    method: &'static str,
    path: &'static str,
    message: Request,
    deadline: Duration,
) -> Result<Response, RemoteError>
where
    Request: Message + Send + Sync + 'static,
    Response: Message + Default + Send + Sync + 'static,
{
    cache.run(method, deadline + Duration::from_secs(1), async {
        let mut client = tonic::client::Grpc::new(cache.channel());
        client
            .ready()
            .await
            .map_err(|error| RemoteError::Unreachable {
                method,
                url: cache.url().to_string(),
                message: error.to_string(),
            })?;
        let codec = tonic_prost::ProstCodec::<Request, Response>::default();
        client
            .unary(
                cache.request(message, deadline),
                PathAndQuery::from_static(path),
                codec,
            )
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| cache.status_error(method, &status))
    })
}
