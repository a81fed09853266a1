//! `add SOURCE… DEST [checksum=…] [keep-git-dir=#true] [chown=…] [chmod=…]`: Docker's `ADD`
//! in KDL. What each source is (a URL, a git repository, a local archive or a plain file) is
//! decided once substituted, by the planner; see [`crate::ir::Add`].

use kdl::KdlNode;

use crate::Code;
use crate::ir::{Add, Copy, FileId};

use super::*;

impl Loader {
    pub(super) fn lower_add(&mut self, node: &KdlNode, file: FileId) -> Option<Add> {
        let props = self.node_properties(node, file, spec::get(spec::STEPS, "add"));
        let mut failed = props.failed;
        let checksum = props.text("checksum");
        let keep_git_dir = props.bool("keep-git-dir").unwrap_or(false);
        let chown = props.text("chown");
        let chmod = props.text("chmod");
        if !self.octal_mode(chmod.as_ref()) {
            failed = true;
        }
        let mut paths = self.string_arguments(node, file, "an add source or destination", false);
        if positional(node).len() < 2 {
            self.error(
                Code::CopyArguments,
                "`add` needs at least a source and a destination",
                Self::loc(file, node.name().span()),
                "source and destination expected",
                Some(
                    "write `add \"https://example.com/tool.tar.gz\" \"/opt/\" checksum=\"sha256:…\"`"
                        .into(),
                ),
            );
            return None;
        }
        let dest = paths.pop()?;
        if failed || paths.is_empty() {
            return None;
        }
        Some(Add {
            copy: Copy {
                sources: paths,
                dest,
                from: None,
                chown,
                chmod,
                exclude: Vec::new(),
                inline: Vec::new(),
                parents: false,
            },
            checksum,
            keep_git_dir,
        })
    }
}
