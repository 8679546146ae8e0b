package proxy

import (
	"runtime"

	"google.golang.org/grpc"
)

// Flow-control windows of every connection the data plane serves or opens. Fixed windows
// turn off gRPC's BDP estimator, which otherwise keeps pinging the peer while data flows
// (small messages never grow its estimate, so the pings never stop): a PING written and an
// ACK read and answered on every connection, about once per round trip, for nothing. The
// sizes are what the estimator would grow to for large tensors on a fast link.
const (
	StreamWindow = 4 << 20
	ConnWindow   = 16 << 20
)

// StreamWorkers is how many goroutines serve calls, kept between calls. gRPC's default runs
// each call on a fresh goroutine, whose stack then grows from 8 KiB by copying, twice, on
// every ModelInfer (the call to Triton is deep): about a tenth of the data plane's CPU under
// load. A call that finds every worker busy gets a fresh goroutine as before. Each worker
// keeps its grown stack (32 KiB): 8 MiB for all of them.
const StreamWorkers = 256

// ServerOptions tune the transport of the public port.
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.InitialWindowSize(StreamWindow),
		grpc.InitialConnWindowSize(ConnWindow),
		grpc.NumStreamWorkers(uint32(max(runtime.GOMAXPROCS(0), StreamWorkers))),
	}
}

// DialOptions tune the transport of a connection the data plane opens.
func DialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithInitialWindowSize(StreamWindow),
		grpc.WithInitialConnWindowSize(ConnWindow),
	}
}
