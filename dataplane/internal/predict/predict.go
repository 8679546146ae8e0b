// Package predict serves loopmesh.v1.InferenceService/Predict in the data plane: the hot path
// of the Python Predictor (loopmesh.inference.core), which it mirrors step for step: route,
// read the version's store features through the FeatureService, build the row, score it on
// Triton (rows of concurrent calls coalesced), answer by the version's task, fall back to
// stable when a canary fails, let shadow candidates score stable's requests off the answer's
// path, and queue the record for the prediction log, which the control plane drains.
//
// What it cannot serve with certainty goes to the control plane unchanged: a request that
// would be refused (its messages have one definition, there), a model or version whose spec
// was not pushed or is bad. Such calls cost a proxy hop; they are rare or errors.
package predict

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/loopmesh/loopmesh/dataplane/internal/auth"
	"github.com/loopmesh/loopmesh/dataplane/internal/oip"
	"github.com/loopmesh/loopmesh/dataplane/internal/proxy"
	"github.com/loopmesh/loopmesh/dataplane/internal/routing"
	"github.com/loopmesh/loopmesh/dataplane/internal/stats"
	"github.com/loopmesh/loopmesh/dataplane/internal/telemetry"
)

// ServiceName is LoopMesh's inference service; only Predict is served here.
const ServiceName = "loopmesh.v1.InferenceService"

const (
	pathPredict = "/" + ServiceName + "/Predict"
	role        = "predict"
	maxDetails  = 1024 // loopmesh.mesh.errors.MAX_DETAILS
	maxText     = 256  // the request's string limits (PredictInput)
)

// Options are the Predictor's settings (LOOPMESH_INFERENCE__*).
type Options struct {
	DefaultModel      string
	Degrade           bool   // features down: answer from defaults (else UNAVAILABLE)
	EntityIDKey       []byte // pseudonymise entity ids with this HMAC key (nil: unchanged)
	ShadowMaxInflight int
	ShadowTimeout     time.Duration
}

// Service is the Predict handler and its shadow work.
type Service struct {
	Routes   *routing.Store
	Features *FeatureClient
	Scorer   *Scorer
	Backend  *grpc.ClientConn // the control plane, for what is not served here
	Stats    *stats.Recorder
	Counts   *Counts
	// Predictions takes each answered prediction (PredictionLog: to Kafka).
	Predictions Sink
	Metrics     *telemetry.Metrics
	Auth        *auth.Auth
	Tracing     *telemetry.Tracing
	// Calls holds each call answered here (method, code, latency) until the control plane
	// drains them into its own rpc.server metrics (the ones it forwards it records itself).
	Calls *stats.Recorder
	Log   *telemetry.Logger
	Options

	degradedWarned atomic.Int64 // unix seconds of the last "features unavailable" warning

	slots   chan struct{} // shadow work in flight
	shadows sync.WaitGroup
}

// Register adds Predict to s; the service's other methods reach the unknown-service handler,
// which proxies them to the control plane.
func (s *Service) Register(server *grpc.Server) {
	s.slots = make(chan struct{}, s.ShadowMaxInflight)
	s.Scorer.OnError = s.Counts.TritonError
	s.Scorer.Tracing, s.Features.Tracing = s.Tracing, s.Tracing
	server.RegisterService(&grpc.ServiceDesc{
		ServiceName: ServiceName,
		HandlerType: (*any)(nil),
		Methods:     []grpc.MethodDesc{{MethodName: "Predict", Handler: s.handle}},
	}, s)
}

// Totals are Predict's cumulative batching figures: how many Triton requests and
// GetOnlineFeatures calls its rows and entities took (fewer than rows: coalesced).
type Totals struct {
	TritonRequests uint64 `json:"triton_requests"`
	Rows           uint64 `json:"rows"`
	FeatureCalls   uint64 `json:"feature_calls"`
	FeatureFetches uint64 `json:"feature_fetches"`
}

// Totals reports the batching so far.
func (s *Service) Totals() Totals {
	requests, rows := s.Scorer.Stats()
	calls, fetches := s.Features.Stats()
	return Totals{TritonRequests: requests, Rows: rows, FeatureCalls: calls, FeatureFetches: fetches}
}

// WaitShadows waits for shadow work in flight (each is bounded by ShadowTimeout).
func (s *Service) WaitShadows() { s.shadows.Wait() }

