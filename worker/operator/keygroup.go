package operator

// DefaultMaxParallelism is the number of key groups of a job that does not
// set max_parallelism.
const DefaultMaxParallelism = 128

// KeyGroup returns the key group of key: FNV-1a 64 of the key's bytes modulo
// maxParallelism. The hash is fixed by the protocol (docs/protocol.md) and is
// the same in every process and version, so snapshots stored per key group can
// be restored with another parallelism. maxParallelism must be positive; for
// any other value KeyGroup returns 0 rather than panicking.
func KeyGroup(key []byte, maxParallelism int) int32 {
	if maxParallelism <= 0 {
		return 0
	}
	// FNV-1a 64 inline: hash/fnv's Hash would allocate per call on this hot
	// path. The constants are FNV's offset basis and prime.
	h := uint64(14695981039346656037)
	for _, c := range key {
		h ^= uint64(c)
		h *= 1099511628211
	}
	return int32(h % uint64(maxParallelism))
}

