package operator

import "hash/fnv"

// DefaultMaxParallelism is the number of key groups of a job that does not
// set max_parallelism.
const DefaultMaxParallelism = 128

// KeyGroup returns the key group of key: FNV-1a 64 of the key's bytes modulo
// maxParallelism. The hash is fixed by the protocol (docs/protocol.md) and is
// the same in every process and version, so snapshots stored per key group can
// be restored with another parallelism. maxParallelism must be positive; for
// any other value KeyGroup returns 0 rather than panicking.
func KeyGroup(key string, maxParallelism int) int32 {
	if maxParallelism <= 0 {
		return 0
	}
	h := fnv.New64a()
	_, _ = h.Write([]byte(key)) // a hash.Hash never returns an error
	return int32(h.Sum64() % uint64(maxParallelism))
}

// KeyGroupRange returns the key groups [start, end) map task index of
// parallelism owns, Flink's contiguous ranges as docs/protocol.md defines them.
// The ranges of indexes 0..parallelism-1 partition [0, maxParallelism).
func KeyGroupRange(index, parallelism, maxParallelism int) (start, end int32) {
	if parallelism <= 0 || index < 0 || index >= parallelism {
		return 0, 0
	}
	return int32(index * maxParallelism / parallelism), int32((index + 1) * maxParallelism / parallelism)
}
