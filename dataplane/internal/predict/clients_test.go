package predict

import (
	"context"
	"errors"
	"math"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/loopmesh/loopmesh/dataplane/internal/gateway"
	"github.com/loopmesh/loopmesh/dataplane/internal/oip"
	"github.com/loopmesh/loopmesh/dataplane/internal/pbwire"
	"github.com/loopmesh/loopmesh/dataplane/internal/proxy"
	"github.com/loopmesh/loopmesh/dataplane/internal/telemetry"
)

// fakeServer answers the unary methods of one service with answer(method, req) and
// remembers what it got.
type fakeServer struct {
	mu       sync.Mutex
	calls    []fakeCall
	answer   func(ctx context.Context, method string, req []byte) ([]byte, error)
	received chan string // the method of each call, as it arrives (buffered)
}

type fakeCall struct {
	method   string
	req      []byte
	md       metadata.MD
	deadline time.Duration // 0: none
}

func serve(t *testing.T, service string, methods []string, answer func(ctx context.Context, method string, req []byte) ([]byte, error)) (*fakeServer, string) {
	t.Helper()
	f := &fakeServer{answer: answer, received: make(chan string, 1000)}
	d := &grpc.ServiceDesc{ServiceName: service, HandlerType: (*any)(nil)}
	for _, name := range methods {
		d.Methods = append(d.Methods, grpc.MethodDesc{MethodName: name, Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			var req []byte
			if err := dec(&req); err != nil {
				return nil, err
			}
			md, _ := metadata.FromIncomingContext(ctx)
			c := fakeCall{method: name, req: req, md: md}
			if dl, ok := ctx.Deadline(); ok {
				c.deadline = time.Until(dl)
			}
			f.mu.Lock()
			f.calls = append(f.calls, c)
			f.mu.Unlock()
			f.received <- name
			return f.answer(ctx, name, req)
		}})
	}
	s := grpc.NewServer(grpc.ForceServerCodecV2(proxy.Codec{}))
	s.RegisterService(d, struct{}{})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.Serve(lis) }()
	t.Cleanup(s.Stop)
	return f, lis.Addr().String()
}

func (f *fakeServer) seen() []fakeCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

