//! Limits that keep a crafted build file from exhausting the stack or memory. Every limit is
//! far above what a real build file needs, is checked before the work it bounds, and is
//! reported as an ordinary diagnostic (exit code 2) pointing at the file and line that
//! crosses it. They are documented in docs/language.md ("Limits").

/// Largest build file or imported file, in bytes.
pub const MAX_FILE_BYTES: usize = 1 << 20;

/// Stack for parsing a file of `length` bytes. kdl-rs's parser restarts itself recursively
/// after every place it gives up (a stray `}`, a bad token), up to once per byte of input, at
/// about 700 bytes of stack each in measurements; so the parse runs on its own thread with
/// 1 KiB of stack per input byte on top of a fixed 16 MiB. [`MAX_FILE_BYTES`] bounds it.
pub fn parser_stack_size(length: usize) -> usize {
    (16 << 20) + length.min(MAX_FILE_BYTES) * 1024
}

/// Deepest `{ … }` nesting of a build file, and deepest nesting of `/* … */` comments.
/// The KDL parser recurses once per level, so this is checked on the raw text first.
pub const MAX_NESTING: usize = 64;

/// Longest chain of imports (a file importing a file importing a file …).
pub const MAX_IMPORT_DEPTH: usize = 32;

/// Most stages in a project, counting every template instance.
pub const MAX_STAGES: usize = 10_000;

/// Most images a project expands to, counting every matrix combination.
pub const MAX_IMAGES: usize = 10_000;

/// Most combinations one image's `matrix` may have: the product of its axes' lengths.
pub const MAX_MATRIX_COMBINATIONS: u128 = 256;

/// Deepest `${A:-${B:-…}}` nesting in one string.
pub const MAX_SUBSTITUTION_NESTING: usize = 32;

/// Longest `/* … */` comment, in parser steps (each `*` and `/` in it, and each run of other
/// characters, is one step of the KDL parser's recursion).
pub const MAX_COMMENT_STEPS: usize = 4_096;

/// Why [`check_nesting`] rejected a text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TooDeep {
    /// A `{` opened more than [`MAX_NESTING`] levels deep, at this byte offset.
    Braces(usize),
    /// A `/*` opened more than [`MAX_NESTING`] comments deep, at this byte offset.
    Comments(usize),
    /// The comment that starts at this byte offset is longer than [`MAX_COMMENT_STEPS`].
    LongComment(usize),
    /// More than [`MAX_NESTING`] `/-` in a row (the parser nests once per `/-`); the offset of
    /// the one too many.
    Slashdashes(usize),
}

/// KDL v2 newlines (CR, LF, NEL, VT, FF, LS, PS; CRLF is a CR then an LF).
fn is_newline(character: char) -> bool {
    matches!(
        character,
        '\n' | '\r' | '\u{85}' | '\u{0B}' | '\u{0C}' | '\u{2028}' | '\u{2029}'
    )
}

/// Scans raw KDL text for nesting the parser could not survive, without parsing it: `{`/`}`
/// are counted outside strings and comments, and block comments are measured. The lexing
/// follows KDL v2 (quoted, multi-line and raw strings, line and nested block comments) closely
/// enough to count; on text that is not valid KDL it may count wrongly, which only decides
/// between a depth error and the parser's own syntax error. Linear time, no allocation.
pub fn check_nesting(text: &str) -> Result<(), TooDeep> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    // `/-` seen in a row, with only whitespace and comments between them.
    let mut slashdashes = 0usize;
    let mut at = 0usize;
    while at < bytes.len() {
        match bytes[at] {
            b'/' if bytes.get(at + 1) == Some(&b'-') => {
                slashdashes += 1;
                if slashdashes > MAX_NESTING {
                    return Err(TooDeep::Slashdashes(at));
                }
                at += 2;
                continue;
            }
            b' ' | b'\t' | b'\n' | b'\r' | b'\\' => {
                at += 1;
                continue;
            }
            _ => {}
        }
        if !(bytes[at] == b'/' && matches!(bytes.get(at + 1), Some(b'/' | b'*'))) {
            slashdashes = 0;
        }
        match bytes[at] {
            b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(TooDeep::Braces(at));
                }
                at += 1;
            }
            b'}' => {
                depth = depth.saturating_sub(1);
                at += 1;
            }
            b'"' => at = skip_quoted(bytes, at),
            b'#' => at = skip_raw(bytes, at),
            b'/' if bytes.get(at + 1) == Some(&b'/') => {
                // A line comment, up to the next newline.
                let rest = &text[at..];
                at += rest
                    .char_indices()
                    .find(|(_, character)| is_newline(*character))
                    .map_or(rest.len(), |(offset, _)| offset);
            }
            b'/' if bytes.get(at + 1) == Some(&b'*') => at = skip_block_comment(bytes, at)?,
            _ => at += 1,
        }
    }
    Ok(())
}