// errForward: the control plane answers this call.
var errForward = errors.New("forward")

func (s *Service) handle(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
	start := time.Now()
	if err := s.Auth.CheckMethod(metadata.ValueFromIncomingContext(ctx, "authorization"), role, pathPredict); err != nil {
		s.answered(start, "", 0, err)
		return nil, err
	}
	var raw []byte
	if err := dec(&raw); err != nil {
		return nil, err
	}
	c := &call{}
	resp, err := s.predict(ctx, raw, start, c)
	if errors.Is(err, errForward) {
		resp, err = s.forward(ctx, raw)
		s.Metrics.Proxied(ServiceName, status.Code(err))
		return resp, err
	}
	s.answered(start, c.model, c.version, err)
	return resp, err
}

// answered records a call answered here.
func (s *Service) answered(start time.Time, model string, version int64, err error) {
	elapsed := time.Since(start)
	code := status.Code(err)
	s.Metrics.Request("Predict", model, telemetry.Version(version), code, elapsed.Seconds())
	if s.Calls != nil {
		s.Calls.Record(pathPredict, int64(code), true, float64(elapsed.Nanoseconds())/1e6)
	}
}

// DrainCalls returns the calls answered here since the previous drain.
func (s *Service) DrainCalls() []stats.Call {
	if s.Calls == nil {
		return []stats.Call{}
	}
	return s.Calls.DrainCalls(func(c int64) string { return telemetry.CodeName(codes.Code(c)) })
}

// call collects the metric labels as the handler learns them.
type call struct {
	model   string
	version int64
}

// forward sends the call to the control plane as it came (metadata included) and returns
// its answer or status.
func (s *Service) forward(ctx context.Context, raw []byte) (any, error) {
	var resp []byte
	var trailer metadata.MD
	err := s.Backend.Invoke(proxy.OutgoingContext(ctx), pathPredict, raw, &resp, grpc.Trailer(&trailer))
	if len(trailer) > 0 {
		_ = grpc.SetTrailer(ctx, trailer)
	}
	if err != nil {
		return nil, err
	}
	return resp, nil
}

