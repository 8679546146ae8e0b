package routing

import (
	"encoding/json"
	"math"
	"os"
	"testing"
)

// Golden values from Python: int.from_bytes(hashlib.blake2b(f"{m}\x00{s}\x00{k}".encode(),
// digest_size=8).digest(), "big") / 2**64 (see ../oip/testdata/python_cases.json).
func TestBucketMatchesPython(t *testing.T) {
	raw, err := os.ReadFile("../oip/testdata/python_cases.json")
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		Buckets []struct {
			Model string
			Salt  int64
			Key   string
			Want  float64
		}
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		t.Fatal(err)
	}
	if len(c.Buckets) == 0 {
		t.Fatal("no golden buckets")
	}
	for _, b := range c.Buckets {
		if got := Bucket(b.Model, b.Salt, b.Key); got != b.Want {
			t.Errorf("%+v: got %v", b, got)
		}
	}
	// Written out too, so a change to the data file cannot hide a change here.
	if got := Bucket("churn", 7, "user-42"); got != 0.6749728369168664 {
		t.Errorf("churn/7/user-42: %v", got)
	}
	if got := Bucket("m", 1, "a"); got != 0.38084071840187644 {
		t.Errorf("m/1/a: %v", got)
	}
}

func table(t *testing.T, body string) *Table {
	t.Helper()
	tab, err := Parse([]byte(body))
	if err != nil {
		t.Fatal(err)
	}
	return tab
}

func TestChoose(t *testing.T) {
	tab := table(t, `{"ready": true, "routes": {
		"none": {"stable": null, "canary": null, "weight": 0.0, "known": []},
		"stable": {"stable": 2, "canary": null, "weight": 0.5, "known": [1, 2]},
		"onlycanary": {"stable": null, "canary": 4, "weight": 0.1},
		"zeroweight": {"stable": null, "canary": 4, "weight": 0},
		"split": {"stable": 1, "canary": 2, "weight": 0.5, "known": [7]},
		"full": {"stable": 1, "canary": 2, "weight": 1.0}}}`)
	if _, _, ok := tab.Routes["none"].Choose(nil); ok {
		t.Error("none: a version was chosen")
	}
	check := func(model string, key *string, version int64, arm Arm) {
		t.Helper()
		v, a, ok := tab.Routes[model].Choose(key)
		if !ok || v != version || a != arm {
			t.Errorf("%s: got %d %s %v, want %d %s", model, v, a, ok, version, arm)
		}
	}
	check("stable", nil, 2, Stable)
	check("onlycanary", nil, 4, Canary)
	check("zeroweight", nil, 4, Canary)
	check("full", nil, 2, Canary)
	// Sticky: the key's bucket decides, the same every time.
	for _, key := range []string{"a", "b", "c", "user-1", "user-2"} {
		k := key
		want, arm := int64(1), Stable
		if Bucket("split", 2, key) < 0.5 {
			want, arm = 2, Canary
		}
		for i := 0; i < 3; i++ {
			check("split", &k, want, arm)
		}
	}
	// No key: spread by weight.
	canary := 0
	for i := 0; i < 4000; i++ {
		if _, arm, _ := tab.Routes["split"].Choose(nil); arm == Canary {
			canary++
		}
	}
	if math.Abs(float64(canary)/4000-0.5) > 0.05 {
		t.Errorf("random split: %d of 4000 on canary", canary)
	}
	r := tab.Routes["split"]
	if !r.IsKnown(7) || !r.IsKnown(1) || !r.IsKnown(2) || r.IsKnown(3) || (*Route)(nil).IsKnown(1) {
		t.Error("Known")
	}
}

func TestParseRefuses(t *testing.T) {
	for _, body := range []string{
		`{`, `[]`, `{"ready": true, "extra": 1}`,
		`{"routes": {"1bad": {"stable": 1}}}`,
		`{"routes": {"m": {"stable": 0}}}`,
		`{"routes": {"m": {"canary": -1}}}`,
		`{"routes": {"m": {"stable": 1.5}}}`,
		`{"routes": {"m": {"weight": 1.5}}}`,
		`{"routes": {"m": {"weight": -0.1}}}`,
		`{"routes": {"m": {"known": [0]}}}`,
		`{"routes": {"m": {"stabel": 1}}}`,
		`{"routes": {"m": null}}`,
		`{} {}`,
	} {
		if _, err := Parse([]byte(body)); err == nil {
			t.Errorf("accepted %s", body)
		}
	}
}

func TestStoreRoundTrip(t *testing.T) {
	s := NewStore()
	if s.Load().Ready || s.Get("m") != nil {
		t.Fatal("a new store is empty and not ready")
	}
	tab := table(t, `{"ready": true, "routes": {"m": {"stable": 3, "canary": null, "weight": 0}}}`)
	s.Replace(tab)
	out, _ := json.Marshal(s.Load())
	want := `{"ready":true,"routes":{"m":{"stable":3,"canary":null,"weight":0,"known":[]}}}`
	if string(out) != want {
		t.Fatalf("got %s", out)
	}
	if *s.Get("m").Stable != 3 {
		t.Fatal("stable")
	}
}
