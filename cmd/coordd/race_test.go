//go:build race

package main

// raceEnabled reports whether the tests run with the race detector, under
// which a cluster in one process runs many times slower.
const raceEnabled = true