func dialRaw(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(proxy.Codec{})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// readFeaturesRequest reads a GetOnlineFeaturesRequest (entity_ids=1, feature_refs=2, join_key=3).
func readFeaturesRequest(t testing.TB, b []byte) (ids, refs []string, joinKey string) {
	err := pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
		switch num {
		case 1:
			ids = append(ids, string(v))
		case 2:
			refs = append(refs, string(v))
		case 3:
			joinKey = string(v)
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
	return ids, refs, joinKey
}

// featureAnswer answers entity "u<n>" with n*10+i for its i-th ref, leaves out entities
// whose id starts with "gone", and marks ref "v:stale" STALE.
func featureAnswer(t testing.TB, req []byte) []byte {
	ids, refs, _ := readFeaturesRequest(t, req)
	var b []byte
	for _, id := range ids {
		if strings.HasPrefix(id, "gone") {
			continue
		}
		n, _ := strconv.Atoi(strings.TrimPrefix(id, "u"))
		var values [][]byte
		for i, ref := range refs {
			st := uint64(1)
			if ref == "v:stale" {
				st = 3
			}
			values = append(values, fvalue(st, number(float64(n*10+i))))
		}
		b = append(b, entity(id, values...)...)
	}
	return b
}

func newFeatureServer(t *testing.T, answer func(ctx context.Context, req []byte) ([]byte, error)) (*fakeServer, *grpc.ClientConn) {
	f, addr := serve(t, "loopmesh.v1.FeatureService", []string{"GetOnlineFeatures"}, func(ctx context.Context, _ string, req []byte) ([]byte, error) {
		return answer(ctx, req)
	})
	return f, dialRaw(t, addr)
}

func TestFeatureClientFetch(t *testing.T) {
	f, conn := newFeatureServer(t, func(_ context.Context, req []byte) ([]byte, error) { return featureAnswer(t, req), nil })
	c := NewFeatureClient(conn, time.Second, "s3cret", 64, time.Millisecond, 2)
	got, err := c.Fetch(context.Background(), "u7", []string{"v:a", "v:stale"})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]Reading{"v:a": {Kind: KindNumber, Number: 70}, "v:stale": {Kind: KindNumber, Number: 71, Stale: true}}
	if !mapsEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	if got, err := c.Fetch(context.Background(), "gone1", []string{"v:a"}); err != nil || len(got) != 0 {
		t.Fatalf("an entity the service did not return: %v %v", got, err)
	}
	calls := f.seen()
	if len(calls) != 2 {
		t.Fatalf("%d calls", len(calls))
	}
	ids, refs, joinKey := readFeaturesRequest(t, calls[0].req)
	if !slices.Equal(ids, []string{"u7"}) || !slices.Equal(refs, []string{"v:a", "v:stale"}) || joinKey != "" {
		t.Fatalf("request %v %v %q", ids, refs, joinKey)
	}
	if auth := calls[0].md.Get("authorization"); !slices.Equal(auth, []string{"Bearer s3cret"}) {
		t.Fatalf("authorization %v", auth)
	}
	if dl := calls[0].deadline; dl <= 0 || dl > time.Second {
		t.Fatalf("deadline %v", dl)
	}
	if calls, fetches := c.Stats(); calls != 2 || fetches != 2 {
		t.Fatalf("stats %d %d", calls, fetches)
	}
}

func mapsEqual(a, b map[string]Reading) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func TestFeatureClientNoToken(t *testing.T) {
	f, conn := newFeatureServer(t, func(_ context.Context, req []byte) ([]byte, error) { return featureAnswer(t, req), nil })
	c := NewFeatureClient(conn, time.Second, "", 64, time.Millisecond, 2)
	if _, err := c.Fetch(context.Background(), "u1", []string{"v:a"}); err != nil {
		t.Fatal(err)
	}
	if auth := f.seen()[0].md.Get("authorization"); len(auth) != 0 {
		t.Fatalf("authorization %v", auth)
	}
}

// The call continues the trace of its batch's first caller, next to the token.
func TestFeatureClientCarriesTheCallersTrace(t *testing.T) {
	f, conn := newFeatureServer(t, func(_ context.Context, req []byte) ([]byte, error) { return featureAnswer(t, req), nil })
	c := NewFeatureClient(conn, time.Second, "s3cret", 64, time.Millisecond, 2)
	const tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	ctx := telemetry.WithOutgoing(context.Background(), metadata.Pairs("traceparent", tp))
	if _, err := c.Fetch(ctx, "u1", []string{"v:a"}); err != nil {
		t.Fatal(err)
	}
	md := f.seen()[0].md
	if got := md.Get("traceparent"); !slices.Equal(got, []string{tp}) || len(md.Get("authorization")) != 1 {
		t.Fatalf("metadata %v", md)
	}
}

func TestFeatureClientCoalesces(t *testing.T) {
	gate := make(chan struct{})
	var n atomic.Int32
	f, conn := newFeatureServer(t, func(_ context.Context, req []byte) ([]byte, error) {
		if n.Add(1) == 1 {
			<-gate
		}
		return featureAnswer(t, req), nil
	})
	c := NewFeatureClient(conn, 5*time.Second, "", 64, time.Hour, 1)
	refs := []string{"v:a", "v:b"}
	type answer struct {
		id  string
		got map[string]Reading
		err error
	}
	answers := make(chan answer, 100)
	fetch := func(id string, refs []string) {
		go func() {
			got, err := c.Fetch(context.Background(), id, refs)
			answers <- answer{id, got, err}
		}()
	}
	fetch("u0", refs)
	<-f.received // the first call is out (and held)
	ids := []string{"u1", "u2", "u3", "u2", "gone9", "u4", "u1", "u5"}
	for _, id := range ids {
		fetch(id, slices.Clone(refs))
	}
	rb := func() *refsBatcher {
		c.mu.RLock()
		defer c.mu.RUnlock()
		return c.batchers["v:a\x00v:b"]
	}()
	waitFor(t, "8 queued fetches", func() bool { return rb.b.queued() == len(ids) })
	// Another list of refs has its own batcher: not held back by the call in flight.
	fetch("u6", []string{"v:b"})
	if a := <-answers; a.id != "u6" || a.err != nil || !mapsEqual(a.got, map[string]Reading{"v:b": {Kind: KindNumber, Number: 60}}) {
		t.Fatalf("other refs: %+v", a)
	}
	close(gate)
	for range len(ids) + 1 {
		a := <-answers
		if a.err != nil {
			t.Fatalf("%s: %v", a.id, a.err)
		}
		if a.id == "gone9" {
			if len(a.got) != 0 {
				t.Fatalf("gone9 got %v", a.got)
			}
			continue
		}
		n, _ := strconv.Atoi(a.id[1:])
		want := map[string]Reading{"v:a": {Kind: KindNumber, Number: float64(n * 10)}, "v:b": {Kind: KindNumber, Number: float64(n*10 + 1)}}
		if !mapsEqual(a.got, want) {
			t.Fatalf("%s got %v, want %v", a.id, a.got, want)
		}
	}
	calls := f.seen()
	if len(calls) != 3 {
		t.Fatalf("%d calls, want 3 (u0, u6, then the 8 queued together)", len(calls))
	}
	got, gotRefs, _ := readFeaturesRequest(t, calls[2].req)
	if !slices.Equal(gotRefs, refs) {
		t.Fatalf("refs %v", gotRefs)
	}
	sorted := slices.Sorted(slices.Values(got))
	if !slices.Equal(sorted, []string{"gone9", "u1", "u2", "u3", "u4", "u5"}) {
		t.Fatalf("entity ids %v: want each once", got)
	}
	if calls, fetches := c.Stats(); calls != 3 || fetches != 10 {
		t.Fatalf("stats %d %d", calls, fetches)
	}
}

func TestFeatureClientKeepsOrder(t *testing.T) {
	f, conn := newFeatureServer(t, func(_ context.Context, req []byte) ([]byte, error) { return featureAnswer(t, req), nil })
	c := NewFeatureClient(conn, time.Second, "", 64, time.Millisecond, 1)
	out, err := c.get(context.Background(), []string{"v:a"}, []string{"u3", "u1", "u3", "u2", "u1"})
	if err != nil {
		t.Fatal(err)
	}
	ids, _, _ := readFeaturesRequest(t, f.seen()[0].req)
	if !slices.Equal(ids, []string{"u3", "u1", "u2"}) {
		t.Fatalf("ids %v", ids)
	}
	for i, n := range []float64{30, 10, 30, 20, 10} {
		if out[i]["v:a"].Number != n {
			t.Fatalf("answer %d: %v", i, out[i])
		}
	}
}

func TestFeatureClientCollidingRefs(t *testing.T) {
	f, conn := newFeatureServer(t, func(_ context.Context, req []byte) ([]byte, error) { return featureAnswer(t, req), nil })
	c := NewFeatureClient(conn, time.Second, "", 64, time.Millisecond, 1)
	if _, err := c.Fetch(context.Background(), "u1", []string{"a\x00b"}); err != nil {
		t.Fatal(err)
	}
	got, err := c.Fetch(context.Background(), "u1", []string{"a", "b"}) // same key, other refs
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got["a"].Number != 10 || got["b"].Number != 11 {
		t.Fatalf("got %v", got)
	}
	_, refs, _ := readFeaturesRequest(t, f.seen()[1].req)
	if !slices.Equal(refs, []string{"a", "b"}) {
		t.Fatalf("refs %v", refs)
	}
}

func TestFeatureClientErrors(t *testing.T) {
	tests := []struct {
		name   string
		answer func(ctx context.Context, req []byte) ([]byte, error)
		want   string
	}{
		{"unavailable", func(context.Context, []byte) ([]byte, error) {
			return nil, status.Error(codes.Unavailable, "redis down")
		}, "UNAVAILABLE: redis down"},
		{"invalid argument", func(context.Context, []byte) ([]byte, error) {
			return nil, status.Error(codes.InvalidArgument, "unknown feature ref 'v:x'")
		}, "INVALID_ARGUMENT: unknown feature ref 'v:x'"},
		{"unauthenticated", func(context.Context, []byte) ([]byte, error) {
			return nil, status.Error(codes.Unauthenticated, "bad token")
		}, "UNAUTHENTICATED: bad token"},
		{"deadline", func(ctx context.Context, _ []byte) ([]byte, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		}, "DEADLINE_EXCEEDED: "},
		{"value count", func(context.Context, []byte) ([]byte, error) {
			return entity("u1", fvalue(1, number(1))), nil
		}, "feature service answered 1 values for 2 refs (entity 'u1')"},
		{"malformed", func(context.Context, []byte) ([]byte, error) {
			return []byte{0x12, 0x05, 0x01}, nil
		}, "feature service answered a malformed GetOnlineFeaturesResponse: malformed protobuf"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, conn := newFeatureServer(t, tc.answer)
			c := NewFeatureClient(conn, 50*time.Millisecond, "", 64, time.Millisecond, 2)
			_, err := c.Fetch(context.Background(), "u1", []string{"v:a", "v:b"})
			var fu *FeaturesUnavailable
			if !errors.As(err, &fu) || !strings.HasPrefix(fu.Msg, tc.want) || err.Error() != fu.Msg {
				t.Fatalf("got %v, want a FeaturesUnavailable %q", err, tc.want)
			}
		})
	}
}

