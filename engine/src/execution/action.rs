//! A [`RemoteStep`] as REAPI messages: its `Action`, `Command` and input root, encoded
//! deterministically (prost writes fields in order; directory entries are sorted by name), so
//! one step is one action digest on every machine and a cluster's action cache can serve it.

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use prost::Message;

use super::{LAYER_PATH, LAYERS_DIR, OUTCOME_PATH, RemoteStep, STEP_FILE, WORKER_STEP_ARG};
use crate::digest::Digest;
use crate::reapi::proto_digest;

/// The salt of every remote step's `Action`; a change here starts a new keyspace.
const STEP_SALT: &[u8] = b"graphbuild remote step v1";

/// An encoded action and the small blobs it names, all to be in the CAS before `Execute`.
pub struct EncodedAction {
    /// The `Action` message and its digest.
    pub action: Vec<u8>,
    pub action_digest: Digest,
    /// `step.json`, the `Command`, the input root and its `layers` directory.
    pub small_blobs: Vec<Vec<u8>>,
    /// The layer blobs the input root names: (digest, size), bottom first.
    pub layers: Vec<(Digest, u64)>,
}

/// The name of layer `index` in the input root's `layers` directory.
pub fn layer_file_name(index: usize) -> String {
    format!("{index:04}")
}

/// The `Command` of every remote step on `properties` (sorted by name).
pub fn command(properties: &[(String, String)]) -> re::Command {
    let platform = re::Platform {
        properties: properties
            .iter()
            .map(|(name, value)| re::platform::Property {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
    };
    re::Command {
        arguments: vec![
            "graphbuild".to_string(),
            WORKER_STEP_ARG.to_string(),
            STEP_FILE.to_string(),
        ],
        // Sorted, as the REAPI requires.
        output_paths: vec![LAYER_PATH.to_string(), OUTCOME_PATH.to_string()],
        #[expect(
            deprecated,
            reason = "servers before REAPI 2.2 read the command's platform"
        )]
        platform: Some(platform),
        ..Default::default()
    }
}

/// Encode `step` as an action for workers matching `properties`.
pub fn encode(step: &RemoteStep, properties: &[(String, String)]) -> EncodedAction {
    let step_json = serde_json::to_vec(step).unwrap_or_default();
    let file = |name: String, bytes_digest: Digest, size: u64| re::FileNode {
        name,
        digest: Some(proto_digest(&bytes_digest, size)),
        is_executable: false,
        node_properties: None,
    };
    let mut small_blobs = Vec::new();
    let mut root = re::Directory {
        files: vec![file(
            STEP_FILE.to_string(),
            Digest::of(&step_json),
            step_json.len() as u64,
        )],
        ..Default::default()
    };
    let layers: Vec<(Digest, u64)> = step
        .layers
        .iter()
        .map(|layer| (layer.digest, layer.size))
        .collect();
    if !layers.is_empty() {
        let directory = re::Directory {
            files: layers
                .iter()
                .enumerate()
                .map(|(index, (digest, size))| file(layer_file_name(index), *digest, *size))
                .collect(),
            ..Default::default()
        }
        .encode_to_vec();
        root.directories.push(re::DirectoryNode {
            name: LAYERS_DIR.to_string(),
            digest: Some(proto_digest(
                &Digest::of(&directory),
                directory.len() as u64,
            )),
        });
        small_blobs.push(directory);
    }
    let root = root.encode_to_vec();
    let command = command(properties).encode_to_vec();
    let action = re::Action {
        command_digest: Some(proto_digest(&Digest::of(&command), command.len() as u64)),
        input_root_digest: Some(proto_digest(&Digest::of(&root), root.len() as u64)),
        // The step's own timeout is enforced by the sandbox; the cluster's default applies.
        timeout: None,
        do_not_cache: false,
        salt: STEP_SALT.to_vec(),
        platform: re::Command::decode(command.as_slice())
            .ok()
            .and_then(|command| {
                #[expect(deprecated, reason = "the same platform as the command's")]
                command.platform
            }),
    }
    .encode_to_vec();
    small_blobs.push(step_json);
    small_blobs.push(root);
    small_blobs.push(command);
    EncodedAction {
        action_digest: Digest::of(&action),
        action,
        small_blobs,
        layers,
    }
}

/// Whether `command` is a remote step's (what `graphbuild worker` agrees to run).
pub fn is_step_command(command: &re::Command) -> bool {
    command.arguments == ["graphbuild", WORKER_STEP_ARG, STEP_FILE]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{NetworkMode, RunTask};
    use crate::state::LayerDesc;

    fn step(layers: Vec<LayerDesc>) -> RemoteStep {
        RemoteStep {
            format: super::super::STEP_FORMAT.into(),
            platform: "linux/arm64".into(),
            task: RunTask {
                argv: vec!["/bin/sh".into(), "-c".into(), "true".into()],
                env: vec![],
                cwd: "/".into(),
                user: String::new(),
                cache_mounts: vec![],
                script: None,
                bind_mounts: vec![],
                stage_binds: vec![],
                tmpfs_mounts: vec![],
                secret_files: vec![],
                ssh_sockets: vec![],
                network: NetworkMode::None,
                hostname: "graphbuild".into(),
                timeout_ms: None,
                max_processes: None,
                insecure: false,
                separate_stderr: false,
            },
            layers,
            source_date_epoch: 0,
            compression: "gzip".into(),
        }
    }

    #[test]
    fn one_step_is_one_action_and_its_input_root_names_every_layer() {
        let layer = LayerDesc {
            digest: Digest::of(b"layer"),
            diff_id: Digest::of(b"tar"),
            size: 5,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        };
        let properties = vec![
            ("ISA".to_string(), "arm64".to_string()),
            ("OSFamily".to_string(), "linux".to_string()),
        ];
        let first = encode(&step(vec![layer.clone()]), &properties);
        let second = encode(&step(vec![layer.clone()]), &properties);
        assert_eq!(first.action_digest, second.action_digest);
        assert_eq!(first.layers, vec![(layer.digest, 5)]);
        let action = re::Action::decode(first.action.as_slice()).unwrap();
        assert_eq!(action.platform.unwrap().properties.len(), 2);
        // Another platform is another action.
        let amd64 = vec![
            ("ISA".to_string(), "amd64".to_string()),
            ("OSFamily".to_string(), "linux".to_string()),
        ];
        assert_ne!(
            encode(&step(vec![layer]), &amd64).action_digest,
            first.action_digest
        );
        // The input root: step.json and layers/0000.
        let root = first
            .small_blobs
            .iter()
            .filter_map(|bytes| re::Directory::decode(bytes.as_slice()).ok())
            .find(|directory| directory.files.iter().any(|file| file.name == STEP_FILE))
            .unwrap();
        assert_eq!(root.directories[0].name, LAYERS_DIR);
        let command = first
            .small_blobs
            .iter()
            .filter_map(|bytes| re::Command::decode(bytes.as_slice()).ok())
            .find(is_step_command)
            .unwrap();
        assert_eq!(command.output_paths, vec![LAYER_PATH, OUTCOME_PATH]);
    }
}