func (s *Service) predict(ctx context.Context, raw []byte, start time.Time, c *call) (any, error) {
	r, err := ParseRequest(raw)
	if err != nil || !acceptable(r) {
		return nil, errForward
	}
	name := r.ModelName
	if name == "" {
		name = s.DefaultModel
	}
	route := s.Routes.Get(name)
	if !oip.ValidName(name) || route == nil {
		return nil, errForward
	}
	entity := r.EntityID
	if s.EntityIDKey != nil {
		// Once, first: routing, the feature read and the log all use the stored id.
		mac := hmac.New(sha256.New, s.EntityIDKey)
		mac.Write([]byte(entity))
		entity = hex.EncodeToString(mac.Sum(nil))
	}
	var version int64
	var arm routing.Arm
	switch {
	case r.ModelVersion != "":
		if !oip.ValidVersion(r.ModelVersion) {
			return nil, errForward
		}
		version, _ = strconv.ParseInt(r.ModelVersion, 10, 64)
		arm = routing.Pinned
	default:
		var ok bool
		if version, arm, ok = route.Choose(&entity); !ok {
			if version = s.latest(ctx, name, route); version == 0 {
				return nil, errForward
			}
			arm = routing.Latest
		}
	}
	spec := route.Spec(version)
	if !spec.Usable() {
		return nil, errForward
	}
	for k := range r.Categorical {
		if spec.Declares(k) == nil {
			return nil, errForward // refused there, naming the field
		}
	}
	c.model, c.version = name, version
	ctx, span, traceMD := s.Tracing.Start(ctx, "Predict", attribute.String("model.name", name))
	defer span.End()
	ctx = telemetry.WithOutgoing(ctx, traceMD) // the feature read and Triton call continue it
	fail := func(err error) (any, error) {
		span.SetStatus(otelcodes.Error, status.Convert(err).Message())
		return nil, err
	}

	in, err := s.inputs(ctx, r, entity, name, version, spec, nil)
	if err != nil {
		return fail(err)
	}
	// Latency is counted per version attempt: a fallback's clock starts when stable is asked.
	attempt := start
	outputs, err := s.score(ctx, name, version, spec, in.row)
	if err != nil {
		if ctx.Err() == context.Canceled {
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		s.Stats.Record(name, version, false, since(attempt))
		stable := route.Stable
		if arm != routing.Canary || stable == nil || *stable == version || !route.Spec(*stable).Usable() {
			return fail(failure(err))
		}
		// The canary failed this request: stable answers it, the canary takes the blame.
		s.Metrics.Fallback(name)
		version, arm, spec = *stable, routing.Fallback, route.Spec(*stable)
		c.version = version
		attempt = time.Now()
		if in, err = s.inputs(ctx, r, entity, name, version, spec, in.readings); err != nil {
			return fail(err)
		}
		if outputs, err = s.score(ctx, name, version, spec, in.row); err != nil {
			s.Stats.Record(name, version, false, since(attempt))
			return fail(failure(err))
		}
	}
	s.Stats.Record(name, version, true, since(attempt))
	s.Counts.Prediction(name, version, string(arm), in.degraded)
	span.SetAttributes(attribute.Int64("model.version", version), attribute.String("model.arm", string(arm)))
	ans := answerOf(spec, outputs)
	rec := &Record{
		PredictionID: newID(),
		ModelName:    name,
		ModelVersion: version,
		EntityID:     entity,
		Features:     in.features,
		Categorical:  in.categorical,
		Score:        ans.score,
		Outputs:      ans.probabilities,
		Task:         spec.Task,
		LatencyMs:    since(start),
		EventTime:    time.Now().UTC().Format("2006-01-02T15:04:05.000000Z07:00"),
		Shadow:       []ShadowAnswer{},
	}
	if tp := traceMD.Get("traceparent"); len(tp) > 0 {
		rec.Traceparent = tp[0]
		if ts := traceMD.Get("tracestate"); len(ts) > 0 {
			rec.Tracestate = ts[0]
		}
	}
	if rec.Outputs == nil {
		rec.Outputs = []float64{}
	}
	var shadows []int64
	if arm == routing.Stable {
		shadows = route.ShadowsFor()
	}
	switch {
	case len(shadows) == 0:
		s.Predictions.Log(rec)
	case s.takeSlot():
		s.shadows.Add(1)
		go s.shadow(rec, r, entity, route, shadows, in.readings)
	default: // shadow work goes first under load, never the answer
		s.Counts.Shadow(name, 0, "shed")
		s.Predictions.Log(rec)
	}
	out := &Response{
		PredictionID:      rec.PredictionID,
		Score:             ans.score,
		ModelName:         name,
		ModelVersion:      version,
		Degraded:          in.degraded,
		DefaultedFeatures: in.defaulted,
		Arm:               string(arm),
		RequestID:         r.RequestID,
		Task:              spec.Task,
		Probabilities:     ans.probabilities,
		PredictedClass:    ans.class,
	}
	return out.Marshal(), nil
}

// latest is the version to answer with when no rollout names one: the newest that Triton
// has ready among the published (a newer one on disk may be a candidate nobody loaded yet),
// else the newest published; 0 when none is published.
func (s *Service) latest(ctx context.Context, name string, route *routing.Route) int64 {
	known := route.Known
	if len(known) == 0 {
		return 0
	}
	published := make(map[int64]bool, len(known))
	var newest int64
	for _, v := range known {
		published[v] = true
		newest = max(newest, v)
	}
	var ready int64
	for _, v := range s.Scorer.ReadyVersions(ctx, name) {
		if published[v] {
			ready = max(ready, v)
		}
	}
	if ready > 0 {
		return ready
	}
	return newest
}

func (s *Service) takeSlot() bool {
	select {
	case s.slots <- struct{}{}:
		return true
	default:
		return false
	}
}

// inputs is one version's input row for the request.
type inputs struct {
	row         []float32
	features    map[string]float64
	categorical map[string]string
	defaulted   []string
	degraded    bool
	readings    map[string]Reading
}

// inputs builds the row of spec: numeric features in declared order (context first, then the
// store's value, else the declared default, reported), then each declared categorical input's
// index. Store features already read (known) are not read again.
func (s *Service) inputs(ctx context.Context, r *Request, entity, name string, version int64, spec *routing.Spec, known map[string]Reading) (*inputs, error) {
	in := &inputs{categorical: map[string]string{}, readings: known, defaulted: []string{}}
	for k, v := range r.Categorical {
		if spec.Declares(k) != nil { // others: refused earlier, or left out by a fallback/shadow
			in.categorical[k] = v
		}
	}
	var wanted []string
	for _, ref := range spec.StoreRefs {
		_, inContext := r.Context[ref]
		_, read := known[ref]
		if !inContext && !read {
			wanted = append(wanted, ref)
		}
	}
	if len(wanted) > 0 {
		fetched, err := s.Features.Fetch(ctx, entity, wanted)
		if err != nil {
			var down *FeaturesUnavailable
			if !errors.As(err, &down) {
				return nil, status.FromContextError(err).Err()
			}
			s.warnDegraded(down)
			if !s.Degrade {
				return nil, status.Error(codes.Unavailable, cut("feature service unavailable: "+down.Error()))
			}
			in.degraded = true
		} else {
			merged := make(map[string]Reading, len(known)+len(fetched))
			for k, v := range known {
				merged[k] = v
			}
			for k, v := range fetched {
				merged[k] = v
			}
			in.readings = merged
		}
	}
	in.row = make([]float32, 0, len(spec.FeatureNames)+len(spec.Categorical))
	in.features = make(map[string]float64, len(spec.FeatureNames))
	for _, f := range spec.FeatureNames {
		value, ok := r.Context[f]
		if !ok {
			reading := in.readings[f]
			switch {
			case reading.Kind == KindText:
				return nil, status.Error(codes.FailedPrecondition, cut(name+" version "+strconv.FormatInt(version, 10)+
					" declares feature "+oip.PyRepr(f)+", which the store holds as text; models take numbers only"))
			case reading.Kind == KindNumber && !math.IsNaN(reading.Number) && !math.IsInf(reading.Number, 0):
				value = reading.Number
			default:
				value = spec.Defaults[f]
				in.defaulted = append(in.defaulted, f)
			}
		}
		in.row = append(in.row, float32(value))
		in.features[f] = value
	}
	for i := range spec.Categorical {
		declared := &spec.Categorical[i]
		in.row = append(in.row, float32(declared.Index(in.categorical[declared.Name])))
	}
	return in, nil
}

// warnDegraded logs why features could not be read, at most every 10 s (each answer that
// defaulted says so in its own fields and counts).
func (s *Service) warnDegraded(err error) {
	now := time.Now().Unix()
	last := s.degradedWarned.Load()
	if s.Log == nil || now-last < 10 || !s.degradedWarned.CompareAndSwap(last, now) {
		return
	}
	s.Log.Warn("feature service unavailable", "error", err.Error(), "degrade", s.Degrade)
}

// score is one row's outputs from that version, checked against its spec: k finite numbers,
// k its n_outputs (another width means metadata and graph disagree: reading it anyway would
// be a wrong answer).
func (s *Service) score(ctx context.Context, name string, version int64, spec *routing.Spec, row []float32) ([]float64, error) {
	out, err := s.Scorer.Score(ctx, name, version, row)
	if err != nil {
		return nil, err // a failed Triton call was counted once, by the Scorer's OnError
	}
	where := name + " version " + strconv.FormatInt(version, 10)
	if len(out) != spec.NOutputs {
		return nil, &BackendError{Code: codes.Internal, Msg: where + " answered " + strconv.Itoa(len(out)) +
			" outputs per row, but its metadata.json declares n_outputs=" + strconv.Itoa(spec.NOutputs) + " (" + spec.Task + ")"}
	}
	for _, v := range out {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			return nil, &BackendError{Code: codes.Internal, Msg: where + " answered a non-finite output"}
		}
	}
	return out, nil
}

