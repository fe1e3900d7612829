//! Text from outside (a peer's bytes quoted in an error, a topic name, a statement's field, an
//! environment variable) made safe to print: control characters escaped, length bounded.
//!
//! A log line, an audit record or a reply that carries such text raw can be forged: a newline
//! starts a fake log line, an ESC sequence rewrites an operator's terminal, and a megabyte of
//! it fills the journal. [`Outside`] shows it as one bounded line in which every control,
//! bidirectional-override and other invisible format character is written as a Rust-style
//! escape (`\n`, `\u{1b}`).

use std::fmt;

/// Text from outside, displayed escaped and cut at a number of characters.
#[derive(Clone, Copy, Debug)]
pub struct Outside<'a> {
    text: &'a str,
    max_chars: usize,
}

/// The default bound: enough for any identifier or error this project quotes.
pub const DEFAULT_MAX_CHARS: usize = 200;

impl<'a> Outside<'a> {
    /// `text`, cut at [`DEFAULT_MAX_CHARS`] characters.
    pub fn new(text: &'a str) -> Self {
        Outside { text, max_chars: DEFAULT_MAX_CHARS }
    }

    /// `text`, cut at `max_chars` characters.
    pub fn bounded(text: &'a str, max_chars: usize) -> Self {
        Outside { text, max_chars }
    }
}

/// Characters that change how the rest of a line is shown without being seen themselves.
fn is_invisible(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}' // zero-width spaces and joiners, directional marks
            | '\u{2028}'..='\u{202e}' // line and paragraph separators, bidirectional embeddings
            | '\u{2060}'..='\u{2069}' // word joiner, bidirectional isolates
            | '\u{feff}') // byte order mark
}

impl fmt::Display for Outside<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.text.chars();
        for c in chars.by_ref().take(self.max_chars) {
            if is_invisible(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        let rest = chars.count();
        if rest > 0 {
            write!(f, "… ({rest} more characters)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_invisible_characters_are_escaped_and_plain_text_kept() {
        let shown = Outside::new("ok\nFAKE LOG LINE\x1b[2J\r\u{202e}txt.exe\u{0}é").to_string();
        assert_eq!(shown, "ok\\nFAKE LOG LINE\\u{1b}[2J\\r\\u{202e}txt.exe\\u{0}é");
        assert!(!shown.chars().any(is_invisible));
        assert_eq!(Outside::new("lock 4c48de0000000001: ünïcode").to_string(), "lock 4c48de0000000001: ünïcode");
    }

    #[test]
    fn long_text_is_cut_and_says_how_much_was_left_out() {
        assert_eq!(Outside::bounded("abcdef", 4).to_string(), "abcd… (2 more characters)");
        assert_eq!(Outside::bounded("abcd", 4).to_string(), "abcd");
        assert_eq!(
            Outside::new(&"x".repeat(1 << 20)).to_string().len(),
            DEFAULT_MAX_CHARS + "… (1048376 more characters)".len()
        );
    }
}
