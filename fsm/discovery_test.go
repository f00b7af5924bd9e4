package fsm

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// TestCheckpointWithDiscoveredPartitions: a source's state may name offsets
// of partitions beyond its assignment that it owns (p mod S == index), which
// it discovered while running; a partition it does not own is rejected, and
// an assigned one must still be there. testPartitions is 5 and S is 2:
// source-0 is assigned 0, 2, 4 and may discover 6, 8, ...
func TestCheckpointWithDiscoveredPartitions(t *testing.T) {
	tests := []struct {
		name  string
		edit  func(src0 map[int32]int64)
		want  error  // nil: accepted
		where string // in the error text
	}{
		{"discovered own partitions", func(o map[int32]int64) { o[6], o[8] = 0, 17 }, nil, ""},
		{"discovered foreign partition", func(o map[int32]int64) { o[6], o[7] = 0, 3 }, ErrIncompleteStates, "partition 7, which the task does not own (p mod 2 must be 0)"},
		{"negative partition", func(o map[int32]int64) { o[-2] = 0 }, ErrIncompleteStates, "partition -2"},
		{"negative offset of a discovered partition", func(o map[int32]int64) { o[6] = -1 }, ErrIncompleteStates, "negative offset -1 for partition 6"},
		{"assigned partition missing", func(o map[int32]int64) { delete(o, 4); o[6] = 0 }, ErrIncompleteStates, "no offset for partition 4"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			j := h.runningJob("j1")
			cp := h.triggered("j1")
			states := statesFor(j.Tasks, int64(cp))
			tc.edit(states["source-0"].Offsets)
			_, err := h.apply(CommandCheckpointCompleted, h.complete("j1", j.Attempt, cp, states))
			if tc.want == nil {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				got := h.job("j1").Completed[0].Tasks["source-0"].Offsets
				if got[6] != states["source-0"].Offsets[6] || got[8] != 17 {
					t.Fatalf("completed offsets %v lack the discovered partitions", got)
				}
				return
			}
			wantErr(t, err, tc.want)
			if !strings.Contains(err.Error(), tc.where) {
				t.Fatalf("error %q does not name %q", err, tc.where)
			}
		})
	}
}

func TestPartitionDiscoverySpec(t *testing.T) {
	withDiscovery := func(v string) string {
		return strings.Replace(minimalSpec, `"parallelism": 1}`, `"parallelism": 1, "partition_discovery": `+v+`}`, 1)
	}
	tests := []struct {
		name string
		doc  string
		want time.Duration // PartitionDiscoveryInterval; 0: an error naming the field
		err  string
	}{
		{"absent", minimalSpec, 10 * time.Second, ""},
		{"null", withDiscovery(`null`), 10 * time.Second, ""},
		{"set", withDiscovery(`"2m"`), 2 * time.Minute, ""},
		{"minimum", withDiscovery(`"1s"`), time.Second, ""},
		{"maximum", withDiscovery(`"1h"`), time.Hour, ""},
		{"explicit zero", withDiscovery(`"0s"`), 0, "source.partition_discovery: must be between 1s and 1h, not 0s"},
		{"below minimum", withDiscovery(`"500ms"`), 0, "source.partition_discovery: must be between 1s and 1h, not 500ms"},
		{"above maximum", withDiscovery(`"2h"`), 0, "source.partition_discovery: must be between 1s and 1h, not 2h"},
		{"negative", withDiscovery(`"-5s"`), 0, "source.partition_discovery: must be between 1s and 1h, not -5s"},
		{"not a duration", withDiscovery(`"off"`), 0, `source.partition_discovery: must be a duration string such as "500ms", not "off"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			spec, err := ParseJobSpec([]byte(tc.doc), nil)
			if tc.err != "" {
				var fe *FieldError
				if err == nil || err.Error() != tc.err || !errors.As(err, &fe) || fe.Field != "source.partition_discovery" {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := spec.Source.PartitionDiscoveryInterval(); got != tc.want {
				t.Fatalf("interval %v, want %v", got, tc.want)
			}
		})
	}
}

// TestPartitionDiscoveryStoredSpec: the FSM's Validate, which replays stored
// specs, accepts the field left out (specs from before it existed) and
// keeps only the lower bound, like the other bounds it has always had.
func TestPartitionDiscoveryStoredSpec(t *testing.T) {
	spec := testSpec()
	if err := spec.Validate(nil); err != nil {
		t.Fatalf("spec without partition_discovery: %v", err)
	}
	spec.Source.PartitionDiscovery = Duration(2 * time.Hour)
	if err := spec.Validate(nil); err != nil {
		t.Fatalf("stored spec with a long interval: %v", err)
	}
	spec.Source.PartitionDiscovery = Duration(time.Millisecond)
	if err := spec.Validate(nil); err == nil || !strings.Contains(err.Error(), "source.partition_discovery") {
		t.Fatalf("1ms: %v, want an error naming source.partition_discovery", err)
	}
}
