package worker

import (
	"fmt"
	"time"
)

// aligner is the barrier alignment state of one map task (docs/protocol.md
// "Checkpoints", step 3). It is pure bookkeeping, owned by the task loop: the
// loop feeds it every barrier, input closure and input replacement of the
// live inputs (an input replaced by a newer channel of its source is no
// longer live: the loop drops its events) and carries out what it answers.
// The invariant it keeps: an input that delivered Barrier(N) stays blocked
// (its goroutine reads nothing more) until snapshot N is taken or N is
// abandoned, or it is replaced (it then never forwards again and N is
// abandoned), so no item behind Barrier(N) is applied before snapshot N.
//
// Every barrier a live input delivers is released exactly once, by exactly
// one answer, because the input's goroutine waits for that release (or its
// replacement) before it reads on.
type aligner struct {
	blocked []bool // input delivered Barrier(pending) and awaits release
	closed  []bool // input ended; no barrier until a new channel replaces it
	pending uint64 // checkpoint being aligned; 0 when none
	arrived int    // inputs blocked on pending
	last    uint64 // highest checkpoint snapshotted or abandoned
	started time.Time
}

func newAligner(inputs int) *aligner {
	return &aligner{blocked: make([]bool, inputs), closed: make([]bool, inputs)}
}

// abandonment is a checkpoint the task cannot take, to be declined.
type abandonment struct {
	id     uint64
	reason string
}

// alignStep is what the task loop must do after a barrier or an input
// closure, in this order: decline the abandoned checkpoints, take the
// snapshot (if non-zero), then release the inputs in release.
type alignStep struct {
	abandoned []abandonment
	snapshot  uint64
	aligned   time.Duration // first to last barrier of snapshot
	release   []int
}

// barrier records that input delivered Barrier(id) at now.
func (a *aligner) barrier(input int, id uint64, now time.Time) alignStep {
	var step alignStep
	if id <= a.last || id < a.pending {
		// Late barrier of a checkpoint already taken or abandoned.
		step.release = []int{input}
		return step
	}
	if id > a.pending {
		if a.pending != 0 {
			// Some source never sent Barrier(pending): it missed the
			// trigger. pending cannot complete; align the newer one.
			a.abandon(&step, fmt.Sprintf("barrier %d arrived before barrier %d was aligned", id, a.pending))
		}
		if c := a.closedInput(); c >= 0 {
			a.last = id
			step.abandoned = append(step.abandoned, abandonment{id, fmt.Sprintf("input from source %d is closed", c)})
			step.release = append(step.release, input)
			return step
		}
		a.pending, a.started = id, now
	}
	if a.blocked[input] {
		// Cannot happen: a blocked input reads nothing. Release it rather
		// than leave it blocked forever.
		step.release = append(step.release, input)
		return step
	}
	a.blocked[input] = true
	a.arrived++
	if a.arrived == len(a.blocked) {
		step.snapshot = a.pending
		step.aligned = now.Sub(a.started)
		a.last = a.pending
		a.pending, a.arrived = 0, 0
		step.release = append(step.release, a.releaseAll()...)
	}
	return step
}

// inputClosed records that input ended. A pending checkpoint can then never
// be aligned, so it is abandoned at once instead of timing out.
func (a *aligner) inputClosed(input int) alignStep {
	var step alignStep
	a.closed[input] = true
	if a.pending != 0 {
		a.abandon(&step, fmt.Sprintf("input from source %d closed", input))
	}
	return step
}

// replaced records that a new channel of input's source replaced the input
// (open or closed): a source reconnected, or task-scoped recovery restored
// it. A pending checkpoint was triggered before that and cannot align with
// the new channel (the leader aborts it anyway): it is abandoned and the
// blocked inputs, the replaced one too, are released. The input is open
// again: later barriers align over every input.
func (a *aligner) replaced(input int) alignStep {
	var step alignStep
	if a.pending != 0 {
		a.abandon(&step, fmt.Sprintf("input from source %d replaced by a new channel", input))
	}
	a.closed[input] = false
	return step
}

// abandon gives up the pending checkpoint and releases its blocked inputs.
func (a *aligner) abandon(step *alignStep, reason string) {
	step.abandoned = append(step.abandoned, abandonment{a.pending, reason})
	step.release = append(step.release, a.releaseAll()...)
	a.last = a.pending
	a.pending, a.arrived = 0, 0
}

func (a *aligner) releaseAll() []int {
	var r []int
	for i, b := range a.blocked {
		if b {
			r = append(r, i)
			a.blocked[i] = false
		}
	}
	return r
}

func (a *aligner) closedInput() int {
	for i, c := range a.closed {
		if c {
			return i
		}
	}
	return -1
}
