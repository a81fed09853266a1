//! `.dockerignore`, with Docker's semantics exactly (moby/patternmatcher and its
//! `ignorefile.ReadAll`).
//!
//! # Reading the file
//!
//! One pattern per line. A line whose first character is `#` is a comment (a `#` after
//! leading spaces is not: Docker checks before trimming). Lines are trimmed; empty lines are
//! skipped. A leading `!` makes the pattern an *exception* (it re-includes what it matches);
//! the rest is trimmed again. The pattern is then cleaned like Go's `filepath.Clean`
//! (`a//b/./c/` → `a/b/c`, `a/../b` → `b`) and a leading `/` is dropped: patterns are relative
//! to the context root either way.
//!
//! # Matching
//!
//! Docker compiles each pattern to a regular expression anchored at both ends:
//! `*` is any run of characters except `/`, `?` is one character except `/`, `[a-z]` and
//! `[^a-z]` are character classes (a negated class also matches `/`, as the regex does), `\x`
//! is a literal `x`, `**` followed by `/` or in the middle is any number of directories
//! (`(.*/)?`), and a trailing `**` is anything (`.*`). A pattern is validated with Go's
//! `filepath.Match` rules first, so `[`, `[]` or a trailing `\` are errors.
//!
//! A path is excluded when the *last* pattern that matches it, or one of its parent
//! directories, is not an exception (`MatchesOrParentMatches`): a pattern that matches a
//! directory excludes everything below it, and `!` patterns re-include with last-match-wins.
//!
//! # Pruning walks
//!
//! A walk can skip an excluded directory entirely unless an exception could re-include
//! something below it; [`DockerIgnore::may_reinclude_under`] answers that conservatively.

use std::fmt;

/// A malformed pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, miette::Diagnostic)]
#[error("invalid .dockerignore pattern `{pattern}` on line {line}: {reason}")]
#[diagnostic(
    code(graphbuild::dockerignore::pattern),
    help(
        "patterns use Go's filepath.Match syntax: `*`, `?`, `[a-z]`, `[^a-z]`, `\\` to escape, and `**` for any directories"
    )
)]
pub(crate) struct DockerIgnoreError {
    pub line: usize,
    pub pattern: String,
    pub reason: String,
}

/// A malformed glob (without the line information of a `.dockerignore`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct PatternError(pub String);

/// A parsed `.dockerignore`.
#[derive(Debug, Clone, Default)]
pub(crate) struct DockerIgnore {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
struct Pattern {
    /// The cleaned pattern, without its `!`.
    text: String,
    /// A `!` pattern: re-includes what it matches.
    exception: bool,
    glob: Glob,
}

impl DockerIgnore {
    /// Parse the contents of a `.dockerignore` file.
    pub(crate) fn parse(text: &str) -> Result<DockerIgnore, DockerIgnoreError> {
        let mut patterns = Vec::new();
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            if raw.starts_with('#') {
                continue;
            }
            let mut pattern = raw.trim();
            if pattern.is_empty() {
                continue;
            }
            let exception = pattern.starts_with('!');
            if exception {
                pattern = pattern[1..].trim();
                if pattern.is_empty() {
                    return Err(DockerIgnoreError {
                        line,
                        pattern: raw.trim().to_string(),
                        reason: "an exception `!` needs a pattern after it".into(),
                    });
                }
            }
            let mut cleaned = go_clean(pattern);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            let glob = Glob::new_dockerignore(&cleaned).map_err(|error| DockerIgnoreError {
                line,
                pattern: raw.trim().to_string(),
                reason: error.0,
            })?;
            patterns.push(Pattern {
                text: cleaned,
                exception,
                glob,
            });
        }
        Ok(DockerIgnore { patterns })
    }

