//! Private PostgreSQL clusters for the test suite and `eastwall demo`: initdb + pg_ctl in a temp dir.
