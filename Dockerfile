# syntax=docker/dockerfile:1
#
# Mayfly's two images, from one build:
#
#   docker build --target server -t mayfly-server:0.1.0 .
#   docker build --target agent  -t mayfly-agent:0.1.0 .
#
# The builder compiles both binaries once (BuildKit caches the build between the two targets).
# The runtime images are distroless (glibc, libgcc, CA certificates; no shell, no package
# manager): the server runs as the unprivileged user 65532, the agent as root, which it needs
# on the node (see docs/kubernetes.md, "Security posture").

ARG RUST_IMAGE=rust:1.95-bookworm
ARG SERVER_BASE=gcr.io/distroless/cc-debian12:nonroot
ARG AGENT_BASE=gcr.io/distroless/cc-debian12

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# The registry and target caches speed up rebuilds; the binaries are copied out of the cached
# target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mayfly-server -p mayfly-agent \
    && mkdir -p /out \
    && cp target/release/mayfly-server target/release/mayfly-agent /out/

FROM ${SERVER_BASE} AS server
COPY --from=builder /out/mayfly-server /usr/local/bin/mayfly-server
# 65532 is distroless' "nonroot" user; the Helm chart runs the server as the same ids.
USER 65532:65532
# 8081: node API (gRPC over mutual TLS); 8082: public HTTP (health, bundle, CRLs).
EXPOSE 8081 8082
ENTRYPOINT ["/usr/local/bin/mayfly-server"]
CMD ["run", "--config", "/etc/mayfly/server.toml"]

FROM ${AGENT_BASE} AS agent
COPY --from=builder /out/mayfly-agent /usr/local/bin/mayfly-agent
USER 0:0
# 8088: /healthz and /readyz.
EXPOSE 8088
ENTRYPOINT ["/usr/local/bin/mayfly-agent"]
CMD ["run", "--config", "/etc/mayfly/agent.toml"]
