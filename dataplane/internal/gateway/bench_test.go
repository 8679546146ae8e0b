package gateway

import (
	"context"
	"testing"
	"time"
)

// BenchmarkModelInfer measures a routed ModelInfer through the gateway to an in-process
// Triton double (the client, gateway and double share the CPU).
func BenchmarkModelInfer(b *testing.B) {
	h := newHarness(b, nil, 2*time.Second)
	h.setRoutes(b, `{"ready": true, "routes": {"m": {"stable": 1, "canary": 2, "weight": 0.5, "known": [1, 2]}}}`)
	req := inferRequest("m", "", "user-1")
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := h.call(context.Background(), "ModelInfer", req); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
