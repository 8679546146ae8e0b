package predict

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// Batcher coalesces concurrent calls into one downstream call (micro-batching), only when it
// pays, as loopmesh.inference.batching.Coalescer does. A lone item is sent at once: waiting
// would only add latency. While maxInflight batches are out, new items queue and leave
// together when one of those returns (the usual case under load), when the oldest has waited
// maxDelay (the bound), or as soon as maxSize are queued. A batch holds at most maxSize
// items; the timer and maxSize can put more than maxInflight batches out, as in Python.
type Batcher[I, O any] struct {
	flush       func(ctx context.Context, items []I) ([]O, error)
	maxSize     int
	maxDelay    time.Duration
	maxInflight int

	mu       sync.Mutex
	pending  []*waiter[I, O]
	inflight int
	timer    *time.Timer
	timerGen uint64 // which armed timer may still launch (a stopped one may fire anyway)

	batches, items atomic.Uint64
}

// waiter is one submitted item and where its result goes (buffered: a flush never blocks on
// a caller that left).
type waiter[I, O any] struct {
	item   I
	ctx    context.Context // the submitter's: its values (the trace) reach the flush
	done   chan result[O]
	queued bool // in pending (under mu)
}

type result[O any] struct {
	out O
	err error
}

// NewBatcher returns a Batcher over flush, which must return one result per item, in order
// (else every item of the batch gets an error); its error goes to every item of the batch.
// flush runs with the first caller's context values but none of its deadline or cancellation:
// a batch serves several callers, so flush applies its own deadline. maxSize and maxInflight below 1 count as 1, a negative maxDelay as 0.
func NewBatcher[I, O any](flush func(ctx context.Context, items []I) ([]O, error), maxSize int, maxDelay time.Duration, maxInflight int) *Batcher[I, O] {
	return &Batcher[I, O]{
		flush:       flush,
		maxSize:     max(maxSize, 1),
		maxDelay:    max(maxDelay, 0),
		maxInflight: max(maxInflight, 1),
	}
}

// Submit returns flush(batch)[i] for the item's place i in its batch. A caller whose ctx ends
// stops waiting and gets ctx's error: its item is dropped if still queued, else its batch
// goes on without it.
func (b *Batcher[I, O]) Submit(ctx context.Context, item I) (O, error) {
	if err := ctx.Err(); err != nil {
		var zero O
		return zero, err
	}
	w := &waiter[I, O]{item: item, ctx: ctx, done: make(chan result[O], 1), queued: true}
	b.mu.Lock()
	b.pending = append(b.pending, w)
	if b.inflight < b.maxInflight || len(b.pending) >= b.maxSize {
		b.launchLocked()
	} else if b.timer == nil {
		b.armLocked()
	}
	b.mu.Unlock()

	select {
	case r := <-w.done:
		return r.out, r.err
	case <-ctx.Done():
	}
	b.mu.Lock()
	if w.queued {
		b.removeLocked(w)
	}
	b.mu.Unlock()
	select {
	case r := <-w.done: // answered meanwhile: the answer is worth more than the error
		return r.out, r.err
	default:
		var zero O
		return zero, ctx.Err()
	}
}

// Stats returns the batches sent and the items they held, since the Batcher was made.
func (b *Batcher[I, O]) Stats() (batches, items uint64) {
	return b.batches.Load(), b.items.Load()
}

// armLocked starts the maxDelay timer of the oldest queued item.
func (b *Batcher[I, O]) armLocked() {
	b.timerGen++
	gen := b.timerGen
	b.timer = time.AfterFunc(b.maxDelay, func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		if b.timer != nil && b.timerGen == gen {
			b.launchLocked()
		}
	})
}

// launchLocked sends the oldest maxSize queued items as one batch and re-arms the timer for
// what is left.
func (b *Batcher[I, O]) launchLocked() {
	if b.timer != nil {
		b.timer.Stop()
		b.timer = nil
		b.timerGen++
	}
	if len(b.pending) == 0 {
		return
	}
	n := min(len(b.pending), b.maxSize)
	batch := make([]*waiter[I, O], n)
	copy(batch, b.pending)
	for _, w := range batch {
		w.queued = false
	}
	left := copy(b.pending, b.pending[n:])
	clear(b.pending[left:])
	b.pending = b.pending[:left]
	b.inflight++
	go b.run(batch)
	if len(b.pending) > 0 {
		b.armLocked()
	}
}

// removeLocked takes w (queued) out of pending.
func (b *Batcher[I, O]) removeLocked(w *waiter[I, O]) {
	for i, p := range b.pending {
		if p == w {
			copy(b.pending[i:], b.pending[i+1:])
			b.pending[len(b.pending)-1] = nil
			b.pending = b.pending[:len(b.pending)-1]
			w.queued = false
			return
		}
	}
}

func (b *Batcher[I, O]) run(batch []*waiter[I, O]) {
	b.batches.Add(1)
	b.items.Add(uint64(len(batch)))
	items := make([]I, len(batch))
	for i, w := range batch {
		items[i] = w.item
	}
	// The first caller's values (its trace: the batch's call continues it, as Python's
	// coalescer does), never its deadline or cancellation: the batch serves every caller.
	outs, err := b.flush(context.WithoutCancel(batch[0].ctx), items)
	if err == nil && len(outs) != len(batch) {
		err = fmt.Errorf("flush returned %d results for %d items", len(outs), len(batch))
	}
	for i, w := range batch {
		if err != nil {
			w.done <- result[O]{err: err}
		} else {
			w.done <- result[O]{out: outs[i]}
		}
	}
	b.mu.Lock()
	b.inflight--
	if len(b.pending) > 0 {
		b.launchLocked()
	}
	b.mu.Unlock()
}
