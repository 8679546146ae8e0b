package predict

import (
	"bytes"
	"os"
	"testing"
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
