package refresher

import (
	"time"

	"github.com/cenkalti/backoff/v4"

	"github.com/tokend/tokend/internal/cache"
)

// item is the refresher's bookkeeping for one entry. Guarded by Refresher.mu.
type item struct {
	e     *cache.Entry
	due   time.Time // when the scheduler acts on it; zero when not queued
	index int       // position in the heap, -1 when not queued

	// bo paces retries; nil until the first retryable failure.
	bo *backoff.ExponentialBackOff
	// err is the last failure, returned to callers without an upstream
	// call until errUntil.
	err      error
	errUntil time.Time
	// errKey is the fingerprint of the API key err was answered to: a
	// reloaded key is not held to the old key's failures.
	errKey []byte
	// minting is set while an upstream call for the entry is in flight;
	// callers that join it are not charged to their miss limit.
	minting bool
}

// queue is a min-heap of items by due time: one timer drives every entry.
type queue []*item

func (q queue) Len() int           { return len(q) }
func (q queue) Less(i, j int) bool { return q[i].due.Before(q[j].due) }
func (q queue) Swap(i, j int) {
	q[i], q[j] = q[j], q[i]
	q[i].index = i
	q[j].index = j
}
func (q *queue) Push(x any) {
	it := x.(*item)
	it.index = len(*q)
	*q = append(*q, it)
}
func (q *queue) Pop() any {
	old := *q
	n := len(old)
	it := old[n-1]
	old[n-1] = nil
	it.index = -1
	*q = old[:n-1]
	return it
}
