//! `RUN --mount=type=bind`'s `from=` (a stage or an image) and `rw`, as BuildKit reads them.

use crate::Code;
use crate::ir::CopyFrom;

use super::{Lowerer, lex};

impl Lowerer {
    /// The `from=` and whether the mount is writable (`rw`, `readwrite`; `ro`/`readonly` is
    /// the default). `None` after reporting a bad value.
    pub(super) fn bind_from(
        &mut self,
        fields: &[(String, String)],
        span: (usize, usize),
    ) -> Option<(Option<CopyFrom>, bool)> {
        let mut readwrite = false;
        let mut from = None;
        for (key, value) in fields {
            let flag = match value.as_str() {
                "true" => true,
                "false" => false,
                _ if key == "from" => {
                    from = Some(value.clone());
                    continue;
                }
                _ if !matches!(key.as_str(), "rw" | "readwrite" | "ro" | "readonly") => continue,
                other => {
                    self.error(
                        Code::RunBind,
                        format!("`{key}={other}` is not true or false"),
                        span,
                        "this mount",
                        "write rw (or rw=true) for a writable mount; read-only is the default",
                    );
                    return None;
                }
            };
            match key.as_str() {
                "rw" | "readwrite" => readwrite = flag,
                "ro" | "readonly" => readwrite = !flag,
                "from" => from = Some(value.clone()),
                _ => {}
            }
        }
        let from = match from {
            None => None,
            Some(name) if name.is_empty() || name == "scratch" => {
                self.error(
                    Code::RunBind,
                    format!("cannot bind from `{name}`"),
                    span,
                    "this mount",
                    "name a stage or an image: --mount=type=bind,from=build,source=/out,target=/out",
                );
                return None;
            }
            Some(name) => {
                // A stage by name, or by its index even when it is named, as BuildKit.
                let lower = name.to_ascii_lowercase();
                let stage = self
                    .stages
                    .iter()
                    .find(|(stage, _)| stage.name == lower)
                    .or_else(|| self.stages.get(name.parse::<usize>().ok()?));
                Some(match stage {
                    Some((stage, _)) => CopyFrom::Stage(stage.name.clone(), self.loc(span)),
                    None => CopyFrom::Image(self.text(lex::literal_raw(&name), span)),
                })
            }
        };
        Some((from, readwrite))
    }
}
