//! Sidecar settings and the policy language: files a security team writes, turned into values.
#![forbid(unsafe_code)]
