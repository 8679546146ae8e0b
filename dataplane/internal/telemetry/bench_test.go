package telemetry

import (
	"context"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
)

func BenchmarkRequestMetrics(b *testing.B) {
	m := NewMetrics()
	b.ReportAllocs()
	for b.Loop() {
		m.Request("ModelInfer", "bench", "1", codes.OK, 0.001)
	}
}

// BenchmarkTracingOff: a call with the usual gRPC headers and no trace context.
func BenchmarkTracingOff(b *testing.B) {
	tr, _ := NewTracing(context.Background(), "", "test", nil)
	ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs(
		":authority", "127.0.0.1:1", "content-type", "application/grpc", "user-agent", "grpc-go/1.76.0", "te", "trailers"))
	b.ReportAllocs()
	for b.Loop() {
		_, span, _ := tr.Start(ctx, "ModelInfer")
		span.End()
	}
}
