//! `eastwall demo`: the seed's lateral-movement story, played against a private PostgreSQL.
