package features

import (
	"context"
	"errors"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/loopmesh/loopmesh/dataplane/internal/auth"
	"github.com/loopmesh/loopmesh/dataplane/internal/config"
	"github.com/loopmesh/loopmesh/dataplane/internal/stats"
	"github.com/loopmesh/loopmesh/dataplane/internal/telemetry"
)

// Service is FeatureService's gRPC name. Only GetOnlineFeatures is served here; its other
// methods (GetFeatureSchema, DeleteEntity) reach the unknown-service handler, the proxy.
const Service = "loopmesh.v1.FeatureService"

// Role GetOnlineFeatures needs (loopmesh.features.server.METHOD_ROLES).
const Role = "features"

const (
	method = "GetOnlineFeatures"
	path   = "/" + Service + "/" + method
	// What loopmesh.mesh.rpc_guards.DecodeGuard answers for a request that does not decode.
	undecodable = "request: not a valid loopmesh.v1.GetOnlineFeaturesRequest (malformed protobuf, or a string that is not UTF-8)"
)

// Server answers GetOnlineFeatures from the online store.
type Server struct {
	Metrics *telemetry.Metrics
	Auth    *auth.Auth
	Tracing *telemetry.Tracing
	Log     *telemetry.Logger

	// Calls holds each answered call (method, code, latency) until the control plane drains
	// it into its own rpc.server.* instruments (POST /calls/drain): the features process's
	// metrics keep counting GetOnlineFeatures although its calls no longer reach Python.
	Calls *stats.Recorder

	mu      sync.Mutex // serialises Replace
	current atomic.Pointer[catalog]
}

// Call is one (method, status code)'s calls (stats.Call).
type Call = stats.Call

// DrainCalls returns the calls answered since the previous drain.
func (s *Server) DrainCalls() []Call {
	return s.Calls.DrainCalls(func(c int64) string { return telemetry.CodeName(codes.Code(c)) })
}

// New opens the configured store and serves cfg.
func New(cfg *config.Features, m *telemetry.Metrics, a *auth.Auth, tr *telemetry.Tracing, log *telemetry.Logger) (*Server, error) {
	store, err := Open(cfg.Store)
	if err != nil {
		return nil, err
	}
	s := &Server{Metrics: m, Auth: a, Tracing: tr, Log: log, Calls: stats.New(64, 0)}
	s.current.Store(newCatalog(cfg, store))
	return s, nil
}

// Replace serves cfg from now on (the control plane's PUT /features). A store at the same
// location stays open; one that moved is opened first and the old one closed once the
// reads that may still use it have timed out.
func (s *Server) Replace(cfg *config.Features) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.current.Load()
	store := old.store
	if !reflect.DeepEqual(old.cfg.Store, cfg.Store) {
		var err error
		if store, err = Open(cfg.Store); err != nil {
			return err
		}
	}
	s.current.Store(newCatalog(cfg, store))
	if store != old.store {
		time.AfterFunc(old.timeout+time.Second, func() { _ = old.store.Close() })
	}
	return nil
}

// Config is the features config in force.
func (s *Server) Config() *config.Features { return s.current.Load().cfg }

// Close closes the store.
func (s *Server) Close() error { return s.current.Load().store.Close() }

// Register adds GetOnlineFeatures to g.
func (s *Server) Register(g *grpc.Server) {
	g.RegisterService(&grpc.ServiceDesc{
		ServiceName: Service,
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{MethodName: method, Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			start := time.Now()
			resp, err := func() (any, error) {
				// Before the request is even read, as the Python interceptor does.
				if err := s.Auth.CheckMethod(metadata.ValueFromIncomingContext(ctx, "authorization"), Role, path); err != nil {
					return nil, err
				}
				var req []byte
				if err := dec(&req); err != nil {
					return nil, err
				}
				return s.GetOnlineFeatures(ctx, req)
			}()
			elapsed := time.Since(start)
			code := status.Code(err)
			s.Metrics.FeatureRequest(method, code, elapsed.Seconds())
			s.Calls.Record(path, int64(code), true, float64(elapsed.Nanoseconds())/1e6)
			return resp, err
		}}},
	}, s)
}

