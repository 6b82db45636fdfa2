// Package ferryv1 holds Ferry's wire contract between operator, agent and CLI.
package ferryv1

//go:generate protoc --plugin=protoc-gen-go=../../hack/bin/protoc-gen-go --plugin=protoc-gen-go-grpc=../../hack/bin/protoc-gen-go-grpc --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative state.proto discovery.proto observer.proto
