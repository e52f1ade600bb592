//! Reading a node's log file (its stderr): tails for failure messages, and the search for
//! the line that explains why the daemon refused hostile input.
//!
//! The agreed refusal vocabulary ([`REFUSAL_WORDS`], case-insensitive): "malformed",
//! "refus", "invalid", "bad", "protocol error", plus "truncat", "too large", "too long",
//! "exceed", "reject", "unexpected" so that a precise message about a truncated packet or
//! an oversized length also counts. A search only looks at bytes appended after an offset
//! taken before the attack, so an older line never satisfies it. At most the last
//! [`READ_LIMIT`] bytes of a log are read.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Words (lower case) of which a refusal line must contain at least one.
pub const REFUSAL_WORDS: &[&str] = &[
    "malformed",
    "refus",
    "invalid",
    "bad",
    "protocol error",
    "truncat",
    "too large",
    "too long",
    "exceed",
    "reject",
    "unexpected",
];

/// Most bytes read from a log at once (logs of these tests are far smaller).
pub const READ_LIMIT: u64 = 16 << 20;

/// Removes ANSI escape sequences (`ESC [ ... letter`), in case the daemon colours its log.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c2 in chars.by_ref() {
                    if c2.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Current length of the log file (0 if it does not exist yet).
pub fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The log text appended after byte `offset` (capped at [`READ_LIMIT`], ANSI removed).
pub fn log_since(path: &Path, offset: u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let start = offset.max(len.saturating_sub(READ_LIMIT));
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(READ_LIMIT).read_to_end(&mut buf);
    strip_ansi(&String::from_utf8_lossy(&buf))
}

/// The last `n` lines of the log.
pub fn log_tail(path: &Path, n: usize) -> String {
    let len = log_len(path);
    crate::bin::tail_lines(&log_since(path, len.saturating_sub(256 << 10)), n)
}

/// The first line of `text` that contains a refusal word.
pub fn find_refusal(text: &str) -> Option<&str> {
    text.lines().find(|l| is_refusal(l))
}

/// Whether `line` contains one of [`REFUSAL_WORDS`] (case-insensitive).
pub fn is_refusal(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    REFUSAL_WORDS.iter().any(|w| l.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_removed() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[33mWARN\u{1b}[0m malformed"),
            "2026 WARN malformed"
        );
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn refusal_words() {
        assert!(is_refusal(
            "WARN replication: Malformed packet from 127.0.0.1:5555"
        ));
        assert!(is_refusal(
            "nbd: REFUSED request: length 1073741824 too large"
        ));
        assert!(is_refusal("Protocol error: bad magic"));
        assert!(!is_refusal("INFO connected to beta"));
        assert_eq!(
            find_refusal("a\nINFO ok\nWARN invalid json on mgmt socket\n"),
            Some("WARN invalid json on mgmt socket")
        );
    }

    #[test]
    fn since_offset() {
        let d = crate::TempDir::new("logs");
        let p = d.join("log");
        std::fs::write(&p, "old bad line\n").expect("write log");
        let off = log_len(&p);
        assert_eq!(find_refusal(&log_since(&p, off)), None);
        std::fs::write(&p, "old bad line\nnew malformed line\n").expect("write log");
        assert_eq!(
            find_refusal(&log_since(&p, off)),
            Some("new malformed line")
        );
        assert_eq!(log_tail(&p, 1), "new malformed line");
    }
}
