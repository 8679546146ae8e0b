package gateway

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/loopmesh/loopmesh/dataplane/internal/auth"
	"github.com/loopmesh/loopmesh/dataplane/internal/oip"
	"github.com/loopmesh/loopmesh/dataplane/internal/proxy"
	"github.com/loopmesh/loopmesh/dataplane/internal/routing"
	"github.com/loopmesh/loopmesh/dataplane/internal/stats"
	"github.com/loopmesh/loopmesh/dataplane/internal/telemetry"
)

// fakeTriton answers inference.GRPCInferenceService calls with canned bytes and remembers
// what it received.
type fakeTriton struct {
	mu       sync.Mutex
	received map[string][][]byte
	md       []metadata.MD
	deadline []time.Duration
	answer   func(method string, req []byte) ([]byte, error)
}

func (f *fakeTriton) desc() *grpc.ServiceDesc {
	d := &grpc.ServiceDesc{ServiceName: Service, HandlerType: (*any)(nil)}
	for _, name := range []string{"ModelInfer", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelConfig"} {
		name := name
		d.Methods = append(d.Methods, grpc.MethodDesc{MethodName: name, Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			var req []byte
			if err := dec(&req); err != nil {
				return nil, err
			}
			md, _ := metadata.FromIncomingContext(ctx)
			dl, _ := ctx.Deadline()
			f.mu.Lock()
			f.received[name] = append(f.received[name], req)
			f.md = append(f.md, md)
			f.deadline = append(f.deadline, time.Until(dl))
			f.mu.Unlock()
			return f.answer(name, req)
		}})
	}
	return d
}

func (f *fakeTriton) last(method string) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	got := f.received[method]
	if len(got) == 0 {
		return nil
	}
	return got[len(got)-1]
}

func (f *fakeTriton) count(method string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.received[method])
}

// fakeBackend is the control plane: a unary echo and a bidi echo that show the metadata
// they got, set headers and trailers, and fail on request.
func backendDesc() *grpc.ServiceDesc {
	return &grpc.ServiceDesc{
		ServiceName: "loopmesh.v1.InferenceService",
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{MethodName: "Predict", Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			var req []byte
			if err := dec(&req); err != nil {
				return nil, err
			}
			md, _ := metadata.FromIncomingContext(ctx)
			_ = grpc.SetHeader(ctx, metadata.Pairs("x-header", "h1"))
			_ = grpc.SetTrailer(ctx, metadata.Pairs("x-trailer", "t1"))
			if string(req) == "fail" {
				return nil, status.Error(codes.NotFound, "no such entity")
			}
			echo := strings.Join(md.Get("authorization"), ",") + "|" + strings.Join(md.Get("traceparent"), ",") + "|" + string(req)
			return []byte(echo), nil
		}}},
		Streams: []grpc.StreamDesc{{StreamName: "PredictStream", ServerStreams: true, ClientStreams: true,
			Handler: func(_ any, ss grpc.ServerStream) error {
				_ = ss.SendHeader(metadata.Pairs("x-stream", "s1"))
				for {
					var m []byte
					if err := ss.RecvMsg(&m); err != nil {
						if errors.Is(err, io.EOF) {
							ss.SetTrailer(metadata.Pairs("x-done", "yes"))
							return nil
						}
						return err
					}
					if err := ss.SendMsg(append([]byte("echo:"), m...)); err != nil {
						return err
					}
				}
			}}},
	}
}

type harness struct {
	triton *fakeTriton
	routes *routing.Store
	stats  *stats.Recorder
	conn   *grpc.ClientConn
}

func serveOn(t testing.TB, s *grpc.Server) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.Serve(lis) }()
	t.Cleanup(s.Stop)
	return lis.Addr().String()
}

