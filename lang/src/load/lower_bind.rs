//! `bind` in a `run`: part of the build context, or of a stage's or image's filesystem, on a
//! path while the step runs (Docker's `RUN --mount=type=bind[,from=…]`).

use kdl::KdlNode;

use crate::ir::{BindMount, FileId, Text};

use super::*;

impl Loader {
    /// `bind "PATH" source="…" from="STAGE|IMAGE" rw=#true`.
    pub(super) fn lower_bind(
        &mut self,
        child: &KdlNode,
        file: FileId,
        resolver: &Resolver<'_>,
    ) -> Option<BindMount> {
        let props = self.node_properties(child, file, spec::get(spec::RUN, "bind"));
        let at = Self::loc(file, child.name().span());
        let failed = props.failed;
        let source = props.text("source");
        let from = props.text("from");
        let readwrite = props.bool("rw").unwrap_or(false);
        let target = self.single_string_argument(
            child,
            file,
            at,
            (
                Code::RunBind,
                "a bind mount path",
                "`bind` takes one path",
                "one path expected",
            ),
            "write `bind \"/src\" source=\".\"` or `bind \"/out\" from=\"build\" source=\"/out\"`",
        )?;
        let from = match from {
            None => None,
            Some(text) => Some(self.source_filesystem(text, resolver, (Code::RunBind, "bind"))?),
        };
        if failed {
            return None;
        }
        // The whole filesystem of a stage, the whole context otherwise, as Docker's defaults.
        let default_source = if from.is_some() { "/" } else { "." };
        Some(BindMount {
            source: source.unwrap_or_else(|| Text {
                raw: default_source.into(),
                at,
            }),
            target,
            from,
            readwrite,
            at,
        })
    }
}
