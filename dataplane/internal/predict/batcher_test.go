package predict

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"
)

// waitFor polls cond until it holds, failing the test after a few seconds.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func (b *Batcher[I, O]) queued() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.pending)
}

func (b *Batcher[I, O]) outstanding() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.inflight
}

// recorder is a flush that records its batches and answers item*10; a batch holding an
// item of gated waits until that gate is closed.
type recorder struct {
	mu      sync.Mutex
	batches [][]int
	started chan []int // each batch, when it starts (buffered)
	gates   map[int]chan struct{}
	err     func(items []int) error
	results func(items []int) []int
}

func newRecorder() *recorder {
	return &recorder{started: make(chan []int, 100), gates: map[int]chan struct{}{}}
}

func (r *recorder) gate(item int) chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	g := make(chan struct{})
	r.gates[item] = g
	return g
}

func (r *recorder) flush(ctx context.Context, items []int) ([]int, error) {
	if ctx.Done() != nil {
		return nil, errors.New("flush got a context that can end")
	}
	r.mu.Lock()
	r.batches = append(r.batches, slices.Clone(items))
	var wait []chan struct{}
	for _, it := range items {
		if g, ok := r.gates[it]; ok {
			wait = append(wait, g)
		}
	}
	r.mu.Unlock()
	r.started <- slices.Clone(items)
	for _, g := range wait {
		<-g
	}
	if r.err != nil {
		if err := r.err(items); err != nil {
			return nil, err
		}
	}
	if r.results != nil {
		return r.results(items), nil
	}
	out := make([]int, len(items))
	for i, it := range items {
		out[i] = it * 10
	}
	return out, nil
}

func (r *recorder) seen() [][]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.batches)
}

// submitAsync submits item and sends the outcome on the returned channel.
type outcome struct {
	item, out int
	err       error
}

func submitAsync(ctx context.Context, b *Batcher[int, int], item int) <-chan outcome {
	ch := make(chan outcome, 1)
	go func() {
		out, err := b.Submit(ctx, item)
		ch <- outcome{item, out, err}
	}()
	return ch
}

func recv(t *testing.T, ch <-chan outcome) outcome {
	t.Helper()
	select {
	case o := <-ch:
		return o
	case <-time.After(5 * time.Second):
		t.Fatal("no answer")
		return outcome{}
	}
}

func TestBatcherLoneItemGoesAtOnce(t *testing.T) {
	r := newRecorder()
	b := NewBatcher(r.flush, 64, time.Hour, 1)
	for i := 1; i <= 3; i++ {
		o := recv(t, submitAsync(context.Background(), b, i))
		if o.err != nil || o.out != i*10 {
			t.Fatalf("got %+v", o)
		}
	}
	if got := r.seen(); !slices.EqualFunc(got, [][]int{{1}, {2}, {3}}, slices.Equal) {
		t.Fatalf("batches %v", got)
	}
	if batches, items := b.Stats(); batches != 3 || items != 3 {
		t.Fatalf("stats %d %d", batches, items)
	}
}

func TestBatcherInflightLimit(t *testing.T) {
	r := newRecorder()
	g1, g2 := r.gate(1), r.gate(2)
	b := NewBatcher(r.flush, 64, time.Hour, 2)
	c1 := submitAsync(context.Background(), b, 1)
	c2 := submitAsync(context.Background(), b, 2)
	<-r.started
	<-r.started // both out at once: two may be in flight
	c3 := submitAsync(context.Background(), b, 3)
	waitFor(t, "item 3 queued", func() bool { return b.queued() == 1 })
	close(g1)
	if o := recv(t, c1); o.out != 10 {
		t.Fatalf("got %+v", o)
	}
	if o := recv(t, c3); o.out != 30 { // left when batch 1 returned
		t.Fatalf("got %+v", o)
	}
	close(g2)
	recv(t, c2)
}

