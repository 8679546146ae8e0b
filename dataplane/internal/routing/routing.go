// Package routing holds the route table pushed by the control plane and the canary choice.
//
// The table is replaced whole through an atomic pointer: a request that already chose its
// version never sees a half-applied change. A request's arm comes from a stable hash of its
// key salted with the model and the canary version, identical to Python's
// loopmesh.inference.routing.bucket, so one entity sees one arm on either plane.
package routing

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"strconv"
	"sync/atomic"

	"golang.org/x/crypto/blake2b"

	"github.com/loopmesh/loopmesh/dataplane/internal/oip"
)

// Arm names which side of a route answered.
type Arm string

const (
	Stable   Arm = "stable"
	Canary   Arm = "canary"
	Fallback Arm = "fallback"
	Pinned   Arm = "pinned"
	Latest   Arm = "latest"
)

// maxVersion keeps versions within [1-9][0-9]{0,17}, the form requests carry.
const maxVersion = 999_999_999_999_999_999

// Route is one model's traffic split. Known lists the versions the repository has
// published (NOT_FOUND for one of them means "not loaded yet"). Shadows score ShadowShare of
// stable's Predict requests without answering them; Specs are the input contracts Predict
// needs, by version (JSON keys are the versions as text).
type Route struct {
	Stable      *int64           `json:"stable"`
	Canary      *int64           `json:"canary"`
	Weight      float64          `json:"weight"`
	Known       []int64          `json:"known"`
	Shadows     []int64          `json:"shadows,omitempty"`
	ShadowShare float64          `json:"shadow_share,omitempty"`
	Specs       map[string]*Spec `json:"specs,omitempty"`
	model       string           // set by the table, for the bucket's salt
	known       []int64          // Known plus stable, canary and shadows
	specs       map[int64]*Spec
}

// Table is the whole set of routes and the control plane's readiness.
type Table struct {
	Ready  bool              `json:"ready"`
	Routes map[string]*Route `json:"routes"`
}

// Store holds the table in force.
type Store struct{ p atomic.Pointer[Table] }

// NewStore starts with an empty, not-ready table.
func NewStore() *Store {
	s := &Store{}
	s.p.Store(&Table{Routes: map[string]*Route{}})
	return s
}

// Load returns the current table (never nil; never mutated once stored).
func (s *Store) Load() *Table { return s.p.Load() }

// Replace makes t the table in force.
func (s *Store) Replace(t *Table) { s.p.Store(t) }

// Get returns the model's route, or nil.
func (s *Store) Get(model string) *Route { return s.p.Load().Routes[model] }

// Parse decodes and validates a table (PUT /routes); the error says which value is wrong.
func Parse(body []byte) (*Table, error) {
	var t Table
	if err := strictUnmarshal(body, &t); err != nil {
		return nil, err
	}
	if t.Routes == nil {
		t.Routes = map[string]*Route{}
	}
	for name, r := range t.Routes {
		if !oip.ValidName(name) {
			return nil, fmt.Errorf("routes: %s", oip.InvalidName(name))
		}
		if r == nil {
			return nil, fmt.Errorf("routes.%s: must be an object", name)
		}
		if math.IsNaN(r.Weight) || r.Weight < 0 || r.Weight > 1 {
			return nil, fmt.Errorf("routes.%s.weight: %v is not within [0, 1]", name, r.Weight)
		}
		if math.IsNaN(r.ShadowShare) || r.ShadowShare < 0 || r.ShadowShare > 1 {
			return nil, fmt.Errorf("routes.%s.shadow_share: %v is not within [0, 1]", name, r.ShadowShare)
		}
		for _, v := range []*int64{r.Stable, r.Canary} {
			if v != nil && (*v < 1 || *v > maxVersion) {
				return nil, fmt.Errorf("routes.%s: version %d is not a positive integer of at most 18 digits", name, *v)
			}
		}
		for _, v := range r.Shadows {
			if v < 1 || v > maxVersion {
				return nil, fmt.Errorf("routes.%s.shadows: version %d is not a positive integer of at most 18 digits", name, v)
			}
		}
		specs, err := parseSpecs(name, r.Specs)
		if err != nil {
			return nil, err
		}
		r.specs = specs
		if r.Known == nil {
			r.Known = []int64{}
		}
		r.known = append([]int64{}, r.Known...)
		for _, v := range r.Known {
			if v < 1 || v > maxVersion {
				return nil, fmt.Errorf("routes.%s.known: version %d is not a positive integer of at most 18 digits", name, v)
			}
		}
		for _, v := range []*int64{r.Stable, r.Canary} {
			if v != nil {
				r.known = append(r.known, *v)
			}
		}
		r.known = append(r.known, r.Shadows...)
		r.model = name
	}
	return &t, nil
}

// Choose returns the version and arm for a request key (nil: no key, spread at random),
// or ok=false when the route names no version. Mirrors Python's Route.choose.
func (r *Route) Choose(key *string) (version int64, arm Arm, ok bool) {
	if r.Canary != nil && r.Weight > 0 {
		if r.Stable == nil {
			return *r.Canary, Canary, true
		}
		k := ""
		if key != nil {
			k = *key
		}
		if k == "" {
			k = randomHex()
		}
		if Bucket(r.model, *r.Canary, k) < r.Weight {
			return *r.Canary, Canary, true
		}
	}
	if r.Stable != nil {
		return *r.Stable, Stable, true
	}
	if r.Canary != nil {
		return *r.Canary, Canary, true
	}
	return 0, "", false
}

// ShadowsFor returns the shadow versions that also score one request: all of them for a
// random ShadowShare of the requests, none for the rest (sampling, not security).
func (r *Route) ShadowsFor() []int64 {
	if r == nil || len(r.Shadows) == 0 || rand.Float64() >= r.ShadowShare {
		return nil
	}
	return r.Shadows
}

// IsKnown reports whether version is published for this route's model (or is its stable or
// canary): a NOT_FOUND for it means "not loaded yet".
func (r *Route) IsKnown(version int64) bool {
	if r == nil {
		return false
	}
	for _, v := range r.known {
		if v == version {
			return true
		}
	}
	return false
}

// Bucket is a stable, uniform number in [0, 1) for key: BLAKE2b-64 of
// "model\x00salt\x00key", big-endian, over 2^64 (Python's routing.bucket).
func Bucket(model string, salt int64, key string) float64 {
	h, _ := blake2b.New(8, nil) // cannot fail for size 8 without a key
	buf := make([]byte, 0, len(model)+len(key)+22)
	buf = append(buf, model...)
	buf = append(buf, 0)
	buf = strconv.AppendInt(buf, salt, 10)
	buf = append(buf, 0)
	buf = append(buf, key...)
	h.Write(buf)
	var sum [8]byte
	return float64(binary.BigEndian.Uint64(h.Sum(sum[:0]))) / (1 << 64)
}

// randomHex stands for uuid4().hex: a key-less request lands on a uniformly random point.
func randomHex() string {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], rand.Uint64())
	binary.BigEndian.PutUint64(b[8:], rand.Uint64())
	const digits = "0123456789abcdef"
	out := make([]byte, 32)
	for i, c := range b {
		out[2*i], out[2*i+1] = digits[c>>4], digits[c&15]
	}
	return string(out)
}

func strictUnmarshal(body []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return fmt.Errorf("trailing data after the JSON object")
	}
	return nil
}
