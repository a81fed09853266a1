//! `plan::expand` and cache keys, in Rust: build files are loaded from text and planned against
//! the vendored busybox layout (`tests/fixtures/busybox`), no binary and no root involved.
//!
//! - expansion: sharing, per-target steps, args reaching `run` as environment, cycles, a long
//!   chain planned without recursion;
//! - keys: different config steps never share a key (the `env A="1 B=2"` collision), a property
//!   test that two steps get one key exactly when their canonical ops are equal, and golden keys
//!   for fixed build files (`BLESS=1` rewrites them after a deliberate FORMAT_VERSION bump).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use graphbuild_engine::plan::{self, ConfigOp, Op, Plan, PlanOptions};
use graphbuild_engine::resolve::LayoutResolver;
use graphbuild_lang::platform::Platform;
use proptest::prelude::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("engine/ has a parent")
        .to_path_buf()
}

const BASE: &str = "oci:tests/fixtures/busybox:1.35.0";

fn platform(text: &str) -> Platform {
    Platform::parse(text).expect("a valid platform")
}

/// Plans `text` as if it were a build file at the repository root.
fn plan_with(text: &str, args: &[(&str, &str)], platforms: &[&str]) -> Result<Plan, String> {
    let root = repo();
    let project = graphbuild_lang::load_source("images.kdl", text, &root)
        .map_err(|diagnostics| format!("{diagnostics:?}"))?;
    let resolver = LayoutResolver::new(&root);
    let options = PlanOptions {
        images: Vec::new(),
        platforms: platforms.iter().map(|text| platform(text)).collect(),
        args: args
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect(),
        host: platform("linux/amd64"),
        context_dir: Some(root.join("examples/basic")),
        resolver: &resolver,
        store: None,
    };
    plan::expand(&project, &options).map_err(|diagnostics| format!("{diagnostics:?}"))
}

fn plan(text: &str) -> Plan {
    plan_with(text, &[], &["linux/amd64"]).expect("the build file plans")
}

/// The node that builds image `name` for its first platform.
fn image_node<'p>(plan: &'p Plan, name: &str) -> &'p plan::Node {
    let image = plan
        .images
        .iter()
        .find(|image| image.name == name)
        .expect("the image is planned");
    &plan.nodes[image.platforms[0].1]
}

#[test]
fn env_steps_that_read_alike_are_different_nodes_with_different_settings() {
    let plan = plan(&format!(
        r#"
        stage a {{ from "{BASE}"; env A="1 B=2"; }}
        stage b {{ from "{BASE}"; env A="1" B="2"; }}
        image one {{ stage a; }}
        image two {{ stage b; }}
        "#
    ));
    let (one, two) = (image_node(&plan, "one"), image_node(&plan, "two"));
    assert_ne!(one.key, two.key, "two different env steps share a node");
    assert_eq!(one.steps[0].description, two.steps[0].description);
    assert_eq!(one.settings.env_value("A"), Some("1 B=2"));
    assert_eq!(one.settings.env_value("B"), None);
    assert_eq!(two.settings.env_value("A"), Some("1"));
    assert_eq!(two.settings.env_value("B"), Some("2"));
}

