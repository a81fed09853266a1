//! `plan --explain`: why a node is not cached.
//!
//! After a build, each node's step keys and their readable inputs ([`StepInputs`]) are recorded
//! in the store under the node's *identity* (stage, platform, first target), which survives
//! changes to its inputs. Explaining compares the current plan with that record: the first
//! step whose key differs is where the cache was lost, and the difference in its inputs says
//! why — a context file by path, an arg and its old and new values, a base image digest, the
//! step's own definition, or only its parent. The step's definition is compared through the
//! canonical encoding of its op, the very bytes its key is computed from
//! ([`crate::plan::op`]), so an explanation cannot disagree with the cache's decision.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Key;
use crate::key::KeyBuilder;
use crate::plan::{Node, Plan, StepInputs, TestPlan};
use crate::store::Store;

#[derive(Serialize, Deserialize)]
struct NodeRecord {
    steps: Vec<StepRecordEntry>,
}

#[derive(Serialize, Deserialize)]
struct StepRecordEntry {
    description: String,
    key: Key,
    inputs: StepInputs,
    /// A copy's context files are recorded apart (see [`files_record`]), under this digest
    /// of its selection; records of older versions hold them in `inputs.files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    files: Option<String>,
}

/// A [`NodeRecord`] borrowed from the plan, to write: the same JSON without copying every
/// step's inputs (a copy of 100,000 context files lists each of them).
#[derive(Serialize)]
struct NodeRecordRef<'a> {
    steps: Vec<StepRecordEntryRef<'a>>,
}

#[derive(Serialize)]
struct StepRecordEntryRef<'a> {
    description: &'a str,
    key: Key,
    inputs: &'a StepInputs,
    #[serde(skip_serializing_if = "Option::is_none")]
    files: Option<&'a str>,
}

/// The digest of a copy's selected context files (its items), when it copies from the
/// context.
fn selection_digest(step: &crate::plan::StepPlan) -> Option<&str> {
    match &step.op {
        crate::plan::Op::Copy(crate::plan::CopyOp {
            from: crate::plan::CopySource::Context { digest, .. },
            ..
        }) => Some(digest),
        _ => None,
    }
}

fn identity(node: &Node) -> Key {
    let target = node
        .targets
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    KeyBuilder::new("explain-identity")
        .str(&node.stage)
        .str(&node.platform.to_string())
        .str(&target)
        .finish()
}

/// Remember what each node of a built plan was made from.
pub fn record(store: &Store, plan: &Plan) {
    record_tests(store, plan);
    for node in &plan.nodes {
        let record = NodeRecordRef {
            steps: node
                .steps
                .iter()
                .map(|step| StepRecordEntryRef {
                    description: &step.description,
                    key: step.key,
                    inputs: &step.inputs,
                    files: selection_digest(step),
                })
                .collect(),
        };
        // Advisory and usually unchanged: write only what differs (each write is fsynced).
        // The record is its JSON, then each copy's context files (see [`with_files`]); the
        // JSON names each copy's selection by digest, so comparing it alone compares all.
        if let Ok(header) = serde_json::to_vec(&record) {
            let identity = identity(node);
            let stored = store.get_action(&identity);
            if stored
                .as_deref()
                .and_then(|bytes| split_record(bytes).map(|(json, _)| json))
                != Some(header.as_slice())
            {
                let _ = store.put_action(&identity, &with_files(header, node));
            }
        }
    }
}

/// A node's record: its JSON, a newline, then for each copy from the context its files
/// ([`encode_files`]), each after its length (8 bytes, little-endian). A record of an older
/// version is the JSON alone.
fn with_files(mut header: Vec<u8>, node: &Node) -> Vec<u8> {
    header.push(b'\n');
    for step in &node.steps {
        if let Some(digest) = selection_digest(step) {
            let files = encode_files(digest, step);
            header.extend_from_slice(&(files.len() as u64).to_le_bytes());
            header.extend_from_slice(&files);
        }
    }
    header
}

