package telemetry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
)

const parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

func incoming(kv ...string) context.Context {
	return metadata.NewIncomingContext(context.Background(), metadata.Pairs(kv...))
}

func TestTracingContinuesTheCallersTrace(t *testing.T) {
	exporter := tracetest.NewInMemoryExporter()
	tr := withExporter(exporter, "test")
	_, span, out := tr.Start(incoming("traceparent", parent), "ModelInfer", attribute.String("model.name", "m"))
	span.End()
	if err := tr.provider.ForceFlush(context.Background()); err != nil {
		t.Fatal(err)
	}
	spans := exporter.GetSpans()
	if len(spans) != 1 || spans[0].Name != "ModelInfer" || spans[0].SpanKind != trace.SpanKindServer {
		t.Fatalf("%+v", spans)
	}
	got := spans[0].SpanContext
	if got.TraceID().String() != "0af7651916cd43dd8448eb211c80319c" || spans[0].Parent.SpanID().String() != "b7ad6b7169203331" {
		t.Fatalf("not a child of the caller's span: %v", got)
	}
	// Triton gets the new span as its parent.
	want := "00-0af7651916cd43dd8448eb211c80319c-" + got.SpanID().String() + "-01"
	if tp := out.Get("traceparent"); len(tp) != 1 || tp[0] != want {
		t.Fatalf("outgoing %v, want %s", tp, want)
	}
}

// OpenTelemetry Python (1.45) sends flags 03: sampled plus Trace Context Level 2's random bit.
func TestTracingContinuesATraceWithTheRandomFlag(t *testing.T) {
	exporter := tracetest.NewInMemoryExporter()
	tr := withExporter(exporter, "test")
	_, span, _ := tr.Start(incoming("traceparent", parent[:53]+"03"), "Predict")
	span.End()
	if err := tr.provider.ForceFlush(context.Background()); err != nil {
		t.Fatal(err)
	}
	spans := exporter.GetSpans()
	if len(spans) != 1 || spans[0].SpanContext.TraceID().String() != "0af7651916cd43dd8448eb211c80319c" ||
		spans[0].Parent.SpanID().String() != "b7ad6b7169203331" || !spans[0].SpanContext.IsSampled() {
		t.Fatalf("a new trace instead of the caller's: %+v", spans)
	}
	for in, want := range map[string]string{
		parent[:53] + "03": parent, parent[:53] + "02": parent[:53] + "00", parent: parent, "garbage": "garbage",
	} {
		if got := sampledOnly(in); got != want {
			t.Errorf("sampledOnly(%s) = %s, want %s", in, got, want)
		}
	}
}

func TestTracingOffForwardsTraceHeaders(t *testing.T) {
	tr, err := NewTracing(context.Background(), "", "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	_, span, out := tr.Start(incoming("traceparent", parent, "tracestate", "a=b", "authorization", "x"), "ModelInfer")
	span.End()
	if span.IsRecording() || out.Get("traceparent")[0] != parent || out.Get("tracestate")[0] != "a=b" || len(out) != 2 {
		t.Fatalf("%v", out)
	}
	if _, _, out := tr.Start(context.Background(), "ModelInfer"); out != nil {
		t.Fatal("no trace headers, no metadata")
	}
}

// A message to Kafka gets a PRODUCER span under the Predict it logs; its headers carry that
// span, so the consumer continues the same trace through it.
func TestProducerSpanContinuesThePredictsTrace(t *testing.T) {
	exporter := tracetest.NewInMemoryExporter()
	tr := withExporter(exporter, "test")
	span, headers := tr.StartProducer(parent, "a=b", "predictions publish", "predictions")
	EndSpan(span, errors.New("broker gone"))
	if err := tr.provider.ForceFlush(context.Background()); err != nil {
		t.Fatal(err)
	}
	spans := exporter.GetSpans()
	if len(spans) != 1 || spans[0].Name != "predictions publish" || spans[0].SpanKind != trace.SpanKindProducer ||
		spans[0].Parent.SpanID().String() != "b7ad6b7169203331" || spans[0].Status.Description != "broker gone" {
		t.Fatalf("%+v", spans)
	}
	want := "00-0af7651916cd43dd8448eb211c80319c-" + spans[0].SpanContext.SpanID().String() + "-01"
	if len(headers) != 2 || headers[0] != [2]string{"traceparent", want} || headers[1] != [2]string{"tracestate", "a=b"} {
		t.Fatalf("headers %v, want traceparent %s and the tracestate", headers, want)
	}
	// Tracing off: the Predict's own context, as it came; none without one.
	off, _ := NewTracing(context.Background(), "", "test", nil)
	if _, h := off.StartProducer(parent, "", "predictions publish", "predictions"); len(h) != 1 || h[0] != [2]string{"traceparent", parent} {
		t.Fatalf("off: %v", h)
	}
	if _, h := off.StartProducer("", "", "predictions publish", "predictions"); h != nil {
		t.Fatalf("off, untraced: %v", h)
	}
}

func TestMetricLabelsAreBounded(t *testing.T) {
	m := NewMetrics()
	for i := 0; i < maxModelVersions+50; i++ {
		m.Request("ModelInfer", "m", Version(int64(i+1)), codes.OK, 0.001)
	}
	m.Proxied("bad\xff", codes.NotFound)
	series := map[string]int{}
	var other, proxiedOther float64
	families, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		for _, s := range f.GetMetric() {
			series[f.GetName()]++
			labels := map[string]string{}
			for _, l := range s.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			switch {
			case f.GetName() == "loopmesh_dataplane_requests_total" && labels["model"] == Other:
				other = s.GetCounter().GetValue()
			case f.GetName() == "loopmesh_dataplane_proxied_total" && labels["service"] == Other:
				proxiedOther = s.GetCounter().GetValue()
			}
		}
	}
	if series["loopmesh_dataplane_requests_total"] != maxModelVersions+1 || other != 50 {
		t.Fatalf("%d series, %v other", series["loopmesh_dataplane_requests_total"], other)
	}
	if proxiedOther != 1 {
		t.Fatal("invalid UTF-8 service")
	}
	if CodeName(codes.Unauthenticated) != "UNAUTHENTICATED" || CodeName(codes.Code(99)) != "UNKNOWN" {
		t.Fatal("CodeName")
	}
}

func TestLoggerWritesJSONLines(t *testing.T) {
	var b bytes.Buffer
	l := NewLogger(&b, "svc")
	l.Info("hello", "n", 1)
	l.Error("bad \"quote\"")
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 2 {
		t.Fatal(b.String())
	}
	var entry map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &entry); err != nil {
		t.Fatal(err)
	}
	if entry["service"] != "svc" || entry["level"] != "INFO" || entry["message"] != "hello" || entry["n"] != 1.0 || entry["ts"] == nil {
		t.Fatalf("%v", entry)
	}
}
