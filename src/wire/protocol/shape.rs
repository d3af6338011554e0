//! What serde does not check in a frame and a backend's parser would trip
//! on (PROTOCOL 1.1): bytes that are not UTF-8 (serde skips the strings of
//! fields it ignores without decoding them), an escaped lone surrogate
//! (`"\ud800"`: valid JSON syntax, not a Unicode string), and nesting
//! deeper than `listener.max_json_depth` (serde_json's own limit is 128,
//! Python's and Jackson's differ; the raw `data` is forwarded as it is).

/// Why a frame's text was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeError {
    NotUtf8,
    LoneSurrogate,
    TooDeep,
}

/// One pass over the frame. Syntax errors are left to the parser.
pub fn check_shape(line: &[u8], max_depth: usize) -> Result<(), ShapeError> {
    if std::str::from_utf8(line).is_err() {
        return Err(ShapeError::NotUtf8);
    }
    let mut depth = 0usize;
    let mut i = 0;
    while i < line.len() {
        match line[i] {
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Err(ShapeError::TooDeep);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => i = check_string(line, i + 1)?,
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Checks the string starting at `start` (after its opening quote) for
/// lone surrogates; returns the index of its closing quote (or the end).
fn check_string(line: &[u8], start: usize) -> Result<usize, ShapeError> {
    let mut i = start;
    // A high surrogate was just read: the next thing must be its low half.
    let mut pending_high = false;
    while i < line.len() {
        match line[i] {
            b'"' => break,
            b'\\' if line.get(i + 1) == Some(&b'u') => {
                let unit = line
                    .get(i + 2..i + 6)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u16::from_str_radix(h, 16).ok());
                let Some(unit) = unit else {
                    return Ok(i); // a bad escape: the parser says so
                };
                match unit {
                    0xD800..=0xDBFF if pending_high => return Err(ShapeError::LoneSurrogate),
                    0xD800..=0xDBFF => pending_high = true,
                    0xDC00..=0xDFFF if pending_high => pending_high = false,
                    0xDC00..=0xDFFF => return Err(ShapeError::LoneSurrogate),
                    _ if pending_high => return Err(ShapeError::LoneSurrogate),
                    _ => {}
                }
                i += 6;
                continue;
            }
            _ if pending_high => return Err(ShapeError::LoneSurrogate),
            b'\\' => i += 1, // skip the escaped character
            _ => {}
        }
        i += 1;
    }
    if pending_high {
        return Err(ShapeError::LoneSurrogate);
    }
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_from_the_frame_itself_outside_strings() {
        let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let frame = |inner: &str| format!(r#"{{"action":"a","uid":"u","data":{inner}}}"#);
        assert_eq!(check_shape(frame(&nest(31)).as_bytes(), 32), Ok(()));
        assert_eq!(
            check_shape(frame(&nest(32)).as_bytes(), 32),
            Err(ShapeError::TooDeep)
        );
        // Brackets inside strings, escaped quotes included, are not nesting.
        let text = format!(r#""\"{}""#, "[".repeat(100));
        assert_eq!(check_shape(frame(&text).as_bytes(), 32), Ok(()));
    }

    #[test]
    fn lone_surrogates_anywhere_are_refused_and_pairs_kept() {
        let ok = [
            r#"{"a":"\ud83d\ude00"}"#,
            r#"{"a":"\u00e9\\u"}"#,
            r#"{"a":"x\\"}"#,
        ];
        for f in ok {
            assert_eq!(check_shape(f.as_bytes(), 32), Ok(()), "{f}");
        }
        let bad = [
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\udc00x"}"#,
            r#"{"a":"\ud800\u0041"}"#,
            r#"{"a":"\ud800\ud800\udc00"}"#,
            r#"{"unknown":["x","\ud800y"]}"#,
            r#"{"\ud800":1}"#,
        ];
        for f in bad {
            assert_eq!(
                check_shape(f.as_bytes(), 32),
                Err(ShapeError::LoneSurrogate),
                "{f}"
            );
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_are_refused_wherever_they_are() {
        let mut f = br#"{"action":"a","uid":"u","x":"#.to_vec();
        f.extend_from_slice(b"\"\xff\xfe\"}");
        assert_eq!(check_shape(&f, 32), Err(ShapeError::NotUtf8));
    }
}