/// The JSON of a record and what follows it (its copies' files).
fn split_record(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut stream =
        serde_json::Deserializer::from_slice(bytes).into_iter::<serde::de::IgnoredAny>();
    stream.next()?.ok()?;
    let end = stream.byte_offset();
    let rest = &bytes[end..];
    Some((&bytes[..end], rest.strip_prefix(b"\n").unwrap_or(rest)))
}

/// The files of the selection `digest` in the part of a record after its JSON.
fn files_in(mut sections: &[u8], digest: &str) -> Option<BTreeMap<String, String>> {
    while sections.len() >= 8 {
        let (length, rest) = sections.split_at(8);
        let length = usize::try_from(u64::from_le_bytes(length.try_into().ok()?)).ok()?;
        let section = rest.get(..length)?;
        if let Some(files) = decode_files(section, digest) {
            return Some(files);
        }
        sections = &rest[length..];
    }
    None
}

const FILES_MAGIC: &[u8] = b"graphbuild-explain-files-1\n";

/// A copy's context files as recorded: a header naming the selection's digest, then each
/// path and value as text, each ended by a NUL (neither can hold one).
fn encode_files(digest: &str, step: &crate::plan::StepPlan) -> Vec<u8> {
    let files = crate::plan::file_inputs::step_files(step);
    let mut bytes = Vec::with_capacity(FILES_MAGIC.len() + digest.len() + 1 + files.len() * 100);
    bytes.extend_from_slice(FILES_MAGIC);
    bytes.extend_from_slice(digest.as_bytes());
    bytes.push(b'\n');
    for (path, value) in files {
        bytes.extend_from_slice(path.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(value.to_string().as_bytes());
        bytes.push(0);
    }
    bytes
}

/// The files of [`encode_files`], if `bytes` holds the selection `digest`'s.
fn decode_files(bytes: &[u8], digest: &str) -> Option<BTreeMap<String, String>> {
    let rest = bytes.strip_prefix(FILES_MAGIC)?;
    let rest = rest.strip_prefix(digest.as_bytes())?.strip_prefix(b"\n")?;
    let mut fields = rest.split(|&byte| byte == 0);
    let mut files = BTreeMap::new();
    loop {
        let path = fields.next()?;
        if path.is_empty() && fields.clone().next().is_none() {
            // The empty field after the last NUL.
            return Some(files);
        }
        let value = fields.next()?;
        files.insert(
            String::from_utf8(path.to_vec()).ok()?,
            String::from_utf8(value.to_vec()).ok()?,
        );
    }
}

/// The files a recorded step read: those of its record, and its copy's context files.
fn recorded_files(sections: &[u8], step: &StepRecordEntry) -> BTreeMap<String, String> {
    let mut files = step.inputs.files.clone();
    if let Some(digest) = &step.files
        && let Some(listed) = files_in(sections, digest)
    {
        files.extend(listed);
    }
    files
}

/// The files a step of the plan reads, as text.
fn current_files(step: &crate::plan::StepPlan) -> BTreeMap<String, String> {
    crate::plan::file_inputs::step_files(step)
        .into_iter()
        .map(|(path, value)| (path.into_owned(), value.to_string()))
        .collect()
}

/// What an image test that passed was made from, under [`test_identity`].
#[derive(Serialize, Deserialize)]
struct TestRecordEntry {
    description: String,
    key: Key,
    /// The key of the image's node it ran in.
    image_key: Key,
    inputs: StepInputs,
}

fn test_identity(test: &TestPlan) -> Key {
    KeyBuilder::new("explain-test-identity")
        .str(&test.image)
        .str(&test.platform.to_string())
        .str(&test.name)
        .finish()
}

/// Whether a test passed before with this key (what the build reads to skip it).
pub fn test_cached(store: &Store, test: &TestPlan) -> bool {
    !test.pending && store.get_action(&test.key).is_some()
}

/// Remember what each image test that passed was made from (tests skipped or never run are
/// not recorded: there is nothing to compare them with).
fn record_tests(store: &Store, plan: &Plan) {
    for test in plan.tests.iter().filter(|test| test_cached(store, test)) {
        let record = TestRecordEntry {
            description: test.description.clone(),
            key: test.key,
            image_key: plan.nodes[test.node].key,
            inputs: test.inputs.clone(),
        };
        if let Ok(bytes) = serde_json::to_vec(&record) {
            let identity = test_identity(test);
            if store.get_action(&identity).as_deref() != Some(bytes.as_slice()) {
                let _ = store.put_action(&identity, &bytes);
            }
        }
    }
}

/// Explain one image test against the store: cached, never run, or what changed since it
/// last passed (its image, or its own definition, field by field).
pub fn explain_test(store: &Store, plan: &Plan, test: &TestPlan) -> Explanation {
    if test.pending {
        return pending(plan, &plan.nodes[test.node]).unwrap_or(Explanation::NeverBuilt);
    }
    if test_cached(store, test) {
        return Explanation::Cached;
    }
    let Some(old) = store
        .get_action(&test_identity(test))
        .and_then(|bytes| serde_json::from_slice::<TestRecordEntry>(&bytes).ok())
    else {
        return Explanation::NeverBuilt;
    };
    if old.key == test.key {
        return Explanation::Evicted;
    }
    let mut reasons = Vec::new();
    let node = &plan.nodes[test.node];
    if old.image_key != node.key {
        reasons.push(format!(
            "the image changed: its node {} · {} has another key",
            node.stage, node.platform
        ));
    }
    diff_maps("arg", &old.inputs.vars, &test.inputs.vars, &mut reasons);
    diff_op(
        "test",
        (&old.description, &old.inputs),
        (&test.description, &test.inputs),
        false,
        &mut reasons,
    );
    if reasons.is_empty() {
        reasons.push("the test's definition changed".into());
    }
    Explanation::Changed {
        step: test.description.clone(),
        location: None,
        reasons,
    }
}

/// Why a node will run.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Explanation {
    Cached,
    NeverBuilt,
    Changed {
        step: String,
        location: Option<String>,
        reasons: Vec<String>,
    },
    /// The inputs are the same as last time but the result is gone (pruned).
    Evicted,
    /// The key waits for these unresolved base images (`REFERENCE (PLATFORM)`).
    Pending {
        bases: Vec<String>,
    },
}

