//! tandem-ublk: the ublk server library (control device + one io_uring per queue).
//!
//! Not built yet: the ublk frontend is its own issue. Hosts without `ublk_drv` (the
//! development machine among them) serve volumes over NBD; this crate exists now so the
//! workspace layout of docs/design.md §1 holds and the crate boundary is fixed.
