//! Shared helpers for the end-to-end suite.
#![forbid(unsafe_code)]
