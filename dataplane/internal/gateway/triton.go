// Package gateway serves the Open Inference Protocol (inference.GRPCInferenceService) in
// front of Triton: checks, canary routing, fallback to stable and per-version figures, with
// requests and answers passed through as raw bytes.
package gateway

import (
	"context"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	"github.com/loopmesh/loopmesh/dataplane/internal/proxy"
)

// Service is the Open Inference Protocol's gRPC service name.
const Service = "inference.GRPCInferenceService"

// ConnectParams reconnect quickly to a local peer that restarts (gRPC's default backoff
// grows to two minutes): within a second, as the Python clients' RECONNECT_OPTIONS do.
var ConnectParams = grpc.ConnectParams{
	Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
	MinConnectTimeout: 5 * time.Second,
}

// Triton is a round-robin pool of connections to one Triton server (several HTTP/2
// connections spread the load over Triton's and our own I/O threads).
type Triton struct {
	conns   []*grpc.ClientConn
	next    atomic.Uint64
	timeout time.Duration
}

// DialTriton opens channels lazy connections to address.
func DialTriton(address string, channels int, timeout time.Duration, creds credentials.TransportCredentials, maxMessage int) (*Triton, error) {
	t := &Triton{timeout: timeout}
	for i := 0; i < max(channels, 1); i++ {
		conn, err := grpc.NewClient(address, append(proxy.DialOptions(),
			grpc.WithTransportCredentials(creds),
			grpc.WithConnectParams(ConnectParams),
			grpc.WithDefaultCallOptions(grpc.ForceCodecV2(proxy.Codec{}),
				grpc.MaxCallRecvMsgSize(maxMessage), grpc.MaxCallSendMsgSize(maxMessage)))...)
		if err != nil {
			t.Close()
			return nil, err
		}
		conn.Connect()
		t.conns = append(t.conns, conn)
	}
	return t, nil
}

// Call invokes method (a full path, "/inference.GRPCInferenceService/X") with the raw request (bytes or proxy.Parts); the deadline is the
// caller's or the Triton timeout, whichever comes first. md carries the trace context.
func (t *Triton) Call(ctx context.Context, method string, req any, md metadata.MD) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, t.timeout)
	defer cancel()
	if md != nil {
		ctx = metadata.NewOutgoingContext(ctx, md)
	}
	conn := t.conns[t.next.Add(1)%uint64(len(t.conns))]
	var resp []byte
	err := conn.Invoke(ctx, method, req, &resp)
	return resp, err
}

// Close closes every connection.
func (t *Triton) Close() {
	for _, c := range t.conns {
		_ = c.Close()
	}
}