// failure is a scoring failure as the caller sees it: UNAVAILABLE when another try may
// succeed, else INTERNAL (the model failed), the message as Python words it.
func failure(err error) error {
	var be *BackendError
	if !errors.As(err, &be) {
		return status.FromContextError(err).Err()
	}
	if be.Unavailable {
		return status.Error(codes.Unavailable, cut(be.Msg))
	}
	return status.Error(codes.Internal, cut(be.Msg))
}

type answer struct {
	score         float64
	probabilities []float64
	class         int32
}

// answerOf reads one row of outputs by the task: multiclass answers every class's
// probability and the top one (the first of equals); the others their one number.
func answerOf(spec *routing.Spec, outputs []float64) answer {
	if spec.Task != "multiclass" {
		return answer{score: outputs[0]}
	}
	top := 0
	for i, p := range outputs {
		if p > outputs[top] {
			top = i
		}
	}
	return answer{score: outputs[top], probabilities: outputs, class: int32(top)}
}

// shadow scores the request stable answered with each shadow version, then queues the
// record with their answers (always queued, whatever happens to the shadows).
func (s *Service) shadow(rec *Record, r *Request, entity string, route *routing.Route, versions []int64, readings map[string]Reading) {
	defer func() { <-s.slots; s.shadows.Done() }()
	ctx, cancel := context.WithTimeout(context.Background(), s.ShadowTimeout)
	defer cancel()
	answers := make([]*ShadowAnswer, len(versions))
	var wg sync.WaitGroup
	for i, v := range versions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers[i] = s.shadowOne(ctx, r, entity, rec.ModelName, v, route.Spec(v), readings)
		}()
	}
	wg.Wait()
	if ctx.Err() != nil { // as one wait over all of them: a timeout gives up every answer
		for _, v := range versions {
			s.Counts.Shadow(rec.ModelName, v, "timeout")
		}
	} else {
		for i, v := range versions {
			if answers[i] == nil {
				s.Counts.Shadow(rec.ModelName, v, "failed")
				continue
			}
			s.Counts.Shadow(rec.ModelName, v, "scored")
			rec.Shadow = append(rec.Shadow, *answers[i])
		}
	}
	s.Predictions.Log(rec)
}

