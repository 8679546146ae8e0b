package predict

import (
	"sort"
	"sync"
)

// Record is one answered prediction: PredictionLogged's fields after the event's own
// (PredictionLog adds event_id, schema and event_time), and the trace context of its Predict.
type Record struct {
	PredictionID string             `json:"prediction_id"`
	ModelName    string             `json:"model_name"`
	ModelVersion int64              `json:"model_version"`
	EntityID     string             `json:"entity_id"`
	Features     map[string]float64 `json:"features"`
	Categorical  map[string]string  `json:"categorical"`
	Score        float64            `json:"score"`
	Outputs      []float64          `json:"outputs"`
	Task         string             `json:"task"`
	LatencyMs    float64            `json:"latency_ms"`
	Shadow       []ShadowAnswer     `json:"shadow"`
	EventTime    string             `json:"-"` // RFC 3339 UTC, microseconds
	Traceparent  string             `json:"-"`
	Tracestate   string             `json:"-"`
}

// ShadowAnswer is a shadow candidate's answer to a request it did not serve.
type ShadowAnswer struct {
	ModelVersion int64     `json:"model_version"`
	Score        float64   `json:"score"`
	Outputs      []float64 `json:"outputs"`
}

// maxCountKeys bounds each counts map; labels come from pushed versions, so it is never
// reached in practice, and a key past it is dropped rather than kept.
const maxCountKeys = 4096

type predictionKey struct {
	model    string
	version  int64
	arm      string
	degraded bool
}

type shadowKey struct {
	model   string
	version int64 // 0: shed before a version was picked
	outcome string
}

type errorKey struct {
	model   string
	version int64
	code    string
}

// Counts are the Predict figures the control plane adds to its own instruments
// (loopmesh_inference_predictions_total, _shadow_scores_total, _triton_errors_total).
type Counts struct {
	mu          sync.Mutex
	predictions map[predictionKey]int64
	shadows     map[shadowKey]int64
	errors      map[errorKey]int64
}

// NewCounts returns empty counts.
func NewCounts() *Counts {
	return &Counts{predictions: map[predictionKey]int64{}, shadows: map[shadowKey]int64{}, errors: map[errorKey]int64{}}
}

func bump[K comparable](m map[K]int64, k K) {
	if _, ok := m[k]; ok || len(m) < maxCountKeys {
		m[k]++
	}
}

// Prediction counts one answer.
func (c *Counts) Prediction(model string, version int64, arm string, degraded bool) {
	c.mu.Lock()
	bump(c.predictions, predictionKey{model, version, arm, degraded})
	c.mu.Unlock()
}

// Shadow counts one shadow outcome (scored, failed, timeout; shed with version 0).
func (c *Counts) Shadow(model string, version int64, outcome string) {
	c.mu.Lock()
	bump(c.shadows, shadowKey{model, version, outcome})
	c.mu.Unlock()
}

// TritonError counts one failed Triton call of Predict.
func (c *Counts) TritonError(model string, version int64, code string) {
	c.mu.Lock()
	bump(c.errors, errorKey{model, version, code})
	c.mu.Unlock()
}

// PredictionCount is one drained prediction count.
type PredictionCount struct {
	Model    string `json:"model"`
	Version  int64  `json:"version"`
	Arm      string `json:"arm"`
	Degraded bool   `json:"degraded"`
	Count    int64  `json:"count"`
}

// ShadowCount is one drained shadow outcome count (Version nil: shed).
type ShadowCount struct {
	Model   string `json:"model"`
	Version *int64 `json:"version"`
	Outcome string `json:"outcome"`
	Count   int64  `json:"count"`
}

// ErrorCount is one drained Triton error count.
type ErrorCount struct {
	Model   string `json:"model"`
	Version int64  `json:"version"`
	Code    string `json:"code"`
	Count   int64  `json:"count"`
}

// Drained is everything counted since the previous drain.
type Drained struct {
	Predictions  []PredictionCount `json:"predictions"`
	ShadowScores []ShadowCount     `json:"shadow_scores"`
	TritonErrors []ErrorCount      `json:"triton_errors"`
}

// Drain returns the counts since the previous drain (sorted) and starts afresh.
func (c *Counts) Drain() Drained {
	c.mu.Lock()
	p, s, e := c.predictions, c.shadows, c.errors
	c.predictions, c.shadows, c.errors = map[predictionKey]int64{}, map[shadowKey]int64{}, map[errorKey]int64{}
	c.mu.Unlock()
	d := Drained{Predictions: []PredictionCount{}, ShadowScores: []ShadowCount{}, TritonErrors: []ErrorCount{}}
	for k, n := range p {
		d.Predictions = append(d.Predictions, PredictionCount{k.model, k.version, k.arm, k.degraded, n})
	}
	for k, n := range s {
		var v *int64
		if k.version > 0 {
			v = new(int64)
			*v = k.version
		}
		d.ShadowScores = append(d.ShadowScores, ShadowCount{k.model, v, k.outcome, n})
	}
	for k, n := range e {
		d.TritonErrors = append(d.TritonErrors, ErrorCount{k.model, k.version, k.code, n})
	}
	sort.Slice(d.Predictions, func(i, j int) bool {
		a, b := d.Predictions[i], d.Predictions[j]
		if a.Model != b.Model {
			return a.Model < b.Model
		}
		if a.Version != b.Version {
			return a.Version < b.Version
		}
		if a.Arm != b.Arm {
			return a.Arm < b.Arm
		}
		return !a.Degraded && b.Degraded
	})
	sort.Slice(d.ShadowScores, func(i, j int) bool {
		a, b := d.ShadowScores[i], d.ShadowScores[j]
		if a.Model != b.Model {
			return a.Model < b.Model
		}
		return a.Outcome < b.Outcome
	})
	sort.Slice(d.TritonErrors, func(i, j int) bool {
		a, b := d.TritonErrors[i], d.TritonErrors[j]
		if a.Model != b.Model {
			return a.Model < b.Model
		}
		return a.Version < b.Version
	})
	return d
}
