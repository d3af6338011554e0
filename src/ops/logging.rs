//! Strings that come from devices or the backend (deviceUids, certificate
//! names, record contents) go into log lines only through [`escaped`]: a
//! newline or a terminal escape in one must not forge a line or colour the
//! operator's terminal.

use std::fmt;

/// `text` with control characters, backslashes and Unicode format
/// characters (bidirectional overrides among them) escaped as `\n`, `\\`,
/// `\u{1b}`...; printable text is left as it is.
pub fn escaped(text: &str) -> Escaped<'_> {
    Escaped(text)
}

pub struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if c.is_control() || is_format(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Unicode's invisible format characters that reorder or hide text: the
/// bidirectional marks and overrides, zero-width ones, the BOM.
fn is_format(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::escaped;

    #[test]
    fn control_and_format_characters_are_escaped() {
        assert_eq!(escaped("dev-42").to_string(), "dev-42");
        assert_eq!(escaped("dévice ü").to_string(), "dévice ü");
        assert_eq!(
            escaped("a\nERROR forged\u{1b}[31m\\").to_string(),
            "a\\nERROR forged\\u{1b}[31m\\\\"
        );
        assert_eq!(escaped("x\u{202e}y\u{0}").to_string(), "x\\u{202e}y\\u{0}");
        assert!(!escaped("\r\n\t\u{7f}\u{85}")
            .to_string()
            .chars()
            .any(char::is_control));
    }
}