func TestFeatureClientUnreachable(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	c := NewFeatureClient(dialRaw(t, addr), time.Second, "", 64, time.Millisecond, 2)
	_, err = c.Fetch(context.Background(), "u1", []string{"v:a"})
	var fu *FeaturesUnavailable
	if !errors.As(err, &fu) || !strings.HasPrefix(fu.Msg, "UNAVAILABLE: ") {
		t.Fatalf("got %v", err)
	}
}

func TestFeatureClientCallerDeadline(t *testing.T) {
	gate := make(chan struct{})
	defer close(gate)
	_, conn := newFeatureServer(t, func(context.Context, []byte) ([]byte, error) { <-gate; return nil, nil })
	c := NewFeatureClient(conn, 5*time.Second, "", 64, time.Millisecond, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err := c.Fetch(ctx, "u1", []string{"v:a"})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v", err)
	}
}

// Triton.

// fakeTriton answers ModelInfer with, for each row, its sum and its first value (FP32
// [n, 2], raw), and RepositoryIndex with index().
type fakeTriton struct {
	*fakeServer
	gate  chan struct{} // when set, the first ModelInfer waits for it
	n     atomic.Int32
	infer func(ctx context.Context, req *oip.InferRequest) ([]byte, error) // replaces the default answer
	index func() ([]byte, error)
}

