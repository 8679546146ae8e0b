package telemetry

import (
	"context"
	"strconv"
	"strings"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.34.0"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/metadata"
)

// Tracing starts server spans continuing the caller's W3C trace context. Without an OTLP
// endpoint it records nothing and only forwards the caller's traceparent/tracestate.
type Tracing struct {
	provider *sdktrace.TracerProvider // nil when off
	tracer   trace.Tracer
	prop     propagation.TraceContext
}

// NewTracing exports spans to endpoint ("host:port" or "http://host:port", plaintext) in
// batches; endpoint "" turns tracing off.
func NewTracing(ctx context.Context, endpoint, service string, log *Logger) (*Tracing, error) {
	t := &Tracing{}
	if endpoint == "" {
		return t, nil
	}
	opts := []otlptracegrpc.Option{otlptracegrpc.WithInsecure()}
	if strings.Contains(endpoint, "://") {
		opts = append(opts, otlptracegrpc.WithEndpointURL(endpoint))
	} else {
		opts = append(opts, otlptracegrpc.WithEndpoint(endpoint))
	}
	exporter, err := otlptracegrpc.New(ctx, opts...)
	if err != nil {
		return nil, err
	}
	otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) { log.Warn("otel: " + err.Error()) }))
	return withExporter(exporter, service), nil
}

func withExporter(exporter sdktrace.SpanExporter, service string) *Tracing {
	res := resource.NewWithAttributes(semconv.SchemaURL,
		semconv.ServiceName(service), semconv.ServiceNamespace("loopmesh"))
	provider := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exporter), sdktrace.WithResource(res))
	return &Tracing{provider: provider, tracer: provider.Tracer("loopmesh.dataplane")}
}

var noopSpan = trace.SpanFromContext(context.Background())

// Start begins a SERVER span named name under the caller's trace context (incoming metadata)
// and returns the metadata that carries the new span to Triton. Off, it returns a no-op span
// and the caller's own trace headers.
func (t *Tracing) Start(ctx context.Context, name string, attrs ...attribute.KeyValue) (context.Context, trace.Span, metadata.MD) {
	if t.provider == nil { // cheap: two lookups, no copy of the caller's metadata
		var out metadata.MD
		if v := metadata.ValueFromIncomingContext(ctx, "traceparent"); len(v) > 0 {
			out = metadata.MD{"traceparent": v}
			if v := metadata.ValueFromIncomingContext(ctx, "tracestate"); len(v) > 0 {
				out["tracestate"] = v
			}
		}
		return ctx, noopSpan, out
	}
	md, _ := metadata.FromIncomingContext(ctx)
	ctx = t.prop.Extract(ctx, carrier(md))
	ctx, span := t.tracer.Start(ctx, name, trace.WithSpanKind(trace.SpanKindServer), trace.WithAttributes(attrs...))
	out := metadata.MD{}
	t.prop.Inject(ctx, carrier(out))
	return ctx, span, out
}

type outgoingKey struct{}

// WithOutgoing keeps md, the trace headers Start returned, in ctx for the calls a handler
// makes on the request's behalf (StartClient with tracing off sends them on).
func WithOutgoing(ctx context.Context, md metadata.MD) context.Context {
	return context.WithValue(ctx, outgoingKey{}, md)
}

// StartClient begins a CLIENT span named method under ctx's span and returns the metadata
// that carries it to the server called. Off, it returns a no-op span and the request's own
// trace headers (WithOutgoing).
func (t *Tracing) StartClient(ctx context.Context, method string) (trace.Span, metadata.MD) {
	if t == nil || t.provider == nil {
		md, _ := ctx.Value(outgoingKey{}).(metadata.MD)
		return noopSpan, md
	}
	ctx, span := t.tracer.Start(ctx, method, trace.WithSpanKind(trace.SpanKindClient))
	out := metadata.MD{}
	t.prop.Inject(ctx, carrier(out))
	return span, out
}

// StartProducer begins a PRODUCER span named name (a message to Kafka topic) under the W3C
// trace context traceparent/tracestate (a Predict's, kept with its record) and returns the
// headers that carry the span in the message. Off, it returns a no-op span and the context
// as it was given (none when traceparent is empty).
func (t *Tracing) StartProducer(traceparent, tracestate, name, topic string) (trace.Span, [][2]string) {
	if t == nil || t.provider == nil {
		if traceparent == "" {
			return noopSpan, nil
		}
		headers := [][2]string{{"traceparent", traceparent}}
		if tracestate != "" {
			headers = append(headers, [2]string{"tracestate", tracestate})
		}
		return noopSpan, headers
	}
	in := metadata.MD{}
	if traceparent != "" {
		in.Set("traceparent", traceparent)
		if tracestate != "" {
			in.Set("tracestate", tracestate)
		}
	}
	ctx := t.prop.Extract(context.Background(), carrier(in))
	ctx, span := t.tracer.Start(ctx, name, trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(attribute.String("messaging.system", "kafka"),
			attribute.String("messaging.destination.name", topic)))
	out := metadata.MD{}
	t.prop.Inject(ctx, carrier(out))
	var headers [][2]string
	for _, key := range []string{"traceparent", "tracestate"} {
		if v := out.Get(key); len(v) > 0 {
			headers = append(headers, [2]string{key, v[0]})
		}
	}
	return span, headers
}

// EndSpan ends span, marked failed when err is not nil.
func EndSpan(span trace.Span, err error) {
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

// Shutdown flushes the spans still batched.
func (t *Tracing) Shutdown(ctx context.Context) error {
	if t.provider == nil {
		return nil
	}
	return t.provider.Shutdown(ctx)
}

// carrier adapts gRPC metadata to OpenTelemetry's TextMapCarrier.
type carrier metadata.MD

func (c carrier) Get(key string) string {
	if v := metadata.MD(c).Get(key); len(v) > 0 {
		if key == "traceparent" {
			return sampledOnly(v[0])
		}
		return v[0]
	}
	return ""
}

// sampledOnly keeps only the sampled bit of a version-00 traceparent's flags. Trace Context
// Level 2 adds a "random" bit (0x02), which OpenTelemetry Python sets on every trace; this
// otel-go refuses version-00 flags above 0x02 and would start a new trace instead.
func sampledOnly(tp string) string {
	if len(tp) != 55 || tp[:3] != "00-" || tp[52] != '-' {
		return tp
	}
	flags, err := strconv.ParseUint(tp[53:], 16, 8)
	if err != nil || flags <= 1 {
		return tp
	}
	return tp[:53] + "0" + strconv.FormatUint(flags&1, 10)
}

func (c carrier) Set(key, value string) { metadata.MD(c).Set(key, value) }

func (c carrier) Keys() []string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	return keys
}
