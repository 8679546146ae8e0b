package predict

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestCountsDrainAndStartAfresh(t *testing.T) {
	c := NewCounts()
	c.Prediction("m", 1, "stable", false)
	c.Prediction("m", 1, "stable", false)
	c.Prediction("m", 2, "canary", true)
	c.Shadow("m", 3, "scored")
	c.Shadow("m", 0, "shed")
	c.TritonError("m", 2, "UNAVAILABLE")
	out, _ := json.Marshal(c.Drain())
	want := `{"predictions":[{"model":"m","version":1,"arm":"stable","degraded":false,"count":2},` +
		`{"model":"m","version":2,"arm":"canary","degraded":true,"count":1}],` +
		`"shadow_scores":[{"model":"m","version":3,"outcome":"scored","count":1},{"model":"m","version":null,"outcome":"shed","count":1}],` +
		`"triton_errors":[{"model":"m","version":2,"code":"UNAVAILABLE","count":1}]}`
	if string(out) != want {
		t.Fatalf("got %s", out)
	}
	again, _ := json.Marshal(c.Drain())
	if string(again) != `{"predictions":[],"shadow_scores":[],"triton_errors":[]}` {
		t.Fatalf("second drain: %s", again)
	}
}

func TestCountsStayBounded(t *testing.T) {
	c := NewCounts()
	for v := range int64(maxCountKeys + 10) {
		c.Prediction("m", v+1, "pinned", false)
	}
	c.Prediction("m", 1, "pinned", false) // a kept key still counts
	d := c.Drain()
	if len(d.Predictions) != maxCountKeys || d.Predictions[0].Count != 2 {
		t.Fatalf("%d keys, first %+v", len(d.Predictions), d.Predictions[0])
	}
}

func TestOnlyWhatPythonWouldTakeIsServedHere(t *testing.T) {
	long := strings.Repeat("é", 256) // 256 characters, 512 bytes: still within the limit
	for _, r := range []*Request{
		{EntityID: "u1"},
		{EntityID: long, RequestID: long, Context: map[string]float64{"p": 1}, Categorical: map[string]string{"c": ""}},
		{EntityID: "a b"},
	} {
		if !acceptable(r) {
			t.Errorf("refused %+v", r)
		}
	}
	for _, r := range []*Request{
		{EntityID: ""},
		{EntityID: " u1"},
		{EntityID: "u1\t"},
		{EntityID: "u1\u00a0"},
		{EntityID: "u1\x1c"},
		{EntityID: long + "é"},
		{EntityID: "u", RequestID: long + "x"},
		{EntityID: "u", Context: map[string]float64{"": 1}},
		{EntityID: "u", Context: map[string]float64{"p": posInf()}},
		{EntityID: "u", Categorical: map[string]string{"c": long + "x"}},
	} {
		if acceptable(r) {
			t.Errorf("took %+v", r)
		}
	}
}

func TestCutKeepsPythonsLimit(t *testing.T) {
	if got := cut(strings.Repeat("é", 1024)); got != strings.Repeat("é", 1024) {
		t.Fatal("1024 characters are kept")
	}
	if got := cut(strings.Repeat("x", 1030)); got != strings.Repeat("x", 1023)+"…" {
		t.Fatalf("got %d characters", len([]rune(got)))
	}
}

func TestNewIDIsAUUID4Hex(t *testing.T) {
	id := newID()
	if len(id) != 32 || id[12] != '4' || !strings.ContainsRune("89ab", rune(id[16])) || id == newID() {
		t.Fatalf("got %s", id)
	}
}

func posInf() float64 {
	var zero float64
	return 1 / zero
}
