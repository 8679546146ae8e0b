package predict

import (
	"context"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	otelcodes "go.opentelemetry.io/otel/codes"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/loopmesh/loopmesh/dataplane/internal/gateway"
	"github.com/loopmesh/loopmesh/dataplane/internal/proxy"
	"github.com/loopmesh/loopmesh/dataplane/internal/telemetry"
)

// Full method names of the calls the clients make.
const (
	methodGetOnlineFeatures = "/loopmesh.v1.FeatureService/GetOnlineFeatures"
	methodModelInfer        = "/" + gateway.Service + "/ModelInfer"
	methodRepositoryIndex   = "/" + gateway.Service + "/RepositoryIndex"
)

// rawCodec makes a call send and receive raw bytes whatever the connection's defaults.
var rawCodec = grpc.ForceCodecV2(proxy.Codec{})

// FeaturesUnavailable is a GetOnlineFeatures call that failed (Python's FeaturesUnavailable):
// Msg is "<CODE_NAME>: <details>" for a gRPC failure, else what was wrong with the answer.
type FeaturesUnavailable struct{ Msg string }

func (e *FeaturesUnavailable) Error() string { return e.Msg }

// FeatureClient reads online features from a FeatureService (Python's FeatureClient):
// concurrent fetches of the same refs share one GetOnlineFeatures call.
type FeatureClient struct {
	// Tracing, when set, gives each call a CLIENT span under its batch's first caller's.
	Tracing *telemetry.Tracing

	conn               *grpc.ClientConn
	timeout            time.Duration
	md                 metadata.MD // nil without a token
	maxBatch, inflight int
	maxDelay           time.Duration
	mu                 sync.RWMutex
	batchers           map[string]*refsBatcher // by the refs joined by "\x00"
}

// refsBatcher coalesces the fetches of one list of refs.
type refsBatcher struct {
	refs []string
	b    *Batcher[string, map[string]Reading]
}

// NewFeatureClient returns a client over conn, a connection dialled with the raw codec
// (proxy.Codec). Each call has a deadline of timeout and carries "authorization: Bearer
// <token>" when token is not empty.
func NewFeatureClient(conn *grpc.ClientConn, timeout time.Duration, token string, maxBatch int, maxDelay time.Duration, maxInflight int) *FeatureClient {
	c := &FeatureClient{conn: conn, timeout: timeout, maxBatch: maxBatch, maxDelay: maxDelay,
		inflight: maxInflight, batchers: map[string]*refsBatcher{}}
	if token != "" {
		c.md = metadata.Pairs("authorization", "Bearer "+token)
	}
	return c
}

// Fetch returns the entity's readings by ref (nil when the service did not return the
// entity; the map may be shared with another caller of the same entity: do not modify it).
// A failed call is a *FeaturesUnavailable; a caller whose ctx ends gets ctx's error.
func (c *FeatureClient) Fetch(ctx context.Context, entityID string, refs []string) (map[string]Reading, error) {
	key := strings.Join(refs, "\x00")
	c.mu.RLock()
	rb := c.batchers[key]
	c.mu.RUnlock()
	if rb == nil {
		c.mu.Lock()
		if rb = c.batchers[key]; rb == nil {
			rb = &refsBatcher{refs: slices.Clone(refs)}
			rb.b = NewBatcher(func(ctx context.Context, ids []string) ([]map[string]Reading, error) {
				return c.get(ctx, rb.refs, ids)
			}, c.maxBatch, c.maxDelay, c.inflight)
			c.batchers[key] = rb
		}
		c.mu.Unlock()
	}
	if !slices.Equal(rb.refs, refs) { // refs holding "\x00" that collide with another list
		found, err := c.get(ctx, refs, []string{entityID})
		if err != nil {
			return nil, err
		}
		return found[0], nil
	}
	return rb.b.Submit(ctx, entityID)
}

// Stats returns the GetOnlineFeatures calls made through the batchers and the fetches they
// served.
func (c *FeatureClient) Stats() (calls, fetches uint64) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	for _, rb := range c.batchers {
		b, i := rb.b.Stats()
		calls, fetches = calls+b, fetches+i
	}
	return calls, fetches
}

