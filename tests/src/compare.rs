//! Byte-for-byte comparison of two replicas, reporting the first differing 4 KiB block.
//!
//! Replicas are compared over the exported volume's bytes (`size_bytes` from status): the
//! data area starts at offset 0 of the backing file, while anything the daemon keeps
//! after it (internal metadata: superblock, activity log, bitmap) is per node and may
//! legitimately differ. Files are read in 1 MiB chunks, so memory stays bounded.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;

/// The unit a difference is reported in: DRBD's bitmap granularity.
pub const BLOCK: u64 = 4096;
const CHUNK: usize = 1 << 20;

/// Where two files first differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// Bytes differ inside the compared range.
    Data {
        /// Index of the first differing 4 KiB block.
        block: u64,
        /// Offset of the first differing byte.
        offset: u64,
        /// Up to 16 bytes of each file from `offset`.
        a: Vec<u8>,
        /// Up to 16 bytes of each file from `offset`.
        b: Vec<u8>,
    },
    /// One file ends before the compared range does.
    Short {
        /// Length of the first file.
        len_a: u64,
        /// Length of the second file.
        len_b: u64,
        /// The length that was to be compared.
        wanted: u64,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Data {
                block,
                offset,
                a,
                b,
            } => write!(
                f,
                "first differing 4 KiB block #{block} (bytes {}..{}), first differing byte at \
                 {offset}: {} vs {}",
                block * BLOCK,
                (block + 1) * BLOCK,
                hex(a),
                hex(b)
            ),
            Difference::Short {
                len_a,
                len_b,
                wanted,
            } => write!(
                f,
                "files too short to compare {wanted} bytes: {len_a} and {len_b} bytes"
            ),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while let Some(rest) = buf.get_mut(n..) {
        if rest.is_empty() {
            break;
        }
        match f.read(rest)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Compares the first `len` bytes of `a` and `b` (the whole files, which must then have the
/// same length, when `len` is `None`). `Ok(None)` means identical.
pub fn first_difference(
    a: &Path,
    b: &Path,
    len: Option<u64>,
) -> std::io::Result<Option<Difference>> {
    let mut fa = File::open(a)?;
    let mut fb = File::open(b)?;
    let len_a = fa.metadata()?.len();
    let len_b = fb.metadata()?.len();
    let wanted = match len {
        Some(l) => l,
        None if len_a == len_b => len_a,
        None => {
            return Ok(Some(Difference::Short {
                len_a,
                len_b,
                wanted: len_a.max(len_b),
            }))
        }
    };
    if len_a < wanted || len_b < wanted {
        return Ok(Some(Difference::Short {
            len_a,
            len_b,
            wanted,
        }));
    }
    let mut ba = vec![0u8; CHUNK];
    let mut bb = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < wanted {
        let n = usize::try_from((wanted - pos).min(CHUNK as u64)).unwrap_or(CHUNK);
        let (Some(ca), Some(cb)) = (ba.get_mut(..n), bb.get_mut(..n)) else {
            break;
        };
        let ra = read_full(&mut fa, ca)?;
        let rb = read_full(&mut fb, cb)?;
        if ra != n || rb != n {
            // The file shrank while we read it.
            return Ok(Some(Difference::Short {
                len_a: pos + ra as u64,
                len_b: pos + rb as u64,
                wanted,
            }));
        }
        if ca != cb {
            let i = ca
                .iter()
                .zip(cb.iter())
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            let offset = pos + i as u64;
            let end = (i + 16).min(n);
            return Ok(Some(Difference::Data {
                block: offset / BLOCK,
                offset,
                a: ca.get(i..end).unwrap_or_default().to_vec(),
                b: cb.get(i..end).unwrap_or_default().to_vec(),
            }));
        }
        pos += n as u64;
    }
    Ok(None)
}

/// Panics with the first differing 4 KiB block unless the first `len` bytes of `a` and `b`
/// (whole files when `None`) are identical.
pub fn assert_same_content(a: &Path, b: &Path, len: Option<u64>) {
    match first_difference(a, b, len) {
        Ok(None) => {}
        Ok(Some(d)) => panic!("{} and {} differ: {d}", a.display(), b.display()),
        Err(e) => panic!("cannot compare {} and {}: {e}", a.display(), b.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TempDir;

    #[test]
    fn identical_and_different() {
        let d = TempDir::new("compare");
        let mut data = vec![7u8; 3 * CHUNK + 100];
        std::fs::write(d.join("a"), &data).expect("write a");
        std::fs::write(d.join("b"), &data).expect("write b");
        assert_eq!(
            first_difference(&d.join("a"), &d.join("b"), None).expect("cmp"),
            None
        );

        let off = 2 * CHUNK + 5 * 4096 + 17;
        if let Some(x) = data.get_mut(off) {
            *x = 8;
        }
        std::fs::write(d.join("b"), &data).expect("write b");
        let diff = first_difference(&d.join("a"), &d.join("b"), None)
            .expect("cmp")
            .expect("must differ");
        let want_block = (off as u64) / BLOCK;
        match &diff {
            Difference::Data {
                block,
                offset,
                a,
                b,
            } => {
                assert_eq!(*block, want_block);
                assert_eq!(*offset, off as u64);
                assert_eq!(a.first(), Some(&7));
                assert_eq!(b.first(), Some(&8));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(diff.to_string().contains(&format!("block #{want_block}")));

        // A limit before the difference: identical.
        assert_eq!(
            first_difference(&d.join("a"), &d.join("b"), Some(off as u64)).expect("cmp"),
            None
        );
    }

    #[test]
    fn lengths() {
        let d = TempDir::new("compare-len");
        std::fs::write(d.join("a"), vec![0u8; 8192]).expect("write a");
        std::fs::write(d.join("b"), vec![0u8; 4096]).expect("write b");
        assert!(matches!(
            first_difference(&d.join("a"), &d.join("b"), None).expect("cmp"),
            Some(Difference::Short { .. })
        ));
        assert_eq!(
            first_difference(&d.join("a"), &d.join("b"), Some(4096)).expect("cmp"),
            None
        );
        assert!(matches!(
            first_difference(&d.join("a"), &d.join("b"), Some(8192)).expect("cmp"),
            Some(Difference::Short { .. })
        ));
    }

    #[test]
    #[should_panic(expected = "first differing 4 KiB block #1 ")]
    fn assert_reports_block() {
        let d = TempDir::new("compare-panic");
        let a = vec![0u8; 3 * 4096];
        let mut b = a.clone();
        if let Some(x) = b.get_mut(4096 + 3) {
            *x = 1;
        }
        std::fs::write(d.join("a"), a).expect("write a");
        std::fs::write(d.join("b"), b).expect("write b");
        assert_same_content(&d.join("a"), &d.join("b"), None);
    }
}
