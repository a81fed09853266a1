//! Dockerfile lexing: parser directives, logical lines (continuations and comments), heredocs,
//! flags, words and Dockerfile quoting.
//!
//! Every piece of text keeps a map back to byte offsets in the file, so diagnostics point at
//! what was written.

/// A parser directive at the top of the file (`# escape=\``, `# syntax=…`).
pub(super) struct Directives {
    pub(super) escape: char,
    /// Problems: (byte offset, length, message).
    pub(super) errors: Vec<(usize, usize, String)>,
    /// Where the instructions start (after the directives).
    pub(super) end: usize,
}

/// Reads the parser directives: `# key=value` lines before anything else.
pub(super) fn directives(text: &str) -> Directives {
    let mut escape = '\\';
    let mut errors = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    // A UTF-8 byte order mark is skipped, as Docker does.
    let mut offset = if text.starts_with('\u{feff}') { 3 } else { 0 };
    for line in text[offset..].split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let Some(rest) = body.trim_start().strip_prefix('#') else {
            break;
        };
        let Some((key, value)) = rest.split_once('=') else {
            break;
        };
        let key = key.trim().to_ascii_lowercase();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            break;
        }
        let value = value.trim();
        if seen.contains(&key) {
            errors.push((
                offset,
                body.len(),
                format!("the parser directive `{key}` is given twice"),
            ));
        }
        seen.push(key.clone());
        if key == "escape" {
            match value {
                "\\" => escape = '\\',
                "`" => escape = '`',
                _ => errors.push((
                    offset,
                    body.len(),
                    format!("the escape character must be `\\` or `` ` ``, not `{value}`"),
                )),
            }
        }
        // `syntax` and `check` select BuildKit front ends and checks: the front end here is
        // graphbuild's own, so they are read and otherwise ignored, as comments.
        offset += line.len();
    }
    Directives {
        escape,
        errors,
        end: offset,
    }
}

/// Text assembled from pieces of the file, with the file offset of every byte.
#[derive(Clone, Debug, Default)]
pub(super) struct Mapped {
    pub(super) text: String,
    /// `offsets[i]`: the file offset of `text`'s byte `i`; one extra entry for the end.
    pub(super) offsets: Vec<usize>,
}

impl Mapped {
    pub(super) fn push_str(&mut self, piece: &str, at: usize) {
        self.text.push_str(piece);
        self.offsets
            .extend((0..piece.len()).map(|index| at + index));
    }

    pub(super) fn at(&self, index: usize) -> usize {
        self.offsets
            .get(index)
            .or(self.offsets.last())
            .copied()
            .unwrap_or(0)
    }

    /// The file span (offset, length) of `text[start..end]`.
    pub(super) fn span(&self, start: usize, end: usize) -> (usize, usize) {
        let from = self.at(start);
        let to = if end == 0 { from } else { self.at(end - 1) + 1 };
        (from, to.saturating_sub(from).max(1))
    }
}

/// A heredoc attached to an instruction: `<<EOF` … `EOF`.
#[derive(Clone, Debug)]
pub(super) struct Heredoc {
    pub(super) name: String,
    /// The body, each line ending with `\n`.
    pub(super) content: String,
}

/// One instruction: its logical line (continuations joined, comments removed) and heredocs.
#[derive(Clone, Debug)]
pub(super) struct Line {
    pub(super) line: Mapped,
    pub(super) heredocs: Vec<Heredoc>,
    /// The file span of the whole instruction, heredocs included.
    pub(super) start: usize,
    pub(super) end: usize,
}

/// Problems found while splitting lines: (offset, length, message).
pub(super) type LexErrors = Vec<(usize, usize, String)>;