func newTriton(t *testing.T, timeout time.Duration) (*fakeTriton, *Scorer) {
	ft := &fakeTriton{}
	f, addr := serve(t, gateway.Service, []string{"ModelInfer", "RepositoryIndex"}, func(ctx context.Context, method string, req []byte) ([]byte, error) {
		if method == "RepositoryIndex" {
			if ok, err := oip.ReadBool(req, 2); err != nil || !ok {
				t.Errorf("RepositoryIndex request %x", req)
			}
			return ft.index()
		}
		if ft.gate != nil && ft.n.Add(1) == 1 {
			<-ft.gate
		}
		r, err := oip.ParseInferRequest(req)
		if err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		if ft.infer != nil {
			return ft.infer(ctx, r)
		}
		return sumsAnswer(r), nil
	})
	ft.fakeServer = f
	triton, err := gateway.DialTriton(addr, 2, timeout, insecure.NewCredentials(), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(triton.Close)
	return ft, NewScorer(triton, 64, time.Hour, 1)
}

func sumsAnswer(r *oip.InferRequest) []byte {
	in := r.Inputs[0]
	n, w := int(in.Shape[0]), int(in.Shape[1])
	var out []float32
	for i := range n {
		var sum float32
		for j := range w {
			sum += math.Float32frombits(leUint32(r.Raw[0][4*(i*w+j):]))
		}
		out = append(out, sum, math.Float32frombits(leUint32(r.Raw[0][4*i*w:])))
	}
	return cat(fStr(1, r.ModelName), fStr(2, r.ModelVersion), output("OUTPUT__0", "FP32", shapeField(int64(n), 2)), rawFP32(out...))
}

func leUint32(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}

func TestScorerScore(t *testing.T) {
	ft, s := newTriton(t, time.Second)
	got, err := s.Score(context.Background(), "ctr", 3, []float32{1, 2, 3.5})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, []float64{6.5, 1}) {
		t.Fatalf("got %v", got)
	}
	r, err := oip.ParseInferRequest(ft.seen()[0].req)
	if err != nil {
		t.Fatal(err)
	}
	if r.ModelName != "ctr" || r.ModelVersion != "3" || len(r.Inputs) != 1 || r.Inputs[0].Name != "INPUT__0" ||
		r.Inputs[0].Datatype != "FP32" || !slices.Equal(r.Inputs[0].Shape, []int64{1, 3}) || len(r.Raw) != 1 || len(r.Raw[0]) != 12 {
		t.Fatalf("request %+v", r)
	}
	if dl := ft.seen()[0].deadline; dl <= 0 || dl > time.Second {
		t.Fatalf("deadline %v", dl)
	}
}

