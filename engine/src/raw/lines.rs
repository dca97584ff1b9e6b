//! Splits an NDJSON byte stream into lines, in bounded memory.
//!
//! * A line longer than the limit is reported as [`Line::TooLong`] and skipped
//!   without ever being held whole, so one bad line cannot exhaust memory.
//! * Blank lines are skipped; a UTF-8 byte order mark at the start of the
//!   stream and a `\r` before each `\n` are dropped.
//! * Line numbers are physical (1-based, blank lines counted), so a user can
//!   find a reported line in an editor.
//! * Each line comes with the Arrow buffer it lies in, so a caller can keep
//!   its text as a string view instead of copying it.

use std::io::{self, Read};

use arrow::buffer::Buffer;

/// One line handed to the callback.
#[derive(Debug)]
pub enum Line<'a> {
    /// The line without its terminator. `last_unterminated` is true for a
    /// final line that has no newline (a file possibly cut short).
    /// `block` is the read buffer `bytes` lies in: a caller that keeps a
    /// reference to it (an Arrow string view) keeps the text without a copy,
    /// and the next read goes to fresh memory.
    Text {
        bytes: &'a [u8],
        last_unterminated: bool,
        block: &'a Buffer,
    },
    /// The line was longer than the limit; `len` is its full length.
    TooLong { len: u64 },
}

/// Totals of one pass over a stream.
#[derive(Debug, Default, Clone, Copy)]
pub struct LineTotals {
    /// Bytes read from the (decompressed) stream.
    pub bytes: u64,
    /// Physical lines, blank ones included.
    pub physical_lines: u64,
}

const READ_CHUNK: usize = 1 << 20;

