//! `$VAR` substitution with Dockerfile's rules.
//!
//! Supported forms, as in a Dockerfile:
//!
//! | form | value |
//! |---|---|
//! | `$VAR`, `${VAR}` | the value of VAR |
//! | `${VAR:-word}` | VAR if it is set and not empty, else `word` |
//! | `${VAR-word}` | VAR if it is set (even empty), else `word` |
//! | `${VAR:+word}` | `word` if VAR is set and not empty, else the empty string |
//! | `${VAR+word}` | `word` if VAR is set (even empty), else the empty string |
//! | `\$` | a literal `$` |
//! | `$` then a character that cannot start a name (`$1`, `$(`, `$$`, a trailing `$`) | a literal `$` |
//!
//! `word` is itself substituted, so `${A:-${B:-x}}` and `${A:-$B/bin}` work. A name starts with
//! a letter or `_` and continues with letters, digits and `_`.
//!
//! Two modes:
//!
//! - [`Mode::Strict`] (every value except `run` commands): an unknown variable becomes the empty
//!   string and is reported in [`Substituted::undefined`] (except as the subject of a
//!   `:-`/`:+` form, which handles absence on purpose); `\$` becomes `$`.
//! - [`Mode::Shell`] (`run` commands): the string goes to a shell afterwards, so anything that
//!   is not a known variable is left exactly as written for the shell to expand: `$HOME`,
//!   `$i`, `${f%.gz}`, `$(cmd)`, `$1`. Shell quoting is respected: nothing inside single
//!   quotes is substituted, and a backslash escape (`\$HOME`) is kept as written.
//!
//! The lookup is called once per reference, in order, including references inside a `word`
//! that ends up unused, so a caller can record everything a string may read (for cache keys).

use std::fmt;

/// How unknown variables are treated; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Strict,
    Shell,
}

/// The result of [`substitute`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Substituted {
    pub value: String,
    /// Variables that were read but unknown (Strict mode only), deduplicated, in order.
    pub undefined: Vec<String>,
}

/// A malformed `${…}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, miette::Diagnostic)]
#[error("{reason} at byte {offset}")]
#[diagnostic(
    code(graphbuild::substitution),
    help(
        "supported forms: $VAR, ${{VAR}}, ${{VAR:-default}}, ${{VAR:+alternative}}; a literal $ is written \\$"
    )
)]
pub struct SubstError {
    /// Byte offset of the `$` that starts the malformed reference.
    pub offset: usize,
    pub reason: SubstErrorReason,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubstErrorReason {
    /// `${` without its closing `}`.
    Unterminated,
    /// `${}` or `${` followed by something that is not a name.
    BadName,
    /// `${VAR?…}`, `${VAR#…}` and other forms graphbuild does not support.
    UnsupportedModifier(char),
    /// `${A:-${B:-…}}` nested more than [`crate::limits::MAX_SUBSTITUTION_NESTING`] deep.
    TooDeep,
}

impl fmt::Display for SubstErrorReason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubstErrorReason::Unterminated => {
                write!(formatter, "`${{` is missing its closing `}}`")
            }
            SubstErrorReason::BadName => {
                write!(formatter, "`${{` is not followed by a variable name")
            }
            SubstErrorReason::UnsupportedModifier(modifier) => {
                write!(formatter, "unsupported substitution modifier `{modifier}`")
            }
            SubstErrorReason::TooDeep => write!(
                formatter,
                "`${{…}}` is nested more than {} deep",
                crate::limits::MAX_SUBSTITUTION_NESTING
            ),
        }
    }
}

/// Substitutes every `$VAR` reference in `raw`; see the module docs for the rules.
pub fn substitute(
    raw: &str,
    mode: Mode,
    lookup: &mut dyn FnMut(&str) -> Option<String>,
) -> Result<Substituted, SubstError> {
    let mut substituter = Substituter {
        text: raw,
        position: 0,
        mode,
        lookup,
        undefined: Vec::new(),
        recording: true,
        depth: 0,
    };
    let value = substituter.word(false)?;
    Ok(Substituted {
        value,
        undefined: substituter.undefined,
    })
}

/// The names of every variable `raw` references (in Strict reading), deduplicated, in order.
/// A malformed string yields the references before the malformed part.
pub fn references(raw: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut record = |name: &str| {
        if !names.iter().any(|known| known == name) {
            names.push(name.to_string());
        }
        None
    };
    let _ = substitute(raw, Mode::Strict, &mut record);
    names
}

struct Substituter<'text, 'lookup> {
    text: &'text str,
    position: usize,
    mode: Mode,
    lookup: &'lookup mut dyn FnMut(&str) -> Option<String>,
    undefined: Vec<String>,
    /// False while evaluating a `word` that will be discarded: its unknown variables are not
    /// reported as undefined.
    recording: bool,
    /// How many `${…:-word}` words enclose the current position.
    depth: usize,
}