func dial(t testing.TB, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(proxy.Codec{})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func newHarness(t testing.TB, tokens []auth.Token, tritonTimeout time.Duration) *harness {
	h := &harness{triton: &fakeTriton{received: map[string][][]byte{}}, routes: routing.NewStore(), stats: stats.New(0, 0)}
	h.triton.answer = func(string, []byte) ([]byte, error) { return []byte("answer"), nil }
	ts := grpc.NewServer(grpc.ForceServerCodecV2(proxy.Codec{}))
	ts.RegisterService(h.triton.desc(), struct{}{})
	tritonAddr := serveOn(t, ts)

	bs := grpc.NewServer(grpc.ForceServerCodecV2(proxy.Codec{}))
	bs.RegisterService(backendDesc(), struct{}{})
	backend := dial(t, serveOn(t, bs))

	triton, err := DialTriton(tritonAddr, 2, tritonTimeout, insecure.NewCredentials(), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(triton.Close)
	tracing, _ := telemetry.NewTracing(context.Background(), "", "test", nil)
	metrics := telemetry.NewMetrics()
	s := grpc.NewServer(grpc.ForceServerCodecV2(proxy.Codec{}),
		grpc.UnknownServiceHandler(proxy.Handler(backend, []string{Service}, metrics.Proxied)))
	(&Gateway{Triton: triton, Routes: h.routes, Stats: h.stats, Metrics: metrics,
		Auth: auth.New(tokens), Tracing: tracing}).Register(s)
	h.conn = dial(t, serveOn(t, s))
	return h
}

func (h *harness) setRoutes(t testing.TB, body string) {
	t.Helper()
	table, err := routing.Parse([]byte(body))
	if err != nil {
		t.Fatal(err)
	}
	h.routes.Replace(table)
}

func (h *harness) call(ctx context.Context, method string, req []byte, opts ...grpc.CallOption) ([]byte, error) {
	var resp []byte
	err := h.conn.Invoke(ctx, "/"+Service+"/"+method, req, &resp, opts...)
	return resp, err
}

// inferRequest is a valid ModelInferRequest: one FP32 [1, 2] input as raw contents.
func inferRequest(model, version, id string) []byte {
	b := protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), model)
	if version != "" {
		b = protowire.AppendString(protowire.AppendTag(b, 2, protowire.BytesType), version)
	}
	if id != "" {
		b = protowire.AppendString(protowire.AppendTag(b, 3, protowire.BytesType), id)
	}
	tensor := append(oip.StringField(1, "x"), oip.StringField(2, "FP32")...)
	tensor = protowire.AppendBytes(protowire.AppendTag(tensor, 3, protowire.BytesType), []byte{1, 2})
	b = protowire.AppendBytes(protowire.AppendTag(b, 5, protowire.BytesType), tensor)
	return protowire.AppendBytes(protowire.AppendTag(b, 7, protowire.BytesType), make([]byte, 8))
}

func versionOf(t *testing.T, req []byte) string {
	t.Helper()
	r, err := oip.ParseInferRequest(req)
	if err != nil {
		t.Fatal(err)
	}
	return r.ModelVersion
}

func wantStatus(t *testing.T, err error, code codes.Code, msg string) {
	t.Helper()
	s := status.Convert(err)
	if s.Code() != code || s.Message() != msg {
		t.Fatalf("got %v %q, want %v %q", s.Code(), s.Message(), code, msg)
	}
}

func TestModelInferForwardsAndRoutes(t *testing.T) {
	h := newHarness(t, nil, 2*time.Second)
	ctx := context.Background()
	req := inferRequest("m", "", "r1")
	resp, err := h.call(ctx, "ModelInfer", req)
	if err != nil || string(resp) != "answer" {
		t.Fatalf("%q %v", resp, err)
	}
	if got := h.triton.last("ModelInfer"); string(got) != string(req) {
		t.Fatal("without a route the request goes as it came")
	}
	if d := h.stats.Drain(); len(d) != 0 {
		t.Fatalf("no version chosen, no figures: %+v", d)
	}

	h.setRoutes(t, `{"ready": true, "routes": {"m": {"stable": 1, "canary": null, "weight": 0}}}`)
	if _, err := h.call(ctx, "ModelInfer", req); err != nil {
		t.Fatal(err)
	}
	got := h.triton.last("ModelInfer")
	if string(got[:len(req)]) != string(req) || string(got[len(req):]) != "\x12\x011" || versionOf(t, got) != "1" {
		t.Fatalf("the version is appended: %x", got)
	}
	// Pinned: forwarded as is, even with a route.
	pinned := inferRequest("m", "7", "")
	if _, err := h.call(ctx, "ModelInfer", pinned); err != nil || string(h.triton.last("ModelInfer")) != string(pinned) {
		t.Fatal("pinned")
	}
	d := h.stats.Drain()
	if len(d) != 2 || d[0].Version != 1 || d[0].Answered != 1 || d[1].Version != 7 || d[1].Answered != 1 {
		t.Fatalf("figures: %+v", d)
	}
}

