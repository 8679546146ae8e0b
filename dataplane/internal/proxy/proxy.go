package proxy

import (
	"context"
	"errors"
	"io"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// streamDesc covers every kind of call: unary and streaming alike travel as a bidi stream.
var streamDesc = &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}

// Handler returns a grpc.UnknownServiceHandler that forwards calls to backend unchanged:
// incoming metadata (authorization, traceparent...) goes out, and the backend's headers,
// messages, trailers and status come back. Calls to a method of a service in local (served
// here) answer UNIMPLEMENTED. done is called with the service and the final code.
func Handler(backend *grpc.ClientConn, local []string, done func(service string, code codes.Code)) grpc.StreamHandler {
	return func(_ any, ss grpc.ServerStream) error {
		method, ok := grpc.MethodFromServerStream(ss)
		if !ok {
			return status.Error(codes.Internal, "proxy: no method in stream")
		}
		service, name := split(method)
		for _, l := range local {
			if service == l {
				return status.Errorf(codes.Unimplemented, "unknown method %s for service %s", name, service)
			}
		}
		err := forward(ss, backend, method)
		if done != nil {
			done(service, status.Code(err))
		}
		return err
	}
}

// OutgoingContext is ctx with the caller's metadata (authorization, traceparent...) set to
// go out on a call to the backend.
func OutgoingContext(ctx context.Context) context.Context {
	md, _ := metadata.FromIncomingContext(ctx)
	out := md.Copy()
	// Transport-level entries are the client connection's own business; the deadline
	// travels with the context.
	for _, k := range []string{":authority", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout"} {
		delete(out, k)
	}
	return metadata.NewOutgoingContext(ctx, out)
}

func forward(ss grpc.ServerStream, backend *grpc.ClientConn, method string) error {
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	cs, err := backend.NewStream(OutgoingContext(ctx), streamDesc, method)
	if err != nil {
		return err
	}
	up := make(chan error, 1)
	down := make(chan error, 1)
	go func() { up <- pumpUp(ss, cs) }()
	go func() { down <- pumpDown(cs, ss) }()
	for {
		select {
		case err := <-up:
			if err == nil {
				up = nil // the caller half-closed; wait for the backend's answer
				continue
			}
			cancel() // the caller is gone (or the message could not go out): stop the backend call
			if _, ok := status.FromError(err); ok {
				return err
			}
			return status.FromContextError(err).Err()
		case err := <-down:
			ss.SetTrailer(cs.Trailer())
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err // the backend's status, unchanged
		}
	}
}

// pumpUp copies caller -> backend; nil when the caller half-closed.
func pumpUp(ss grpc.ServerStream, cs grpc.ClientStream) error {
	for {
		var frame []byte
		if err := ss.RecvMsg(&frame); err != nil {
			if errors.Is(err, io.EOF) {
				return cs.CloseSend()
			}
			return err
		}
		if err := cs.SendMsg(frame); err != nil {
			if errors.Is(err, io.EOF) {
				// The backend ended the call; its status comes through pumpDown.
				return nil
			}
			return err
		}
	}
}

// pumpDown copies backend -> caller, headers first; io.EOF when the backend ended with OK.
func pumpDown(cs grpc.ClientStream, ss grpc.ServerStream) error {
	hdr, err := cs.Header()
	if err != nil {
		return err
	}
	if hdr != nil {
		if err := ss.SendHeader(hdr); err != nil {
			return err
		}
	}
	for {
		var frame []byte
		if err := cs.RecvMsg(&frame); err != nil {
			return err
		}
		if err := ss.SendMsg(frame); err != nil {
			return err
		}
	}
}

// split parses "/pkg.Service/Method".
func split(method string) (service, name string) {
	method = strings.TrimPrefix(method, "/")
	if i := strings.LastIndexByte(method, '/'); i >= 0 {
		return method[:i], method[i+1:]
	}
	return method, ""
}
