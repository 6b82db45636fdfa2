# syntax=docker/dockerfile:1
# ferry-agent image: the node agent. Build from the repository root:
#
#   docker buildx build -f deploy/docker/ferry-agent.Dockerfile \
#     --platform linux/amd64,linux/arm64 -t ghcr.io/ferrymesh/ferry-agent:TAG .
#
# The eBPF objects are compiled ahead and committed (bpf/*_bpfel.o, embedded by
# bpf2go's Go files), so the build needs no clang, and the programs are CO-RE
# free networking hooks that load on any little-endian kernel with the features
# docs/install.md lists. The image needs nothing beyond the static binary: no
# iproute2, no mount(8) (`ferry-agent --mount-bpffs` mounts bpffs), no shell.

FROM --platform=$BUILDPLATFORM golang:1.26 AS build
ARG TARGETOS TARGETARCH
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags="-s -w" -o /out/ferry-agent ./cmd/ferry-agent

# Not the nonroot variant: the agent runs as root with a short list of added
# capabilities (see deploy/agent/daemonset.yaml); the DaemonSet says so too.
FROM gcr.io/distroless/static
COPY --from=build /out/ferry-agent /usr/local/bin/ferry-agent
EXPOSE 15020 15021
ENTRYPOINT ["/usr/local/bin/ferry-agent"]
