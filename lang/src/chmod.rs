//! `chmod` of a copy: an octal mode (`0755`), or symbolic clauses (`u+x,g-w`, `a=rX`) applied
//! to each copied entry's own mode, as BuildKit's `COPY --chmod` (Dockerfile 1.14) and
//! `chmod(1)` read them. Plain data: parsing, the canonical text, and the mode it gives.
//!
//! Symbolic: clauses separated by `,`, each `[ugoa]*` then one or more `[+-=][rwxXst]*`. No
//! `ugoa` means `a` (a build has no umask). `X` is `x` for directories and for entries that
//! already have an `x` bit; `s` is set-uid for `u` and set-gid for `g`; `t` is the sticky bit
//! (with `o` or `a`). `=` clears the affected bits first.

/// A parsed `chmod`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chmod {
    Octal(u32),
    Symbolic(Vec<Clause>),
}

/// One `who op perms` of a symbolic mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clause {
    /// Bits of `u`, `g`, `o` (their rwx, set-id and sticky bits) this clause affects.
    who: u32,
    ops: Vec<(char, String)>,
}

const USER: u32 = 0o4700;
const GROUP: u32 = 0o2070;
const OTHER: u32 = 0o1007;

impl Chmod {
    /// `0755`, `644`, `u+x,go-w`…; the error says why not.
    pub fn parse(text: &str) -> Result<Chmod, String> {
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return match u32::from_str_radix(text, 8) {
                Ok(mode) if text.len() <= 5 && mode <= 0o7777 => Ok(Chmod::Octal(mode)),
                _ => Err(format!("`{text}` is not an octal mode (0000 to 7777)")),
            };
        }
        let mut clauses = Vec::new();
        for part in text.split(',') {
            let split = part.find(['+', '-', '=']).ok_or_else(|| {
                format!("`{part}` has no operator: write it like u+x, g-w or a=rX")
            })?;
            let (who_text, rest) = part.split_at(split);
            let mut who = 0;
            for c in who_text.chars() {
                who |= match c {
                    'u' => USER,
                    'g' => GROUP,
                    'o' => OTHER,
                    'a' => USER | GROUP | OTHER,
                    other => return Err(format!("`{other}` in `{part}` is not u, g, o or a")),
                };
            }
            if who == 0 {
                who = USER | GROUP | OTHER;
            }
            let mut ops: Vec<(char, String)> = Vec::new();
            for c in rest.chars() {
                match c {
                    '+' | '-' | '=' => ops.push((c, String::new())),
                    'r' | 'w' | 'x' | 'X' | 's' | 't' => {
                        if let Some((_, perms)) = ops.last_mut()
                            && !perms.contains(c)
                        {
                            perms.push(c);
                        }
                    }
                    other => {
                        return Err(format!(
                            "`{other}` in `{part}` is not a permission (r, w, x, X, s or t)"
                        ));
                    }
                }
            }
            clauses.push(Clause { who, ops });
        }
        Ok(Chmod::Symbolic(clauses))
    }

    /// The mode an entry with `mode` gets.
    pub fn apply(&self, mode: u32, is_dir: bool) -> u32 {
        let clauses = match self {
            Chmod::Octal(octal) => return *octal,
            Chmod::Symbolic(clauses) => clauses,
        };
        let mut mode = mode & 0o7777;
        for clause in clauses {
            for (op, perms) in &clause.ops {
                let mut bits = 0;
                for perm in perms.chars() {
                    bits |= match perm {
                        'r' => 0o444,
                        'w' => 0o222,
                        'x' => 0o111,
                        'X' if is_dir || mode & 0o111 != 0 => 0o111,
                        's' => 0o6000,
                        't' => 0o1000,
                        _ => 0,
                    };
                }
                let bits = bits & clause.who;
                match op {
                    '+' => mode |= bits,
                    '-' => mode &= !bits,
                    _ => mode = (mode & !clause.who) | bits,
                }
            }
        }
        mode
    }
}

impl std::fmt::Display for Chmod {
    /// The canonical text: four octal digits, or the clauses with `ugo` spelled out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chmod::Octal(mode) => write!(f, "{mode:04o}"),
            Chmod::Symbolic(clauses) => {
                for (index, clause) in clauses.iter().enumerate() {
                    if index > 0 {
                        f.write_str(",")?;
                    }
                    for (bits, name) in [(USER, 'u'), (GROUP, 'g'), (OTHER, 'o')] {
                        if clause.who & bits == bits {
                            write!(f, "{name}")?;
                        }
                    }
                    for (op, perms) in &clause.ops {
                        write!(f, "{op}{perms}")?;
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(spec: &str, mode: u32, is_dir: bool) -> u32 {
        Chmod::parse(spec).unwrap().apply(mode, is_dir)
    }

    #[test]
    fn symbolic_modes_as_chmod_applies_them() {
        assert_eq!(apply("0755", 0o600, false), 0o755);
        assert_eq!(apply("u+x", 0o644, false), 0o744);
        assert_eq!(apply("u+x,g-w", 0o664, false), 0o744);
        assert_eq!(apply("+x", 0o644, false), 0o755);
        assert_eq!(apply("go-rwx", 0o755, false), 0o700);
        assert_eq!(apply("a=rX", 0o640, false), 0o444);
        assert_eq!(apply("a=rX", 0o740, false), 0o555);
        assert_eq!(apply("a=rX", 0o700, true), 0o555);
        assert_eq!(apply("u=rwx,g=rx,o=", 0o7777, false), 0o750);
        assert_eq!(apply("u+s,g+s", 0o755, false), 0o6755);
        assert_eq!(apply("o+t", 0o777, true), 0o1777);
        assert_eq!(apply("u-w+x", 0o644, false), 0o544);
        assert_eq!(Chmod::parse("u+x,g-w").unwrap().to_string(), "u+x,g-w");
        assert_eq!(Chmod::parse("+x").unwrap().to_string(), "ugo+x");
        assert_eq!(Chmod::parse("644").unwrap().to_string(), "0644");
        for bad in ["", "8", "17777", "u", "z+x", "u+q", "u+x,", "g=u"] {
            assert!(Chmod::parse(bad).is_err(), "{bad}");
        }
    }
}
