//! Lowering stages: `from`, steps (`run`, `copy`, metadata), `when` blocks and stage
//! references resolved in the referring file's namespace.

use crate::Code;

use kdl::{KdlNode, KdlValue};

use crate::Diagnostic;
use crate::ir::{
    CacheMount, CacheSharing, Command, Copy, CopyFrom, FileId, From, FromSource, Healthcheck,
    InlineFile, Loc, Network, PlatformSpec, Run, ScopeId, Secret, Stage, Step, StepKind, Text,
    TmpfsMount,
};

use super::*;

impl Loader {
    pub(super) fn resolve_stage(&self, name: &str, resolver: &Resolver<'_>) -> Option<String> {
        if let Some((siblings, instance)) = resolver.siblings
            && siblings.iter().any(|sibling| sibling == name)
        {
            return Some(format!("{instance}/{name}"));
        }
        let prefixed = format!("{}{name}", resolver.prefix);
        if self.stage_names.contains_key(&prefixed) {
            return Some(prefixed);
        }
        if self.stage_names.contains_key(name) {
            return Some(name.to_string());
        }
        None
    }

    pub(super) fn stage_candidates<'a>(&'a self, resolver: &'a Resolver<'_>) -> Vec<String> {
        let mut candidates: Vec<String> = self.stage_names.keys().cloned().collect();
        if let Some((siblings, _)) = resolver.siblings {
            candidates.extend(siblings.iter().cloned());
        }
        candidates.sort();
        candidates
    }

    pub(super) fn unknown_stage(
        &mut self,
        name: &str,
        at: Loc,
        resolver: &Resolver<'_>,
        image_ref_allowed: bool,
    ) {
        let candidates = self.stage_candidates(resolver);
        let mut help = match did_you_mean(name, candidates.iter().map(String::as_str)) {
            Some(close) => format!("did you mean `{close}`?"),
            None if candidates.is_empty() => "no stage is defined".to_string(),
            None => format!("defined stages: {}", candidates.join(", ")),
        };
        if image_ref_allowed {
            help.push_str(&format!(
                "; an image from Docker Hub must be written `docker.io/library/{name}` or `{name}:TAG`"
            ));
        }
        self.error(
            Code::UnknownStage,
            format!("unknown stage `{name}`"),
            at,
            "not a stage",
            Some(help),
        );
    }

    pub(super) fn lower_from(&mut self, text: Text, resolver: &Resolver<'_>) -> Option<From> {
        let at = text.at;
        let raw = text.raw.as_str();
        let source = if raw == "scratch" {
            FromSource::Scratch
        } else if raw.contains('$') || raw.starts_with("oci:") {
            FromSource::Image(text)
        } else if let Some(stage) = self.resolve_stage(raw, resolver) {
            FromSource::Stage(stage)
        } else if is_image_reference(raw) {
            FromSource::Image(text)
        } else {
            self.unknown_stage(raw, at, resolver, true);
            return None;
        };
        Some(From { source, at })
    }

    pub(super) fn lower_stage(
        &mut self,
        node: &KdlNode,
        file: FileId,
        name: String,
        resolver: &Resolver<'_>,
        scope: Option<ScopeId>,
    ) -> Option<Stage> {
        let name_at = positional(node)
            .first()
            .map(|entry| Self::loc(file, entry.span()))
            .unwrap_or_else(|| Self::loc(file, node.name().span()));
        let docker_rules = self.stage_rules(node, file);
        let mut from: Option<From> = None;
        let mut from_seen: Option<Loc> = None;
        let mut platform: Option<PlatformSpec> = None;
        let mut platform_seen: Option<Loc> = None;
        let mut steps = Vec::new();
        let children: Vec<KdlNode> = node
            .children()
            .map(|children| children.nodes().to_vec())
            .unwrap_or_default();
        for child in &children {
            let child_at = Self::loc(file, child.name().span());
            match child.name().value() {
                "from" => {
                    if let Some(first) = from_seen {
                        let diagnostic =
                            Diagnostic::error(Code::DuplicateFrom, "a stage has one `from`")
                                .with_label(&self.sources, child_at, "second `from`")
                                .with_label(&self.sources, first, "first `from`")
                                .with_help(
                                    "use another stage to combine images: `copy … from=OTHER`",
                                );
                        self.diagnostics.push(diagnostic);
                        continue;
                    }
                    from_seen = Some(child_at);
                    if let Some(text) = self.single(child, file, spec::get(spec::STAGE, "from")) {
                        from = self.lower_from(text, resolver);
                    }
                }
                "platform" => {
                    if let Some(first) = platform_seen {
                        let diagnostic = Diagnostic::error(
                            Code::DuplicatePlatform,
                            "a stage has one `platform`",
                        )
                        .with_label(&self.sources, child_at, "second `platform`")
                        .with_label(&self.sources, first, "first `platform`")
                        .with_help("use `when platform=\"…\" { … }` for per-platform steps");
                        self.diagnostics.push(diagnostic);
                        continue;
                    }
                    platform_seen = Some(child_at);
                    if let Some(text) = self.single(child, file, spec::get(spec::STAGE, "platform"))
                    {
                        platform = self.platform_spec(text);
                    }
                }
                "when" => self.lower_when(child, file, resolver, &mut steps),
                other => {
                    if let Some(kind) = self.lower_step(
                        child,
                        file,
                        resolver,
                        other,
                        &spec::stage_names(),
                        "in a stage",
                    ) {
                        steps.push(Step {
                            kind,
                            at: child_at,
                            when: None,
                        });
                    }
                }
            }
        }
        let Some(from) = from else {
            if from_seen.is_none() {
                self.error(
                    Code::StageMissingFrom,
                    format!("stage `{name}` has no `from`"),
                    name_at,
                    "no base",
                    Some("start the stage with `from \"scratch\"`, `from OTHER_STAGE` or `from \"docker.io/library/alpine:3.20\"`".into()),
                );
            }
            return None;
        };
        Some(Stage {
            name,
            at: name_at,
            from,
            platform,
            steps,
            scope,
            docker_rules,
        })
    }

    /// A node with exactly one value (a string; also an integer with `integers`: `user 1000`,
    /// `stopsignal 15`) and nothing else; a problem's help shows `example`. Called through
    /// [`Self::single`], which takes `what`, `example` and `integers` from the node's spec.
    pub(super) fn single_value(
        &mut self,
        node: &KdlNode,
        file: FileId,
        kind: &str,
        (what, example): (&str, &str),
        integers: bool,
    ) -> Option<Text> {
        self.check_no_children(node, file, kind);
        self.check_no_properties(node, file, kind);
        let arguments = positional(node);
        for extra in arguments.iter().skip(1) {
            self.error(
                Code::NodeExtraArgument,
                format!("`{kind}` takes one value"),
                Self::loc(file, extra.span()),
                "extra argument",
                Some(format!("write `{example}`")),
            );
        }
        let Some(first) = arguments.first() else {
            self.error(
                Code::NodeMissingValue,
                format!("`{kind}` needs {what}"),
                Self::loc(file, node.name().span()),
                "value missing",
                Some(format!("write `{example}`")),
            );
            return None;
        };
        if integers {
            self.string_or_integer(first, file, &format!("`{kind}`"))
        } else {
            self.string(first, file, &format!("`{kind}`"))
        }
    }

    pub(super) fn lower_when(
        &mut self,
        node: &KdlNode,
        file: FileId,
        resolver: &Resolver<'_>,
        steps: &mut Vec<Step>,
    ) {
        let node_at = Self::loc(file, node.name().span());
        self.check_no_arguments(node, file, "when");
        let mut platform = None;
        let platform_seen = properties(node).iter().any(|(key, _)| *key == "platform");
        let props = self.node_properties(node, file, spec::get(spec::STAGE, "when"));
        if let Some(text) = props.text("platform") {
            if text.raw.contains('$') {
                self.error(
                    Code::WhenDynamicPlatform,
                    "`when platform=` must be a literal platform",
                    text.at,
                    "contains a variable",
                    Some("write the platform it applies to, for example when platform=\"linux/arm/v7\"".into()),
                );
            } else if let Some(PlatformSpec::Literal(parsed, _)) = self.platform_spec(text) {
                platform = Some(parsed);
            }
        }
        if !platform_seen {
            self.error(
                Code::WhenMissingPlatform,
                "`when` needs platform=\"…\"",
                node_at,
                "no condition",
                Some("write `when platform=\"linux/arm64\" { … }`".into()),
            );
        }
        let children: Vec<KdlNode> = node
            .children()
            .map(|children| children.nodes().to_vec())
            .unwrap_or_default();
        for child in &children {
            let child_at = Self::loc(file, child.name().span());
            let name = child.name().value();
            if let Some(kind) = self.lower_step(
                child,
                file,
                resolver,
                name,
                &spec::names(spec::STEPS),
                "in `when`",
            ) && let Some(platform) = &platform
            {
                steps.push(Step {
                    kind,
                    at: child_at,
                    when: Some(platform.clone()),
                });
            }
        }
    }

    pub(super) fn lower_step(
        &mut self,
        node: &KdlNode,
        file: FileId,
        resolver: &Resolver<'_>,
        name: &str,
        allowed: &[&str],
        place: &str,
    ) -> Option<StepKind> {
        let step = spec::find(spec::STEPS, name).filter(|_| allowed.contains(&name));
        let Some(step) = step else {
            self.unknown_node(node, file, name, allowed, place);
            return None;
        };
        let node_at = Self::loc(file, node.name().span());
        match name {
            "run" => self.lower_run(node, file, resolver).map(StepKind::Run),
            "copy" => self.lower_copy(node, file, resolver).map(StepKind::Copy),
            "file" => self.lower_file(node, file).map(StepKind::Copy),
            "add" => self.lower_add(node, file).map(StepKind::Add),
            "env" => {
                self.check_no_children(node, file, name);
                let pairs = self.key_values(node, file, name);
                (!pairs.is_empty()).then_some(StepKind::Env(pairs))
            }
            "label" => {
                self.check_no_children(node, file, name);
                let pairs = self.key_values(node, file, name);
                (!pairs.is_empty()).then_some(StepKind::Label(pairs))
            }
            "arg" => {
                self.check_no_children(node, file, name);
                let mut declarations = self.arg_declarations(node, file);
                if declarations.len() > 1 {
                    self.error(
                        Code::ArgSeveralInStage,
                        "`arg` in a stage declares one arg",
                        node_at,
                        "several args",
                        Some("write one `arg` node per name".into()),
                    );
                }
                declarations.drain(..).next().map(StepKind::Arg)
            }
            "workdir" => self.single(node, file, step).map(StepKind::Workdir),
            "user" => self.single(node, file, step).map(StepKind::User),
            "stopsignal" => self.single(node, file, step).map(StepKind::StopSignal),
            "expose" | "volume" | "shell" => {
                self.check_no_children(node, file, name);
                self.check_no_properties(node, file, name);
                let values =
                    self.string_arguments(node, file, &format!("`{name}`"), name == "expose");
                if values.is_empty() {
                    if positional(node).is_empty() {
                        self.error(
                            Code::NodeMissingValue,
                            format!("`{name}` needs at least one value"),
                            node_at,
                            "value missing",
                            None,
                        );
                    }
                    return None;
                }
                Some(match name {
                    "expose" => StepKind::Expose(values),
                    "volume" => StepKind::Volume(values),
                    _ => StepKind::Shell(values),
                })
            }
            "entrypoint" | "cmd" => {
                let command = self.argv_command(node, file, step)?;
                Some(if name == "entrypoint" {
                    StepKind::Entrypoint(command)
                } else {
                    StepKind::Cmd(command)
                })
            }
            "healthcheck" => self
                .lower_healthcheck(node, file)
                .map(StepKind::Healthcheck),
            _ => None,
        }
    }

    /// `entrypoint`/`cmd`: argv unless `shell=#true`.
    pub(super) fn argv_command(
        &mut self,
        node: &KdlNode,
        file: FileId,
        spec: &spec::NodeSpec,
    ) -> Option<Command> {
        let name = spec.name;
        let shell = self
            .node_properties(node, file, spec)
            .bool("shell")
            .unwrap_or(false);
        let arguments = self.string_arguments(node, file, &format!("`{name}`"), false);
        if arguments.is_empty() {
            if positional(node).is_empty() {
                self.error(
                    Code::NodeMissingValue,
                    format!("`{name}` needs a command"),
                    Self::loc(file, node.name().span()),
                    "command missing",
                    Some(format!(
                        "write `{name} \"/app\" \"--flag\"` (argv), or `{name} \"…\" shell=#true`"
                    )),
                );
            }
            return None;
        }
        if shell {
            if arguments.len() > 1 {
                self.error(
                    Code::CommandShellForm,
                    format!("`{name} … shell=#true` takes one command string"),
                    Self::loc(file, node.name().span()),
                    "several strings",
                    Some("join the command into one string, or drop shell=#true for argv".into()),
                );
                return None;
            }
            return arguments.into_iter().next().map(Command::Shell);
        }
        Some(Command::Exec(arguments))
    }

    /// `run`-style: one string is shell form, several are argv.
    pub(super) fn run_command(
        &mut self,
        node: &KdlNode,
        file: FileId,
        name: &str,
    ) -> Option<Command> {
        let mut arguments = self.string_arguments(node, file, &format!("`{name}`"), false);
        if arguments.is_empty() {
            if positional(node).is_empty() {
                self.error(
                    Code::NodeMissingValue,
                    format!("`{name}` needs a command"),
                    Self::loc(file, node.name().span()),
                    "command missing",
                    Some(format!(
                        "write `{name} \"make all\"` (shell) or `{name} \"make\" \"all\"` (argv)"
                    )),
                );
            }
            return None;
        }
        if arguments.len() == 1 {
            return arguments.pop().map(Command::Shell);
        }
        Some(Command::Exec(arguments))
    }

    /// A `run` child of the form `NAME "PATH" PROPERTY="…"` (`tmpfs`, `bind`): its path and
    /// the property's value, if given.
    fn path_and_one_property(
        &mut self,
        child: &KdlNode,
        file: FileId,
        (name, property, code): (&str, &str, Code),
        example: &str,
    ) -> Option<(Text, Option<Text>)> {
        let value = self
            .node_properties(child, file, spec::get(spec::RUN, name))
            .text(property);
        let at = Self::loc(file, child.name().span());
        let target = self.single_string_argument(
            child,
            file,
            at,
            (
                code,
                &format!("a {name} mount path"),
                &format!("`{name}` takes one path"),
                "one path expected",
            ),
            example,
        )?;
        Some((target, value))
    }

    pub(super) fn lower_run(
        &mut self,
        node: &KdlNode,
        file: FileId,
        resolver: &Resolver<'_>,
    ) -> Option<Run> {
        let props = self.node_properties(node, file, spec::get(spec::STEPS, "run"));
        let timeout = props.text("timeout");
        let insecure = props.bool("insecure").unwrap_or(false);
        let command = self.run_command(node, file, "run");
        let mut cache_mounts = Vec::new();
        let mut tmpfs_mounts = Vec::new();
        let mut bind_mounts = Vec::new();
        let mut ssh_mounts = Vec::new();
        let mut secrets = Vec::new();
        let mut network = Network::default();
        let mut network_seen = false;
        let children: Vec<KdlNode> = node
            .children()
            .map(|children| children.nodes().to_vec())
            .unwrap_or_default();
        for child in &children {
            let child_at = Self::loc(file, child.name().span());
            match child.name().value() {
                "cache-mount" => {
                    let props =
                        self.node_properties(child, file, spec::get(spec::RUN, "cache-mount"));
                    let id = props.text("id");
                    let (uid, gid, mode) =
                        (props.text("uid"), props.text("gid"), props.text("mode"));
                    let mut sharing = CacheSharing::Shared;
                    for text in props.texts("sharing") {
                        {
                            {
                                sharing = match text.raw.as_str() {
                                    "shared" => CacheSharing::Shared,
                                    "private" => CacheSharing::Private,
                                    "locked" => CacheSharing::Locked,
                                    other => {
                                        let modes = ["shared", "private", "locked"];
                                        let help = match did_you_mean(other, modes) {
                                            Some(close) => format!(
                                                "did you mean \"{close}\"? sharing is \"shared\", \"private\" or \"locked\""
                                            ),
                                            None => "sharing is \"shared\" (the default), \"private\" or \"locked\"".to_string(),
                                        };
                                        self.error(
                                            Code::RunCacheMountSharing,
                                            format!("unknown cache mount sharing `{other}`"),
                                            text.at,
                                            "unknown sharing",
                                            Some(help),
                                        );
                                        continue;
                                    }
                                };
                            }
                        }
                    }
                    let Some(target) = self.single_string_argument(
                        child,
                        file,
                        child_at,
                        (
                            Code::RunCacheMount,
                            "a cache mount path",
                            "`cache-mount` takes one path",
                            "one path expected",
                        ),
                        "write `cache-mount \"/root/.cache\" id=\"pip\"`",
                    ) else {
                        continue;
                    };
                    cache_mounts.push(CacheMount {
                        target,
                        id,
                        sharing,
                        uid,
                        gid,
                        mode,
                        at: child_at,
                    });
                }
                "tmpfs" => {
                    let Some((target, size)) = self.path_and_one_property(
                        child,
                        file,
                        ("tmpfs", "size", Code::RunTmpfs),
                        "write `tmpfs \"/tmp\" size=\"256m\"`",
                    ) else {
                        continue;
                    };
                    tmpfs_mounts.push(TmpfsMount {
                        target,
                        size,
                        at: child_at,
                    });
                }
                "bind" => bind_mounts.extend(self.lower_bind(child, file, resolver)),
                "ssh" => ssh_mounts.extend(self.lower_ssh(child, file)),
                "secret" => {
                    let props = self.node_properties(child, file, spec::get(spec::RUN, "secret"));
                    let target = props.text("target");
                    let env = props.text("env").map(|text| text.raw);
                    let required = props.bool("required").unwrap_or(true);
                    let Some(id) = self.single_string_argument(
                        child,
                        file,
                        child_at,
                        (Code::RunSecret, "a secret id", "`secret` takes one id", "one id expected"),
                        "write `secret \"npmrc\" target=\"/root/.npmrc\"` and pass `--secret id=npmrc,src=FILE`",
                    ) else {
                        continue;
                    };
                    secrets.push(Secret {
                        id: id.raw,
                        target,
                        env,
                        required,
                        at: child_at,
                    });
                }
                "network" => {
                    if network_seen {
                        self.error(
                            Code::DuplicateNetwork,
                            "`network` is set twice",
                            child_at,
                            "set again",
                            None,
                        );
                        continue;
                    }
                    network_seen = true;
                    if let Some(text) = self.single(child, file, spec::get(spec::RUN, "network")) {
                        match text.raw.as_str() {
                            "none" => network = Network::None,
                            "host" => network = Network::Host,
                            other => {
                                let help = match did_you_mean(other, ["none", "host"]) {
                                    Some(close) => format!(
                                        "did you mean \"{close}\"? the network is \"none\" or \"host\""
                                    ),
                                    None => "the network is \"none\" or \"host\"".to_string(),
                                };
                                self.error(
                                    Code::RunNetwork,
                                    format!("unknown network mode `{other}`"),
                                    text.at,
                                    "unknown mode",
                                    Some(help),
                                );
                            }
                        }
                    }
                }
                other => self.unknown_node(child, file, other, &spec::names(spec::RUN), "in `run`"),
            }
        }
        Some(Run {
            command: command?,
            cache_mounts,
            tmpfs_mounts,
            bind_mounts,
            ssh_mounts,
            secrets,
            network,
            timeout,
            insecure,
        })
    }

    /// `from="…"` of a copy or a bind mount: a stage of this file (or an imported one), or
    /// an image (`oci:…`, a registry reference, or anything with a variable, resolved once
    /// substituted). `scratch` is empty and unknown names are reported; `None` after a report.
    pub(super) fn source_filesystem(
        &mut self,
        text: Text,
        resolver: &Resolver<'_>,
        (scratch_code, verb): (Code, &str),
    ) -> Option<CopyFrom> {
        let raw = text.raw.as_str();
        if raw == "scratch" {
            self.error(
                scratch_code,
                format!("cannot {verb} from `scratch`: it is empty"),
                text.at,
                "empty filesystem",
                Some(format!("name a stage or an image to {verb} from")),
            );
            None
        } else if raw.contains('$') || raw.starts_with("oci:") {
            Some(CopyFrom::Image(text))
        } else if let Some(stage) = self.resolve_stage(raw, resolver) {
            Some(CopyFrom::Stage(stage, text.at))
        } else if is_image_reference(raw) {
            Some(CopyFrom::Image(text))
        } else {
            self.unknown_stage(raw, text.at, resolver, true);
            None
        }
    }

    pub(super) fn lower_copy(
        &mut self,
        node: &KdlNode,
        file: FileId,
        resolver: &Resolver<'_>,
    ) -> Option<Copy> {
        let props = self.node_properties(node, file, spec::get(spec::STEPS, "copy"));
        let mut failed = props.failed;
        let from = props.text("from");
        let chown = props.text("chown");
        let exclude = props.texts("exclude");
        let parents = props.bool("parents").unwrap_or(false);
        let mut chmod = None;
        for entry in props.raw("chmod") {
            if let KdlValue::Integer(number) = entry.value() {
                self.error(
                    Code::TypeExpectedString,
                    "expected a string for `chmod`, found an integer",
                    Self::loc(file, entry.span()),
                    "an integer",
                    Some(format!("quote the octal mode: chmod=\"0{number}\"")),
                );
                failed = true;
                continue;
            }
            chmod = self.string(entry, file, "`chmod`");
            if !self.octal_mode(chmod.as_ref()) {
                failed = true;
            }
        }
        let mut paths = self.string_arguments(node, file, "a copy path", false);
        if positional(node).len() < 2 {
            self.error(
                Code::CopyArguments,
                "`copy` needs at least a source and a destination",
                Self::loc(file, node.name().span()),
                "sources and destination expected",
                Some(
                    "write `copy \"src/\" \"/app/\"`; several sources may precede the destination"
                        .into(),
                ),
            );
            return None;
        }
        let dest = paths.pop()?;
        let from = match from {
            None => None,
            Some(text) => {
                Some(self.source_filesystem(text, resolver, (Code::CopyFromScratch, "copy"))?)
            }
        };
        if failed || paths.is_empty() {
            return None;
        }
        Some(Copy {
            sources: paths,
            dest,
            from,
            chown,
            chmod,
            exclude,
            inline: Vec::new(),
            parents,
        })
    }

    /// Whether a `chmod` value is an octal mode (or has variables, checked once substituted);
    /// reports it when not.
    pub(super) fn octal_mode(&mut self, chmod: Option<&Text>) -> bool {
        let Some(text) = chmod else {
            return true;
        };
        let valid = text.raw.contains('$') || crate::chmod::Chmod::parse(&text.raw).is_ok();
        if !valid {
            self.error(
                Code::CopyChmod,
                format!("invalid mode `{}`", text.raw),
                text.at,
                "not a file mode",
                Some(
                    "write an octal mode such as chmod=\"0755\" or a symbolic one such as chmod=\"u+x,g-w\""
                        .into(),
                ),
            );
        }
        valid
    }

    /// `file "PATH" content="…" chown=… chmod=…`: a file the build file writes, as a copy of
    /// inline content (Docker's `COPY <<EOF PATH`).
    pub(super) fn lower_file(&mut self, node: &KdlNode, file: FileId) -> Option<Copy> {
        let props = self.node_properties(node, file, spec::get(spec::STEPS, "file"));
        let content = props.text("content");
        let chown = props.text("chown");
        let chmod = props.text("chmod");
        // Dockerfile heredoc parity (`graphbuild convert`): the delimiter names the file, and
        // an unquoted one has its `$VAR`s substituted.
        let heredoc = props.text("heredoc");
        let expand = props.bool("expand").unwrap_or(false);
        if !self.octal_mode(chmod.as_ref()) {
            return None;
        }
        let at = Self::loc(file, node.name().span());
        let dest = self.single_string_argument(
            node,
            file,
            at,
            (
                Code::CopyArguments,
                "the file's path",
                "`file` takes one path",
                "one path expected",
            ),
            "write `file \"/etc/motd\" content=\"hello\\n\"`",
        )?;
        let name = match &heredoc {
            Some(heredoc) => heredoc.raw.clone(),
            None => dest
                .raw
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or("")
                .to_string(),
        };
        if name.is_empty() || name.contains('/') || (heredoc.is_none() && dest.raw.ends_with('/')) {
            self.error(
                Code::CopyArguments,
                format!("`file \"{}\"` names a directory, not a file", dest.raw),
                dest.at,
                "a directory",
                Some(
                    "write the file's whole path: `file \"/etc/app/config.toml\" content=…`".into(),
                ),
            );
            return None;
        }
        let Some(content) = content else {
            self.error(
                Code::NodeMissingValue,
                "`file` needs its content",
                at,
                "content missing",
                Some("write `file \"/etc/motd\" content=\"hello\\n\"`".into()),
            );
            return None;
        };
        Some(Copy {
            sources: vec![Text {
                raw: name.clone(),
                at: dest.at,
            }],
            dest,
            from: None,
            chown,
            chmod,
            exclude: Vec::new(),
            inline: vec![InlineFile {
                name,
                content,
                substitute: expand,
            }],
            parents: false,
        })
    }

    pub(super) fn lower_healthcheck(
        &mut self,
        node: &KdlNode,
        file: FileId,
    ) -> Option<Healthcheck> {
        let props = self.node_properties(node, file, spec::get(spec::STEPS, "healthcheck"));
        let mut healthcheck = Healthcheck {
            test: None,
            interval: props.text("interval"),
            timeout: props.text("timeout"),
            start_period: props.text("start-period"),
            retries: props.count("retries"),
        };
        let none = props.bool("none").unwrap_or(false);
        if none {
            self.check_no_arguments(node, file, "healthcheck none=#true");
            return Some(healthcheck);
        }
        healthcheck.test = Some(self.run_command(node, file, "healthcheck")?);
        Some(healthcheck)
    }

    // ----------------------------------------------------------------------------------------
    // Templates
}