    /// Whether `rel_path` (relative to the context root, `/`-separated) is excluded from the
    /// context. Docker's patterns do not distinguish directories from files (`filepath.Clean`
    /// removes a trailing `/`), so `is_dir` does not change the answer; it is taken so callers
    /// need not care.
    pub(crate) fn is_excluded(&self, rel_path: &str, is_dir: bool) -> bool {
        let _ = is_dir;
        if self.patterns.is_empty() {
            // No .dockerignore: nothing to clean or match (asked once per context entry).
            return false;
        }
        let path = go_clean(rel_path);
        let path = path.trim_start_matches('/');
        let parents: Vec<&str> = match path.rfind('/') {
            Some(slash) => path[..slash].split('/').collect(),
            None => Vec::new(),
        };
        let mut excluded = false;
        for pattern in &self.patterns {
            // An exclusion cannot change an excluded path, an exception an included one.
            if pattern.exception != excluded {
                continue;
            }
            let mut matched = pattern.glob.matches(path);
            if !matched {
                for depth in 1..=parents.len() {
                    if pattern.glob.matches(&parents[..depth].join("/")) {
                        matched = true;
                        break;
                    }
                }
            }
            if matched {
                excluded = !pattern.exception;
            }
        }
        excluded
    }

    /// Could an exception (`!` pattern) re-include something strictly below the directory
    /// `rel_dir`? `false` means a walk may skip an excluded `rel_dir` without looking inside.
    /// Conservative: `true` whenever unsure.
    pub(crate) fn may_reinclude_under(&self, rel_dir: &str) -> bool {
        let dir = go_clean(rel_dir);
        let dir_components: Vec<&str> = dir
            .trim_start_matches('/')
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        self.patterns
            .iter()
            .filter(|pattern| pattern.exception)
            .any(|pattern| {
                for (pattern_component, dir_component) in
                    pattern.text.split('/').zip(&dir_components)
                {
                    if pattern_component.contains("**") {
                        return true;
                    }
                    match Glob::new_component(pattern_component) {
                        Ok(glob) if glob.matches(dir_component) => {}
                        _ => return false,
                    }
                }
                true
            })
    }
}

/// A compiled glob.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Glob {
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Char(char),
    /// `?`: one character but `/`.
    AnyChar,
    /// `*`: any run of characters without `/`.
    Star,
    /// `**` before more pattern: empty, or anything ending with `/`.
    AnyDirs,
    /// `**` at the end: anything.
    AnyAll,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.tokens)
    }
}

impl Glob {
    /// A `.dockerignore` pattern: `**` spans directories.
    pub(crate) fn new_dockerignore(pattern: &str) -> Result<Glob, PatternError> {
        Self::compile(pattern, true)
    }

    /// A Go `filepath.Match` pattern for one path component: `**` is just `*` twice.
    pub(crate) fn new_component(pattern: &str) -> Result<Glob, PatternError> {
        Self::compile(pattern, false)
    }

    fn compile(pattern: &str, double_star: bool) -> Result<Glob, PatternError> {
        let chars: Vec<char> = pattern.chars().collect();
        let mut tokens = Vec::new();
        let mut index = 0;
        while index < chars.len() {
            let char = chars[index];
            index += 1;
            match char {
                '*' if double_star && chars.get(index) == Some(&'*') => {
                    index += 1;
                    if chars.get(index) == Some(&'/') {
                        index += 1;
                    }
                    tokens.push(if index == chars.len() {
                        Token::AnyAll
                    } else {
                        Token::AnyDirs
                    });
                }
                '*' => tokens.push(Token::Star),
                '?' => tokens.push(Token::AnyChar),
                '\\' => match chars.get(index) {
                    Some(escaped) => {
                        tokens.push(Token::Char(*escaped));
                        index += 1;
                    }
                    None => return Err(PatternError("a trailing `\\` escapes nothing".into())),
                },
                '[' => {
                    let (token, next) = parse_class(&chars, index)?;
                    tokens.push(token);
                    index = next;
                }
                other => tokens.push(Token::Char(other)),
            }
        }
        Ok(Glob { tokens })
    }