func TestScorerCoalesces(t *testing.T) {
	ft, s := newTriton(t, 5*time.Second)
	ft.gate = make(chan struct{})
	type answer struct {
		i   int
		got []float64
		err error
	}
	answers := make(chan answer, 100)
	score := func(i int, version int64) {
		go func() {
			got, err := s.Score(context.Background(), "ctr", version, []float32{float32(i), 1})
			answers <- answer{i, got, err}
		}()
	}
	score(0, 1)
	<-ft.received
	for i := 1; i <= 6; i++ {
		score(i, 1)
	}
	b := func() *Batcher[[]float32, []float64] {
		s.mu.RLock()
		defer s.mu.RUnlock()
		return s.batchers[scoreKey{"ctr", 1}]
	}()
	waitFor(t, "6 queued rows", func() bool { return b.queued() == 6 })
	score(100, 2) // another version: its own batcher, not held back
	if a := <-answers; a.i != 100 || a.err != nil || !slices.Equal(a.got, []float64{101, 100}) {
		t.Fatalf("version 2: %+v", a)
	}
	close(ft.gate)
	for range 7 {
		a := <-answers
		if a.err != nil || !slices.Equal(a.got, []float64{float64(a.i) + 1, float64(a.i)}) {
			t.Fatalf("row %d: %+v", a.i, a)
		}
	}
	calls := ft.seen()
	if len(calls) != 3 {
		t.Fatalf("%d calls, want 3", len(calls))
	}
	r, _ := oip.ParseInferRequest(calls[2].req)
	if r.ModelVersion != "1" || !slices.Equal(r.Inputs[0].Shape, []int64{6, 2}) {
		t.Fatalf("batched request %+v", r)
	}
	if requests, rows := s.Stats(); requests != 3 || rows != 8 {
		t.Fatalf("stats %d %d", requests, rows)
	}
}

