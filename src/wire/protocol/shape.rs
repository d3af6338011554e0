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

/// Bytes that matter outside strings.
const STRUCTURAL: [bool; 256] = {
    let mut t = [false; 256];
    t[b'{' as usize] = true;
    t[b'}' as usize] = true;
    t[b'[' as usize] = true;
    t[b']' as usize] = true;
    t[b'"' as usize] = true;
    t
};

/// One pass over the frame, jumping from one byte that matters to the
/// next (a tight loop: this runs on every request). Syntax errors are left
/// to the parser. Returns the frame as text: parsing a `&str` spares
/// serde_json validating UTF-8 again, in every string and raw value.
pub fn check_shape(line: &[u8], max_depth: usize) -> Result<&str, ShapeError> {
    let Ok(text) = std::str::from_utf8(line) else {
        return Err(ShapeError::NotUtf8);
    };
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(off) = line[i..].iter().position(|&b| STRUCTURAL[b as usize]) {
        i += off;
        match line[i] {
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Err(ShapeError::TooDeep);
                }
                i += 1;
            }
            b'"' => i = check_string(line, i + 1)? + 1,
            _ => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
        }
        if i >= line.len() {
            break;
        }
    }
    Ok(text)
}

/// The code unit of the four hex digits at `at`, if they are that.
fn hex4(line: &[u8], at: usize) -> Option<u16> {
    let digits = std::str::from_utf8(line.get(at..at + 4)?).ok()?;
    u16::from_str_radix(digits, 16).ok()
}

/// Where the first `"` or `\` is. Most strings of a frame are short (its
/// keys, ids, actions) and memchr's vector set-up costs more than it saves
/// on them (about 57 instructions a call, nine calls a request, in the
/// profile), so the first bytes are looked at one by one.
fn quote_or_escape(s: &[u8]) -> Option<usize> {
    const BY_HAND: usize = 16;
    let head = &s[..s.len().min(BY_HAND)];
    match head.iter().position(|&b| b == b'"' || b == b'\\') {
        Some(at) => Some(at),
        None if s.len() > BY_HAND => {
            memchr::memchr2(b'"', b'\\', &s[BY_HAND..]).map(|at| at + BY_HAND)
        }
        None => None,
    }
}

/// Checks the string whose first byte is at `start` (after the opening
/// quote) for lone surrogates; returns the index of its closing quote, or
/// the end of the line.
fn check_string(line: &[u8], start: usize) -> Result<usize, ShapeError> {
    let mut i = start;
    loop {
        let Some(off) = quote_or_escape(&line[i..]) else {
            return Ok(line.len());
        };
        i += off;
        if line[i] == b'"' {
            return Ok(i);
        }
        match line.get(i + 1) {
            Some(b'u') => match hex4(line, i + 2) {
                Some(0xD800..=0xDBFF) => {
                    // A high surrogate must be followed at once by a low one.
                    let low = match (line.get(i + 6), line.get(i + 7)) {
                        (Some(b'\\'), Some(b'u')) => hex4(line, i + 8),
                        _ => None,
                    };
                    if !matches!(low, Some(0xDC00..=0xDFFF)) {
                        return Err(ShapeError::LoneSurrogate);
                    }
                    i += 12;
                }
                Some(0xDC00..=0xDFFF) => return Err(ShapeError::LoneSurrogate),
                Some(_) => i += 6,
                None => i += 2, // a bad escape: the parser says so
            },
            Some(_) => i += 2,
            None => return Ok(line.len()),
        }
        if i >= line.len() {
            return Ok(line.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shape(line: &[u8], max_depth: usize) -> Result<(), ShapeError> {
        check_shape(line, max_depth).map(drop)
    }

    /// The first version, a byte at a time: the model for the fast one.
    fn model(line: &[u8], max_depth: usize) -> Result<(), ShapeError> {
        if std::str::from_utf8(line).is_err() {
            return Err(ShapeError::NotUtf8);
        }
        let (mut depth, mut i) = (0usize, 0);
        while i < line.len() {
            match line[i] {
                b'{' | b'[' => {
                    depth += 1;
                    if depth > max_depth {
                        return Err(ShapeError::TooDeep);
                    }
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                b'"' => {
                    i += 1;
                    let mut pending_high = false;
                    while i < line.len() {
                        match line[i] {
                            b'"' => break,
                            b'\\' if line.get(i + 1) == Some(&b'u') => {
                                let Some(unit) = hex4(line, i + 2) else {
                                    if pending_high {
                                        return Err(ShapeError::LoneSurrogate);
                                    }
                                    i += 2;
                                    continue;
                                };
                                match unit {
                                    0xD800..=0xDBFF if pending_high => {
                                        return Err(ShapeError::LoneSurrogate)
                                    }
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
                            b'\\' => i += 1,
                            _ => {}
                        }
                        i += 1;
                    }
                    if pending_high {
                        return Err(ShapeError::LoneSurrogate);
                    }
                }
                _ => {}
            }
            i += 1;
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn the_fast_scan_agrees_with_the_model(
            parts in proptest::collection::vec(prop::sample::select(vec![
                "{", "}", "[", "]", "\"", "\\", "\\\"", "\\u", "d800", "DBFF", "dc00",
                "\\ud83d", "\\ude00", "0041", "a", ":", ",", "\\\\", "\u{e9}",
            ]), 0..40),
            depth in 1usize..6,
        ) {
            let line = parts.concat();
            prop_assert_eq!(shape(line.as_bytes(), depth), model(line.as_bytes(), depth), "{}", line);
        }
    }

    #[test]
    fn depth_counts_from_the_frame_itself_outside_strings() {
        let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let frame = |inner: &str| format!(r#"{{"action":"a","uid":"u","data":{inner}}}"#);
        let ok = frame(&nest(31));
        assert_eq!(check_shape(ok.as_bytes(), 32), Ok(ok.as_str()));
        assert_eq!(
            shape(frame(&nest(32)).as_bytes(), 32),
            Err(ShapeError::TooDeep)
        );
        // Brackets inside strings, escaped quotes included, are not nesting.
        let text = format!(r#""\"{}""#, "[".repeat(100));
        assert_eq!(shape(frame(&text).as_bytes(), 32), Ok(()));
    }

    #[test]
    fn lone_surrogates_anywhere_are_refused_and_pairs_kept() {
        let ok = [
            r#"{"a":"\ud83d\ude00"}"#,
            r#"{"a":"\u00e9\\u"}"#,
            r#"{"a":"x\\"}"#,
        ];
        for f in ok {
            assert_eq!(shape(f.as_bytes(), 32), Ok(()), "{f}");
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
                shape(f.as_bytes(), 32),
                Err(ShapeError::LoneSurrogate),
                "{f}"
            );
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_are_refused_wherever_they_are() {
        let mut f = br#"{"action":"a","uid":"u","x":"#.to_vec();
        f.extend_from_slice(b"\"\xff\xfe\"}");
        assert_eq!(shape(&f, 32), Err(ShapeError::NotUtf8));
    }
}