func TestCanaryFallsBackToStable(t *testing.T) {
	h := newHarness(t, nil, 2*time.Second)
	h.setRoutes(t, `{"ready": true, "routes": {"m": {"stable": 1, "canary": 2, "weight": 1.0, "known": [1, 2]}}}`)
	h.triton.answer = func(_ string, req []byte) ([]byte, error) {
		r, _ := oip.ParseInferRequest(req)
		switch r.ModelVersion {
		case "2":
			return nil, status.Error(codes.Internal, "canary broke")
		case "1":
			return []byte("stable answer"), nil
		}
		return nil, status.Error(codes.InvalidArgument, "bad input")
	}
	req := inferRequest("m", "", "")
	resp, err := h.call(context.Background(), "ModelInfer", req)
	if err != nil || string(resp) != "stable answer" {
		t.Fatalf("%q %v", resp, err)
	}
	if h.triton.count("ModelInfer") != 2 || versionOf(t, h.triton.last("ModelInfer")) != "1" {
		t.Fatal("the original request went again, re-targeted at stable")
	}
	d := h.stats.Drain()
	if len(d) != 2 || d[0].Version != 1 || d[0].Answered != 1 || d[1].Version != 2 || d[1].Failed != 1 {
		t.Fatalf("canary failure and stable answer both recorded: %+v", d)
	}

	// INVALID_ARGUMENT from Triton is the caller's fault: no retry, no blame.
	h.triton.answer = func(string, []byte) ([]byte, error) { return nil, status.Error(codes.InvalidArgument, "bad input") }
	_, err = h.call(context.Background(), "ModelInfer", req)
	wantStatus(t, err, codes.InvalidArgument, "triton: bad input")
	if h.triton.count("ModelInfer") != 3 || len(h.stats.Drain()) != 0 {
		t.Fatal("no retry and no figures for INVALID_ARGUMENT")
	}

	// Both failing: the stable's error is the answer, both failures counted.
	h.triton.answer = func(string, []byte) ([]byte, error) { return nil, status.Error(codes.Unavailable, "") }
	_, err = h.call(context.Background(), "ModelInfer", req)
	wantStatus(t, err, codes.Unavailable, "triton: UNAVAILABLE")
	if d := h.stats.Drain(); len(d) != 2 || d[0].Failed != 1 || d[1].Failed != 1 {
		t.Fatalf("%+v", d)
	}
}

func TestNotFound(t *testing.T) {
	h := newHarness(t, nil, 2*time.Second)
	h.setRoutes(t, `{"ready": true, "routes": {"m": {"stable": 1, "canary": null, "weight": 0, "known": [1, 3]}}}`)
	h.triton.answer = func(string, []byte) ([]byte, error) {
		return nil, status.Error(codes.NotFound, "Request for unknown model")
	}
	// Published, not loaded: UNAVAILABLE, and the version is blamed.
	_, err := h.call(context.Background(), "ModelInfer", inferRequest("m", "3", ""))
	wantStatus(t, err, codes.Unavailable, "triton: Request for unknown model")
	// Never published: NOT_FOUND, the caller's mistake, no figures.
	_, err = h.call(context.Background(), "ModelInfer", inferRequest("m", "9", ""))
	wantStatus(t, err, codes.NotFound, "triton: Request for unknown model")
	if d := h.stats.Drain(); len(d) != 1 || d[0].Version != 3 || d[0].Failed != 1 {
		t.Fatalf("%+v", d)
	}
}

