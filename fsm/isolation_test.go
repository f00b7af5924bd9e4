package fsm

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

// TestSourceIsolationLevel: source.isolation_level takes Kafka's two names;
// left out it is read uncommitted, Kafka's default; anything else, an empty
// string given too, is an error naming the field.
func TestSourceIsolationLevel(t *testing.T) {
	withLevel := func(v string) string {
		return strings.Replace(minimalSpec, `"parallelism": 1}`, `"parallelism": 1, "isolation_level": `+v+`}`, 1)
	}
	const want = `source.isolation_level: must be "read_uncommitted" or "read_committed", not `
	tests := []struct {
		name, doc     string
		readCommitted bool
		err           string
	}{
		{"absent", minimalSpec, false, ""},
		{"read_uncommitted", withLevel(`"read_uncommitted"`), false, ""},
		{"read_committed", withLevel(`"read_committed"`), true, ""},
		{"empty", withLevel(`""`), false, want + `""`},
		{"Kafka's property spelling", withLevel(`"read-committed"`), false, want + `"read-committed"`},
		{"upper case", withLevel(`"READ_COMMITTED"`), false, want + `"READ_COMMITTED"`},
		{"not a string", withLevel(`true`), false, "source.isolation_level: must be a string, not a JSON bool"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			spec, err := ParseJobSpec([]byte(tc.doc), nil)
			if tc.err != "" {
				var fe *FieldError
				if err == nil || err.Error() != tc.err || !errors.As(err, &fe) || fe.Field != "source.isolation_level" {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := spec.Source.ReadCommitted(); got != tc.readCommitted {
				t.Fatalf("ReadCommitted() = %v, want %v", got, tc.readCommitted)
			}
		})
	}
}

// TestSourceIsolationLevelStoredSpec: a spec stored before the field existed
// keeps its JSON (the field is omitted, not written as the default) and
// reads uncommitted, as its jobs always did; the FSM's Validate does not
// check the value, which only submissions do.
func TestSourceIsolationLevelStoredSpec(t *testing.T) {
	spec := testSpec()
	if err := spec.Validate(nil); err != nil {
		t.Fatalf("stored spec without isolation_level: %v", err)
	}
	if spec.Source.ReadCommitted() {
		t.Fatal("a spec without isolation_level reads committed, want uncommitted")
	}
	b, err := json.Marshal(spec.Source)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), "isolation_level") {
		t.Fatalf("source without isolation_level encodes as %s, want the field left out", b)
	}
	// The check of the value is a rule of submissions only: the FSM
	// replays what a leader accepted, whatever a later version allows.
	spec.Source.IsolationLevel = "serializable"
	if err := spec.Validate(nil); err != nil {
		t.Fatalf("stored spec with isolation_level %q: %v, want it accepted as the leader did", spec.Source.IsolationLevel, err)
	}
	if spec.Source.ReadCommitted() {
		t.Fatalf("isolation_level %q reads committed", spec.Source.IsolationLevel)
	}
}
