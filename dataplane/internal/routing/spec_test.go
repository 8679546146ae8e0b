package routing

import (
	"strings"
	"testing"
)

func TestCategoricalIndexMatchesPython(t *testing.T) {
	// Expected values from loopmesh.mesh.model_spec.ContextField.index.
	buckets := int64(1000)
	hashed := Categorical{Name: "c", Buckets: &buckets}
	for value, want := range map[string]int64{"": 876, "FR": 455, "ünï": 167, strings.Repeat("a", 300): 378} {
		if got := hashed.Index(value); got != want {
			t.Errorf("hashed %q: %d, want %d", value, got, want)
		}
	}
	vocab := Categorical{Name: "d", Vocabulary: []string{"x", "y"}}
	for value, want := range map[string]int64{"x": 1, "y": 2, "z": 0, "": 0} {
		if got := vocab.Index(value); got != want {
			t.Errorf("vocabulary %q: %d, want %d", value, got, want)
		}
	}
}

func TestSpecsArePushedWithTheRoute(t *testing.T) {
	tab, err := Parse([]byte(`{"ready": true, "routes": {"m": {"stable": 1, "weight": 0, "known": [1, 2],
		"shadows": [3], "shadow_share": 0.5,
		"specs": {"1": {"feature_names": ["v:a", "p"], "store_refs": ["v:a"], "defaults": {"v:a": 1, "p": 0},
		                "categorical": [{"name": "c", "buckets": 8, "vocabulary": null}], "task": "binary", "n_outputs": 1},
		          "2": {"error": "bad metadata"}}}}}`))
	if err != nil {
		t.Fatal(err)
	}
	r := tab.Routes["m"]
	if s := r.Spec(1); !s.Usable() || s.Declares("c") == nil || s.Declares("x") != nil {
		t.Fatalf("spec 1: %+v", s)
	}
	if r.Spec(2).Usable() || r.Spec(3).Usable() || (*Route)(nil).Spec(1) != nil {
		t.Fatal("a spec with an error, an absent one and a nil route are not usable")
	}
	if !r.IsKnown(3) {
		t.Fatal("a shadow version is known: NOT_FOUND for it means not loaded yet")
	}
}

func TestBadSpecsAreRefused(t *testing.T) {
	for _, spec := range []string{
		`{"feature_names": [], "task": "binary", "n_outputs": 1}`,
		`{"feature_names": ["a"], "defaults": {"a": 0}, "task": "ranking", "n_outputs": 1}`,
		`{"feature_names": ["a"], "defaults": {"a": 0}, "task": "binary", "n_outputs": 3}`,
		`{"feature_names": ["a"], "defaults": {}, "task": "binary", "n_outputs": 1}`,
		`{"feature_names": ["a"], "store_refs": ["v:b"], "defaults": {"a": 0}, "task": "binary", "n_outputs": 1}`,
		`{"feature_names": ["a"], "defaults": {"a": 0}, "task": "binary", "n_outputs": 1, "categorical": [{"name": "c"}]}`,
		`{"feature_names": ["a"], "defaults": {"a": 0}, "task": "binary", "n_outputs": 1, "surprise": 1}`,
	} {
		body := `{"ready": true, "routes": {"m": {"stable": 1, "weight": 0, "specs": {"1": ` + spec + `}}}}`
		if _, err := Parse([]byte(body)); err == nil {
			t.Errorf("accepted %s", spec)
		}
	}
	for _, body := range []string{
		`{"ready": true, "routes": {"m": {"shadow_share": 1.5}}}`,
		`{"ready": true, "routes": {"m": {"shadows": [0]}}}`,
		`{"ready": true, "routes": {"m": {"specs": {"x": {"error": "e"}}}}}`,
	} {
		if _, err := Parse([]byte(body)); err == nil {
			t.Errorf("accepted %s", body)
		}
	}
}

func TestShadowsForSamplesTheShare(t *testing.T) {
	all := &Route{Shadows: []int64{3}, ShadowShare: 1}
	none := &Route{Shadows: []int64{3}, ShadowShare: 0}
	for range 100 {
		if len(all.ShadowsFor()) != 1 || len(none.ShadowsFor()) != 0 {
			t.Fatal("share 1 scores every request, share 0 none")
		}
	}
	half, hits := &Route{Shadows: []int64{3}, ShadowShare: 0.5}, 0
	for range 10000 {
		hits += len(half.ShadowsFor())
	}
	if hits < 4500 || hits > 5500 { // 10 standard deviations
		t.Fatalf("share 0.5 scored %d of 10000", hits)
	}
}