// get makes one GetOnlineFeatures call for ids (deduplicated, order kept) and returns each
// id's readings (Python's FeatureClient._get).
func (c *FeatureClient) get(parent context.Context, refs, ids []string) ([]map[string]Reading, error) {
	unique := make([]string, 0, len(ids))
	seen := make(map[string]struct{}, len(ids))
	for _, id := range ids {
		if _, ok := seen[id]; !ok {
			seen[id] = struct{}{}
			unique = append(unique, id)
		}
	}
	span, traceMD := c.Tracing.StartClient(parent, methodGetOnlineFeatures)
	defer span.End()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(parent), c.timeout)
	defer cancel()
	if md := metadata.Join(c.md, traceMD); len(md) > 0 {
		ctx = metadata.NewOutgoingContext(ctx, md)
	}
	var resp []byte
	if err := c.conn.Invoke(ctx, methodGetOnlineFeatures, encodeFeaturesRequest(unique, refs), &resp, rawCodec); err != nil {
		s := status.Convert(err)
		span.SetStatus(otelcodes.Error, s.Message())
		return nil, &FeaturesUnavailable{Msg: telemetry.CodeName(s.Code()) + ": " + s.Message()}
	}
	found, err := parseFeaturesResponse(resp, refs)
	if err != nil {
		return nil, &FeaturesUnavailable{Msg: err.Error()}
	}
	out := make([]map[string]Reading, len(ids))
	for i, id := range ids {
		out[i] = found[id]
	}
	return out, nil
}

// BackendError is a Triton call that failed (Python's BackendError). Msg is the whole
// message; Unavailable when another version or a later retry may succeed; BadAnswer when
// Triton answered but not something usable (Code is then INTERNAL; Python records the
// failure as "BAD_ANSWER").
type BackendError struct {
	Code        codes.Code
	Msg         string
	Unavailable bool
	BadAnswer   bool
}

func (e *BackendError) Error() string { return e.Msg }

// retryable are the codes after which another version or a later retry may succeed
// (Python's RETRYABLE).
func retryable(c codes.Code) bool {
	switch c {
	case codes.Unavailable, codes.DeadlineExceeded, codes.NotFound, codes.Canceled, codes.ResourceExhausted:
		return true
	}
	return false
}

// scoreKey is one model version.
type scoreKey struct {
	model   string
	version int64
}

// Scorer scores rows with Triton (Python's TritonPool.score_rows and ready_versions): rows
// for the same version share one ModelInfer call.
type Scorer struct {
	// Tracing, when set, gives each call a CLIENT span under its batch's first caller's.
	Tracing *telemetry.Tracing
	// OnError, when set (before the first Score), is told of each failed ModelInfer call
	// once, with the code name as Python's instruments.record_triton_error gets it
	// ("BAD_ANSWER" for an unusable answer); Score's error goes to every row of the call.
	OnError func(model string, version int64, code string)

	triton             *gateway.Triton
	maxBatch, inflight int
	maxDelay           time.Duration

	mu       sync.RWMutex
	batchers map[scoreKey]*Batcher[[]float32, []float64]

	indexMu    sync.Mutex
	index      map[string][]int64
	indexAt    time.Time // zero: never read
	refreshing *indexRefresh
}

// indexRefresh is a RepositoryIndex call in flight; done closes once index (nil: failed) is set.
type indexRefresh struct {
	done  chan struct{}
	index map[string][]int64
}

// indexTTL is how long a RepositoryIndex answer is used (Python's _index_ttl_s).
const indexTTL = 2 * time.Second

// NewScorer returns a Scorer over the Triton pool.
func NewScorer(triton *gateway.Triton, maxBatch int, maxDelay time.Duration, maxInflight int) *Scorer {
	return &Scorer{triton: triton, maxBatch: maxBatch, maxDelay: maxDelay, inflight: maxInflight,
		batchers: map[scoreKey]*Batcher[[]float32, []float64]{}}
}

