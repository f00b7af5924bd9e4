package fsm

// KeyGroupRanges splits key groups [0, maxParallelism) into parallelism
// contiguous ranges, Flink's layout: map task i owns
// [i*max/M, (i+1)*max/M). It returns nil unless 1 <= parallelism <= maxParallelism,
// the only case in which every range is non-empty.
func KeyGroupRanges(maxParallelism, parallelism int) []KeyGroupRange {
	if parallelism < 1 || parallelism > maxParallelism {
		return nil
	}
	ranges := make([]KeyGroupRange, parallelism)
	for i := range ranges {
		ranges[i] = KeyGroupRange{
			Start: i * maxParallelism / parallelism,
			End:   (i + 1) * maxParallelism / parallelism,
		}
	}
	return ranges
}

// SourcePartitions returns, in ascending order, the partitions of a topic
// with numPartitions partitions that source task index of parallelism reads:
// those p with p mod parallelism == index. It returns an empty slice for a
// task with no partition (parallelism > numPartitions) or invalid arguments.
func SourcePartitions(numPartitions, parallelism, index int) []int32 {
	if parallelism < 1 || index < 0 || index >= parallelism || numPartitions <= index {
		return []int32{}
	}
	parts := make([]int32, 0, (numPartitions-index+parallelism-1)/parallelism)
	for p := index; p < numPartitions; p += parallelism {
		parts = append(parts, int32(p))
	}
	return parts
}

// KeyGroup returns the key group of key: FNV-1a 64 of the key's bytes modulo
// maxParallelism. The hash is fixed by the protocol (docs/protocol.md) and is
// the same in every process and version, so state stored per key group can
// be restored with another parallelism, and the coordinator finds a key's
// state without asking a worker. maxParallelism must be positive; for any
// other value KeyGroup returns 0 rather than panicking.
func KeyGroup(key []byte, maxParallelism int) int32 {
	if maxParallelism <= 0 {
		return 0
	}
	// FNV-1a 64 inline: hash/fnv's Hash would allocate per call on the
	// sources' hot path. The constants are FNV's offset basis and prime.
	h := uint64(14695981039346656037)
	for _, c := range key {
		h ^= uint64(c)
		h *= 1099511628211
	}
	return int32(h % uint64(maxParallelism))
}
