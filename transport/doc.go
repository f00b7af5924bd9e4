// Package transport holds coordflow's wire protocol: the protobuf messages and
// gRPC services of the control plane (workerd <-> coordd leader) and the data
// plane (source task -> map task). The generated code is committed so that a
// build needs no protoc; regenerate it with `go generate ./transport`.
package transport

//go:generate protoc --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative coordflow.proto
