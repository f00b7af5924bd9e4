package fsm

import (
	"reflect"
	"slices"
	"testing"
)

func TestKeyGroupRanges(t *testing.T) {
	tests := []struct {
		max, par int
		want     []KeyGroupRange
	}{
		{128, 1, []KeyGroupRange{{0, 128}}},
		{128, 2, []KeyGroupRange{{0, 64}, {64, 128}}},
		{128, 3, []KeyGroupRange{{0, 42}, {42, 85}, {85, 128}}},
		{8, 3, []KeyGroupRange{{0, 2}, {2, 5}, {5, 8}}},
		{4, 4, []KeyGroupRange{{0, 1}, {1, 2}, {2, 3}, {3, 4}}},
		{4, 5, nil},
		{4, 0, nil},
		{0, 1, nil},
		{-1, -1, nil},
	}
	for _, tc := range tests {
		if got := KeyGroupRanges(tc.max, tc.par); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("KeyGroupRanges(%d, %d) = %v, want %v", tc.max, tc.par, got, tc.want)
		}
	}
}

// Every valid (max, parallelism) tiles [0, max) with non-empty ranges, and
// the result is accepted by the FSM's assignment check.
func TestKeyGroupRangesTile(t *testing.T) {
	for _, groups := range []int{1, 7, 128, 1000} {
		for par := 1; par <= groups && par <= 64; par++ {
			ranges := KeyGroupRanges(groups, par)
			next := 0
			for i, r := range ranges {
				if r.Start != next || r.End <= r.Start {
					t.Fatalf("groups %d par %d: range %d = %v after %d", groups, par, i, r, next)
				}
				next = r.End
			}
			if next != groups {
				t.Fatalf("groups %d par %d: ranges end at %d", groups, par, next)
			}
			spec := testSpec()
			spec.Operator.MaxParallelism, spec.Operator.Parallelism = groups, par
			if err := checkAssignment(spec, assignment(spec, "w1")); err != nil {
				t.Fatalf("groups %d par %d: %v", groups, par, err)
			}
		}
	}
}

func TestSourcePartitions(t *testing.T) {
	tests := []struct {
		parts, par, index int
		want              []int32
	}{
		{4, 2, 0, []int32{0, 2}},
		{4, 2, 1, []int32{1, 3}},
		{5, 2, 0, []int32{0, 2, 4}},
		{5, 2, 1, []int32{1, 3}},
		{2, 3, 2, []int32{}},
		{8, 1, 0, []int32{0, 1, 2, 3, 4, 5, 6, 7}},
		{4, 2, 2, []int32{}},
		{4, 0, 0, []int32{}},
		{4, 2, -1, []int32{}},
		{0, 2, 0, []int32{}},
	}
	for _, tc := range tests {
		if got := SourcePartitions(tc.parts, tc.par, tc.index); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("SourcePartitions(%d, %d, %d) = %v, want %v", tc.parts, tc.par, tc.index, got, tc.want)
		}
	}
}

// The source tasks of a job read every partition exactly once.
func TestSourcePartitionsCover(t *testing.T) {
	for parts := 1; parts <= 12; parts++ {
		for par := 1; par <= 6; par++ {
			var all []int32
			for i := range par {
				all = append(all, SourcePartitions(parts, par, i)...)
			}
			slices.Sort(all)
			for p, got := range all {
				if int(got) != p || len(all) != parts {
					t.Fatalf("parts %d par %d: partitions %v", parts, par, all)
				}
			}
		}
	}
}
