//! NBD frontend (in progress)
