package routing

import (
	"encoding/binary"
	"fmt"
	"math"
	"strconv"

	"golang.org/x/crypto/blake2b"
)

// Tasks a model version may declare (loopmesh.mesh.events.Task).
var tasks = map[string]bool{"binary": true, "multiclass": true, "regression": true}

// Spec is one version's input contract as the control plane read it from metadata.json
// (loopmesh.inference.catalog.ModelSpec). Error set: the metadata cannot drive Predict and
// the data plane leaves such requests to the control plane, whose message it is.
type Spec struct {
	FeatureNames []string           `json:"feature_names"`
	StoreRefs    []string           `json:"store_refs"`
	Defaults     map[string]float64 `json:"defaults"`
	Categorical  []Categorical      `json:"categorical"`
	Task         string             `json:"task"`
	NOutputs     int                `json:"n_outputs"`
	Error        string             `json:"error"`
}

// Categorical is one categorical context input (loopmesh.mesh.model_spec.ContextField):
// hashed into Buckets rows, or looked up in Vocabulary (1..n, anything else 0).
type Categorical struct {
	Name       string   `json:"name"`
	Buckets    *int64   `json:"buckets"`
	Vocabulary []string `json:"vocabulary"`
}

// Usable reports whether the data plane can serve this version itself.
func (s *Spec) Usable() bool { return s != nil && s.Error == "" }

// Declares returns the categorical input named name, or nil.
func (s *Spec) Declares(name string) *Categorical {
	for i := range s.Categorical {
		if s.Categorical[i].Name == name {
			return &s.Categorical[i]
		}
	}
	return nil
}

// Index is the embedding row of value, as ContextField.index computes it: BLAKE2b-64
// (big-endian) modulo Buckets, or the 1-based vocabulary position (0: unknown).
func (c *Categorical) Index(value string) int64 {
	if c.Buckets != nil {
		h, _ := blake2b.New(8, nil) // cannot fail for size 8 without a key
		h.Write([]byte(value))
		var out [8]byte
		return int64(binary.BigEndian.Uint64(h.Sum(out[:0])) % uint64(*c.Buckets))
	}
	for i, v := range c.Vocabulary {
		if v == value {
			return int64(i + 1)
		}
	}
	return 0
}

// check validates a pushed spec (the control plane already did; this keeps a bad push from
// becoming a wrong answer).
func (s *Spec) check(where string) error {
	if s.Error != "" {
		return nil
	}
	if len(s.FeatureNames)+len(s.Categorical) == 0 {
		return fmt.Errorf("%s: no inputs", where)
	}
	if !tasks[s.Task] {
		return fmt.Errorf("%s.task: %q is not binary, multiclass or regression", where, s.Task)
	}
	if s.NOutputs < 1 || (s.Task != "multiclass" && s.NOutputs != 1) {
		return fmt.Errorf("%s.n_outputs: %d does not fit task %s", where, s.NOutputs, s.Task)
	}
	names := make(map[string]bool, len(s.FeatureNames))
	for _, n := range s.FeatureNames {
		names[n] = true
		d, ok := s.Defaults[n]
		if !ok || math.IsNaN(d) || math.IsInf(d, 0) {
			return fmt.Errorf("%s.defaults: no finite default for %q", where, n)
		}
	}
	for _, r := range s.StoreRefs {
		if !names[r] {
			return fmt.Errorf("%s.store_refs: %q is not a feature name", where, r)
		}
	}
	for i, c := range s.Categorical {
		if (c.Buckets == nil) == (c.Vocabulary == nil) || (c.Buckets != nil && *c.Buckets < 2) {
			return fmt.Errorf("%s.categorical[%d]: needs buckets >= 2 or a vocabulary", where, i)
		}
	}
	return nil
}

// Spec returns the spec pushed for version, or nil.
func (r *Route) Spec(version int64) *Spec {
	if r == nil {
		return nil
	}
	return r.specs[version]
}

func parseSpecs(name string, raw map[string]*Spec) (map[int64]*Spec, error) {
	out := make(map[int64]*Spec, len(raw))
	for v, s := range raw {
		version, err := strconv.ParseInt(v, 10, 64)
		if err != nil || version < 1 || version > maxVersion {
			return nil, fmt.Errorf("routes.%s.specs: %q is not a version", name, v)
		}
		if s == nil {
			return nil, fmt.Errorf("routes.%s.specs.%s: must be an object", name, v)
		}
		if err := s.check(fmt.Sprintf("routes.%s.specs.%s", name, v)); err != nil {
			return nil, err
		}
		out[version] = s
	}
	return out, nil
}
