# syntax=docker/dockerfile:1
# sluice container image: a glibc build (aws-lc-rs compiles C) on distroless/cc, run as the
# distroless nonroot user (65532). Build and push:
#   docker build -t registry.example.org/sluice:0.1.0 .
#   docker push registry.example.org/sluice:0.1.0
# The config is not in the image: mount it at /etc/sluice/sluice.toml (see
# deploy/kubernetes/sidecar.yaml).

FROM rust:1-bookworm AS build
WORKDIR /src
# The whole context (see .dockerignore): Cargo.toml declares [[bench]] targets in benches/, and
# [patch.crates-io] takes russh from vendor/russh.
COPY . .
# Registry and target dir in BuildKit caches; the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin sluice \
 && cp target/release/sluice /sluice

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /sluice /sluice
USER 65532:65532
# 8443: the TLS port (the Service maps 443 to it); 9090: admin (/livez, /readyz, /metrics).
EXPOSE 8443 9090
ENTRYPOINT ["/sluice"]
CMD ["serve", "--config", "/etc/sluice/sluice.toml"]
