//! What KDL borrows from Dockerfiles: a stage's `rules="dockerfile"` (Dockerfile variable
//! rules for one stage, what `graphbuild convert` writes).

use kdl::KdlNode;

use crate::Code;
use crate::ir::FileId;

use super::*;

impl Loader {
    /// `stage NAME rules="dockerfile"|"kdl"`: whether the stage follows Dockerfile variable
    /// rules ([`crate::ir::Project::docker_rules`]); any other property is reported.
    pub(super) fn stage_rules(&mut self, node: &KdlNode, file: FileId) -> bool {
        let mut docker_rules = false;
        for (key, entry) in properties(node) {
            if key != "rules" {
                self.unknown_property(key, entry, file, "stage", &["rules"]);
                continue;
            }
            let Some(text) = self.string(entry, file, "`rules`") else {
                continue;
            };
            match text.raw.as_str() {
                "dockerfile" => docker_rules = true,
                "kdl" => docker_rules = false,
                other => self.error(
                    Code::StageRules,
                    format!("unknown rules `{other}`"),
                    text.at,
                    "not a set of rules",
                    Some(
                        "rules=\"dockerfile\" scopes args as a Dockerfile does; \"kdl\" is the default"
                            .into(),
                    ),
                ),
            }
        }
        docker_rules
    }
}
