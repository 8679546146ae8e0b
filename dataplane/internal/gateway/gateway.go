package gateway

import (
	"context"
	"strconv"
	"time"

	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
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

// ServerName replaces Triton's name in ServerMetadata.
const ServerName = "loopmesh-inference"

// Role every OIP method needs.
const Role = "predict"

const (
	pathInfer    = "/" + Service + "/ModelInfer"
	pathReady    = "/" + Service + "/ServerReady"
	pathMetadata = "/" + Service + "/ServerMetadata"
)

var liveAnswer = []byte{0x08, 0x01} // ServerLiveResponse{live: true}

// Gateway is the inference.GRPCInferenceService implementation.
type Gateway struct {
	Triton  *Triton
	Routes  *routing.Store
	Stats   *stats.Recorder
	Metrics *telemetry.Metrics
	Auth    *auth.Auth
	Tracing *telemetry.Tracing
}

// call collects a call's metric labels as the handler learns them.
type call struct{ model, version string }

type handler func(ctx context.Context, req []byte, c *call) (any, error)

// Register adds the served methods to s; any other method of the service reaches the
// unknown-service handler, which answers UNIMPLEMENTED.
func (g *Gateway) Register(s *grpc.Server) {
	desc := grpc.ServiceDesc{
		ServiceName: Service,
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{
			g.method("ModelInfer", g.modelInfer),
			g.method("ServerLive", g.serverLive),
			g.method("ServerReady", g.serverReady),
			g.method("ServerMetadata", g.serverMetadata),
			g.method("ModelReady", g.model("ModelReady", "/"+Service+"/ModelReady")),
			g.method("ModelMetadata", g.model("ModelMetadata", "/"+Service+"/ModelMetadata")),
			g.method("ModelConfig", g.model("ModelConfig", "/"+Service+"/ModelConfig")),
		},
	}
	s.RegisterService(&desc, g)
}

// method wraps h with auth (before the request is even read) and the request metrics.
func (g *Gateway) method(name string, h handler) grpc.MethodDesc {
	return grpc.MethodDesc{MethodName: name, Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
		start := time.Now()
		c := &call{}
		resp, err := func() (any, error) {
			if g.Auth.Enabled() {
				if err := g.Auth.Check(metadata.ValueFromIncomingContext(ctx, "authorization"), Role); err != nil {
					return nil, err
				}
			}
			var req []byte
			if err := dec(&req); err != nil {
				return nil, err
			}
			return h(ctx, req, c)
		}()
		g.Metrics.Request(name, c.model, c.version, status.Code(err), time.Since(start).Seconds())
		return resp, err
	}}
}

func invalid(msg string) error { return status.Error(codes.InvalidArgument, msg) }