fn is_cached(store: &Store, node: &Node) -> bool {
    match node
        .steps
        .iter()
        .rev()
        .find(|step| step.op.touches_filesystem())
    {
        Some(step) => store.get_action(&step.key).is_some(),
        None => true,
    }
}

fn diff_maps(
    kind: &str,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
    reasons: &mut Vec<String>,
) {
    for (name, value) in new {
        match old.get(name) {
            None => reasons.push(format!("{kind} {name} is new")),
            Some(previous) if previous != value => {
                if let Some(stage) = name.strip_prefix("stage ") {
                    reasons.push(format!("the stage it copies from, {stage}, changed"));
                } else if kind == "arg" {
                    reasons.push(format!("arg {name} changed: \"{previous}\" → \"{value}\""));
                } else {
                    reasons.push(format!("{kind} {name} changed"));
                }
            }
            _ => {}
        }
    }
    for name in old.keys() {
        if !new.contains_key(name) {
            reasons.push(format!("{kind} {name} is gone"));
        }
    }
}

/// The differences between a step's recorded op and its current one, field by field. Fields
/// that only reflect an input already reported (an arg in the environment, the digest of the
/// selected files) add nothing.
fn diff_op(
    what: &str,
    (old_description, old): (&str, &StepInputs),
    (new_description, new): (&str, &StepInputs),
    inputs_explained: bool,
    reasons: &mut Vec<String>,
) {
    use serde_json::Value;
    let definition_changed = format!("the {what} changed: was `{old_description}`");
    let (Value::Object(before), Value::Object(after)) = (&old.op, &new.op) else {
        // A record from before ops were recorded: compare what it has.
        if old_description != new_description {
            reasons.push(definition_changed);
        }
        return;
    };
    if before.get("kind") != after.get("kind") {
        reasons.push(definition_changed);
        return;
    }
    let mut fields: Vec<&String> = before.keys().chain(after.keys()).collect();
    fields.sort();
    fields.dedup();
    for field in fields {
        let (was, now) = (before.get(field), after.get(field));
        if was == now {
            continue;
        }
        match field.as_str() {
            "env" => {
                let pairs = |value: Option<&Value>| -> BTreeMap<String, String> {
                    serde_json::from_value(value.cloned().unwrap_or(Value::Null))
                        .map(|pairs: Vec<(String, String)>| pairs.into_iter().collect())
                        .unwrap_or_default()
                };
                let (was, now) = (pairs(was), pairs(now));
                let mut env = Vec::new();
                diff_maps("env", &was, &now, &mut env);
                let by_arg = |reason: &String| {
                    new.vars
                        .keys()
                        .chain(old.vars.keys())
                        .any(|name| reason.starts_with(&format!("env {name} ")))
                };
                reasons.extend(env.into_iter().filter(|reason| !by_arg(reason)));
            }
            "from" | "value" if inputs_explained => {}
            "argv" | "sources" | "dest" | "value" | "config" => {
                if !reasons.contains(&definition_changed) {
                    reasons.push(definition_changed.clone());
                }
            }
            _ => reasons.push(format!(
                "{field} changed: {} → {}",
                was.map_or("(none)".to_string(), Value::to_string),
                now.map_or("(none)".to_string(), Value::to_string)
            )),
        }
    }
}