// Score returns the outputs of row from the model version (k values; whether k is the
// version's is the caller's check). A failure is a *BackendError; a caller whose ctx ends
// gets ctx's error.
func (s *Scorer) Score(ctx context.Context, model string, version int64, row []float32) ([]float64, error) {
	key := scoreKey{model, version}
	s.mu.RLock()
	b := s.batchers[key]
	s.mu.RUnlock()
	if b == nil {
		s.mu.Lock()
		if b = s.batchers[key]; b == nil {
			b = NewBatcher(func(ctx context.Context, rows [][]float32) ([][]float64, error) {
				return s.scoreRows(ctx, model, version, rows)
			}, s.maxBatch, s.maxDelay, s.inflight)
			s.batchers[key] = b
		}
		s.mu.Unlock()
	}
	return b.Submit(ctx, row)
}

// Stats returns the ModelInfer calls made and the rows they held.
func (s *Scorer) Stats() (requests, rows uint64) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, b := range s.batchers {
		r, n := b.Stats()
		requests, rows = requests+r, rows+n
	}
	return requests, rows
}

// scoreRows makes one ModelInfer call for rows (all of one width) and returns each row's
// outputs, failing as TritonPool.score_rows does.
func (s *Scorer) scoreRows(parent context.Context, model string, version int64, rows [][]float32) ([][]float64, error) {
	name := model + "/" + strconv.FormatInt(version, 10)
	width := len(rows[0])
	flat := make([]float32, 0, len(rows)*width)
	for _, r := range rows {
		if len(r) != width { // a version has one width: a caller's bug, no call is made
			return nil, &BackendError{Code: codes.Internal,
				Msg: "triton " + name + ": rows of " + strconv.Itoa(width) + " and " + strconv.Itoa(len(r)) + " values in one batch"}
		}
		flat = append(flat, r...)
	}
	span, traceMD := s.Tracing.StartClient(parent, methodModelInfer)
	defer span.End()
	resp, err := s.triton.Call(context.WithoutCancel(parent), methodModelInfer,
		encodeInferRequest(model, version, flat, len(rows), width), traceMD)
	if err != nil {
		span.SetStatus(otelcodes.Error, status.Convert(err).Message())
		st := status.Convert(err)
		code := telemetry.CodeName(st.Code())
		return nil, s.fail(model, version, code, &BackendError{Code: st.Code(),
			Msg: "triton " + name + ": " + code + ": " + st.Message(), Unavailable: retryable(st.Code())})
	}
	out, err := parseInferResponse(resp, len(rows))
	if err != nil {
		what := err.Error()
		if isMalformed(err) {
			what = "answered malformed protobuf for " + strconv.Itoa(len(rows)) + " rows"
		}
		return nil, s.fail(model, version, "BAD_ANSWER", &BackendError{Code: codes.Internal, Msg: "triton " + name + " " + what, BadAnswer: true})
	}
	return out, nil
}

func (s *Scorer) fail(model string, version int64, code string, err *BackendError) error {
	if s.OnError != nil {
		s.OnError(model, version, code)
	}
	return err
}

// ReadyVersions returns the versions of model Triton has READY, sorted (Python's
// ready_versions): the RepositoryIndex answer is kept indexTTL; nil when unknown or when the
// call fails. Concurrent callers share one call; a caller whose ctx ends stops waiting (nil).
// The slice is the caller's.
func (s *Scorer) ReadyVersions(ctx context.Context, model string) []int64 {
	s.indexMu.Lock()
	if !s.indexAt.IsZero() && time.Since(s.indexAt) <= indexTTL {
		v := slices.Clone(s.index[model])
		s.indexMu.Unlock()
		return v
	}
	r := s.refreshing
	if r == nil {
		r = &indexRefresh{done: make(chan struct{})}
		s.refreshing = r
		go s.refresh(context.WithoutCancel(ctx), r)
	}
	s.indexMu.Unlock()
	select {
	case <-r.done:
		return slices.Clone(r.index[model])
	case <-ctx.Done():
		return nil
	}
}

// refresh makes the RepositoryIndex call of r (with Triton's timeout, not one caller's).
func (s *Scorer) refresh(ctx context.Context, r *indexRefresh) {
	var index map[string][]int64
	resp, err := s.triton.Call(ctx, methodRepositoryIndex, encodeRepositoryIndexRequest(), nil)
	if err == nil {
		index, err = parseRepositoryIndex(resp)
	}
	s.indexMu.Lock()
	if err == nil {
		s.index, s.indexAt = index, time.Now()
	}
	r.index = index
	s.refreshing = nil
	s.indexMu.Unlock()
	close(r.done)
}