/// Splits the instructions after the directives into logical lines.
pub(super) fn lines(text: &str, start: usize, escape: char, errors: &mut LexErrors) -> Vec<Line> {
    // Physical lines with their offsets, line ends removed.
    let mut physical: Vec<(usize, &str)> = Vec::new();
    let mut offset = start;
    for line in text[start..].split_inclusive('\n') {
        physical.push((offset, line.trim_end_matches(['\n', '\r'])));
        offset += line.len();
    }
    let is_comment = |line: &str| line.trim_start().starts_with('#');
    let mut result = Vec::new();
    let mut index = 0;
    while index < physical.len() {
        let (at, body) = physical[index];
        index += 1;
        if body.trim().is_empty() || is_comment(body) {
            continue;
        }
        let mut mapped = Mapped::default();
        let mut current = (at, body);
        let mut end = at + body.len();
        loop {
            let (at, body) = current;
            let trimmed = body.trim_end();
            end = end.max(at + body.len());
            if let Some(before) = trimmed.strip_suffix(escape) {
                // A continuation: the escape character ends the line.
                mapped.push_str(before, at);
                let mut next = None;
                while index < physical.len() {
                    let (next_at, next_body) = physical[index];
                    index += 1;
                    if is_comment(next_body) || next_body.trim().is_empty() {
                        continue;
                    }
                    next = Some((next_at, next_body));
                    break;
                }
                match next {
                    Some(line) => current = line,
                    None => break,
                }
            } else {
                mapped.push_str(body, at);
                break;
            }
        }
        mapped.offsets.push(end);
        // Heredocs: RUN, COPY and ADD only, as BuildKit.
        let mut heredocs = Vec::new();
        let keyword = mapped
            .text
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        if matches!(keyword.as_str(), "RUN" | "COPY" | "ADD") {
            for (name, strip_tabs, position) in heredoc_markers(&mapped.text) {
                let mut content = String::new();
                let mut closed = false;
                while index < physical.len() {
                    let (line_at, body) = physical[index];
                    index += 1;
                    end = line_at + body.len();
                    let body = if strip_tabs {
                        body.trim_start_matches('\t')
                    } else {
                        body
                    };
                    if body == name {
                        closed = true;
                        break;
                    }
                    content.push_str(body);
                    content.push('\n');
                }
                if !closed {
                    let (from, length) = mapped.span(position, position + 2 + name.len());
                    errors.push((
                        from,
                        length,
                        format!("the heredoc `<<{name}` has no line `{name}` to end it"),
                    ));
                }
                heredocs.push(Heredoc { name, content });
            }
        }
        result.push(Line {
            line: mapped,
            heredocs,
            start: at,
            end,
        });
    }
    result
}

/// The heredoc markers of a line, in order: (name, `<<-`, byte position of `<<`).
pub(super) fn heredoc_markers(line: &str) -> Vec<(String, bool, usize)> {
    let bytes = line.as_bytes();
    let mut markers = Vec::new();
    let mut quote: Option<u8> = None;
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        match quote {
            Some(q) if byte == q => quote = None,
            Some(_) => {}
            None if byte == b'\'' || byte == b'"' => quote = Some(byte),
            None if bytes[index..].starts_with(b"<<")
                && !bytes[index..].starts_with(b"<<<")
                && starts_word(bytes, index) =>
            {
                let start = index;
                let mut at = index + 2;
                let strip = bytes.get(at) == Some(&b'-');
                if strip {
                    at += 1;
                }
                let quoted = bytes.get(at).copied().filter(|b| *b == b'"' || *b == b'\'');
                if quoted.is_some() {
                    at += 1;
                }
                let name_start = at;
                while at < bytes.len() && (bytes[at].is_ascii_alphanumeric() || bytes[at] == b'_') {
                    at += 1;
                }
                let name = &line[name_start..at];
                if let Some(q) = quoted {
                    if bytes.get(at) == Some(&q) {
                        at += 1;
                    } else {
                        index = at;
                        continue;
                    }
                }
                if !name.is_empty() {
                    markers.push((name.to_string(), strip, start));
                }
                index = at;
                continue;
            }
            None => {}
        }
        index += 1;
    }
    markers
}

/// Whether `<<` at `index` starts a word (after optional file descriptor digits, `2<<EOF`),
/// as BuildKit requires: `$((1<<2))` is no heredoc.
fn starts_word(bytes: &[u8], index: usize) -> bool {
    let mut at = index;
    while at > 0 && bytes[at - 1].is_ascii_digit() {
        at -= 1;
    }
    at == 0 || bytes[at - 1].is_ascii_whitespace()
}

/// A word of an instruction's arguments: its text as written (quotes kept) and position.
#[derive(Clone, Debug)]
pub(super) struct Word {
    pub(super) text: String,
    /// Byte range in the logical line.
    pub(super) start: usize,
    pub(super) end: usize,
}

/// Splits on whitespace outside quotes; an escaped character never splits.
pub(super) fn split_words(text: &str, base: usize, escape: char) -> Vec<Word> {
    let mut words = Vec::new();
    let mut current: Option<usize> = None;
    let mut quote: Option<char> = None;
    let mut chars = text.char_indices().peekable();
    while let Some((index, c)) = chars.next() {
        if current.is_none() {
            if c.is_whitespace() {
                continue;
            }
            current = Some(index);
        }
        match quote {
            Some(q) if c == q => quote = None,
            Some('"') if c == escape => {
                chars.next();
            }
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == escape => {
                chars.next();
            }
            None if c.is_whitespace() => {
                let start = current.take().unwrap_or(index);
                words.push(Word {
                    text: text[start..index].to_string(),
                    start: base + start,
                    end: base + index,
                });
            }
            None => {}
        }
    }
    if let Some(start) = current {
        words.push(Word {
            text: text[start..].to_string(),
            start: base + start,
            end: base + text.len(),
        });
    }
    words
}