// GetOnlineFeatures answers one serialized GetOnlineFeaturesRequest with a serialized
// GetOnlineFeaturesResponse, or a status error.
func (s *Server) GetOnlineFeatures(ctx context.Context, raw []byte) ([]byte, error) {
	req, err := parseRequest(raw)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, undecodable)
	}
	ctx, span, _ := s.Tracing.Start(ctx, "FeatureService/GetOnlineFeatures")
	defer span.End()
	c := s.current.Load()
	if err := c.validateEntityIDs(req.entityIDs); err != nil {
		span.SetStatus(otelcodes.Error, err.Error())
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	joinKey := req.joinKey
	if joinKey == "" {
		joinKey = PrimaryJoinKey
	}
	specs, err := c.resolve(req.featureRefs, joinKey)
	if err != nil {
		span.SetStatus(otelcodes.Error, err.Error())
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	span.SetAttributes(attribute.Int("loopmesh.features.entities", len(req.entityIDs)),
		attribute.Int("loopmesh.features.refs", len(specs)))

	// Each entity read once, each view once with each of its requested features once.
	row := make(map[string]int, len(req.entityIDs))
	distinct := make([]string, 0, len(req.entityIDs))
	for _, id := range req.entityIDs {
		if _, ok := row[id]; !ok {
			row[id] = len(distinct)
			distinct = append(distinct, id)
		}
	}
	type at struct{ view, feature int }
	where := make([]at, len(specs))
	var views []viewRead
	viewIndex := map[string]int{}
	featureIndex := map[*spec]int{}
	for i, sp := range specs {
		v, ok := viewIndex[sp.view]
		if !ok {
			v = len(views)
			viewIndex[sp.view] = v
			views = append(views, viewRead{view: c.cfg.Views[sp.view]})
		}
		f, ok := featureIndex[sp]
		if !ok {
			f = len(views[v].features)
			featureIndex[sp] = f
			views[v].features = append(views[v].features, sp.name)
		}
		where[i] = at{v, f}
	}

	readCtx, cancel := context.WithTimeout(ctx, c.timeout)
	rows, err := c.store.Read(readCtx, joinKey, distinct, views)
	timedOut := errors.Is(readCtx.Err(), context.DeadlineExceeded)
	cancel()
	if err != nil {
		if ctx.Err() != nil { // the caller's deadline or cancel: its own status
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		msg := err.Error()
		if timedOut {
			msg = "the online store did not answer within " + c.timeoutText + "s"
		}
		span.RecordError(err)
		span.SetStatus(otelcodes.Error, msg)
		s.Metrics.StoreError(c.store.Kind())
		if s.Log != nil {
			s.Log.Warn("online store read failed", "store", c.store.Kind(), "error", err)
		}
		return nil, status.Error(codes.Unavailable, "online store: "+msg)
	}

	now := float64(time.Now().UnixNano()) / 1e9
	cells := make([]cell, len(req.entityIDs)*len(specs))
	var present, missing, stale int
	for e, id := range req.entityIDs {
		r := row[id]
		for i, sp := range specs {
			w := where[i]
			vr := &rows[w.view]
			cl := &cells[e*len(specs)+i]
			cl.v = vr.values[r][w.feature]
			cl.seconds = vr.seconds[r]
			cl.status = statusOf(cl.v, cl.seconds, sp.maxAge, now)
			switch cl.status {
			case statusPresent:
				present++
			case statusMissing:
				missing++
			default:
				stale++
			}
		}
	}
	s.Metrics.FeatureValues(present, missing, stale)
	refs := make([]string, len(specs))
	for i, sp := range specs {
		refs[i] = sp.ref
	}
	return appendResponse(make([]byte, 0, 64+len(cells)*24), refs, req.entityIDs, cells), nil
}
