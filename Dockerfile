# syntax=docker/dockerfile:1
# The Eastwall image: the `eastwall` binary alone on slim Debian, run as a non-root user.
# Build: docker build -t eastwall:local .    Use: see docker-compose.yml and docs/docker.md.

# --- build stage: the full Rust toolchain, discarded after the build -----------------------
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the crate registry and target dir between builds. The binary is copied
# out of the cached target dir because a cache mount is not part of the image. --locked: the
# image is built from exactly the dependency versions the repository pins in Cargo.lock.
# The release profile keeps line tables for profiling; the shipped binary does not need them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p eastwall --bin eastwall \
 && install -D -m 0755 target/release/eastwall /out/eastwall \
 && strip --strip-debug /out/eastwall

# --- runtime stage: glibc matches the builder (both bookworm) -------------------------------
FROM debian:bookworm-slim
# ca-certificates only; no shell tools beyond what the base image has. /eastwall is where the
# layout (CA, certificates, config, decision log) lives; a named volume mounted there starts
# out owned by the eastwall user, so the sidecar can write its log and token key.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 eastwall \
 && useradd --system --uid 10001 --gid eastwall --home-dir /eastwall --no-create-home \
      --shell /usr/sbin/nologin eastwall \
 && install -d -o eastwall -g eastwall -m 0700 /eastwall
COPY --from=build /out/eastwall /usr/local/bin/eastwall
USER eastwall:eastwall
WORKDIR /eastwall
# 5432: the PostgreSQL front door; 8443: the HTTPS MFA step-up endpoint.
EXPOSE 5432 8443
ENTRYPOINT ["eastwall"]
CMD ["--help"]