/// At a `"`: returns the offset after the quoted (or `"""` multi-line) string.
fn skip_quoted(bytes: &[u8], start: usize) -> usize {
    let multi_line = bytes[start..].starts_with(b"\"\"\"");
    let mut at = start + if multi_line { 3 } else { 1 };
    while at < bytes.len() {
        match bytes[at] {
            b'\\' => at += 2,
            b'"' if !multi_line => return at + 1,
            b'"' if bytes[at..].starts_with(b"\"\"\"") => return at + 3,
            _ => at += 1,
        }
    }
    bytes.len()
}

/// At a `#`: returns the offset after a raw string (`#"…"#`, `##"""…"""##`), or after the
/// `#`s when they start a keyword (`#true`) instead.
fn skip_raw(bytes: &[u8], start: usize) -> usize {
    let hashes = bytes[start..].iter().take_while(|&&b| b == b'#').count();
    let open = start + hashes;
    if bytes.get(open) != Some(&b'"') {
        return open;
    }
    let quotes = if bytes[open..].starts_with(b"\"\"\"") {
        3
    } else {
        1
    };
    let mut at = open + quotes;
    while at < bytes.len() {
        if bytes[at..].starts_with(&b"\"\"\""[..quotes])
            && bytes[at + quotes..]
                .iter()
                .take_while(|&&b| b == b'#')
                .count()
                >= hashes
        {
            return at + quotes + hashes;
        }
        at += 1;
    }
    bytes.len()
}

/// At a `/*`: returns the offset after the (nested) block comment.
fn skip_block_comment(bytes: &[u8], start: usize) -> Result<usize, TooDeep> {
    let mut depth = 0usize;
    let mut steps = 0usize;
    let mut in_run = false;
    let mut at = start;
    while at < bytes.len() {
        if bytes[at..].starts_with(b"/*") {
            depth += 1;
            if depth > MAX_NESTING {
                return Err(TooDeep::Comments(at));
            }
            at += 2;
            in_run = false;
        } else if bytes[at..].starts_with(b"*/") {
            depth -= 1;
            at += 2;
            in_run = false;
            if depth == 0 {
                return Ok(at);
            }
        } else if bytes[at] == b'*' || bytes[at] == b'/' {
            steps += 1;
            at += 1;
            in_run = false;
        } else {
            if !in_run {
                steps += 1;
                in_run = true;
            }
            at += 1;
        }
        if steps > MAX_COMMENT_STEPS {
            return Err(TooDeep::LongComment(start));
        }
    }
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        format!("{}{}", "a {".repeat(depth), "}".repeat(depth))
    }

    #[test]
    fn real_nesting_passes_and_deep_nesting_is_caught_where_it_crosses() {
        assert_eq!(check_nesting(&nested(MAX_NESTING)), Ok(()));
        let deep = nested(2_000);
        assert_eq!(
            check_nesting(&deep),
            Err(TooDeep::Braces(3 * MAX_NESTING + 2))
        );
    }

    #[test]
    fn braces_in_strings_and_comments_do_not_count() {
        let many = "{".repeat(500);
        for text in [
            format!("a \"{many}\"\n"),
            format!("a \"\\\"{many}\"\n"),
            format!("a \"\"\"\n{many}\n\"\"\"\n"),
            format!("a #\"{many}\"#\n"),
            format!("a ##\"\"\"\n\"#{many}\n\"\"\"##\n"),
            format!("// {many}\na 1\n"),
            format!("/* {many} /* {many} */ */ a 1\n"),
            format!("a #true {{ b #false; }}\n/* {many} */"),
        ] {
            assert_eq!(check_nesting(&text), Ok(()), "{text}");
        }
    }

    #[test]
    fn deeply_nested_and_very_long_comments_are_caught() {
        let deep = format!("{}{}", "/*".repeat(100), "*/".repeat(100));
        assert!(matches!(check_nesting(&deep), Err(TooDeep::Comments(_))));
        let long = format!("/*{}*/", "*a".repeat(MAX_COMMENT_STEPS));
        assert_eq!(check_nesting(&long), Err(TooDeep::LongComment(0)));
        let banner = format!("/*{}*/\na 1", "*".repeat(200));
        assert_eq!(check_nesting(&banner), Ok(()));
    }

    #[test]
    fn long_slashdash_chains_are_caught() {
        let chain = |count: usize| format!("{}a 1 /-2 /-{{ }}\n", "/- ".repeat(count));
        assert_eq!(check_nesting(&chain(MAX_NESTING)), Ok(()));
        assert_eq!(
            check_nesting(&chain(100_000)),
            Err(TooDeep::Slashdashes(3 * MAX_NESTING))
        );
        let apart = "/- a 1\n".repeat(1_000);
        assert_eq!(check_nesting(&apart), Ok(()));
        let commented = "/- /* x */ // y\n".repeat(MAX_NESTING + 1);
        assert!(matches!(
            check_nesting(&commented),
            Err(TooDeep::Slashdashes(_))
        ));
    }
}
