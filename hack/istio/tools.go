//go:build tools

// Package tools pins the Istio echo commands this module builds, so go mod tidy
// keeps their dependencies.
package tools

import (
	_ "istio.io/istio/pkg/test/echo/cmd/client"
	_ "istio.io/istio/pkg/test/echo/cmd/server"
)
