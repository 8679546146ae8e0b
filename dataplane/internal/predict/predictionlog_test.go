package predict

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/loopmesh/loopmesh/dataplane/internal/config"
	"github.com/loopmesh/loopmesh/dataplane/internal/telemetry"
)

// goldenRecord is the record whose event testdata/prediction_logged.json holds; the Python
// side (tests/unit/test_dataplane_events.py) checks that file against the PredictionLogged
// model, the event's one definition.
func goldenRecord() *Record {
	return &Record{
		PredictionID: "0123456789abcdef0123456789abcdef", ModelName: "churn", ModelVersion: 3,
		EntityID: "pseudo-7f", Features: map[string]float64{"hour": 9, "price": 12.5, "activity:events_1h": 1e-7},
		Categorical: map[string]string{"country": "NL"}, Score: 0.8125, Outputs: []float64{0.1875, 0.8125},
		Task: "multiclass", LatencyMs: 1.234,
		Shadow:    []ShadowAnswer{{ModelVersion: 4, Score: 0.75, Outputs: []float64{}}},
		EventTime: "2026-12-07T13:15:23.123456Z", Traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
	}
}

func TestEncodeWritesThePredictionLoggedEvent(t *testing.T) {
	got, err := Encode(goldenRecord(), "fedcba9876543210fedcba9876543210")
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile("testdata/prediction_logged.json")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, bytes.TrimSpace(want)) {
		t.Fatalf("event differs from testdata/prediction_logged.json:\n%s", got)
	}
}

// With the brokers away, records wait in the producer's buffer, never the answer: past the
// buffer's bound each is dropped at once and counted, and what is still buffered at Close
// (after its wait) is lost and counted too.
func TestPredictionLogBoundsWhatWaitsForAbsentBrokers(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	address := lis.Addr().String()
	_ = lis.Close() // nothing listens there now
	metrics := telemetry.NewMetrics()
	l, err := NewPredictionLog(&config.PredictLog{Topic: "predictions", Brokers: []string{address},
		ClientID: "test", SecurityProtocol: "PLAINTEXT", LingerMs: 0, RequestTimeoutMs: 1000},
		3, nil, metrics, telemetry.NewLogger(io.Discard, "test"))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for i := range 5 {
		r := goldenRecord()
		r.PredictionID = fmt.Sprintf("%032x", i)
		l.Log(r)
	}
	if elapsed := time.Since(start); elapsed > time.Second {
		t.Fatalf("Log waited for Kafka: %v", elapsed)
	}
	// Promises run on the client's own goroutine: the counts come shortly after.
	var got LogCounts
	for deadline := time.Now().Add(5 * time.Second); got.Dropped < 2 && time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		d := l.Drain()
		got.Logged, got.Dropped = got.Logged+d.Logged, got.Dropped+d.Dropped
	}
	if got != (LogCounts{Logged: 0, Dropped: 2}) {
		t.Fatalf("after 5 records into a buffer of 3: %+v", got)
	}
	if l.Close(200 * time.Millisecond) {
		t.Fatal("Close reported the records acknowledged")
	}
	if got := l.Totals(); got != (LogCounts{Logged: 0, Dropped: 5}) {
		t.Fatalf("totals after Close: %+v", got)
	}
	families, err := metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	byOutcome := map[string]float64{}
	for _, f := range families {
		if f.GetName() == "loopmesh_dataplane_predictions_logged_total" {
			for _, m := range f.GetMetric() {
				byOutcome[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
			}
		}
	}
	if byOutcome["dropped"] != 2 || byOutcome["failed"] != 3 || byOutcome["logged"] != 0 {
		t.Fatalf("series by outcome: %v", byOutcome)
	}
}