// shadowOne is one shadow's answer (nil when it failed): its own declared inputs, from what
// was read (a feature only it declares is read now); its call feeds its operational window.
func (s *Service) shadowOne(ctx context.Context, r *Request, entity, name string, version int64, spec *routing.Spec, readings map[string]Reading) *ShadowAnswer {
	if !spec.Usable() {
		return nil
	}
	in, err := s.inputs(ctx, r, entity, name, version, spec, readings)
	if err != nil {
		return nil
	}
	start := time.Now()
	outputs, err := s.score(ctx, name, version, spec, in.row)
	s.Stats.RecordShadow(name, version, err == nil, since(start))
	if err != nil {
		return nil
	}
	ans := answerOf(spec, outputs)
	probs := ans.probabilities
	if probs == nil {
		probs = []float64{}
	}
	return &ShadowAnswer{ModelVersion: version, Score: ans.score, Outputs: probs}
}

// acceptable reports whether PredictInput would take r as it is: otherwise the control
// plane refuses it, naming the field. Conservative: anything doubtful is left to it.
func acceptable(r *Request) bool {
	if !textOK(r.EntityID, 1) || edgeSpace(r.EntityID) || !textOK(r.RequestID, 0) {
		return false
	}
	for k, v := range r.Context {
		if !textOK(k, 1) || math.IsNaN(v) || math.IsInf(v, 0) {
			return false
		}
	}
	for k, v := range r.Categorical {
		if !textOK(k, 1) || !textOK(v, 0) {
			return false
		}
	}
	return true
}

// textOK: at least least and at most maxText characters (code points, as Python counts).
func textOK(s string, least int) bool {
	if len(s) <= maxText {
		return len(s) >= least
	}
	return utf8.RuneCountInString(s) <= maxText
}

// edgeSpace reports a first or last character that Python's str.strip could remove (the
// ids are trimmed there, so such an id is not used as sent).
func edgeSpace(s string) bool {
	first, _ := utf8.DecodeRuneInString(s)
	last, _ := utf8.DecodeLastRuneInString(s)
	for _, c := range []rune{first, last} {
		if c <= ' ' || (c >= 0x7f && c <= 0xa0) || unicode.IsSpace(c) || unicode.In(c, unicode.Z) {
			return true
		}
	}
	return false
}

// cut keeps a status message within maxDetails characters (loopmesh.mesh.errors._cut).
func cut(msg string) string {
	if len(msg) <= maxDetails || utf8.RuneCountInString(msg) <= maxDetails {
		return msg
	}
	runes := []rune(msg)
	return string(runes[:maxDetails-1]) + "…"
}

func since(t time.Time) float64 { return float64(time.Since(t).Nanoseconds()) / 1e6 }

// newID is a random UUID4 as 32 hex digits (Python's uuid4().hex).
func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return hex.EncodeToString(b[:])
}
