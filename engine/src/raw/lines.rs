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

    let deliver = |line_no: u64,
                   mut bytes: &[u8],
                   block: &Buffer,
                   first: &mut bool,
                   last: bool,
                   f: &mut dyn FnMut(u64, Line<'_>) -> Result<(), E>| {
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
    };

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
}