func TestScorerErrors(t *testing.T) {
	tests := []struct {
		name  string
		infer func(ctx context.Context, r *oip.InferRequest) ([]byte, error)
		want  BackendError
		hook  string
	}{
		{"not found", func(context.Context, *oip.InferRequest) ([]byte, error) {
			return nil, status.Error(codes.NotFound, "Request for unknown model: 'ctr' version 4 is not found")
		}, BackendError{Code: codes.NotFound, Msg: "triton ctr/4: NOT_FOUND: Request for unknown model: 'ctr' version 4 is not found", Unavailable: true}, "NOT_FOUND"},
		{"unavailable", func(context.Context, *oip.InferRequest) ([]byte, error) {
			return nil, status.Error(codes.Unavailable, "down")
		}, BackendError{Code: codes.Unavailable, Msg: "triton ctr/4: UNAVAILABLE: down", Unavailable: true}, "UNAVAILABLE"},
		{"resource exhausted", func(context.Context, *oip.InferRequest) ([]byte, error) {
			return nil, status.Error(codes.ResourceExhausted, "queue full")
		}, BackendError{Code: codes.ResourceExhausted, Msg: "triton ctr/4: RESOURCE_EXHAUSTED: queue full", Unavailable: true}, "RESOURCE_EXHAUSTED"},
		{"invalid argument", func(context.Context, *oip.InferRequest) ([]byte, error) {
			return nil, status.Error(codes.InvalidArgument, "unexpected shape for input 'INPUT__0'")
		}, BackendError{Code: codes.InvalidArgument, Msg: "triton ctr/4: INVALID_ARGUMENT: unexpected shape for input 'INPUT__0'"}, "INVALID_ARGUMENT"},
		{"internal", func(context.Context, *oip.InferRequest) ([]byte, error) {
			return nil, status.Error(codes.Internal, "onnx runtime error")
		}, BackendError{Code: codes.Internal, Msg: "triton ctr/4: INTERNAL: onnx runtime error"}, "INTERNAL"},
		{"wrong rows", func(context.Context, *oip.InferRequest) ([]byte, error) {
			return cat(output("OUTPUT__0", "FP32", shapeField(3, 1)), rawFP32(1, 2, 3)), nil
		}, BackendError{Code: codes.Internal, Msg: "triton ctr/4 answered (3, 1) for 1 rows", BadAnswer: true}, "BAD_ANSWER"},
		{"no output", func(context.Context, *oip.InferRequest) ([]byte, error) {
			return output("probabilities", "FP32", shapeField(1, 1)), nil
		}, BackendError{Code: codes.Internal, Msg: "triton ctr/4 answered None for 1 rows", BadAnswer: true}, "BAD_ANSWER"},
		{"malformed", func(context.Context, *oip.InferRequest) ([]byte, error) {
			return []byte{0x2a, 0x09, 0x01}, nil
		}, BackendError{Code: codes.Internal, Msg: "triton ctr/4 answered malformed protobuf for 1 rows", BadAnswer: true}, "BAD_ANSWER"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ft, s := newTriton(t, time.Second)
			ft.infer = tc.infer
			var hooks []string
			s.OnError = func(model string, version int64, code string) {
				hooks = append(hooks, model+"/"+strconv.FormatInt(version, 10)+" "+code)
			}
			_, err := s.Score(context.Background(), "ctr", 4, []float32{1})
			var be *BackendError
			if !errors.As(err, &be) || *be != tc.want || err.Error() != tc.want.Msg {
				t.Fatalf("got %#v, want %#v", err, tc.want)
			}
			if !slices.Equal(hooks, []string{"ctr/4 " + tc.hook}) {
				t.Fatalf("OnError %v", hooks)
			}
		})
	}
}

func TestScorerDeadline(t *testing.T) {
	ft, s := newTriton(t, 30*time.Millisecond)
	ft.infer = func(ctx context.Context, _ *oip.InferRequest) ([]byte, error) {
		<-ctx.Done() // the call's deadline (the Triton timeout) ends it
		return nil, ctx.Err()
	}
	_, err := s.Score(context.Background(), "ctr", 1, []float32{1})
	var be *BackendError
	if !errors.As(err, &be) || be.Code != codes.DeadlineExceeded || !be.Unavailable ||
		!strings.HasPrefix(be.Msg, "triton ctr/1: DEADLINE_EXCEEDED: ") {
		t.Fatalf("got %#v", err)
	}
}