func (g *Gateway) modelInfer(ctx context.Context, req []byte, c *call) (any, error) {
	r, msg := oip.CheckInfer(req)
	c.model = telemetry.Invalid
	if r != nil && oip.ValidName(r.ModelName) {
		c.model = r.ModelName
	}
	if msg != "" {
		return nil, invalid(msg)
	}
	name := r.ModelName
	ctx, span, traceMD := g.Tracing.Start(ctx, "ModelInfer", attribute.String("model.name", name))
	defer span.End()

	route := g.Routes.Get(name)
	var version int64 // 0: Triton picks
	var arm routing.Arm
	parts := proxy.Parts{req}
	if r.ModelVersion != "" {
		version, _ = strconv.ParseInt(r.ModelVersion, 10, 64) // checked: at most 18 digits
		arm = routing.Pinned
	} else if route != nil {
		var key *string
		if r.HasRoutingKey {
			key = &r.RoutingKey
		} else if r.ID != "" {
			key = &r.ID
		}
		if v, a, ok := route.Choose(key); ok {
			version, arm = v, a
			parts = proxy.Parts{req, oip.StringField(2, strconv.FormatInt(v, 10))}
		}
	}
	for {
		c.version = telemetry.Version(version)
		if version > 0 {
			span.SetAttributes(attribute.Int64("model.version", version), attribute.String("model.arm", string(arm)))
		}
		start := time.Now()
		resp, err := g.Triton.Call(ctx, pathInfer, parts, traceMD)
		ms := float64(time.Since(start).Nanoseconds()) / 1e6
		if err == nil {
			if version > 0 {
				g.Stats.Record(name, version, true, ms)
			}
			return resp, nil
		}
		if ctx.Err() == context.Canceled { // the caller left: nobody to blame, nobody to answer
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		code := status.Code(err)
		// A malformed request is the caller's fault, not the version's: no blame, no retry.
		clientErr := code == codes.InvalidArgument
		known := route.IsKnown(version)
		if !clientErr {
			g.Metrics.TritonError(name, c.version, code)
			// A version that does not exist at all is the caller's mistake too (NOT_FOUND).
			if version > 0 && (code != codes.NotFound || known) {
				g.Stats.Record(name, version, false, ms)
			}
		}
		if arm == routing.Canary && !clientErr && route.Stable != nil && *route.Stable != version && ctx.Err() == nil {
			// A failing canary: stable answers this request instead.
			g.Metrics.Fallback(name)
			span.AddEvent("fallback", trace.WithAttributes(attribute.String("triton.code", telemetry.CodeName(code))))
			version, arm = *route.Stable, routing.Fallback
			parts = proxy.Parts{req, oip.StringField(2, strconv.FormatInt(version, 10))}
			continue
		}
		err = tritonError(err, known)
		span.SetStatus(otelcodes.Error, status.Convert(err).Message())
		return nil, err
	}
}

// tritonError is Triton's failure as the caller sees it: "triton: <message>", and NOT_FOUND
// for a published version becomes UNAVAILABLE (published, not loaded yet: retry later).
func tritonError(err error, known bool) error {
	st := status.Convert(err)
	code, msg := st.Code(), st.Message()
	if msg == "" {
		msg = telemetry.CodeName(code)
	}
	if code == codes.NotFound && known {
		code = codes.Unavailable
	}
	return status.Error(code, "triton: "+msg)
}

func (g *Gateway) serverLive(_ context.Context, req []byte, _ *call) (any, error) {
	if oip.Validate(req) != nil {
		return nil, invalid("request: not ServerLiveRequest")
	}
	return liveAnswer, nil
}

// serverReady: ready only when the control plane marked the routes ready and Triton is.
func (g *Gateway) serverReady(ctx context.Context, req []byte, _ *call) (any, error) {
	if oip.Validate(req) != nil {
		return nil, invalid("request: not ServerReadyRequest")
	}
	if !g.Routes.Load().Ready {
		return []byte(nil), nil // ready=false
	}
	ctx, span, traceMD := g.Tracing.Start(ctx, "ServerReady")
	defer span.End()
	resp, err := g.Triton.Call(ctx, pathReady, req, traceMD)
	if err != nil {
		return []byte(nil), nil
	}
	return resp, nil
}

func (g *Gateway) serverMetadata(ctx context.Context, req []byte, _ *call) (any, error) {
	if oip.Validate(req) != nil {
		return nil, invalid("request: not ServerMetadataRequest")
	}
	ctx, span, traceMD := g.Tracing.Start(ctx, "ServerMetadata")
	defer span.End()
	resp, err := g.Triton.Call(ctx, pathMetadata, req, traceMD)
	if err != nil {
		return nil, tritonError(err, false)
	}
	return proxy.Parts{resp, oip.StringField(1, ServerName)}, nil
}

// model serves ModelReady, ModelMetadata and ModelConfig: the name and version are checked
// here, naming the field, instead of travelling on to Triton.
func (g *Gateway) model(method, path string) handler {
	return func(ctx context.Context, req []byte, c *call) (any, error) {
		name, version, err := oip.ParseModelRequest(req)
		if err != nil {
			return nil, invalid("request: not " + method + "Request")
		}
		c.model = telemetry.Invalid
		if !oip.ValidName(name) {
			return nil, invalid("name: " + oip.InvalidName(name))
		}
		c.model = name
		if version != "" && !oip.ValidVersion(version) {
			return nil, invalid("version: " + oip.InvalidVersion(version))
		}
		route := g.Routes.Get(name)
		parts := proxy.Parts{req}
		if version == "" && method == "ModelReady" && route != nil && route.Stable != nil {
			// "Is the model ready" means: is the version its traffic goes to ready.
			version = strconv.FormatInt(*route.Stable, 10)
			parts = proxy.Parts{req, oip.StringField(2, version)}
		}
		c.version = version
		attrs := []attribute.KeyValue{attribute.String("model.name", name)}
		if version != "" {
			attrs = append(attrs, attribute.String("model.version", version))
		}
		ctx, span, traceMD := g.Tracing.Start(ctx, method, attrs...)
		defer span.End()
		resp, err := g.Triton.Call(ctx, path, parts, traceMD)
		if err != nil {
			v, _ := strconv.ParseInt(version, 10, 64)
			err = tritonError(err, route.IsKnown(v))
			span.SetStatus(otelcodes.Error, status.Convert(err).Message())
			return nil, err
		}
		return resp, nil
	}
}
