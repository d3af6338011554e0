//! Newline-delimited framing that never depends on read boundaries.
//!
//! The decoder keeps at most one partial line per connection, and only while
//! a line is actually split across reads; an oversized line is discarded up to
//! its newline without being buffered, so a hostile 32 MiB line costs nothing
//! beyond the read buffer.

use std::ops::ControlFlow;

/// One decoded unit of input.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete line, without its `\n` or `\r\n` terminator; never empty.
    Line(&'a [u8]),
    /// A line longer than the limit ended; its bytes were discarded.
    TooLarge,
}

#[derive(Debug)]
pub struct LineDecoder {
    max_frame: usize,
    /// Bytes of a line that started in an earlier read. Empty (and without
    /// capacity) whenever no line is split, which keeps idle connections cheap.
    partial: Vec<u8>,
    /// Inside an oversized line: drop everything up to the next newline.
    discarding: bool,
}

impl LineDecoder {
    pub fn new(max_frame: usize) -> Self {
        LineDecoder {
            max_frame,
            partial: Vec::new(),
            discarding: false,
        }
    }

    /// Feeds one read's worth of bytes, calling `emit` for every frame that
    /// completes, in order. (The gateway uses [`LineDecoder::decode_until`];
    /// the tests and the fuzz target read this simpler form.)
    #[allow(dead_code)]
    pub fn decode(&mut self, chunk: &[u8], mut emit: impl FnMut(Frame<'_>)) {
        self.decode_until(chunk, |frame| {
            emit(frame);
            ControlFlow::Continue(())
        });
    }

    /// Like [`LineDecoder::decode`], but stops right after a frame for which
    /// `emit` breaks, and returns how many bytes of `chunk` it used: all of
    /// them unless it stopped. After a stop no line is pending, so the
    /// caller feeds the rest of the chunk later (back-pressure on a
    /// connection whose replies pile up).
    pub fn decode_until(
        &mut self,
        chunk: &[u8],
        mut emit: impl FnMut(Frame<'_>) -> ControlFlow<()>,
    ) -> usize {
        let mut rest = chunk;
        while let Some(pos) = memchr::memchr(b'\n', rest) {
            let head = &rest[..pos];
            rest = &rest[pos + 1..];
            let flow = if self.discarding {
                self.discarding = false;
                emit(Frame::TooLarge)
            } else if self.partial.is_empty() {
                self.finish_line(head, &mut emit)
            } else if self.partial.len() + head.len() > self.max_frame + 1 {
                self.release_partial();
                emit(Frame::TooLarge)
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(head);
                let flow = self.finish_line(&line, &mut emit);
                line.clear();
                // Keep the allocation only if it is small; a burst of big split
                // frames must not pin memory on an otherwise idle connection.
                if line.capacity() <= 4096 {
                    self.partial = line;
                }
                flow
            };
            if flow.is_break() {
                if !rest.is_empty() {
                    self.release_partial();
                }
                return chunk.len() - rest.len();
            }
        }
        if rest.is_empty() {
            if self.partial.is_empty() {
                self.release_partial();
            }
            return chunk.len();
        }
        if self.discarding {
            return chunk.len();
        }
        // One byte of slack for a `\r` that may be followed by `\n`.
        if self.partial.len() + rest.len() > self.max_frame + 1 {
            self.release_partial();
            self.discarding = true;
        } else {
            self.partial.extend_from_slice(rest);
        }
        chunk.len()
    }

    /// Memory held for a line split across reads (its buffer's capacity).
    pub fn buffered(&self) -> usize {
        self.partial.capacity()
    }

    fn finish_line(
        &self,
        line: &[u8],
        emit: &mut impl FnMut(Frame<'_>) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > self.max_frame {
            emit(Frame::TooLarge)
        } else if !line.iter().all(u8::is_ascii_whitespace) {
            emit(Frame::Line(line))
        } else {
            ControlFlow::Continue(())
        }
    }

    fn release_partial(&mut self) {
        self.partial = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(decoder: &mut LineDecoder, chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, ()>> {
        let mut out = Vec::new();
        for chunk in chunks {
            decoder.decode(chunk, |f| match f {
                Frame::Line(l) => out.push(Ok(l.to_vec())),
                Frame::TooLarge => out.push(Err(())),
            });
        }
        out
    }

    #[test]
    fn stopping_and_feeding_the_rest_later_gives_the_same_frames() {
        let input: &[u8] = b"a\nbb\n\nccc\nddd\r\ne";
        let whole = frames(&mut LineDecoder::new(100), &[input, b"\n"]);
        let mut d = LineDecoder::new(100);
        let mut got = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            // Stop after every frame.
            let used = d.decode_until(rest, |f| {
                got.push(match f {
                    Frame::Line(l) => Ok(l.to_vec()),
                    Frame::TooLarge => Err(()),
                });
                ControlFlow::Break(())
            });
            assert!(used > 0);
            rest = &rest[used..];
        }
        got.extend(frames(&mut d, &[b"\n"]));
        assert_eq!(got, whole);
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn many_frames_in_one_read() {
        let mut d = LineDecoder::new(100);
        let got = frames(&mut d, &[b"a\nbb\r\nccc\n"]);
        assert_eq!(
            got,
            vec![Ok(b"a".to_vec()), Ok(b"bb".to_vec()), Ok(b"ccc".to_vec())]
        );
        assert!(d.partial.is_empty() && !d.discarding);
    }

    #[test]
    fn frame_split_byte_by_byte_is_the_same_frame() {
        let input = b"{\"action\":\"x\"}\r\n{\"b\":1}\n";
        let whole = frames(&mut LineDecoder::new(100), &[input]);
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        let split = frames(&mut LineDecoder::new(100), &chunks);
        assert_eq!(whole, split);
        assert_eq!(whole.len(), 2);
    }

    #[test]
    fn every_split_point_gives_the_same_frames() {
        let input = b"one\ntwo\r\n\nthree\n";
        let whole = frames(&mut LineDecoder::new(8), &[input]);
        for cut in 0..input.len() {
            let (a, b) = input.split_at(cut);
            assert_eq!(
                frames(&mut LineDecoder::new(8), &[a, b]),
                whole,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn empty_and_blank_lines_are_ignored() {
        let mut d = LineDecoder::new(100);
        assert_eq!(frames(&mut d, &[b"\n\r\n  \nx\n"]), vec![Ok(b"x".to_vec())]);
    }

    #[test]
    fn limit_excludes_the_terminator() {
        let mut d = LineDecoder::new(3);
        let got = frames(&mut d, &[b"abc\r\nabcd\nab", b"c\r", b"\n"]);
        assert_eq!(got, vec![Ok(b"abc".to_vec()), Err(()), Ok(b"abc".to_vec())]);
    }

    #[test]
    fn oversized_line_is_discarded_without_buffering() {
        let mut d = LineDecoder::new(16);
        let big = vec![b'x'; 1 << 20];
        let mut got = frames(&mut d, &[b"ok\n", &big]);
        assert!(d.discarding);
        assert_eq!(d.partial.capacity(), 0, "oversized bytes must not be kept");
        got.extend(frames(&mut d, &[&big, b"tail\nnext\n"]));
        assert_eq!(got, vec![Ok(b"ok".to_vec()), Err(()), Ok(b"next".to_vec())]);
    }

    #[test]
    fn split_oversized_line_reports_once_at_its_newline() {
        let mut d = LineDecoder::new(4);
        let got = frames(&mut d, &[b"abc", b"def", b"\nz\n"]);
        assert_eq!(got, vec![Err(()), Ok(b"z".to_vec())]);
    }

    #[test]
    fn no_partial_allocation_when_reads_end_on_newlines() {
        let mut d = LineDecoder::new(64);
        frames(&mut d, &[b"abc\n"]);
        assert_eq!(d.partial.capacity(), 0);
    }
}
