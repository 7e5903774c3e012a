// Package proto holds tokend's protobuf contracts and their generated Go
// code. Run `go generate ./proto` after editing a .proto file; protoc comes
// from Debian's protobuf-compiler, the Go plugins are pinned in go.mod.
package proto

//go:generate sh -c "protoc -I . --plugin=protoc-gen-go=$(go tool -n protoc-gen-go) --plugin=protoc-gen-go-grpc=$(go tool -n protoc-gen-go-grpc) --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative tokend/v1/tokend.proto tokend/store/v1/record.proto"
