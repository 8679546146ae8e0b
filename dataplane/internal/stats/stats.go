// Package stats keeps per-(model, version) figures of ModelInfer and Predict calls (and of
// shadow scoring, kept apart: it feeds the version's guards but answers nobody) between two drains by
// the control plane, which feeds them to its canary guards. Memory is bounded whatever the
// load: a ring of the newest latencies per version and a cap on the number of versions.
package stats

import (
	"sort"
	"sync"
)

// Defaults for the bounds.
const (
	MaxLatencies = 4096
	MaxVersions  = 1024
)

// Version is one (model, version)'s figures since the previous drain.
type Version struct {
	Model       string    `json:"model"`
	Version     int64     `json:"version"`
	Answered    int64     `json:"answered"`
	Failed      int64     `json:"failed"`
	LatenciesMs []float64 `json:"latencies_ms"`
	// Shadow: calls that scored a request for a shadow candidate, not answers.
	Shadow bool `json:"shadow"`
}

type key struct {
	model   string
	version int64
	shadow  bool
}

type entry struct {
	answered, failed int64
	ring             []float64 // grows to the cap, then overwrites the oldest at next
	next             int
}

// Recorder collects figures; safe for concurrent use.
type Recorder struct {
	mu           sync.Mutex
	entries      map[key]*entry
	maxLatencies int
	maxVersions  int
	// OnOverflow is called (outside the lock) for a call not recorded because the cap on
	// versions was reached.
	OnOverflow func()
}

// New returns a recorder with the given bounds (<= 0: the defaults).
func New(maxVersions, maxLatencies int) *Recorder {
	if maxVersions <= 0 {
		maxVersions = MaxVersions
	}
	if maxLatencies <= 0 {
		maxLatencies = MaxLatencies
	}
	return &Recorder{entries: map[key]*entry{}, maxVersions: maxVersions, maxLatencies: maxLatencies}
}

// Record counts one call of model/version: answered (ok) or failed, with its latency.
func (r *Recorder) Record(model string, version int64, ok bool, latencyMs float64) {
	r.record(key{model, version, false}, ok, latencyMs)
}

// RecordShadow counts one shadow call of model/version (kept apart from the answers).
func (r *Recorder) RecordShadow(model string, version int64, ok bool, latencyMs float64) {
	r.record(key{model, version, true}, ok, latencyMs)
}

func (r *Recorder) record(k key, ok bool, latencyMs float64) {
	r.mu.Lock()
	e := r.entries[k]
	if e == nil {
		if len(r.entries) >= r.maxVersions {
			r.mu.Unlock()
			if r.OnOverflow != nil {
				r.OnOverflow()
			}
			return
		}
		e = &entry{}
		r.entries[k] = e
	}
	if ok {
		e.answered++
	} else {
		e.failed++
	}
	if len(e.ring) < r.maxLatencies {
		e.ring = append(e.ring, latencyMs)
	} else {
		e.ring[e.next] = latencyMs
		e.next = (e.next + 1) % r.maxLatencies
	}
	r.mu.Unlock()
}

// Drain returns everything since the previous drain (sorted by model, version; latencies
// oldest first) and starts afresh.
func (r *Recorder) Drain() []Version {
	r.mu.Lock()
	entries := r.entries
	r.entries = make(map[key]*entry, len(entries))
	r.mu.Unlock()
	out := make([]Version, 0, len(entries))
	for k, e := range entries {
		lat := make([]float64, 0, len(e.ring))
		lat = append(append(lat, e.ring[e.next:]...), e.ring[:e.next]...)
		out = append(out, Version{k.model, k.version, e.answered, e.failed, lat, k.shadow})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Model != out[j].Model {
			return out[i].Model < out[j].Model
		}
		if out[i].Version != out[j].Version {
			return out[i].Version < out[j].Version
		}
		return !out[i].Shadow && out[j].Shadow
	})
	return out
}

// Call is one (method, status code)'s calls, for a control plane's own RPC metrics (its
// rpc.server.calls and rpc.server.duration) when its data plane answered them.
type Call struct {
	Method      string    `json:"method"`
	Code        string    `json:"code"`
	Count       int64     `json:"count"`
	LatenciesMs []float64 `json:"latencies_ms"` // the newest, at most MaxLatencies
}

// DrainCalls reads a recorder used as (method, code as version) and starts afresh; codeName
// turns a code number into its name.
func (r *Recorder) DrainCalls(codeName func(int64) string) []Call {
	drained := r.Drain()
	out := make([]Call, len(drained))
	for i, d := range drained {
		out[i] = Call{Method: d.Model, Code: codeName(d.Version), Count: d.Answered + d.Failed, LatenciesMs: d.LatenciesMs}
	}
	return out
}
