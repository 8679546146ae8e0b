// Command loopmesh-passthrough is the floor the inference bench measures the data plane's
// ModelInfer against: the least a gRPC-go proxy does, unary calls forwarded to one upstream as
// raw bytes over one connection, with the data plane's transport options (windows, stream
// workers) and nothing else: no parsing, checks, routing, tracing or metrics.
//
//	loopmesh-passthrough -listen 127.0.0.1:0 -upstream 127.0.0.1:8001
//
// It prints the address it listens on, then serves until it is killed.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/loopmesh/loopmesh/dataplane/internal/proxy"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "host:port to serve on (plaintext)")
	upstream := flag.String("upstream", "", "host:port every call goes to (plaintext)")
	flag.Parse()
	if err := run(*listen, *upstream); err != nil {
		fmt.Fprintln(os.Stderr, "loopmesh-passthrough:", err)
		os.Exit(1)
	}
}

func run(listen, upstream string) error {
	if upstream == "" {
		return fmt.Errorf("-upstream is required")
	}
	conn, err := grpc.NewClient(upstream, append(proxy.DialOptions(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(proxy.Codec{}), grpc.MaxCallRecvMsgSize(1<<30)))...)
	if err != nil {
		return err
	}
	defer conn.Close()
	forward := func(_ any, stream grpc.ServerStream) error {
		method, _ := grpc.MethodFromServerStream(stream)
		var req, resp []byte
		if err := stream.RecvMsg(&req); err != nil {
			return err
		}
		if err := conn.Invoke(stream.Context(), method, req, &resp); err != nil {
			return err
		}
		return stream.SendMsg(resp)
	}
	server := grpc.NewServer(append(proxy.ServerOptions(), grpc.ForceServerCodecV2(proxy.Codec{}),
		grpc.MaxRecvMsgSize(1<<30), grpc.UnknownServiceHandler(forward))...)
	lis, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	fmt.Println(lis.Addr().String())
	return server.Serve(lis)
}
