// Package ferryv1 holds Ferry's wire contract between operator, agent and CLI.
package ferryv1

//go:generate protoc --plugin=protoc-gen-go=../../hack/bin/protoc-gen-go --go_out=. --go_opt=paths=source_relative state.proto
