//! `add SOURCE… DEST [checksum=…] [keep-git-dir=#true] [chown=…] [chmod=…]`: Docker's `ADD`
//! in KDL. What each source is (a URL, a git repository, a local archive or a plain file) is
//! decided once substituted, by the planner; see [`crate::ir::Add`].

use kdl::KdlNode;

use crate::Code;
use crate::ir::{Add, Copy, FileId};

use super::*;

impl Loader {
    pub(super) fn lower_add(&mut self, node: &KdlNode, file: FileId) -> Option<Add> {
        self.check_no_children(node, file, "add");
        let mut checksum = None;
        let mut keep_git_dir = false;
        let mut chown = None;
        let mut chmod = None;
        let mut failed = false;
        for (key, entry) in properties(node) {
            match key {
                "checksum" => match self.string(entry, file, "`checksum`") {
                    Some(text) => checksum = Some(text),
                    None => failed = true,
                },
                "keep-git-dir" => match self.boolean(entry, file, "`keep-git-dir`") {
                    Some(value) => keep_git_dir = value,
                    None => failed = true,
                },
                "chown" => chown = self.string_or_integer(entry, file, "`chown`"),
                "chmod" => {
                    chmod = self.string(entry, file, "`chmod`");
                    if chmod.is_none() || !self.octal_mode(chmod.as_ref()) {
                        failed = true;
                    }
                }
                other => self.unknown_property(
                    other,
                    entry,
                    file,
                    "add",
                    &["checksum", "keep-git-dir", "chown", "chmod"],
                ),
            }
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
            },
            checksum,
            keep_git_dir,
        })
    }
}