/// Hands `bytes` (one line, without its `\n`) to `f`, unless it is blank:
/// without a byte order mark when it is the file's first line, and without
/// a `\r` at its end.
fn deliver<E>(
    line_no: u64,
    mut bytes: &[u8],
    block: &Buffer,
    first: &mut bool,
    last: bool,
    f: &mut impl FnMut(u64, Line<'_>) -> Result<(), E>,
) -> Result<(), E> {
    if std::mem::take(first) {
        bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    }
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    if bytes.iter().all(|c| matches!(c, b' ' | b'\t' | b'\r')) {
        return Ok(());
    }
    f(
        line_no,
        Line::Text {
            bytes,
            last_unterminated: last,
            block,
        },
    )
}

/// Calls `f(line_no, line)` for every non-blank line of `reader`.
pub fn for_each_line<R: Read, E: From<io::Error>>(
    reader: R,
    max_line: usize,
    f: impl FnMut(u64, Line<'_>) -> Result<(), E>,
) -> Result<LineTotals, E> {
    for_each_line_after(reader, max_line, 0, f)
}

/// [`for_each_line`] for a stream that starts at a line boundary after
/// `lines_before` lines of its file (a byte range of it): lines are numbered
/// from `lines_before + 1`, and a byte order mark is only dropped at the
/// start of the file. `physical_lines` counts this stream's lines only.
pub fn for_each_line_after<R: Read, E: From<io::Error>>(
    mut reader: R,
    max_line: usize,
    lines_before: u64,
    mut f: impl FnMut(u64, Line<'_>) -> Result<(), E>,
) -> Result<LineTotals, E> {
    let mut buf: Vec<u8> = vec![0; READ_CHUNK];
    let (mut start, mut end) = (0usize, 0usize);
    let mut totals = LineTotals::default();
    let mut line_no = lines_before;
    let mut first = lines_before == 0;
    // Bytes of an over-long line skipped so far (None when not skipping).
    let mut skipping: Option<u64> = None;
    let mut eof = false;

    loop {
        // The bytes read so far, frozen so that lines can be handed out as
        // parts of a shared buffer.
        let block = Buffer::from_vec(std::mem::take(&mut buf));
        let data = block.as_slice();
        // Deliver every complete line in the buffer.
        while let Some(i) = memchr::memchr(b'\n', &data[start..end]) {
            line_no += 1;
            match skipping.take() {
                Some(skipped) => {
                    first = false;
                    f(
                        line_no,
                        Line::TooLong {
                            len: skipped + i as u64,
                        },
                    )?;
                }
                None if i > max_line => {
                    first = false;
                    f(line_no, Line::TooLong { len: i as u64 })?;
                }
                None => deliver(
                    line_no,
                    &data[start..start + i],
                    &block,
                    &mut first,
                    false,
                    &mut f,
                )?,
            }
            start += i + 1;
        }
        if eof {
            // What is left is a last line without a newline.
            if let Some(skipped) = skipping.take() {
                line_no += 1;
                f(
                    line_no,
                    Line::TooLong {
                        len: skipped + (end - start) as u64,
                    },
                )?;
            } else if start < end {
                line_no += 1;
                if end - start > max_line {
                    f(
                        line_no,
                        Line::TooLong {
                            len: (end - start) as u64,
                        },
                    )?;
                } else {
                    deliver(line_no, &data[start..end], &block, &mut first, true, &mut f)?;
                }
            }
            break;
        }
        // An unfinished line: stop keeping it once it is over the limit.
        if skipping.is_some() || end - start > max_line {
            *skipping.get_or_insert(0) += (end - start) as u64;
            start = end;
        }
        // Room for the next read, with the partial line at the front: the
        // same memory when the caller kept no line of it, else fresh memory.
        let partial = end - start;
        buf = match block.into_vec::<u8>() {
            Ok(mut v) => {
                v.copy_within(start..end, 0);
                v
            }
            Err(kept) => {
                let mut v = vec![0; kept.len()];
                v[..partial].copy_from_slice(&kept[start..end]);
                v
            }
        };
        (start, end) = (0, partial);
        if end == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = loop {
            match reader.read(&mut buf[end..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        };
        totals.bytes += n as u64;
        end += n;
        eof = n == 0;
    }
    totals.physical_lines = line_no - lines_before;
    Ok(totals)
}

/// Bytes that can be handed out as parts of themselves, as Arrow buffers,
/// without a copy: a local file through memory maps of the page cache
/// (`raw::MappedFile`), or bytes fetched from a store.
pub trait Windows {
    /// Where the bytes end: the size of the whole file they are of, or
    /// less when they are only its start.
    fn size(&self) -> u64;
    /// `len` bytes from `offset`, which lie within [`Windows::size`].
    fn window(&self, offset: u64, len: usize) -> io::Result<Buffer>;
}

/// How many bytes [`for_each_line_in`] takes at a time (more for a longer
/// line).
pub const WINDOW: usize = 8 << 20;

/// The lines of `src` that start in `start..end`, where `start` is the
/// start of a line after `lines_before` lines of the file, as
/// [`for_each_line_after`] gives them: each line lies in a window of
/// `src`, so nothing is copied. A line that starts before `end` is given
/// whole, up to its newline or the end of `src`. `bytes` in the totals
/// counts from `start` to the end of the last line given.
pub fn for_each_line_in<W: Windows + ?Sized, E: From<io::Error>>(
    src: &W,
    start: u64,
    end: u64,
    max_line: usize,
    lines_before: u64,
    f: impl FnMut(u64, Line<'_>) -> Result<(), E>,
) -> Result<LineTotals, E> {
    lines_in_windows(src, start, end, max_line, lines_before, WINDOW, f)
}

fn lines_in_windows<W: Windows + ?Sized, E: From<io::Error>>(
    src: &W,
    start: u64,
    end: u64,
    max_line: usize,
    lines_before: u64,
    window: usize,
    mut f: impl FnMut(u64, Line<'_>) -> Result<(), E>,
) -> Result<LineTotals, E> {
    let (size, end) = (src.size(), end.min(src.size()));
    let mut pos = start;
    let mut line_no = lines_before;
    let mut first = lines_before == 0;
    let mut want = window;
    while pos < end {
        let len = (size - pos).min(want as u64) as usize;
        let block = src.window(pos, len)?;
        let data = block.as_slice();
        let at_eof = pos + len as u64 == size;
        let mut off = 0;
        while pos + (off as u64) < end {
            let Some(i) = memchr::memchr(b'\n', &data[off..]) else {
                if at_eof {
                    // What is left is a last line without a newline.
                    line_no += 1;
                    let rest = &data[off..];
                    if rest.len() > max_line {
                        first = false;
                        f(
                            line_no,
                            Line::TooLong {
                                len: rest.len() as u64,
                            },
                        )?;
                    } else {
                        deliver(line_no, rest, &block, &mut first, true, &mut f)?;
                    }
                    off = len;
                }
                break;
            };
            line_no += 1;
            if i > max_line {
                first = false;
                f(line_no, Line::TooLong { len: i as u64 })?;
            } else {
                deliver(
                    line_no,
                    &data[off..off + i],
                    &block,
                    &mut first,
                    false,
                    &mut f,
                )?;
            }
            off += i + 1;
        }
        pos += off as u64;
        if off > 0 || pos >= end {
            want = window;
            continue;
        }
        // Not one whole line in the window: a larger one, unless the line
        // is already over the limit, which is then skipped window by window.
        if len <= max_line {
            want = want.saturating_mul(2);
            continue;
        }
        let mut skip = pos + len as u64;
        let newline = loop {
            if skip == size {
                break None;
            }
            let n = (size - skip).min(window as u64) as usize;
            if let Some(i) = memchr::memchr(b'\n', &src.window(skip, n)?) {
                break Some(skip + i as u64);
            }
            skip += n as u64;
        };
        line_no += 1;
        first = false;
        let stop = newline.unwrap_or(size);
        f(line_no, Line::TooLong { len: stop - pos })?;
        pos = newline.map_or(size, |n| n + 1);
        want = window;
    }
    Ok(LineTotals {
        bytes: pos - start,
        physical_lines: line_no - lines_before,
    })
}

/// The newlines of `src` in `range`, counted window by window.
pub fn count_newlines<W: Windows + ?Sized>(
    src: &W,
    range: std::ops::Range<u64>,
) -> io::Result<u64> {
    let mut count = 0;
    let mut at = range.start;
    while at < range.end {
        let n = (range.end - at).min(WINDOW as u64) as usize;
        count += memchr::memchr_iter(b'\n', &src.window(at, n)?).count() as u64;
        at += n as u64;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        // A reader that returns 3 bytes at a time exercises the refills.
        struct Slow<'a>(&'a [u8]);
        impl Read for Slow<'_> {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(b.len()).min(3);
                b[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        for_each_line::<_, io::Error>(Slow(input), max, |n, l| {
            out.push((
                n,
                match l {
                    Line::Text {
                        bytes,
                        last_unterminated,
                        ..
                    } => {
                        format!(
                            "{}{}",
                            String::from_utf8_lossy(bytes),
                            if last_unterminated { "$" } else { "" }
                        )
                    }
                    Line::TooLong { len } => format!("TOO_LONG({len})"),
                },
            ));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn splits_and_tolerates_bom_crlf_blank() {
        let got = lines(b"\xEF\xBB\xBF{\"a\":1}\r\n\n  \r\n{\"b\":2}\n{\"c\"", 100);
        assert_eq!(
            got,
            vec![
                (1, "{\"a\":1}".into()),
                (4, "{\"b\":2}".into()),
                (5, "{\"c\"$".into())
            ]
        );
    }

    #[test]
    fn skips_long_lines_in_bounded_memory() {
        let mut input = Vec::new();
        input.extend_from_slice(b"short\n");
        input.extend(std::iter::repeat_n(b'x', 50));
        input.extend_from_slice(b"\nok\n");
        input.extend(std::iter::repeat_n(b'y', 30));
        let got = lines(&input, 10);
        assert_eq!(
            got,
            vec![
                (1, "short".into()),
                (2, "TOO_LONG(50)".into()),
                (3, "ok".into()),
                (4, "TOO_LONG(30)".into())
            ]
        );
    }

    #[test]
    fn lines_lie_in_their_blocks_and_outlive_the_pass() {
        // A caller that keeps every block (as string views do) still has
        // each line intact afterwards: across refills into fresh memory and
        // a buffer grown for a line longer than one read.
        let mut input = Vec::new();
        for i in 0..4000 {
            let pad = "x".repeat(i % 700);
            input.extend_from_slice(format!("{{\"n\":{i},\"pad\":\"{pad}\"}}\n").as_bytes());
            if i == 2000 {
                input.extend(std::iter::repeat_n(b'y', 3 * READ_CHUNK / 2));
                input.push(b'\n');
            }
        }
        input.extend_from_slice(b"last");
        let mut kept = Vec::new();
        for_each_line::<_, io::Error>(&input[..], 4 * READ_CHUNK, |_, l| {
            let Line::Text { bytes, block, .. } = l else {
                panic!("no line is too long here");
            };
            let at = bytes.as_ptr() as usize - block.as_ptr() as usize;
            assert!(at + bytes.len() <= block.len());
            kept.push((block.clone(), at, bytes.len()));
            Ok(())
        })
        .unwrap();
        let got: Vec<&[u8]> = kept.iter().map(|(b, at, n)| &b[*at..at + n]).collect();
        let want: Vec<&[u8]> = input.split(|&c| c == b'\n').collect();
        assert_eq!(got.len(), want.len());
        assert!(got == want);
    }

    impl Windows for Buffer {
        fn size(&self) -> u64 {
            self.len() as u64
        }
        fn window(&self, offset: u64, len: usize) -> io::Result<Buffer> {
            Ok(self.slice_with_length(offset as usize, len))
        }
    }

    /// What [`lines_in_windows`] gives for `input[start..end]`, windows of
    /// `window` bytes, in the form of [`lines`].
    fn windowed(
        input: &[u8],
        start: u64,
        end: u64,
        before: u64,
        window: usize,
        max: usize,
    ) -> Vec<(u64, String)> {
        let src = Buffer::from(input.to_vec());
        let mut out = Vec::new();
        lines_in_windows::<_, io::Error>(&src, start, end, max, before, window, |n, l| {
            out.push((
                n,
                match l {
                    Line::Text {
                        bytes,
                        last_unterminated,
                        block,
                    } => {
                        let at = bytes.as_ptr() as usize - block.as_ptr() as usize;
                        assert!(
                            at + bytes.len() <= block.len(),
                            "the line lies in its window"
                        );
                        format!(
                            "{}{}",
                            String::from_utf8_lossy(bytes),
                            if last_unterminated { "$" } else { "" }
                        )
                    }
                    Line::TooLong { len } => format!("TOO_LONG({len})"),
                },
            ));
            Ok(())
        })
        .unwrap();
        out
    }

    /// Lines of every edge: a BOM, CRLF, blank lines, lines longer than
    /// the windows and than the limit, and a last line without a newline.
    fn awkward() -> Vec<u8> {
        let mut input = b"\xEF\xBB\xBF{\"a\":1}\r\n\n  \r\n".to_vec();
        for i in 0..40 {
            input.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, (i * 13) % 70));
            input.extend_from_slice(if i % 4 == 0 { b"\r\n" } else { b"\n" });
        }
        input.extend(std::iter::repeat_n(b'z', 150));
        input.extend_from_slice(b"\nend");
        input
    }

    #[test]
    fn windows_give_the_lines_a_stream_gives() {
        let input = awkward();
        let n = input.len() as u64;
        for max in [50, 100, 1000] {
            let want = lines(&input, max);
            for window in [1, 3, 16, 64, 4096] {
                assert_eq!(
                    windowed(&input, 0, n, 0, window, max),
                    want,
                    "window {window}, max {max}"
                );
            }
        }
        // A long line at the very end, without a newline.
        let mut tail = b"ok\n".to_vec();
        tail.extend(std::iter::repeat_n(b'q', 90));
        for window in [4, 128] {
            let got = windowed(&tail, 0, tail.len() as u64, 0, window, 50);
            assert_eq!(got, vec![(1, "ok".into()), (2, "TOO_LONG(90)".into())]);
        }
        assert!(windowed(b"", 0, 0, 0, 8, 50).is_empty());
    }

    #[test]
    fn ranges_of_windows_number_their_lines_as_one_read() {
        // Cut anywhere: each range gives the lines that start in it, with
        // the numbers of the whole file, and together they give them all.
        let input = awkward();
        let want = lines(&input, 100);
        for cut in [1usize, 5, 17, 40, 333] {
            let mut got = Vec::new();
            let mut start = 0usize;
            let mut before = 0u64;
            for end in (cut..input.len()).step_by(cut).chain([input.len()]) {
                if start >= end {
                    continue;
                }
                let lines = windowed(&input, start as u64, end as u64, before, 16, 100);
                // The next range starts after the line that straddles `end`.
                let stop = match memchr::memchr(b'\n', &input[end.max(1) - 1..]) {
                    _ if end == input.len() => end,
                    Some(i) => end - 1 + i + 1,
                    None => input.len(),
                };
                before += input[start..stop].iter().filter(|&&c| c == b'\n').count() as u64;
                got.extend(lines);
                start = stop;
            }
            assert_eq!(got, want, "ranges of {cut} bytes");
        }
    }
}
