# syntax=docker/dockerfile:1
#
# healthgate container image: a release build on the official Rust image,
# copied into a distroless runtime (glibc + libgcc, no shell, no package
# manager) that runs as the non-root user 65532.
#
#   docker build -t healthgate:0.1.0 .
#   docker build -t healthgate:0.1.0 --build-arg FEATURES="..." .
#   docker run --rm -p 8080:8080 -p 9901:9901 \
#       -v "$PWD/config.yaml:/etc/healthgate/config/healthgate.yaml:ro" healthgate:0.1.0
#
# Build arguments:
#   RUST_VERSION   Rust toolchain of the builder image (default 1.95; the
#                  crate's rust-version in Cargo.toml is the minimum).
#   DEBIAN_RELEASE Debian release of the builder; it must match the runtime
#                  image's glibc (bookworm <-> distroless *-debian12).
#   RUNTIME_IMAGE  The final base image. Any glibc image works, e.g.
#                  debian:bookworm-slim when you want a shell for debugging.
#   FEATURES       Cargo features to enable, space or comma separated
#                  (default: none, i.e. the default features).
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts,
# which keep the cargo registry and target/ between builds.
#
# Not a static (musl) binary on purpose: healthgate's performance figures
# were measured against glibc (its resolver; the allocator is jemalloc, built
# from source by tikv-jemalloc-sys with the options in .cargo/config.toml,
# which COPY brings along). The runtime image only needs glibc and libgcc_s,
# which distroless/cc provides.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
ARG FEATURES=""
WORKDIR /src
# The whole context (.dockerignore trims it): Cargo.toml may name benches or
# tests whose files cargo needs to read the manifest, even unbuilt.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin healthgate ${FEATURES:+--features "$FEATURES"} \
 && install -D -m 0755 target/release/healthgate /out/healthgate \
 && /out/healthgate --version

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/healthgate /usr/local/bin/healthgate
# The repository's example config, used when nothing else is mounted there.
# In Kubernetes the ConfigMap is mounted over this directory.
COPY config.yaml /etc/healthgate/config/healthgate.yaml
ENV HEALTHGATE_CONFIG=/etc/healthgate/config/healthgate.yaml
# Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532
# 8080: the example listener `web`; 9901: the admin server (probes, /status, /metrics).
EXPOSE 8080 9901
# No HEALTHCHECK: Kubernetes ignores it; use the /livez, /readyz and
# /startupz probes (deploy/kubernetes/deployment.yaml).
ENTRYPOINT ["/usr/local/bin/healthgate"]
CMD ["run"]