func TestRefusedBeforeTriton(t *testing.T) {
	h := newHarness(t, nil, 2*time.Second)
	ctx := context.Background()
	_, err := h.call(ctx, "ModelInfer", []byte{0xff})
	wantStatus(t, err, codes.InvalidArgument, "request: not ModelInferRequest")
	_, err = h.call(ctx, "ModelInfer", inferRequest("", "", ""))
	wantStatus(t, err, codes.InvalidArgument, "model_name: required")
	_, err = h.call(ctx, "ModelInfer", inferRequest("m", "0", ""))
	wantStatus(t, err, codes.InvalidArgument, "model_version: invalid model version '0': expected a positive integer")
	bad := append(oip.StringField(1, "m"), protowire.AppendBytes(protowire.AppendTag(nil, 5, protowire.BytesType),
		append(oip.StringField(2, "FP32"), 0x18, 0x02))...)
	_, err = h.call(ctx, "ModelInfer", bad)
	wantStatus(t, err, codes.InvalidArgument, "inputs[0] (unnamed): FP32 shape [2] declares 2 elements, contents hold 0")
	_, err = h.call(ctx, "ModelReady", oip.StringField(1, "bad name"))
	wantStatus(t, err, codes.InvalidArgument, "name: invalid model name 'bad name': expected [A-Za-z][A-Za-z0-9_-]{0,63}")
	_, err = h.call(ctx, "ModelConfig", append(oip.StringField(1, "m"), oip.StringField(2, "x")...))
	wantStatus(t, err, codes.InvalidArgument, "version: invalid model version 'x': expected a positive integer")
	_, err = h.call(ctx, "ServerLive", []byte{0xff})
	wantStatus(t, err, codes.InvalidArgument, "request: not ServerLiveRequest")
	if h.triton.count("ModelInfer")+h.triton.count("ModelReady")+h.triton.count("ModelConfig") != 0 {
		t.Fatal("a refused request reached Triton")
	}
	_, err = h.call(ctx, "ModelStreamInfer", nil)
	wantStatus(t, err, codes.Unimplemented, "unknown method ModelStreamInfer for service inference.GRPCInferenceService")
}

func TestHealthAndMetadata(t *testing.T) {
	h := newHarness(t, nil, 2*time.Second)
	ctx := context.Background()
	ready := true
	h.triton.answer = func(method string, req []byte) ([]byte, error) {
		switch method {
		case "ServerReady":
			if !ready {
				return nil, status.Error(codes.Unavailable, "down")
			}
			return []byte{0x08, 0x01}, nil
		case "ServerMetadata":
			return append(oip.StringField(1, "triton"), oip.StringField(2, "2.45.0")...), nil
		}
		return []byte{0x08, 0x01}, nil
	}
	isReady := func() bool {
		resp, err := h.call(ctx, "ServerReady", nil)
		if err != nil {
			t.Fatal(err)
		}
		ok, _ := oip.ReadBool(resp, 1)
		return ok
	}
	if live, err := h.call(ctx, "ServerLive", nil); err != nil || string(live) != "\x08\x01" {
		t.Fatal("live")
	}
	if isReady() {
		t.Fatal("ready before the routes are")
	}
	h.setRoutes(t, `{"ready": true, "routes": {"m": {"stable": 4, "canary": null, "weight": 0}}}`)
	if !isReady() {
		t.Fatal("not ready with routes and Triton ready")
	}
	ready = false
	if isReady() {
		t.Fatal("ready with Triton failing")
	}
	resp, err := h.call(ctx, "ServerMetadata", nil)
	if err != nil {
		t.Fatal(err)
	}
	name, _, _ := oip.ParseModelRequest(resp) // field 1 is a string there too
	if name != ServerName {
		t.Fatalf("name %q", name)
	}
	if _, err := h.call(ctx, "ModelReady", oip.StringField(1, "m")); err != nil {
		t.Fatal(err)
	}
	if _, v, _ := oip.ParseModelRequest(h.triton.last("ModelReady")); v != "4" {
		t.Fatalf("ModelReady asks about the stable version, got %q", v)
	}
	if _, err := h.call(ctx, "ModelMetadata", oip.StringField(1, "other")); err != nil {
		t.Fatal(err)
	}
	h.triton.answer = func(string, []byte) ([]byte, error) { return nil, status.Error(codes.NotFound, "gone") }
	_, err = h.call(ctx, "ModelReady", oip.StringField(1, "m"))
	wantStatus(t, err, codes.Unavailable, "triton: gone")
	_, err = h.call(ctx, "ModelMetadata", oip.StringField(1, "other"))
	wantStatus(t, err, codes.NotFound, "triton: gone")
}