func TestBatcherCoalescesWhileInflight(t *testing.T) {
	r := newRecorder()
	gate := r.gate(0)
	b := NewBatcher(r.flush, 64, time.Hour, 1)
	first := submitAsync(context.Background(), b, 0)
	<-r.started
	var chans []<-chan outcome
	for i := 1; i <= 5; i++ {
		chans = append(chans, submitAsync(context.Background(), b, i))
	}
	waitFor(t, "5 queued", func() bool { return b.queued() == 5 })
	if len(r.seen()) != 1 {
		t.Fatal("queued items left before the batch in flight returned")
	}
	close(gate)
	recv(t, first)
	for _, ch := range chans {
		o := recv(t, ch)
		if o.err != nil || o.out != o.item*10 {
			t.Fatalf("got %+v", o)
		}
	}
	got := r.seen()
	if len(got) != 2 {
		t.Fatalf("batches %v", got)
	}
	second := slices.Sorted(slices.Values(got[1]))
	if !slices.Equal(second, []int{1, 2, 3, 4, 5}) {
		t.Fatalf("second batch %v", got[1])
	}
	if batches, items := b.Stats(); batches != 2 || items != 6 {
		t.Fatalf("stats %d %d", batches, items)
	}
}

func TestBatcherMaxSize(t *testing.T) {
	// With the one slot taken, the third queued item sends the three at once.
	r := newRecorder()
	gate := r.gate(0)
	defer close(gate)
	b := NewBatcher(r.flush, 3, time.Hour, 1)
	submitAsync(context.Background(), b, 0)
	<-r.started
	chans := []<-chan outcome{submitAsync(context.Background(), b, 1), submitAsync(context.Background(), b, 2)}
	waitFor(t, "2 queued", func() bool { return b.queued() == 2 })
	chans = append(chans, submitAsync(context.Background(), b, 3))
	for _, ch := range chans {
		if o := recv(t, ch); o.err != nil || o.out != o.item*10 {
			t.Fatalf("got %+v", o)
		}
	}
	if got := r.seen(); len(got) != 2 || len(got[1]) != 3 {
		t.Fatalf("batches %v", got)
	}
}

func TestBatcherMaxDelay(t *testing.T) {
	r := newRecorder()
	gate := r.gate(0)
	defer close(gate)
	const delay = 20 * time.Millisecond
	b := NewBatcher(r.flush, 64, delay, 1)
	submitAsync(context.Background(), b, 0)
	<-r.started
	start := time.Now()
	c1 := submitAsync(context.Background(), b, 1)
	c2 := submitAsync(context.Background(), b, 2)
	o1, o2 := recv(t, c1), recv(t, c2) // batch 0 is still out: the timer sent them
	if o1.out != 10 || o2.out != 20 {
		t.Fatalf("got %+v %+v", o1, o2)
	}
	if waited := time.Since(start); waited < delay {
		t.Fatalf("sent after %v, before the delay", waited)
	}
	if got := r.seen(); len(got) != 2 || len(got[1]) != 2 {
		t.Fatalf("batches %v", got)
	}
}

func TestBatcherErrorGoesToTheWholeBatch(t *testing.T) {
	r := newRecorder()
	boom := errors.New("boom")
	r.err = func(items []int) error {
		if len(items) > 1 {
			return boom
		}
		return nil
	}
	gate := r.gate(0)
	b := NewBatcher(r.flush, 64, time.Hour, 1)
	first := submitAsync(context.Background(), b, 0)
	<-r.started
	chans := []<-chan outcome{submitAsync(context.Background(), b, 1), submitAsync(context.Background(), b, 2), submitAsync(context.Background(), b, 3)}
	waitFor(t, "3 queued", func() bool { return b.queued() == 3 })
	close(gate)
	if o := recv(t, first); o.err != nil {
		t.Fatal(o.err)
	}
	for _, ch := range chans {
		if o := recv(t, ch); !errors.Is(o.err, boom) {
			t.Fatalf("got %+v", o)
		}
	}
}

func TestBatcherResultCountMismatch(t *testing.T) {
	r := newRecorder()
	r.results = func(items []int) []int { return make([]int, len(items)-1) }
	gate := r.gate(0)
	b := NewBatcher(r.flush, 64, time.Hour, 1)
	first := submitAsync(context.Background(), b, 0)
	<-r.started
	chans := []<-chan outcome{submitAsync(context.Background(), b, 1), submitAsync(context.Background(), b, 2)}
	waitFor(t, "2 queued", func() bool { return b.queued() == 2 })
	close(gate)
	if o := recv(t, first); o.err == nil || o.err.Error() != "flush returned 0 results for 1 items" {
		t.Fatalf("got %+v", o)
	}
	for _, ch := range chans {
		if o := recv(t, ch); o.err == nil || o.err.Error() != "flush returned 1 results for 2 items" {
			t.Fatalf("got %+v", o)
		}
	}
}