fn is_name_start(character: char) -> bool {
    character.is_ascii_alphabetic() || character == '_'
}

fn is_name_continue(character: char) -> bool {
    character.is_ascii_alphanumeric() || character == '_'
}

impl Substituter<'_, '_> {
    fn peek(&self) -> Option<char> {
        self.text[self.position..].chars().next()
    }

    fn peek_at(&self, offset: usize) -> Option<char> {
        self.text
            .get(self.position + offset..)
            .and_then(|rest| rest.chars().next())
    }

    fn bump(&mut self) -> Option<char> {
        let character = self.peek()?;
        self.position += character.len_utf8();
        Some(character)
    }

    fn note_undefined(&mut self, name: &str) {
        if self.recording
            && self.mode == Mode::Strict
            && !self.undefined.iter().any(|known| known == name)
        {
            self.undefined.push(name.to_string());
        }
    }

    /// Reads text up to the end, or up to an unmatched `}` when `inside_braces`.
    fn word(&mut self, inside_braces: bool) -> Result<String, SubstError> {
        let mut output = String::new();
        let mut in_single_quotes = false;
        let mut in_double_quotes = false;
        let mut brace_depth = 0usize;
        while let Some(character) = self.peek() {
            if self.mode == Mode::Shell && in_single_quotes {
                self.bump();
                output.push(character);
                if character == '\'' {
                    in_single_quotes = false;
                }
                continue;
            }
            match character {
                '}' if inside_braces && brace_depth == 0 => return Ok(output),
                '{' if inside_braces => {
                    brace_depth += 1;
                    self.bump();
                    output.push(character);
                }
                '}' if inside_braces => {
                    brace_depth -= 1;
                    self.bump();
                    output.push(character);
                }
                '\\' => {
                    self.bump();
                    match (self.mode, self.peek()) {
                        (Mode::Strict, Some('$')) => {
                            self.bump();
                            output.push('$');
                        }
                        (Mode::Shell, Some(next)) => {
                            self.bump();
                            output.push('\\');
                            output.push(next);
                        }
                        _ => output.push('\\'),
                    }
                }
                '\'' if self.mode == Mode::Shell && !in_double_quotes => {
                    self.bump();
                    output.push(character);
                    in_single_quotes = true;
                }
                '"' if self.mode == Mode::Shell => {
                    self.bump();
                    output.push(character);
                    in_double_quotes = !in_double_quotes;
                }
                '$' => {
                    let replacement = self.dollar()?;
                    output.push_str(&replacement);
                }
                _ => {
                    self.bump();
                    output.push(character);
                }
            }
        }
        if inside_braces {
            // The caller reports the unterminated `${` with its own offset.
            return Err(SubstError {
                offset: self.position,
                reason: SubstErrorReason::Unterminated,
            });
        }
        Ok(output)
    }

    /// At a `$`: returns what it stands for.
    fn dollar(&mut self) -> Result<String, SubstError> {
        let start = self.position;
        self.bump();
        match self.peek() {
            Some(character) if is_name_start(character) => {
                let name = self.name();
                match (self.lookup)(&name) {
                    Some(value) => Ok(value),
                    None if self.mode == Mode::Shell => {
                        Ok(self.text[start..self.position].to_string())
                    }
                    None => {
                        self.note_undefined(&name);
                        Ok(String::new())
                    }
                }
            }
            Some('{') => self.braced(start),
            _ => Ok("$".to_string()),
        }
    }

    fn name(&mut self) -> String {
        let begin = self.position;
        while self.peek().is_some_and(is_name_continue) {
            self.bump();
        }
        self.text[begin..self.position].to_string()
    }

