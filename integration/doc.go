// Package integration holds coordflow's end-to-end tests. They build the real
// binaries (devkafka, coordd, workerd), run each as its own process on
// loopback ports, kill them with SIGKILL where a scenario says so, and check
// the user contract: the HTTP API, the CLI and the exactly-once invariant.
//
// The package has no code outside its tests. Run it with
//
//	go test -count=1 ./integration/
//
// Set COORDFLOW_IT_RACE=1 to build the binaries with the race detector.
package integration
