package operator

import "github.com/coordflow/coordflow/fsm"

// DefaultMaxParallelism is the number of key groups of a job that does not
// set max_parallelism.
const DefaultMaxParallelism = fsm.DefaultMaxParallelism

// KeyGroup returns the key group of key, FNV-1a 64 of its bytes modulo
// maxParallelism: fsm.KeyGroup, the one definition the coordinator uses too.
func KeyGroup(key []byte, maxParallelism int) int32 {
	return fsm.KeyGroup(key, maxParallelism)
}
