//! The decision log: durable, hash-chained JSON lines written with group commit; `verify` checks the chain.