    /// Skips a `${…}` the shell will handle, keeping it verbatim (Shell mode).
    fn verbatim_braces(&mut self, start: usize) -> Result<String, SubstError> {
        let mut depth = 0usize;
        while let Some(character) = self.bump() {
            match character {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(self.text[start..self.position].to_string());
                    }
                }
                _ => {}
            }
        }
        Err(SubstError {
            offset: start,
            reason: SubstErrorReason::Unterminated,
        })
    }

    /// At `${` (`start` is the `$`).
    fn braced(&mut self, start: usize) -> Result<String, SubstError> {
        let after_dollar = self.position;
        self.bump(); // `{`
        if !self.peek().is_some_and(is_name_start) {
            if self.mode == Mode::Shell {
                self.position = after_dollar;
                return self.verbatim_braces(start);
            }
            let reason = if self.peek().is_none() {
                SubstErrorReason::Unterminated
            } else {
                SubstErrorReason::BadName
            };
            return Err(SubstError {
                offset: start,
                reason,
            });
        }
        let name = self.name();
        let unterminated = SubstError {
            offset: start,
            reason: SubstErrorReason::Unterminated,
        };
        let (colon, operator) = match (self.peek(), self.peek_at(1)) {
            (Some('}'), _) => (false, None),
            (Some(':'), Some(operator @ ('-' | '+'))) => (true, Some(operator)),
            (Some(operator @ ('-' | '+')), _) => (false, Some(operator)),
            (None, _) => return Err(unterminated),
            (Some(':'), None) => return Err(unterminated),
            (Some(':'), Some(other)) | (Some(other), _) => {
                if self.mode == Mode::Shell {
                    self.position = after_dollar;
                    return self.verbatim_braces(start);
                }
                let modifier = if other == ':' { ':' } else { other };
                return Err(SubstError {
                    offset: start,
                    reason: SubstErrorReason::UnsupportedModifier(modifier),
                });
            }
        };
        let value = (self.lookup)(&name);
        let Some(operator) = operator else {
            self.bump(); // `}`
            return Ok(match value {
                Some(value) => value,
                None if self.mode == Mode::Shell => self.text[start..self.position].to_string(),
                None => {
                    self.note_undefined(&name);
                    String::new()
                }
            });
        };
        if colon {
            self.bump();
        }
        self.bump(); // the operator
        let is_set = match &value {
            Some(value) => !colon || !value.is_empty(),
            None => false,
        };
        let use_word = match operator {
            '-' => !is_set,
            _ => is_set,
        };
        if self.depth >= crate::limits::MAX_SUBSTITUTION_NESTING {
            return Err(SubstError {
                offset: start,
                reason: SubstErrorReason::TooDeep,
            });
        }
        let was_recording = self.recording;
        self.recording = was_recording && use_word;
        self.depth += 1;
        let word = self.word(true);
        self.depth -= 1;
        self.recording = was_recording;
        let word = word.map_err(|error| match error.reason {
            SubstErrorReason::TooDeep => error,
            _ => unterminated.clone(),
        })?;
        if self.bump() != Some('}') {
            return Err(unterminated);
        }
        if value.is_none() && self.mode == Mode::Shell {
            return Ok(self.text[start..self.position].to_string());
        }
        Ok(match (operator, use_word) {
            (_, true) => word,
            ('-', false) => value.unwrap_or_default(),
            _ => String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn variables(name: &str) -> Option<String> {
        match name {
            "ARCH" => Some("arm64".to_string()),
            "EMPTY" => Some(String::new()),
            "VERSION" => Some("1.2".to_string()),
            _ => None,
        }
    }

    fn strict(raw: &str) -> Substituted {
        substitute(raw, Mode::Strict, &mut variables).expect("valid")
    }

    fn shell(raw: &str) -> String {
        substitute(raw, Mode::Shell, &mut variables)
            .expect("valid")
            .value
    }

    #[test]
    fn dockerfile_forms() {
        let cases = [
            ("$ARCH", "arm64"),
            ("${ARCH}", "arm64"),
            ("a-${ARCH}-b", "a-arm64-b"),
            ("$ARCH.tar", "arm64.tar"),
            ("${ARCH:-x}", "arm64"),
            ("${EMPTY:-x}", "x"),
            ("${EMPTY-x}", ""),
            ("${NOPE:-x}", "x"),
            ("${NOPE-x}", "x"),
            ("${ARCH:+yes}", "yes"),
            ("${EMPTY:+yes}", ""),
            ("${EMPTY+yes}", "yes"),
            ("${NOPE:+yes}", ""),
            ("${NOPE:-${ARCH}}", "arm64"),
            ("${NOPE:-${ALSO:-deep}}", "deep"),
            ("${NOPE:-$VERSION/bin}", "1.2/bin"),
            ("${ARCH:+v$VERSION}", "v1.2"),
            ("${NOPE:-{a}}", "{a}"),
            ("\\$ARCH", "$ARCH"),
            ("a\\b", "a\\b"),
            ("$", "$"),
            ("$1", "$1"),
            ("$$", "$$"),
            ("$(x)", "$(x)"),
            ("cost: $5", "cost: $5"),
            ("ünïcode $ARCH ✓", "ünïcode arm64 ✓"),
        ];
        for (raw, expected) in cases {
            assert_eq!(strict(raw).value, expected, "input {raw}");
        }
    }

    #[test]
    fn strict_reports_undefined_except_when_handled() {
        assert_eq!(
            strict("$NOPE and ${NOPE} $OTHER").undefined,
            vec!["NOPE", "OTHER"]
        );
        assert_eq!(strict("$NOPE and $OTHER").value, " and ");
        assert!(strict("${NOPE:-x} ${NOPE:+y}").undefined.is_empty());
        // The word's references are reported only when the word is used.
        assert_eq!(strict("${NOPE:-$MISSING}").undefined, vec!["MISSING"]);
        assert!(strict("${ARCH:-$MISSING}").undefined.is_empty());
    }

    #[test]
    fn lookup_sees_every_reference_once_in_order() {
        let mut seen = Vec::new();
        let mut lookup = |name: &str| {
            seen.push(name.to_string());
            variables(name)
        };
        substitute(
            "$ARCH ${A:-$B} ${ARCH:+$C} $ARCH",
            Mode::Strict,
            &mut lookup,
        )
        .expect("valid");
        assert_eq!(seen, ["ARCH", "A", "B", "ARCH", "C", "ARCH"]);
        assert_eq!(references("$X ${Y:-$Z} $X \\$W"), ["X", "Y", "Z"]);
    }

    #[test]
    fn shell_mode_leaves_unknown_variables_to_the_shell() {
        assert_eq!(
            shell("make ARCH=$ARCH HOME=$HOME"),
            "make ARCH=arm64 HOME=$HOME"
        );
        assert_eq!(
            shell("for i in 1 2; do echo $i ${i}; done"),
            "for i in 1 2; do echo $i ${i}; done"
        );
        assert_eq!(
            shell("echo $(uname -m) $1 $@ $$ $?"),
            "echo $(uname -m) $1 $@ $$ $?"
        );
        assert_eq!(
            shell("echo ${f%.gz} ${#list} ${x:?no}"),
            "echo ${f%.gz} ${#list} ${x:?no}"
        );
        assert_eq!(shell("echo ${NOPE:-$ARCH}"), "echo ${NOPE:-$ARCH}");
        assert_eq!(shell("echo ${ARCH:-x}"), "echo arm64");
        assert_eq!(
            shell("echo '$ARCH' \"$ARCH\" \\$ARCH"),
            "echo '$ARCH' \"arm64\" \\$ARCH"
        );
        assert_eq!(
            shell("awk '{print $1}' \"it's $ARCH\""),
            "awk '{print $1}' \"it's arm64\""
        );
        let result = substitute("$NOPE", Mode::Shell, &mut variables).expect("valid");
        assert!(result.undefined.is_empty());
    }

    #[test]
    fn malformed_braces_are_errors_with_offsets() {
        let error = substitute("ab ${ARCH", Mode::Strict, &mut variables).unwrap_err();
        assert_eq!(
            error,
            SubstError {
                offset: 3,
                reason: SubstErrorReason::Unterminated
            }
        );
        let error = substitute("x ${}", Mode::Strict, &mut variables).unwrap_err();
        assert_eq!(
            error,
            SubstError {
                offset: 2,
                reason: SubstErrorReason::BadName
            }
        );
        let error = substitute("${A:-${B}", Mode::Strict, &mut variables).unwrap_err();
        assert_eq!(error.offset, 0);
        let error = substitute("${A#x}", Mode::Strict, &mut variables).unwrap_err();
        assert_eq!(error.reason, SubstErrorReason::UnsupportedModifier('#'));
        assert!(substitute("echo ${", Mode::Shell, &mut variables).is_err());
        assert_eq!(
            error.to_string(),
            "unsupported substitution modifier `#` at byte 0"
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let nested = |depth: usize| format!("{}x{}", "${A:-".repeat(depth), "}".repeat(depth));
        let limit = crate::limits::MAX_SUBSTITUTION_NESTING;
        assert_eq!(strict(&nested(limit)).value, "x");
        for mode in [Mode::Strict, Mode::Shell] {
            let error = substitute(&nested(100_000), mode, &mut variables).unwrap_err();
            assert_eq!(error.reason, SubstErrorReason::TooDeep);
            assert_eq!(error.offset, 5 * limit);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn never_panics(raw in "[a-zA-Z0-9_${}:+\\-\\\\'\" ]{0,40}") {
            let _ = substitute(&raw, Mode::Strict, &mut variables);
            let _ = substitute(&raw, Mode::Shell, &mut variables);
            let _ = references(&raw);
        }

        #[test]
        fn never_panics_on_any_unicode(raw in any::<String>()) {
            let _ = substitute(&raw, Mode::Strict, &mut variables);
            let _ = substitute(&raw, Mode::Shell, &mut variables);
        }

        #[test]
        fn text_without_dollar_is_identity(raw in "[^$\\\\]{0,60}") {
            prop_assert_eq!(strict(&raw).value, raw.clone());
            prop_assert_eq!(shell(&raw), raw);
        }

        #[test]
        fn shell_mode_with_no_known_variables_is_identity(raw in "[a-z $]{0,30}") {
            let result = substitute(&raw, Mode::Shell, &mut |_| None).expect("no braces");
            prop_assert_eq!(result.value, raw);
        }
    }
}
