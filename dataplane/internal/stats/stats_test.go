package stats

import (
	"reflect"
	"testing"
)

func TestRecordAndDrain(t *testing.T) {
	r := New(0, 3)
	r.Record("m", 2, true, 1)
	r.Record("m", 1, false, 2)
	r.Record("m", 2, false, 3)
	r.Record("m", 2, true, 4)
	r.Record("m", 2, true, 5)        // the ring keeps the 3 newest: 3, 4, 5
	r.RecordShadow("m", 2, false, 7) // a shadow call is no answer: kept apart
	got := r.Drain()
	want := []Version{
		{"m", 1, 0, 1, []float64{2}, false},
		{"m", 2, 3, 1, []float64{3, 4, 5}, false},
		{"m", 2, 0, 1, []float64{7}, true},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v", got)
	}
	if again := r.Drain(); len(again) != 0 {
		t.Fatalf("a drain resets: %+v", again)
	}
}

func TestVersionCapCountsOverflow(t *testing.T) {
	r := New(2, 0)
	overflow := 0
	r.OnOverflow = func() { overflow++ }
	r.Record("a", 1, true, 1)
	r.Record("b", 1, true, 1)
	r.Record("c", 1, true, 1)
	r.Record("a", 1, true, 1) // existing entries still count
	if got := r.Drain(); len(got) != 2 || got[0].Answered != 2 || overflow != 1 {
		t.Fatalf("got %+v, overflow %d", got, overflow)
	}
}
