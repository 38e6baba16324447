//! The `eastwall` command line: one module per verb group, each with its clap arguments and `run`.

pub mod audit;
pub mod ca;
pub mod demo;
pub mod mfa;
pub mod policy;
pub mod proxy;
pub mod quickstart;