    /// Whether the whole of `text` matches.
    pub(crate) fn matches(&self, text: &str) -> bool {
        let chars: Vec<char> = text.chars().collect();
        let tokens = &self.tokens;
        // reachable[i]: the tokens so far can consume exactly chars[..i].
        let mut reachable = vec![false; chars.len() + 1];
        reachable[0] = true;
        for token in tokens {
            let mut next = vec![false; chars.len() + 1];
            for start in 0..=chars.len() {
                if !reachable[start] {
                    continue;
                }
                match token {
                    Token::Char(expected) => {
                        if chars.get(start) == Some(expected) {
                            next[start + 1] = true;
                        }
                    }
                    Token::AnyChar => {
                        if chars.get(start).is_some_and(|c| *c != '/') {
                            next[start + 1] = true;
                        }
                    }
                    Token::Class { negated, ranges } => {
                        if let Some(c) = chars.get(start) {
                            let inside = ranges.iter().any(|(low, high)| low <= c && c <= high);
                            if inside != *negated {
                                next[start + 1] = true;
                            }
                        }
                    }
                    Token::Star => {
                        next[start] = true;
                        for end in start..chars.len() {
                            if chars[end] == '/' {
                                break;
                            }
                            next[end + 1] = true;
                        }
                    }
                    Token::AnyDirs => {
                        next[start] = true;
                        for end in start..chars.len() {
                            if chars[end] == '/' {
                                next[end + 1] = true;
                            }
                        }
                    }
                    Token::AnyAll => {
                        for slot in next.iter_mut().skip(start) {
                            *slot = true;
                        }
                        break;
                    }
                }
            }
            reachable = next;
        }
        reachable[chars.len()]
    }
}

/// Parse a class after its `[`, with Go `filepath.Match` validation; returns the token and
/// the index after `]`.
fn parse_class(chars: &[char], mut index: usize) -> Result<(Token, usize), PatternError> {
    let unclosed = || PatternError("a `[` character class is not closed with `]`".into());
    let mut negated = false;
    if chars.get(index) == Some(&'^') {
        negated = true;
        index += 1;
    }
    let mut ranges = Vec::new();
    loop {
        match chars.get(index) {
            None => return Err(unclosed()),
            Some(']') if !ranges.is_empty() => {
                return Ok((Token::Class { negated, ranges }, index + 1));
            }
            _ => {}
        }
        let (low, next) = class_char(chars, index)?;
        index = next;
        let mut high = low;
        if chars.get(index) == Some(&'-') {
            let (end, next) = class_char(chars, index + 1)?;
            high = end;
            index = next;
        }
        if high < low {
            return Err(PatternError(format!(
                "the range `{low}-{high}` is backwards"
            )));
        }
        ranges.push((low, high));
    }
}

fn class_char(chars: &[char], index: usize) -> Result<(char, usize), PatternError> {
    match chars.get(index) {
        None => Err(PatternError(
            "a `[` character class is not closed with `]`".into(),
        )),
        Some('-') | Some(']') => Err(PatternError(
            "a character class is empty or has a misplaced `-` or `]`".into(),
        )),
        Some('\\') => chars
            .get(index + 1)
            .map(|escaped| (*escaped, index + 2))
            .ok_or_else(|| PatternError("a trailing `\\` escapes nothing".into())),
        Some(other) => Ok((*other, index + 1)),
    }
}

