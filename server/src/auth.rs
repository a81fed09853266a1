//! Bearer-token authentication and per-instance authorization.
//!
//! # Tokens file
//!
//! One token per line: `TOKEN ACCESS [INSTANCE]`, fields separated by spaces or tabs.
//!
//! ```text
//! # CI runners push, developers read
//! 3f9c…e1  rw  team-a      # read-write, only under /team-a/…
//! 8b20…77  ro              # read-only, any instance
//! ```
//!
//! - `TOKEN`: any run of visible ASCII without spaces (generate one with
//!   `openssl rand -hex 32`).
//! - `ACCESS`: `ro` (GET and HEAD) or `rw` (also PUT).
//! - `INSTANCE` (optional): the token only works for URLs under `/<INSTANCE>/…`; without it
//!   the token works for every instance and for URLs without one.
//! - `#` starts a comment (whole line or after the fields); blank lines are ignored.
//!
//! # Decisions
//!
//! Without a tokens file every request is allowed. With one, a request needs
//! `Authorization: Bearer TOKEN`: no token or an unknown token gets 401 with
//! `WWW-Authenticate: Bearer`, a read-only token writing or a token limited to another
//! instance gets 403. `--allow-anonymous-read` lets every GET and HEAD through, whatever
//! token it carries. `/healthz` and `/metrics` never need a token.
//!
//! Tokens are compared in constant time and never appear in an error message or log line.

use std::path::Path;

use crate::ServerError;
use crate::store::is_valid_instance;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

struct TokenEntry {
    token: Vec<u8>,
    access: Access,
    instance: Option<String>,
}

/// The parsed tokens file.
pub struct Tokens {
    entries: Vec<TokenEntry>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} entries)", self.entries.len())
    }
}