#[test]
fn labels_cmds_and_entrypoints_that_describe_alike_differ() {
    let pairs = [
        (r#"label "a"="1 b=2""#, r#"label "a"="1" "b"="2""#),
        (r#"cmd "echo" "a b""#, r#"cmd "echo a" "b""#),
        (r#"entrypoint "a" "b""#, r#"entrypoint "a b""#),
        (r#"expose "80" "81""#, r#"expose "80 81""#),
    ];
    for (left, right) in pairs {
        let plan = plan(&format!(
            r#"
            stage a {{ from "{BASE}"; {left}; }}
            stage b {{ from "{BASE}"; {right}; }}
            image one {{ stage a; }}
            image two {{ stage b; }}
            "#
        ));
        let (one, two) = (image_node(&plan, "one"), image_node(&plan, "two"));
        assert_ne!(one.key, two.key, "`{left}` and `{right}` share a key");
        assert_ne!(one.settings, two.settings);
    }
}

#[test]
fn build_args_reach_run_as_environment_never_as_shell_source() {
    let text = format!(
        r#"
        arg SARG="plain"
        stage s {{ from "{BASE}"; run "echo \"sarg=${{SARG}}\" > /out"; }}
        image app {{ stage s; }}
        "#
    );
    let hostile = r#"";echo INJ2;""#;
    let plan = plan_with(&text, &[("SARG", hostile)], &["linux/amd64"]).expect("plans");
    let node = image_node(&plan, "app");
    let Op::Run(run) = &node.steps[0].op else {
        panic!("the first step is a run")
    };
    assert_eq!(
        run.argv,
        ["/bin/sh", "-c", r#"echo "sarg=${SARG}" > /out"#],
        "the command runs as written"
    );
    let env: BTreeMap<_, _> = run.env.iter().cloned().collect();
    assert_eq!(env.get("SARG").map(String::as_str), Some(hostile));
    // People still see the value.
    assert!(node.steps[0].description.contains("INJ2"));

    // The value is in the key: another value, another key.
    let other = plan_with(&text, &[("SARG", "other")], &["linux/amd64"]).expect("plans");
    assert_ne!(image_node(&other, "app").key, node.key);
}

#[test]
fn a_run_that_does_not_reference_an_arg_keeps_its_key_when_the_arg_changes() {
    let text = format!(
        r#"
        arg UNUSED="1"
        stage s {{ from "{BASE}"; run "echo hi > /out"; }}
        image app {{ stage s; }}
        "#
    );
    let one = plan_with(&text, &[("UNUSED", "1")], &["linux/amd64"]).expect("plans");
    let two = plan_with(&text, &[("UNUSED", "2")], &["linux/amd64"]).expect("plans");
    assert_eq!(image_node(&one, "app").key, image_node(&two, "app").key);
}

#[test]
fn a_build_platform_stage_is_one_node_until_a_step_reads_the_target() {
    let text = format!(
        r#"
        stage tools {{
            platform "$BUILDPLATFORM"
            from "{BASE}"
            run "echo shared > /shared"
            run "echo ${{TARGETARCH}} > /arch"
        }}
        stage runtime {{ from "{BASE}"; copy "/arch" "/arch" from=tools; }}
        image app {{ stage runtime; }}
        "#
    );
    let plan = plan_with(&text, &[], &["linux/amd64", "linux/arm64"]).expect("plans");
    let tools: Vec<_> = plan
        .nodes
        .iter()
        .filter(|node| node.stage == "tools")
        .collect();
    assert_eq!(
        tools.len(),
        2,
        "the TARGETARCH step makes the stage per target"
    );
    assert_eq!(
        tools[0].steps[0].key, tools[1].steps[0].key,
        "the step before it is shared"
    );
    assert_ne!(tools[0].steps[1].key, tools[1].steps[1].key);
    for node in tools {
        assert_eq!(
            node.platform,
            platform("linux/amd64"),
            "runs on the build platform"
        );
    }
}

#[test]
fn a_cycle_is_reported_with_its_stages() {
    let error = plan_with(
        r#"
        stage a { from b; }
        stage b { from a; }
        image app { stage a; }
        "#,
        &[],
        &["linux/amd64"],
    )
    .expect_err("a cycle does not plan");
    assert!(
        error.contains("a → b → a") || error.contains("b → a → b"),
        "{error}"
    );
}

#[test]
fn a_chain_of_thousands_of_stages_plans_without_recursion() {
    // Test threads have a 2 MiB stack: a recursive walk overflows long before 5,000 stages.
    let mut text = String::from("stage s0 { from \"scratch\"; env N=\"0\"; }\n");
    for index in 1..5_000 {
        text.push_str(&format!(
            "stage s{index} {{ from s{}; env N=\"{index}\"; }}\n",
            index - 1
        ));
    }
    text.push_str("image app { stage s4999; }\n");
    let plan = plan(&text);
    assert_eq!(plan.nodes.len(), 5_000);
    assert_eq!(
        image_node(&plan, "app").settings.env_value("N"),
        Some("4999")
    );
    // Every node comes after its base.
    for node in &plan.nodes {
        assert!(node.deps.iter().all(|dep| *dep < node.id));
    }
}

// ---------------------------------------------------------------------------------------------
// Property: one key exactly when the canonical ops are equal.

/// Strings with the characters that break naive joining and quoting.
fn tricky() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("a"),
            Just("B"),
            Just(" "),
            Just("="),
            Just("\""),
            Just("'"),
            Just(","),
            Just("["),
            Just("]"),
            Just("\\"),
            Just("1"),
        ],
        0..6,
    )
    .prop_map(|parts| parts.concat())
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![Just("A"), Just("B"), Just("A_B"), Just("PATH")].prop_map(str::to_string)
}

fn config() -> impl Strategy<Value = ConfigOp> {
    let pairs = || proptest::collection::vec((name(), tricky()), 1..3);
    let list = || proptest::collection::vec(tricky(), 1..3);
    prop_oneof![
        pairs().prop_map(ConfigOp::Env),
        pairs().prop_map(ConfigOp::Label),
        list().prop_map(ConfigOp::Cmd),
        list().prop_map(ConfigOp::Entrypoint),
        list().prop_map(ConfigOp::Shell),
        list().prop_map(ConfigOp::Expose),
        list().prop_map(ConfigOp::Volume),
        tricky().prop_map(ConfigOp::Workdir),
        tricky().prop_map(ConfigOp::User),
        tricky().prop_map(ConfigOp::StopSignal),
        (name(), proptest::option::of(tricky()))
            .prop_map(|(name, value)| ConfigOp::Arg { name, value }),
    ]
}

/// KDL string literal.
fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A build file line for an `env`/`cmd` op, so the property also holds through the language.
fn kdl(op: &ConfigOp) -> Option<String> {
    let pairs = |pairs: &[(String, String)]| {
        pairs
            .iter()
            .map(|(name, value)| format!("{name}={}", quote(value)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let list = |items: &[String]| {
        items
            .iter()
            .map(|item| quote(item))
            .collect::<Vec<_>>()
            .join(" ")
    };
    match op {
        ConfigOp::Env(values) => Some(format!("env {}", pairs(values))),
        ConfigOp::Cmd(argv) => Some(format!("cmd {} shell=#false", list(argv))),
        _ => None,
    }
}

proptest! {
    #[test]
    fn two_config_steps_share_a_key_only_when_their_ops_are_equal(
        left in config(),
        right in config(),
    ) {
        let parent = graphbuild_engine::digest::Key([3; 32]);
        let (left, right) = (Op::Config(left), Op::Config(right));
        prop_assert_eq!(
            left.key(&parent) == right.key(&parent),
            left.canonical() == right.canonical()
        );
        prop_assert_eq!(left.canonical() == right.canonical(), left == right);
    }

    #[test]
    fn through_the_language_equal_settings_mean_equal_keys_and_back(
        left in config(),
        right in config(),
    ) {
        let (Some(left_line), Some(right_line)) = (kdl(&left), kdl(&right)) else {
            return Ok(());
        };
        let text = format!(
            "stage a {{ from \"scratch\"; {left_line}; }}\n\
             stage b {{ from \"scratch\"; {right_line}; }}\n\
             image one {{ stage a; }}\nimage two {{ stage b; }}\n"
        );
        let Ok(plan) = plan_with(&text, &[], &["linux/amd64"]) else {
            // Duplicate names in one `env` and the like are the language's to refuse.
            return Ok(());
        };
        let (one, two) = (image_node(&plan, "one"), image_node(&plan, "two"));
        let (Op::Config(one_op), Op::Config(two_op)) = (&one.steps[0].op, &two.steps[0].op) else {
            panic!("config steps");
        };
        prop_assert_eq!(one.key == two.key, one_op == two_op);
        if one.key == two.key {
            prop_assert_eq!(&one.settings, &two.settings);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Golden keys.

/// Build files whose keys are pinned in `engine/tests/golden/keys.txt`.
fn golden_files() -> Vec<(&'static str, String, Vec<&'static str>)> {
    vec![
        (
            "examples/basic",
            std::fs::read_to_string(repo().join("examples/basic/images.kdl"))
                .expect("examples/basic")
                .replace("../../tests/fixtures", "tests/fixtures"),
            vec!["linux/amd64", "linux/arm64", "linux/arm/v7"],
        ),
        (
            "every step kind",
            format!(
                r#"
                arg VERSION="1.0"
                stage tools {{
                    platform "$BUILDPLATFORM"
                    from "{BASE}"
                    arg TARGETARCH
                    run "echo $TARGETARCH > /arch" {{ cache-mount "/root/.cache"; }}
                }}
                stage app {{
                    from "{BASE}"
                    env A="1 B=2" C=""
                    workdir "/srv"
                    user "1000:1000"
                    label "org.opencontainers.image.version"="$VERSION"
                    expose "8080" "53/udp"
                    volume "/data"
                    shell "/bin/sh" "-ec"
                    stopsignal "SIGINT"
                    healthcheck "true" interval="30s"
                    copy "src/" "/srv/src/" chmod="0644"
                    copy "/arch" "/arch" from=tools
                    run "echo v$VERSION > /version" {{ network "none"; }}
                    entrypoint "/bin/sh" "-c"
                    cmd "exec cat /version" shell=#true
                }}
                image app {{ stage app; }}
                "#
            ),
            vec!["linux/amd64", "linux/arm64"],
        ),
    ]
}

fn render_keys() -> String {
    let mut out = String::new();
    for (name, text, platforms) in golden_files() {
        let plan = plan_with(&text, &[], &platforms).expect("golden build file plans");
        out.push_str(&format!("# {name}\n"));
        for node in &plan.nodes {
            out.push_str(&format!("{} {} {}\n", node.stage, node.platform, node.key));
            for step in &node.steps {
                out.push_str(&format!("    {} {}\n", step.key, step.description));
            }
        }
    }
    out
}

#[test]
fn keys_of_fixed_build_files_are_stable() {
    let golden = repo().join("engine/tests/golden/keys.txt");
    let actual = render_keys();
    if std::env::var_os("BLESS").is_some() {
        std::fs::create_dir_all(golden.parent().expect("has a parent")).expect("mkdir");
        std::fs::write(&golden, &actual).expect("write the golden keys");
        return;
    }
    let expected = std::fs::read_to_string(&golden).unwrap_or_default();
    assert!(
        expected == actual,
        "cache keys changed.\n\
         If what a step means or how its key is encoded changed on purpose, bump FORMAT_VERSION \
         in engine/src/key.rs (old store entries must never be reused with a new meaning) and \
         rewrite the golden file with BLESS=1.\n\
         If not, a change leaked into the keys by accident: find it.\n\
         --- expected ({})\n{expected}\n--- actual\n{actual}",
        golden.display()
    );
}

/// Resolves `registry.example/…` as a base that cannot be had without the network, and
/// everything else from OCI layouts.
struct NoNetwork(LayoutResolver);

impl graphbuild_engine::resolve::Resolver for NoNetwork {
    fn resolve(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<
        std::sync::Arc<graphbuild_engine::resolve::ResolvedBase>,
        graphbuild_engine::resolve::ResolveError,
    > {
        if reference.starts_with("registry.example/") {
            return Err(graphbuild_engine::resolve::ResolveError::Unresolved(
                Box::new(graphbuild_engine::resolve::Unresolved {
                    reference: reference.to_string(),
                    platform: platform.clone(),
                    locked: None,
                    reason: "no network".into(),
                }),
            ));
        }
        self.0.resolve(reference, platform)
    }

    fn fetch_layers(
        &self,
        base: &graphbuild_engine::resolve::ResolvedBase,
        store: &graphbuild_engine::store::Store,
    ) -> Result<(), graphbuild_engine::resolve::ResolveError> {
        self.0.fetch_layers(base, store)
    }
}

#[test]
fn unresolved_bases_make_exactly_the_keys_that_depend_on_them_pending() {
    let root = repo();
    let text = format!(
        r#"
        stage base {{ from "registry.example/base:1"; run "echo base"; }}
        stage tool {{ from "{BASE}"; run "echo tool"; }}
        stage app {{
            from tool
            run "echo before"
            copy "/x" "/x" from=base
            run "echo after"
        }}
        stage grab {{ from "{BASE}"; copy "/y" "/y" from="registry.example/image:2"; }}
        image app {{ stage app; }}
        image tool {{ stage tool; }}
        image grab {{ stage grab; }}
        "#
    );
    let project = graphbuild_lang::load_source("images.kdl", &text, &root).expect("loads");
    let resolver = NoNetwork(LayoutResolver::new(&root));
    let options = PlanOptions {
        images: Vec::new(),
        platforms: vec![platform("linux/amd64")],
        args: BTreeMap::new(),
        host: platform("linux/amd64"),
        context_dir: Some(root.join("examples/basic")),
        resolver: &resolver,
        store: None,
    };
    let planned = plan::expand(&project, &options).expect("an unresolved base is not an error");

    // Nothing that does not depend on the unresolved bases is pending, and its key is the
    // key it has in a plan without them.
    let tool = image_node(&planned, "tool");
    assert!(!tool.pending);
    let alone = plan(&format!(
        r#"
        stage tool {{ from "{BASE}"; run "echo tool"; }}
        image tool {{ stage tool; }}
        "#
    ));
    assert_eq!(tool.key, image_node(&alone, "tool").key);

    // The unresolved base's own node: pending, every step pending.
    let base = planned
        .nodes
        .iter()
        .find(|node| node.stage == "base")
        .expect("base node");
    assert!(base.pending);
    assert!(matches!(base.base, plan::Base::Unresolved(_)));
    assert!(base.steps.iter().all(|step| step.pending));

    // Copying from it makes that step and the ones after it pending, not the ones before.
    let app = image_node(&planned, "app");
    assert!(app.pending);
    let pending: Vec<bool> = app.steps.iter().map(|step| step.pending).collect();
    assert_eq!(pending, [false, true, true]);
    assert!(app.deps.contains(&base.id));
    assert_ne!(app.key, base.key);

    // `copy from="IMAGE"` of an unresolved image.
    let grab = image_node(&planned, "grab");
    assert!(grab.pending);
    assert!(grab.steps.iter().all(|step| step.pending));
    let image = &planned.nodes[grab.deps[0]];
    assert!(matches!(image.base, plan::Base::Unresolved(_)));

    let unresolved: Vec<&str> = planned
        .unresolved()
        .iter()
        .map(|base| base.reference.as_str())
        .collect();
    assert_eq!(
        unresolved,
        ["registry.example/base:1", "registry.example/image:2"]
    );
    let under_app: Vec<&str> = planned
        .unresolved_under(app.id)
        .iter()
        .map(|base| base.reference.as_str())
        .collect();
    assert_eq!(under_app, ["registry.example/base:1"]);
}

/// Platforms that copy the same context sources share one selection (held once, not once per
/// platform); other sources or `exclude` patterns are their own.
#[test]
fn platforms_copying_the_same_sources_share_one_selection() {
    let planned = plan_with(
        &format!(
            r#"
            stage app {{ from "{BASE}"; copy "src/" "/src/"; copy "src/" "/other/" exclude="*.txt"; }}
            image app {{ stage app; }}
            "#
        ),
        &[],
        &["linux/amd64", "linux/arm64"],
    )
    .expect("the build file plans");
    let image = &planned.images[0];
    let selection = |node: usize, step: usize| match &planned.nodes[node].steps[step].op {
        Op::Copy(plan::CopyOp {
            from: plan::CopySource::Context { items, digest, .. },
            ..
        }) => (items.clone(), digest.clone()),
        other => panic!("not a context copy: {other:?}"),
    };
    let (amd64, arm64) = (image.platforms[0].1, image.platforms[1].1);
    assert_ne!(amd64, arm64, "two platforms, two nodes");
    let (first, first_digest) = selection(amd64, 0);
    let (second, second_digest) = selection(arm64, 0);
    assert!(!first.is_empty());
    assert!(std::sync::Arc::ptr_eq(&first, &second), "one selection");
    assert_eq!(first_digest, second_digest);
    let (excluded, excluded_digest) = selection(amd64, 1);
    assert!(!std::sync::Arc::ptr_eq(&first, &excluded));
    assert_ne!(first_digest, excluded_digest);
    assert!(excluded.len() < first.len(), "the pattern leaves files out");
}
