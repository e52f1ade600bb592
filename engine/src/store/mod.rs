//! Backing storage (in progress).

mod buf;
pub use buf::{AlignedBuf, BufError, BUF_ALIGN, MAX_BUF_LEN, SECTOR_SIZE};
