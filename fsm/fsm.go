// Package fsm is coordflow's replicated state machine: jobs, their attempts and
// task assignments, and their checkpoints. It is pure and deterministic: no
// clock, no randomness, no network; time and ids come in the commands.
package fsm

// FSM is the raft.FSM of coordd. [F: to be implemented]
type FSM struct{}