/// A word with Dockerfile quoting resolved into the IR's substitution syntax: quotes removed,
/// escapes resolved, `$VAR`/`${…}` references kept for the engine, literal `$` as `\$`.
/// `Err` names an unterminated quote.
pub(super) fn word_to_raw(word: &str, escape: char) -> Result<String, String> {
    let chars: Vec<char> = word.chars().collect();
    let mut out = String::new();
    let mut index = 0;
    let literal = |out: &mut String, c: char| {
        if c == '$' {
            out.push_str("\\$");
        } else {
            out.push(c);
        }
    };
    while index < chars.len() {
        let c = chars[index];
        if c == '\'' {
            index += 1;
            loop {
                match chars.get(index) {
                    None => return Err("a single quote `'` is not closed".into()),
                    Some('\'') => break,
                    Some(&c) => literal(&mut out, c),
                }
                index += 1;
            }
            index += 1;
        } else if c == '"' {
            index += 1;
            loop {
                match chars.get(index) {
                    None => return Err("a double quote `\"` is not closed".into()),
                    Some('"') => break,
                    Some(&c) if c == escape => match chars.get(index + 1) {
                        Some(&next) if next == '"' || next == '$' || next == escape => {
                            literal(&mut out, next);
                            index += 1;
                        }
                        _ => out.push(c),
                    },
                    Some('$') => index = reference(&chars, index, &mut out) - 1,
                    Some(&c) => out.push(c),
                }
                index += 1;
            }
            index += 1;
        } else if c == escape {
            match chars.get(index + 1) {
                Some(&next) => literal(&mut out, next),
                None => out.push(c),
            }
            index += 2;
        } else if c == '$' {
            index = reference(&chars, index, &mut out);
        } else {
            out.push(c);
            index += 1;
        }
    }
    Ok(out)
}

/// Copies the `$NAME` or `${…}` reference at `index` as written; returns the index after it.
fn reference(chars: &[char], index: usize, out: &mut String) -> usize {
    match chars.get(index + 1) {
        Some('{') => {
            let mut depth = 0;
            let mut at = index + 1;
            while at < chars.len() {
                match chars[at] {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                at += 1;
            }
            let end = (at + 1).min(chars.len());
            out.extend(&chars[index..end]);
            end
        }
        Some(&c) if c.is_ascii_alphabetic() || c == '_' => {
            let mut at = index + 1;
            while at < chars.len() && (chars[at].is_ascii_alphanumeric() || chars[at] == '_') {
                at += 1;
            }
            out.extend(&chars[index..at]);
            at
        }
        // A `$` that starts no reference is a literal `$`.
        _ => {
            out.push_str("\\$");
            index + 1
        }
    }
}

/// A literal string as IR text: every `$` escaped, so no substitution happens.
pub(super) fn literal_raw(text: &str) -> String {
    text.replace('$', "\\$")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_quotes() {
        let words: Vec<String> = split_words(r#"a "b c" 'd e'  f\ g"#, 0, '\\')
            .into_iter()
            .map(|word| word.text)
            .collect();
        assert_eq!(words, ["a", "\"b c\"", "'d e'", "f\\ g"]);
        assert_eq!(word_to_raw(r#""b $X c""#, '\\').unwrap(), "b $X c");
        assert_eq!(word_to_raw("'$X'", '\\').unwrap(), "\\$X");
        assert_eq!(word_to_raw(r"\$X", '\\').unwrap(), "\\$X");
        assert_eq!(word_to_raw("${A:-x y}z", '\\').unwrap(), "${A:-x y}z");
        assert_eq!(word_to_raw("f\\ g", '\\').unwrap(), "f g");
        assert!(word_to_raw("\"open", '\\').is_err());
    }

    #[test]
    fn continuations_comments_and_heredocs() {
        let text = "RUN a \\\n# comment\n  b\nRUN <<EOF\nline 1\nEOF\nCOPY <<-A <<B /x\n\tone\n\tA\ntwo\nB\n";
        let mut errors = Vec::new();
        let lines = lines(text, 0, '\\', &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(lines[0].line.text, "RUN a   b");
        assert_eq!(lines[1].heredocs[0].content, "line 1\n");
        assert_eq!(lines[2].heredocs.len(), 2);
        assert_eq!(lines[2].heredocs[0].content, "one\n");
        assert_eq!(lines[2].heredocs[1].content, "two\n");
        assert!(heredoc_markers("echo $((1<<2)) a<<b").is_empty());
        assert_eq!(heredoc_markers("cat 0<<EOF").len(), 1);
    }

    #[test]
    fn directives_set_the_escape_character() {
        let parsed = directives("# syntax=docker/dockerfile:1\n# escape=`\nFROM x\n");
        assert_eq!(parsed.escape, '`');
        assert!(parsed.errors.is_empty());
        assert!(directives("# escape=x\n").errors.len() == 1);
        assert_eq!(directives("\u{feff}FROM x\n").end, 3);
    }
}
