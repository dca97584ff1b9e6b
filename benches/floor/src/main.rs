//! The floor of the curate benchmark: the least work a curate run must do,
//! done as fast as this machine allows. Every line of every raw file is
//! parsed fully (sonic-rs, building its document), gets the tenant label
//! inserted as text and is written out. No validation against the model,
//! no keys, no dedup, no metadata.
//!
//! The input is split into byte ranges at line boundaries, one share per
//! worker thread, so that every core works whatever the file sizes.
//!
//! usage: floor RAW_DIR OUT_DIR TENANT WORKERS

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, raw, out, tenant, workers] = &args[..] else {
        eprintln!("usage: floor RAW_DIR OUT_DIR TENANT WORKERS");
        std::process::exit(2);
    };
    let workers: usize = workers.parse().expect("WORKERS is a number");
    let mut files = Vec::new();
    collect(Path::new(raw), &mut files);
    files.sort();
    let sized: Vec<(PathBuf, u64)> = files
        .into_iter()
        .map(|p| {
            let len = fs::metadata(&p).unwrap().len();
            (p, len)
        })
        .collect();
    let total: u64 = sized.iter().map(|(_, l)| l).sum();
    let share = total.div_ceil(workers as u64).max(1);
    // Cut the concatenated input into `workers` shares; each share is a list
    // of (file, start, end) ranges whose ends the workers move to the next
    // line boundary.
    let mut shares: Vec<Vec<(PathBuf, u64, u64)>> = vec![Vec::new(); workers];
    let mut at = 0u64;
    for (path, len) in &sized {
        let mut start = 0;
        while start < *len {
            let w = ((at / share) as usize).min(workers - 1);
            let end = (start + (share * (w as u64 + 1) - at)).min(*len);
            shares[w].push((path.clone(), start, end));
            at += end - start;
            start = end;
        }
    }
    fs::create_dir_all(out).unwrap();
    let label = format!(
        r#""meta":{{"security":[{{"system":"http://thirdopinion.io/identity/claims/tenant","code":"{tenant}"}}]}},"#
    );
    let lines: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = shares
            .iter()
            .enumerate()
            .map(|(w, ranges)| {
                let (out, label) = (Path::new(out), label.as_bytes());
                s.spawn(move || work(ranges, &out.join(format!("{w}.ndjson")), label))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    println!("{lines} lines, {total} bytes");
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|x| x == "ndjson") {
            out.push(p);
        }
    }
}

/// One worker: its ranges, each line parsed, labelled and written.
fn work(ranges: &[(PathBuf, u64, u64)], out: &Path, label: &[u8]) -> u64 {
    let mut w = BufWriter::with_capacity(1 << 20, File::create(out).unwrap());
    let mut lines = 0;
    for (path, start, end) in ranges {
        let f = File::open(path).unwrap();
        // The file's pages in the page cache, mapped: no copy on the way in.
        // SAFETY: the benchmark's input is not changed while it runs.
        let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        let (start, end) = (*start as usize, (*end as usize).min(map.len()));
        // A range owns the lines that start inside it: skip a line cut at
        // the start, read on to the end of the line cut at the end.
        let first = match start {
            0 => 0,
            _ if map[start - 1] == b'\n' => start,
            _ => match memchr(&map[start..]) {
                Some(i) => start + i + 1,
                None => continue,
            },
        };
        if first >= end {
            continue;
        }
        let stop = match map[end - 1] {
            b'\n' => end,
            _ => memchr(&map[end..]).map_or(map.len(), |i| end + i + 1),
        };
        let text = &map[first..stop];
        let mut from = 0;
        for nl in memchr::memchr_iter(b'\n', text).chain(std::iter::once(text.len())) {
            let line = &text[from.min(nl)..nl];
            from = nl + 1;
            if line.is_empty() {
                continue;
            }
            let _: sonic_rs::Value = sonic_rs::from_slice(line).expect("valid JSON");
            let brace = line.iter().position(|&b| b == b'{').expect("an object");
            w.write_all(&line[..=brace]).unwrap();
            w.write_all(label).unwrap();
            w.write_all(&line[brace + 1..]).unwrap();
            w.write_all(b"\n").unwrap();
            lines += 1;
        }
    }
    w.flush().unwrap();
    lines
}

fn memchr(b: &[u8]) -> Option<usize> {
    memchr::memchr(b'\n', b)
}