/// Go's `path.Clean` on `/`-separated paths.
pub(crate) fn go_clean(path: &str) -> String {
    if path.is_empty() {
        return ".".into();
    }
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn excluded(ignore: &str, path: &str) -> bool {
        DockerIgnore::parse(ignore)
            .unwrap()
            .is_excluded(path, false)
    }

    #[test]
    fn docker_documented_examples() {
        // From the Dockerfile reference, ".dockerignore file".
        let ignore = "# comment\n*/temp*\n*/*/temp*\ntemp?\n";
        let table = [
            ("somedir/temporary.txt", true),
            ("somedir/temp", true),
            ("somedir/temp/file", true),
            ("somedir/subdir/temporary.txt", true),
            ("temp1", true),
            ("temp12", false),
            ("tempa/file", true),
            ("temporary.txt", false),
            ("a/b/c/temp", false),
            ("# comment", false),
        ];
        for (path, expected) in table {
            assert_eq!(excluded(ignore, path), expected, "{path}");
        }
    }

    #[test]
    fn exceptions_and_last_match_wins() {
        // Docker docs: all markdown files excluded except README.md.
        let ignore = "*.md\n!README.md\n";
        assert!(excluded(ignore, "CHANGELOG.md"));
        assert!(!excluded(ignore, "README.md"));
        // Docs: README-secret.md excluded again by a later pattern.
        let ignore = "*.md\n!README*.md\nREADME-secret.md\n";
        assert!(excluded(ignore, "README-secret.md"));
        assert!(!excluded(ignore, "README-public.md"));
        // Docs: the order matters, here everything README is included.
        let ignore = "*.md\nREADME-secret.md\n!README*.md\n";
        assert!(!excluded(ignore, "README-secret.md"));
    }

    #[test]
    fn double_star_spans_directories() {
        let table = [
            ("**/*.go", "main.go", true),
            ("**/*.go", "a/b/c/main.go", true),
            ("**/*.go", "a/b/c/main.rs", false),
            ("a/**/z", "a/z", true),
            ("a/**/z", "a/b/c/z", true),
            ("a/**/z", "b/z", false),
            ("a/**", "a/x/y", true),
            ("a/**", "a", false),
            ("**", "anything/at/all", true),
            ("node_modules", "node_modules/pkg/index.js", true),
            ("/node_modules", "node_modules", true),
            ("./dist/", "dist/app.js", true),
            ("a//b/../c", "a/c/file", true),
        ];
        for (pattern, path, expected) in table {
            assert_eq!(excluded(pattern, path), expected, "{pattern} vs {path}");
        }
    }

    #[test]
    fn single_star_question_mark_classes_and_escapes() {
        let table = [
            ("*", "file", true),
            ("*", "dir/file", true), // the parent `dir` matches
            ("*.txt", "dir/file.txt", false),
            ("?.c", "a.c", true),
            ("?.c", "ab.c", false),
            ("[a-c].rs", "b.rs", true),
            ("[a-c].rs", "d.rs", false),
            ("[^a-c].rs", "d.rs", true),
            ("[^a-c].rs", "a.rs", false),
            ("\\*.txt", "*.txt", true),
            ("\\*.txt", "a.txt", false),
            ("file[\\]]", "file]", true),
        ];
        for (pattern, path, expected) in table {
            assert_eq!(excluded(pattern, path), expected, "{pattern} vs {path}");
        }
    }

    #[test]
    fn comments_whitespace_and_errors() {
        let ignore = DockerIgnore::parse("  \n# c\n  build  \n !  build/keep \n").unwrap();
        assert!(ignore.is_excluded("build/out", false));
        assert!(!ignore.is_excluded("build/keep", false));
        assert!(!ignore.is_excluded("build/keep/deep", false));
        // `#` after spaces is a pattern, as in Docker.
        assert!(excluded("  #x", "#x"));
        for bad in ["[", "a[", "[]", "x\\", "!", "[z-a]"] {
            let error = DockerIgnore::parse(&format!("ok\n{bad}\n")).unwrap_err();
            assert_eq!(error.line, 2, "{bad}");
        }
    }

    #[test]
    fn reinclusion_hints_for_walks() {
        let ignore = DockerIgnore::parse("vendor\ndocs\n!docs/keep.md\n!**/important\n").unwrap();
        assert!(ignore.is_excluded("vendor", true));
        assert!(ignore.may_reinclude_under("docs"));
        assert!(
            ignore.may_reinclude_under("vendor"),
            "`**/important` may be anywhere"
        );
        let ignore = DockerIgnore::parse("vendor\ndocs\n!docs/keep.md\n").unwrap();
        assert!(!ignore.may_reinclude_under("vendor"));
        assert!(ignore.may_reinclude_under("docs"));
        assert!(!ignore.may_reinclude_under("docs2"));
        assert!(
            !DockerIgnore::parse("vendor")
                .unwrap()
                .may_reinclude_under("vendor")
        );
    }

    #[test]
    fn go_clean_matches_go() {
        for (input, expected) in [
            ("", "."),
            ("a/b/", "a/b"),
            ("./a", "a"),
            ("a//b", "a/b"),
            ("a/../..", ".."),
            ("/../a", "/a"),
            ("/", "/"),
            ("a/./b/../c", "a/c"),
        ] {
            assert_eq!(go_clean(input), expected, "{input}");
        }
    }
}
