package worker

import "time"

// leaseClock reads the clock a worker's lease is measured on: the time
// elapsed since some fixed origin, always positive (0 means "never" where a
// reading is stored).
//
// It must be monotonic. The lease stops a worker's tasks when no leader has
// been heard for lease_ms; measured on the wall clock, a step of the clock
// (NTP, date -s, a VM resumed from a snapshot) would stop every task at once
// when it jumps forward, and, worse, keep a partitioned worker running as a
// zombie for as long as it jumps back. So lease deadlines are computed only
// from time.Now() values, whose monotonic readings time.Since subtracts, and
// kept as durations since the origin. Never from a time rebuilt from a number
// (time.Unix, a wall time received over the wire, such as Heartbeat.unix_nano)
// or one stripped of its monotonic reading (Round(0), UTC(), In, Local): the
// time package then falls back to the wall clock.
type leaseClock func() time.Duration

// monotonicClock returns the leaseClock of the process: durations since now,
// read on the monotonic clock.
func monotonicClock() leaseClock {
	origin := time.Now()
	return func() time.Duration { return max(time.Since(origin), 1) }
}
