//! On-disk metadata (placeholder: the full module docs arrive with the superblock).

pub mod al;