func TestDeadlineAndTraceContext(t *testing.T) {
	h := newHarness(t, nil, 2*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	tp := "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	ctx = metadata.AppendToOutgoingContext(ctx, "traceparent", tp, "authorization", "Bearer x")
	if _, err := h.call(ctx, "ModelInfer", inferRequest("m", "", "")); err != nil {
		t.Fatal(err)
	}
	h.triton.mu.Lock()
	defer h.triton.mu.Unlock()
	if d := h.triton.deadline[0]; d <= 0 || d > 300*time.Millisecond {
		t.Fatalf("Triton's deadline is the caller's: %v", d)
	}
	md := h.triton.md[0]
	if got := md.Get("traceparent"); len(got) != 1 || got[0] != tp {
		t.Fatalf("traceparent %v", got)
	}
	if len(md.Get("authorization")) != 0 {
		t.Fatal("the caller's token went to Triton")
	}
}

func TestAuth(t *testing.T) {
	h := newHarness(t, []auth.Token{{Name: "app", Secret: "good", Roles: []string{"predict"}},
		{Name: "ops", Secret: "ops", Roles: []string{"operator"}}}, 2*time.Second)
	bearer := func(token string) context.Context {
		return metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+token)
	}
	_, err := h.call(context.Background(), "ServerLive", nil)
	wantStatus(t, err, codes.Unauthenticated, "missing or invalid bearer token")
	_, err = h.call(bearer("nope"), "ModelInfer", inferRequest("m", "", ""))
	wantStatus(t, err, codes.Unauthenticated, "missing or invalid bearer token")
	_, err = h.call(bearer("ops"), "ModelInfer", inferRequest("m", "", ""))
	wantStatus(t, err, codes.PermissionDenied, "token 'ops' lacks role 'predict'")
	if _, err := h.call(bearer("good"), "ModelInfer", inferRequest("m", "", "")); err != nil {
		t.Fatal(err)
	}
	// Proxied services check their own tokens: the call goes through, token and all.
	var resp []byte
	if err := h.conn.Invoke(bearer("ops"), "/loopmesh.v1.InferenceService/Predict", []byte("hi"), &resp); err != nil {
		t.Fatal(err)
	}
	if string(resp) != "Bearer ops||hi" {
		t.Fatalf("%q", resp)
	}
}

func TestProxy(t *testing.T) {
	h := newHarness(t, nil, 2*time.Second)
	tp := "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer t", "traceparent", tp)
	var resp []byte
	var header, trailer metadata.MD
	err := h.conn.Invoke(ctx, "/loopmesh.v1.InferenceService/Predict", []byte("hi"), &resp, grpc.Header(&header), grpc.Trailer(&trailer))
	if err != nil {
		t.Fatal(err)
	}
	if string(resp) != "Bearer t|"+tp+"|hi" {
		t.Fatalf("%q", resp)
	}
	if header.Get("x-header")[0] != "h1" || trailer.Get("x-trailer")[0] != "t1" {
		t.Fatalf("header %v trailer %v", header, trailer)
	}
	trailer = nil
	err = h.conn.Invoke(ctx, "/loopmesh.v1.InferenceService/Predict", []byte("fail"), &resp, grpc.Trailer(&trailer))
	wantStatus(t, err, codes.NotFound, "no such entity")
	if len(trailer.Get("x-trailer")) != 1 {
		t.Fatal("trailers of a failed call come back too")
	}
	err = h.conn.Invoke(ctx, "/loopmesh.v1.Nope/X", []byte("hi"), &resp)
	wantStatus(t, err, codes.Unimplemented, "unknown service loopmesh.v1.Nope")

	// Bidi stream.
	stream, err := h.conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, "/loopmesh.v1.InferenceService/PredictStream")
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{"a", "b", "c"} {
		if err := stream.SendMsg([]byte(m)); err != nil {
			t.Fatal(err)
		}
		var got []byte
		if err := stream.RecvMsg(&got); err != nil || string(got) != "echo:"+m {
			t.Fatalf("%q %v", got, err)
		}
	}
	if md, _ := stream.Header(); md.Get("x-stream")[0] != "s1" {
		t.Fatal("stream header")
	}
	_ = stream.CloseSend()
	var extra []byte
	if err := stream.RecvMsg(&extra); !errors.Is(err, io.EOF) {
		t.Fatalf("end of stream: %v", err)
	}
	if stream.Trailer().Get("x-done")[0] != "yes" {
		t.Fatal("stream trailer")
	}

	// Cancellation reaches the backend: a stream left open ends when the caller cancels.
	cctx, cancel := context.WithCancel(ctx)
	stream, err = h.conn.NewStream(cctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, "/loopmesh.v1.InferenceService/PredictStream")
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.SendMsg([]byte("x"))
	cancel()
	if err := stream.RecvMsg(&extra); status.Code(err) != codes.Canceled {
		// The echo may win the race; then the next receive sees the cancellation.
		if err == nil {
			err = stream.RecvMsg(&extra)
		}
		if status.Code(err) != codes.Canceled {
			t.Fatalf("after cancel: %v", err)
		}
	}
}