/// What a request wants to do.
pub(crate) struct Operation<'a> {
    pub(crate) write: bool,
    pub(crate) instance: Option<&'a str>,
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Denied {
    /// No token, a malformed header, or an unknown token: 401.
    Unauthenticated,
    /// A known token without the right scope: 403, with the reason.
    Forbidden(&'static str),
}

impl Tokens {
    /// Read and parse a tokens file.
    pub fn load(path: &Path) -> Result<Tokens, ServerError> {
        let text = std::fs::read_to_string(path).map_err(|source| ServerError::TokensRead {
            path: path.to_path_buf(),
            source,
        })?;
        Tokens::parse(&text).map_err(|(line, message)| ServerError::TokensSyntax {
            path: path.to_path_buf(),
            line,
            message,
        })
    }

    /// Parse the tokens file format; errors are `(line number, message)` and never quote a
    /// token.
    pub fn parse(text: &str) -> Result<Tokens, (usize, String)> {
        let mut entries: Vec<(usize, TokenEntry)> = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let number = number + 1;
            let content = line.split('#').next().unwrap_or("");
            let fields: Vec<&str> = content.split_whitespace().collect();
            let (token, access, instance) = match fields.as_slice() {
                [] => continue,
                [token, access] => (*token, *access, None),
                [token, access, instance] => (*token, *access, Some(*instance)),
                [_] => {
                    return Err((
                        number,
                        "missing the access field: expected `TOKEN ro|rw [INSTANCE]`".into(),
                    ));
                }
                _ => {
                    return Err((
                        number,
                        "too many fields: expected `TOKEN ro|rw [INSTANCE]`".into(),
                    ));
                }
            };
            let access = match access {
                "ro" => Access::ReadOnly,
                "rw" => Access::ReadWrite,
                other => {
                    return Err((
                        number,
                        format!("access must be `ro` or `rw`, found `{other}`"),
                    ));
                }
            };
            if let Some(instance) = instance
                && !is_valid_instance(instance)
            {
                return Err((
                    number,
                    format!(
                        "invalid instance name `{instance}`: use letters, digits, `.`, `_`, `-`, starting with a letter or digit"
                    ),
                ));
            }
            if token.bytes().any(|b| !b.is_ascii_graphic()) {
                return Err((number, "the token must be visible ASCII characters".into()));
            }
            if let Some((first, _)) = entries
                .iter()
                .find(|(_, entry)| entry.token == token.as_bytes())
            {
                return Err((
                    number,
                    format!("this token is already defined on line {first}"),
                ));
            }
            entries.push((
                number,
                TokenEntry {
                    token: token.as_bytes().to_vec(),
                    access,
                    instance: instance.map(str::to_string),
                },
            ));
        }
        Ok(Tokens {
            entries: entries.into_iter().map(|(_, entry)| entry).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Decide on a request given its `Authorization` header value.
    pub(crate) fn check(
        &self,
        authorization: Option<&[u8]>,
        operation: &Operation<'_>,
        allow_anonymous_read: bool,
    ) -> Result<(), Denied> {
        if allow_anonymous_read && !operation.write {
            return Ok(());
        }
        let token = authorization
            .and_then(bearer_token)
            .ok_or(Denied::Unauthenticated)?;
        // Compare against every entry so timing reveals nothing about which prefix matched.
        let mut found: Option<&TokenEntry> = None;
        for entry in &self.entries {
            if constant_time_eq(&entry.token, token) {
                found = Some(entry);
            }
        }
        let entry = found.ok_or(Denied::Unauthenticated)?;
        if operation.write && entry.access == Access::ReadOnly {
            return Err(Denied::Forbidden("this token is read-only"));
        }
        if let Some(limited_to) = &entry.instance
            && operation.instance != Some(limited_to.as_str())
        {
            return Err(Denied::Forbidden(
                "this token is limited to another instance",
            ));
        }
        Ok(())
    }
}

/// The token of `Bearer TOKEN` (scheme case-insensitive).
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    let header = header.trim_ascii();
    let (scheme, rest) = header.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer")
        || !rest.first().is_some_and(|b| *b == b' ' || *b == b'\t')
    {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    if left.len() != right.len() {
        return false;
    }
    left.iter()
        .zip(right)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str =
        "# comment\n\nadmin-token rw\nreader ro   # trailing comment\nteam-a-writer rw team-a\n";

    fn check(
        tokens: &Tokens,
        header: Option<&str>,
        write: bool,
        instance: Option<&str>,
        anonymous: bool,
    ) -> Result<(), Denied> {
        tokens.check(
            header.map(str::as_bytes),
            &Operation { write, instance },
            anonymous,
        )
    }

    #[test]
    fn decisions_follow_access_and_instance() {
        let tokens = Tokens::parse(FILE).unwrap();
        assert_eq!(tokens.len(), 3);
        assert_eq!(
            check(&tokens, None, false, None, false),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            check(&tokens, Some("Bearer nope"), false, None, false),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            check(&tokens, Some("Basic admin-token"), false, None, false),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            check(&tokens, Some("bearer admin-token"), true, Some("x"), false),
            Ok(())
        );
        assert_eq!(
            check(&tokens, Some("Bearer reader"), false, Some("x"), false),
            Ok(())
        );
        assert!(matches!(
            check(&tokens, Some("Bearer reader"), true, None, false),
            Err(Denied::Forbidden(_))
        ));
        assert_eq!(
            check(
                &tokens,
                Some("Bearer team-a-writer"),
                true,
                Some("team-a"),
                false
            ),
            Ok(())
        );
        assert!(matches!(
            check(
                &tokens,
                Some("Bearer team-a-writer"),
                true,
                Some("team-b"),
                false
            ),
            Err(Denied::Forbidden(_))
        ));
        assert!(matches!(
            check(&tokens, Some("Bearer team-a-writer"), false, None, false),
            Err(Denied::Forbidden(_))
        ));
        assert_eq!(check(&tokens, None, false, Some("team-b"), true), Ok(()));
        assert_eq!(
            check(&tokens, None, true, None, true),
            Err(Denied::Unauthenticated)
        );
    }

    #[test]
    fn syntax_errors_name_the_line_but_not_the_token() {
        let error = Tokens::parse("ok rw\nsecret-value rx\n").unwrap_err();
        assert_eq!(error.0, 2);
        assert!(!error.1.contains("secret-value"), "{}", error.1);
        assert_eq!(Tokens::parse("secret-value\n").unwrap_err().0, 1);
        let duplicate = Tokens::parse("secret-value rw\nsecret-value ro\n").unwrap_err();
        assert_eq!(
            duplicate,
            (2, "this token is already defined on line 1".to_string())
        );
        assert!(Tokens::parse("t rw ../x\n").is_err());
    }
}