func TestBatcherCallerLeavesWhileQueued(t *testing.T) {
	r := newRecorder()
	gate := r.gate(0)
	b := NewBatcher(r.flush, 64, time.Hour, 1)
	first := submitAsync(context.Background(), b, 0)
	<-r.started
	ctx, cancel := context.WithCancel(context.Background())
	leaving := submitAsync(ctx, b, 1)
	staying := submitAsync(context.Background(), b, 2)
	waitFor(t, "2 queued", func() bool { return b.queued() == 2 })
	cancel()
	if o := recv(t, leaving); !errors.Is(o.err, context.Canceled) {
		t.Fatalf("got %+v", o)
	}
	if n := b.queued(); n != 1 {
		t.Fatalf("%d queued after the caller left, want 1", n)
	}
	close(gate)
	recv(t, first)
	if o := recv(t, staying); o.err != nil || o.out != 20 {
		t.Fatalf("got %+v", o)
	}
	if got := r.seen(); len(got) != 2 || !slices.Equal(got[1], []int{2}) {
		t.Fatalf("batches %v: the item of the caller who left was sent", got)
	}
}

func TestBatcherCallerLeavesWhileInFlight(t *testing.T) {
	r := newRecorder()
	gate := r.gate(0)
	b := NewBatcher(r.flush, 64, time.Hour, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	o := recv(t, submitAsync(ctx, b, 0)) // the flush is stuck: the deadline ends the wait
	if !errors.Is(o.err, context.DeadlineExceeded) {
		t.Fatalf("got %+v", o)
	}
	close(gate) // the flush finishes without anyone to answer, and does not block
	waitFor(t, "the flush to end", func() bool { return b.outstanding() == 0 })
	if o := recv(t, submitAsync(context.Background(), b, 5)); o.out != 50 {
		t.Fatalf("got %+v", o)
	}
}

func TestBatcherContextAlreadyDone(t *testing.T) {
	r := newRecorder()
	b := NewBatcher(r.flush, 64, time.Hour, 1)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := b.Submit(ctx, 1); !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	if len(r.seen()) != 0 {
		t.Fatal("sent anyway")
	}
}

func TestBatcherConcurrent(t *testing.T) {
	var mu sync.Mutex
	calls := 0
	flush := func(_ context.Context, items []string) ([]string, error) {
		mu.Lock()
		calls++
		mu.Unlock()
		out := make([]string, len(items))
		for i, it := range items {
			out[i] = "r:" + it
		}
		return out, nil
	}
	before := runtime.NumGoroutine()
	b := NewBatcher(flush, 8, 50*time.Microsecond, 2)
	const n = 2000
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx := context.Background()
			if i%10 == 0 { // some callers give up at once or soon
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, time.Duration(i%3)*time.Microsecond)
				defer cancel()
			}
			item := fmt.Sprint(i)
			out, err := b.Submit(ctx, item)
			if err == nil && out != "r:"+item {
				errs <- fmt.Errorf("item %s got %s", item, out)
			}
			if err != nil && !errors.Is(err, context.DeadlineExceeded) {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	waitFor(t, "flushes to end", func() bool { return b.outstanding() == 0 && b.queued() == 0 })
	waitFor(t, "no goroutine left", func() bool { return runtime.NumGoroutine() <= before })
	batches, items := b.Stats()
	if batches != uint64(calls) || items > n || items < n*9/10 {
		t.Fatalf("stats %d batches %d items, %d calls", batches, items, calls)
	}
}

func TestNewBatcherClampsLimits(t *testing.T) {
	b := NewBatcher(func(context.Context, []int) ([]int, error) { return nil, nil }, 0, -time.Second, -1)
	if b.maxSize != 1 || b.maxInflight != 1 || b.maxDelay != 0 {
		t.Fatalf("%d %d %v", b.maxSize, b.maxInflight, b.maxDelay)
	}
}
