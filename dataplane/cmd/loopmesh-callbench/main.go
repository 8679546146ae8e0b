// Command loopmesh-callbench times sequential unary gRPC calls of one serialized request, as
// a lean client: raw bytes both ways (nothing decoded), one connection, one call at a time.
// The benchmarks use it to time a server without a Python client's cost (or ghz's, which
// decodes every response into a dynamic message: milliseconds for large answers).
//
//	loopmesh-callbench -target 127.0.0.1:50053 -method /loopmesh.v1.FeatureService/GetOnlineFeatures \
//	    -request req.bin -calls 200 -warmup 20
//
// It prints one JSON object: {"latencies_ms": [...], "errors": N, "first_error": "..."}.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/loopmesh/loopmesh/dataplane/internal/proxy"
)

func main() {
	target := flag.String("target", "", "host:port (plaintext)")
	method := flag.String("method", "", "full method, /pkg.Service/Method")
	request := flag.String("request", "", "file holding the serialized request")
	calls := flag.Int("calls", 100, "timed calls")
	warmup := flag.Int("warmup", 10, "calls made first, not timed")
	token := flag.String("token", "", "bearer token (optional)")
	flag.Parse()
	if err := run(*target, *method, *request, *token, *calls, *warmup); err != nil {
		fmt.Fprintln(os.Stderr, "loopmesh-callbench:", err)
		os.Exit(1)
	}
}

func run(target, method, requestFile, token string, calls, warmup int) error {
	if target == "" || method == "" || requestFile == "" || calls < 1 {
		return fmt.Errorf("-target, -method, -request and -calls >= 1 are required")
	}
	req, err := os.ReadFile(requestFile)
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(proxy.Codec{}), grpc.MaxCallRecvMsgSize(1<<30)))
	if err != nil {
		return err
	}
	defer conn.Close()
	base := context.Background()
	if token != "" {
		base = metadata.AppendToOutgoingContext(base, "authorization", "Bearer "+token)
	}
	out := struct {
		LatenciesMs []float64 `json:"latencies_ms"`
		Errors      int       `json:"errors"`
		FirstError  string    `json:"first_error"`
	}{LatenciesMs: make([]float64, 0, calls)}
	for i := 0; i < warmup+calls; i++ {
		ctx, cancel := context.WithTimeout(base, 10*time.Second)
		var resp []byte
		start := time.Now()
		err := conn.Invoke(ctx, method, req, &resp)
		elapsed := time.Since(start)
		cancel()
		if i < warmup {
			continue
		}
		if err != nil {
			if out.Errors == 0 {
				out.FirstError = err.Error()
			}
			out.Errors++
			continue
		}
		out.LatenciesMs = append(out.LatenciesMs, float64(elapsed.Nanoseconds())/1e6)
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}
