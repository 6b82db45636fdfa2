# syntax=docker/dockerfile:1
# ferry-operator image: the control plane (watches, mesh CA, gRPC Discovery and
# Certificates). Build from the repository root:
#
#   docker buildx build -f deploy/docker/ferry-operator.Dockerfile \
#     --platform linux/amd64,linux/arm64 -t ghcr.io/ferrymesh/ferry-operator:TAG .
#
# A static Go binary on distroless: no shell, no package manager, runs as the
# image's nonroot user (65532), which the Deployment also sets.

FROM --platform=$BUILDPLATFORM golang:1.26 AS build
ARG TARGETOS TARGETARCH
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
# CGO off: distroless/static has no libc. The Go toolchain cross-compiles for
# TARGETARCH on the build machine's architecture.
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags="-s -w" -o /out/ferry-operator ./cmd/ferry-operator

FROM gcr.io/distroless/static:nonroot
COPY --from=build /out/ferry-operator /usr/local/bin/ferry-operator
USER 65532:65532
EXPOSE 15012 15014 15021
ENTRYPOINT ["/usr/local/bin/ferry-operator"]