func TestScorerMixedWidths(t *testing.T) {
	ft, s := newTriton(t, 5*time.Second)
	ft.gate = make(chan struct{})
	errs := make(chan error, 3)
	go func() { _, err := s.Score(context.Background(), "ctr", 1, []float32{1, 2}); errs <- err }()
	<-ft.received
	go func() { _, err := s.Score(context.Background(), "ctr", 1, []float32{1, 2}); errs <- err }()
	go func() { _, err := s.Score(context.Background(), "ctr", 1, []float32{1, 2, 3}); errs <- err }()
	waitFor(t, "2 queued rows", func() bool {
		s.mu.RLock()
		defer s.mu.RUnlock()
		return s.batchers[scoreKey{"ctr", 1}].queued() == 2
	})
	close(ft.gate)
	failed := 0
	for range 3 {
		var be *BackendError
		switch err := <-errs; {
		case err == nil:
		case errors.As(err, &be) && !be.Unavailable && strings.Contains(be.Msg, "values in one batch"):
			failed++
		default:
			t.Fatalf("got %v", err)
		}
	}
	if failed != 2 {
		t.Fatalf("%d failed, want the 2 of the mixed batch", failed)
	}
	if n := len(ft.seen()); n != 1 {
		t.Fatalf("%d calls", n)
	}
}

func indexAnswer(models ...[3]string) []byte {
	var b []byte
	for _, m := range models {
		b = append(b, fBytes(1, fStr(1, m[0]), fStr(2, m[1]), fStr(3, m[2]))...)
	}
	return b
}

func TestScorerReadyVersions(t *testing.T) {
	ft, s := newTriton(t, time.Second)
	ft.index = func() ([]byte, error) {
		return indexAnswer([3]string{"ctr", "2", "READY"}, [3]string{"ctr", "1", "READY"}, [3]string{"ctr", "3", "UNAVAILABLE"}, [3]string{"rank", "1", "READY"}), nil
	}
	for range 3 {
		if got := s.ReadyVersions(context.Background(), "ctr"); !slices.Equal(got, []int64{1, 2}) {
			t.Fatalf("got %v", got)
		}
	}
	if got := s.ReadyVersions(context.Background(), "other"); got != nil {
		t.Fatalf("got %v", got)
	}
	if n := len(ft.seen()); n != 1 {
		t.Fatalf("%d calls within the TTL, want 1", n)
	}
	got := s.ReadyVersions(context.Background(), "ctr")
	got[0] = 99 // the caller's copy
	if got := s.ReadyVersions(context.Background(), "ctr"); got[0] != 1 {
		t.Fatal("the cached answer was modified through a returned slice")
	}

	// Expired: asked again; a failure answers nil and is not kept.
	s.indexMu.Lock()
	s.indexAt = time.Now().Add(-indexTTL - time.Millisecond)
	s.indexMu.Unlock()
	ft.index = func() ([]byte, error) { return nil, status.Error(codes.Unavailable, "down") }
	if got := s.ReadyVersions(context.Background(), "ctr"); got != nil {
		t.Fatalf("got %v after a failure", got)
	}
	ft.index = func() ([]byte, error) { return indexAnswer([3]string{"ctr", "5", "READY"}), nil }
	if got := s.ReadyVersions(context.Background(), "ctr"); !slices.Equal(got, []int64{5}) {
		t.Fatalf("got %v", got)
	}
	if n := len(ft.seen()); n != 3 {
		t.Fatalf("%d calls, want 3", n)
	}
}

func TestScorerReadyVersionsShared(t *testing.T) {
	ft, s := newTriton(t, 5*time.Second)
	gate := make(chan struct{})
	ft.index = func() ([]byte, error) { <-gate; return indexAnswer([3]string{"ctr", "1", "READY"}), nil }
	results := make(chan []int64, 10)
	for range 5 {
		go func() { results <- s.ReadyVersions(context.Background(), "ctr") }()
	}
	<-ft.received
	// A caller whose context ends stops waiting.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if got := s.ReadyVersions(ctx, "ctr"); got != nil {
		t.Fatalf("cancelled caller got %v", got)
	}
	close(gate)
	for range 5 {
		if got := <-results; !slices.Equal(got, []int64{1}) {
			t.Fatalf("got %v", got)
		}
	}
	if n := len(ft.seen()); n != 1 {
		t.Fatalf("%d calls, want 1", n)
	}
}