/// [`Explanation::Pending`] for a node whose key waits for unresolved bases.
pub fn pending(plan: &Plan, node: &Node) -> Option<Explanation> {
    node.pending.then(|| Explanation::Pending {
        bases: plan
            .unresolved_under(node.id)
            .into_iter()
            .map(|base| format!("{} ({})", base.reference, base.platform))
            .collect(),
    })
}

/// Explain one node against the store.
pub fn explain(
    store: &Store,
    plan: &Plan,
    node: &Node,
    describe: &dyn Fn(graphbuild_lang::ir::Loc) -> String,
) -> Explanation {
    if let Some(pending) = pending(plan, node) {
        return pending;
    }
    if is_cached(store, node) {
        return Explanation::Cached;
    }
    let Some(bytes) = store.get_action(&identity(node)) else {
        return Explanation::NeverBuilt;
    };
    let Some((record, sections)) = split_record(&bytes).and_then(|(json, sections)| {
        Some((serde_json::from_slice::<NodeRecord>(json).ok()?, sections))
    }) else {
        return Explanation::NeverBuilt;
    };
    for (index, step) in node.steps.iter().enumerate() {
        let Some(old) = record.steps.get(index) else {
            return Explanation::Changed {
                step: step.description.clone(),
                location: Some(describe(step.at)),
                reasons: vec!["this step is new".into()],
            };
        };
        if old.key == step.key {
            continue;
        }
        let mut reasons = Vec::new();
        if index == 0 && old.inputs.base != step.inputs.base {
            reasons.push(format!(
                "the base changed: {} → {}",
                old.inputs.base, step.inputs.base
            ));
        }
        let files_before = reasons.len();
        diff_maps("arg", &old.inputs.vars, &step.inputs.vars, &mut reasons);
        diff_maps(
            "file",
            &recorded_files(sections, old),
            &current_files(step),
            &mut reasons,
        );
        let inputs_explained = reasons.len() > files_before;
        diff_op(
            "step",
            (&old.description, &old.inputs),
            (&step.description, &step.inputs),
            inputs_explained,
            &mut reasons,
        );
        if reasons.is_empty() {
            reasons.push(if index == 0 {
                format!("the base changed: {}", step.inputs.base)
            } else {
                "an earlier step changed".to_string()
            });
        }
        return Explanation::Changed {
            step: step.description.clone(),
            location: Some(describe(step.at)),
            reasons,
        };
    }
    if record.steps.len() != node.steps.len() {
        return Explanation::Changed {
            step: "(end of stage)".into(),
            location: None,
            reasons: vec!["steps were removed".into()],
        };
    }
    Explanation::Evicted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_borrowed_record_writes_the_same_json_as_the_one_read_back() {
        let inputs = StepInputs {
            op: serde_json::json!({"copy": {"dest": "/src/"}}),
            vars: BTreeMap::from([("A".to_string(), "1".to_string())]),
            files: BTreeMap::from([("f".to_string(), "00:644".to_string())]),
            base: "scratch".to_string(),
        };
        let key = Key([7; 32]);
        let owned = NodeRecord {
            steps: vec![StepRecordEntry {
                description: "COPY f /src/".to_string(),
                key,
                inputs: inputs.clone(),
                files: Some("ab".to_string()),
            }],
        };
        let borrowed = NodeRecordRef {
            steps: vec![StepRecordEntryRef {
                description: "COPY f /src/",
                key,
                inputs: &inputs,
                files: Some("ab"),
            }],
        };
        let bytes = serde_json::to_vec(&borrowed).unwrap();
        assert_eq!(bytes, serde_json::to_vec(&owned).unwrap());
        let read: NodeRecord = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(read.steps[0].inputs, inputs);
        assert_eq!(read.steps[0].files.as_deref(), Some("ab"));
        // A record of an older version, with no `files`, still reads.
        let old = br#"{"steps":[{"description":"COPY f /src/","key":"0707070707070707070707070707070707070707070707070707070707070707","inputs":{"op":null,"vars":{},"files":{"f":"00:644"},"base":"scratch"}}]}"#;
        let read: NodeRecord = serde_json::from_slice(old).unwrap();
        assert_eq!(read.steps[0].files, None);
        assert_eq!(read.steps[0].inputs.files["f"], "00:644");
    }

    #[test]
    fn a_copys_files_record_round_trips_and_belongs_to_its_selection() {
        let digest = "d".repeat(64);
        let mut bytes = FILES_MAGIC.to_vec();
        bytes.extend_from_slice(digest.as_bytes());
        bytes.extend_from_slice(b"\nsrc/a b.txt\0aa:644\0src/link\0-> /etc/x\0");
        let files = decode_files(&bytes, &digest).unwrap();
        assert_eq!(
            files,
            BTreeMap::from([
                ("src/a b.txt".to_string(), "aa:644".to_string()),
                ("src/link".to_string(), "-> /etc/x".to_string()),
            ])
        );
        // Another selection's record, a truncated one, or another format: not these files.
        assert_eq!(decode_files(&bytes, &"e".repeat(64)), None);
        assert_eq!(decode_files(&bytes[..bytes.len() - 1], &digest), None);
        assert_eq!(decode_files(&bytes[1..], &digest), None);
        // In a node's record: after its JSON, each section after its length.
        let other = {
            let mut other = FILES_MAGIC.to_vec();
            other.extend_from_slice("e".repeat(64).as_bytes());
            other.extend_from_slice(b"\nx\0ee:644\0");
            other
        };
        let mut record = br#"{"steps":[]}"#.to_vec();
        record.push(b'\n');
        for section in [&other, &bytes] {
            record.extend_from_slice(&(section.len() as u64).to_le_bytes());
            record.extend_from_slice(section);
        }
        let (json, sections) = split_record(&record).unwrap();
        assert_eq!(json, br#"{"steps":[]}"#);
        assert_eq!(files_in(sections, &digest), Some(files.clone()));
        assert_eq!(files_in(sections, &"e".repeat(64)).unwrap().len(), 1);
        assert_eq!(files_in(sections, &"f".repeat(64)), None);
        assert_eq!(files_in(&sections[..sections.len() - 1], &digest), None);
        // A record of an older version: its JSON alone.
        assert_eq!(
            split_record(br#"{"steps":[]}"#),
            Some((&br#"{"steps":[]}"#[..], &b""[..]))
        );
        assert_eq!(split_record(b"not json"), None);
        let mut empty = FILES_MAGIC.to_vec();
        empty.extend_from_slice(digest.as_bytes());
        empty.push(b'\n');
        assert_eq!(decode_files(&empty, &digest), Some(BTreeMap::new()));
    }
}
