package fsm

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

// designSpec is the example job spec of the user contract.
const designSpec = `{
  "name": "wordcount",
  "source": {"brokers": ["127.0.0.1:9092"], "topic": "words", "start": "earliest", "parallelism": 2},
  "operator": {"name": "wordcount", "parallelism": 2, "max_parallelism": 128},
  "sink": {"brokers": ["127.0.0.1:9092"], "topic": "counts"},
  "checkpoint": {"interval": "1s", "timeout": "30s", "min_pause": "0s", "retained": 3, "tolerable_failures": 3}
}`

const minimalSpec = `{
  "name": "wc",
  "source": {"brokers": ["localhost:9092"], "topic": "words", "parallelism": 1},
  "operator": {"name": "count", "parallelism": 1}
}`

func knownOps(name string) bool {
	switch name {
	case "wordcount", "count", "sum", "passthrough", "latest", "distinct":
		return true
	}
	return false
}

func TestParseJobSpecDesignExample(t *testing.T) {
	spec, err := ParseJobSpec([]byte(designSpec), knownOps)
	if err != nil {
		t.Fatal(err)
	}
	want := JobSpec{
		Name:     "wordcount",
		Source:   SourceSpec{Brokers: []string{"127.0.0.1:9092"}, Topic: "words", Start: "earliest", Parallelism: 2, Group: "coordflow-wordcount"},
		Operator: OperatorSpec{Name: "wordcount", Parallelism: 2, MaxParallelism: 128},
		Sink: &SinkSpec{Brokers: []string{"127.0.0.1:9092"}, Topic: "counts",
			Delivery: DeliveryExactlyOnce, TransactionTimeout: Duration(91 * time.Second)},
		Checkpoint: CheckpointSpec{
			Interval: Duration(time.Second), Timeout: Duration(30 * time.Second), Retained: 3, TolerableFailures: 3,
			InlineThreshold: DefaultInlineThreshold,
		},
		State:   StateSpec{Backend: "memory"},
		Restart: RestartSpec{Initial: DefaultRestartInitial, Max: DefaultRestartMax, ResetAfter: DefaultRestartResetAfter},
	}
	if !reflect.DeepEqual(spec, want) {
		t.Fatalf("got  %+v\nwant %+v", spec, want)
	}
}

func TestParseJobSpecDefaults(t *testing.T) {
	spec, err := ParseJobSpec([]byte(minimalSpec), knownOps)
	if err != nil {
		t.Fatal(err)
	}
	want := JobSpec{
		Name:     "wc",
		Source:   SourceSpec{Brokers: []string{"localhost:9092"}, Topic: "words", Start: "earliest", Parallelism: 1, Group: "coordflow-wc"},
		Operator: OperatorSpec{Name: "count", Parallelism: 1, MaxParallelism: 128},
		Checkpoint: CheckpointSpec{
			Interval: DefaultCheckpointInterval, Timeout: DefaultCheckpointTimeout, MinPause: 0,
			Retained: DefaultRetained, TolerableFailures: DefaultTolerableFailures,
			InlineThreshold: DefaultInlineThreshold,
		},
		State:   StateSpec{Backend: DefaultStateBackend},
		Restart: RestartSpec{Initial: DefaultRestartInitial, Max: DefaultRestartMax, ResetAfter: DefaultRestartResetAfter},
	}
	if !reflect.DeepEqual(spec, want) {
		t.Fatalf("got  %+v\nwant %+v", spec, want)
	}
}

func TestTolerableFailuresDefault(t *testing.T) {
	withCheckpoint := func(cp string) string {
		return strings.Replace(minimalSpec, `"operator"`, `"checkpoint": `+cp+`, "operator"`, 1)
	}
	tests := []struct {
		name string
		doc  string
		want int
	}{
		{"section absent", minimalSpec, DefaultTolerableFailures},
		{"section null", withCheckpoint(`null`), DefaultTolerableFailures},
		{"field absent", withCheckpoint(`{"interval": "2s"}`), DefaultTolerableFailures},
		{"explicit zero", withCheckpoint(`{"tolerable_failures": 0}`), 0},
		{"explicit five", withCheckpoint(`{"tolerable_failures": 5}`), 5},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			spec, err := ParseJobSpec([]byte(tc.doc), nil)
			if err != nil {
				t.Fatal(err)
			}
			if got := spec.Checkpoint.TolerableFailures; got != tc.want {
				t.Fatalf("tolerable_failures = %d, want %d", got, tc.want)
			}
		})
	}
}

func TestApplyDefaultsInGo(t *testing.T) {
	var absent JobSpec
	absent.ApplyDefaults()
	if absent.Checkpoint.TolerableFailures != DefaultTolerableFailures {
		t.Fatalf("absent checkpoint section: tolerable_failures = %d", absent.Checkpoint.TolerableFailures)
	}
	set := JobSpec{Checkpoint: CheckpointSpec{Interval: Duration(time.Minute)}}
	set.ApplyDefaults()
	if set.Checkpoint.TolerableFailures != 0 || set.Checkpoint.Interval != Duration(time.Minute) || set.Checkpoint.Retained != DefaultRetained {
		t.Fatalf("set checkpoint section: %+v", set.Checkpoint)
	}
}

func TestParseJobSpecErrors(t *testing.T) {
	// edit replaces old by new in the design example.
	edit := func(old, new string) string {
		if !strings.Contains(designSpec, old) {
			t.Fatalf("design spec has no %q", old)
		}
		return strings.Replace(designSpec, old, new, 1)
	}
	tests := []struct {
		name  string
		doc   string
		want  string // exact error text
		field string // FieldError.Field, or "" when the error is not a FieldError
	}{
		{"unknown field", edit(`"parallelism": 2}`, `"paralelism": 2}`), `parse job spec: unknown field "paralelism"`, ""},
		{"unknown top-level field", edit(`"name"`, `"nmae": "x", "name"`), `parse job spec: unknown field "nmae"`, ""},
		{"source parallelism 0", edit(`"parallelism": 2}`, `"parallelism": 0}`), "source.parallelism: must be at least 1", "source.parallelism"},
		{"missing topic", edit(`"topic": "words", `, ``), "source.topic: required", "source.topic"},
		{"unknown operator", edit(`"name": "wordcount", "parallelism"`, `"name": "nope", "parallelism"`), `operator.name: unknown operator "nope"`, "operator.name"},
		{"missing name", edit(`"name": "wordcount",`, ``), "name: required", "name"},
		{"bad name", edit(`"name": "wordcount",`, `"name": "word count",`), "name: must be 1-64 characters of A-Z a-z 0-9 . _ -", "name"},
		{"no brokers", edit(`"brokers": ["127.0.0.1:9092"], "topic": "words"`, `"brokers": [], "topic": "words"`), "source.brokers: required", "source.brokers"},
		{"broker without port", edit(`["127.0.0.1:9092"], "topic": "words"`, `["127.0.0.1:9092", "kafka"], "topic": "words"`), `source.brokers[1]: "kafka" is not host:port`, "source.brokers[1]"},
		{"broker bad port", edit(`["127.0.0.1:9092"], "topic": "words"`, `["127.0.0.1:0"], "topic": "words"`), `source.brokers[0]: "127.0.0.1:0" is not host:port`, "source.brokers[0]"},
		{"bad topic", edit(`"topic": "words"`, `"topic": "a b"`), `source.topic: "a b" is not a Kafka topic name (1-249 characters of A-Z a-z 0-9 . _ -)`, "source.topic"},
		{"bad start", edit(`"start": "earliest"`, `"start": "beginning"`), `source.start: must be "earliest" or "latest", not "beginning"`, "source.start"},
		{"operator parallelism 0", edit(`"parallelism": 2, "max`, `"parallelism": 0, "max`), "operator.parallelism: must be at least 1", "operator.parallelism"},
		{"operator parallelism above max", edit(`"parallelism": 2, "max_parallelism": 128`, `"parallelism": 9, "max_parallelism": 8`), "operator.parallelism: must not exceed operator.max_parallelism (8), not 9", "operator.parallelism"},
		{"max parallelism too big", edit(`"max_parallelism": 128`, `"max_parallelism": 40000`), "operator.max_parallelism: must be between 1 and 32768, not 40000", "operator.max_parallelism"},
		{"sink without topic", edit(`"topic": "counts"`, `"topic": ""`), "sink.topic: required", "sink.topic"},
		{"sink without brokers", edit(`"sink": {"brokers": ["127.0.0.1:9092"]`, `"sink": {"brokers": []`), "sink.brokers: required", "sink.brokers"},
		{"unknown delivery", edit(`"topic": "counts"`, `"topic": "counts", "delivery": "twice"`), `sink.delivery: must be "exactly_once" or "at_least_once", not "twice"`, "sink.delivery"},
		{"transaction timeout too short", edit(`"topic": "counts"`, `"topic": "counts", "transaction_timeout": "60s"`), "sink.transaction_timeout: must exceed checkpoint.interval + 2 x checkpoint.timeout (1m1s), not 1m0s: a transaction must outlive its checkpoint and the commit after it", "sink.transaction_timeout"},
		{"transaction timeout too long", edit(`"topic": "counts"`, `"topic": "counts", "transaction_timeout": "1h"`), "sink.transaction_timeout: must not exceed 15m0s (Kafka's default transaction.max.timeout.ms), not 1h0m0s; with checkpoint.timeout 30s the default would be 1m31s: lower checkpoint.timeout", "sink.transaction_timeout"},
		{"default transaction timeout too long", edit(`"timeout": "30s"`, `"timeout": "10m"`), "sink.transaction_timeout: must exceed checkpoint.interval + 2 x checkpoint.timeout (20m1s), longer than Kafka allows a transaction by default (15m0s): lower checkpoint.timeout, or use at_least_once", "sink.transaction_timeout"},
		{"transaction settings at least once", edit(`"topic": "counts"`, `"topic": "counts", "delivery": "at_least_once", "transaction_timeout": "2m"`), "sink.delivery: an at_least_once sink writes no transactions: remove transaction_timeout and transactional_id_prefix, or use exactly_once", "sink.delivery"},
		{"bad transactional id prefix", edit(`"topic": "counts"`, `"topic": "counts", "transactional_id_prefix": "a b"`), "sink.transactional_id_prefix: must be 1-128 characters of A-Z a-z 0-9 . _ -", "sink.transactional_id_prefix"},
		{"interval too short", edit(`"interval": "1s"`, `"interval": "5ms"`), "checkpoint.interval: must be at least 10ms, not 5ms", "checkpoint.interval"},
		{"negative timeout", edit(`"timeout": "30s"`, `"timeout": "-1s"`), "checkpoint.timeout: must be positive, not -1s", "checkpoint.timeout"},
		{"negative min pause", edit(`"min_pause": "0s"`, `"min_pause": "-1s"`), "checkpoint.min_pause: must not be negative, not -1s", "checkpoint.min_pause"},
		{"negative retained", edit(`"retained": 3`, `"retained": -1`), "checkpoint.retained: must be at least 1, not -1", "checkpoint.retained"},
		{"negative tolerable failures", edit(`"tolerable_failures": 3`, `"tolerable_failures": -1`), "checkpoint.tolerable_failures: must not be negative, not -1", "checkpoint.tolerable_failures"},
		{"restart initial above max", edit(`"tolerable_failures": 3}`, `"tolerable_failures": 3}, "restart": {"initial": "1m", "max": "10s"}`), "restart.initial: must not exceed restart.max (10s), not 1m0s", "restart.initial"},
		{"negative restart max", edit(`"tolerable_failures": 3}`, `"tolerable_failures": 3}, "restart": {"max": "-1s"}`), "restart.max: must be positive, not -1s", "restart.max"},
		{"bad backend", edit(`"tolerable_failures": 3}`, `"tolerable_failures": 3}, "state": {"backend": "rocksdb"}`), `state.backend: must be "memory" or "disk", not "rocksdb"`, "state.backend"},
		{"storage scheme", edit(`"retained": 3`, `"retained": 3, "storage": "hdfs://nn/ck"`), `checkpoint.storage: "hdfs://nn/ck": scheme must be file or s3`, "checkpoint.storage"},
		{"relative file storage", edit(`"retained": 3`, `"retained": 3, "storage": "file://ck"`), `checkpoint.storage: "file://ck": a file URL names an absolute directory, as file:///var/lib/coordflow/checkpoints`, "checkpoint.storage"},
		{"s3 without bucket", edit(`"retained": 3`, `"retained": 3, "storage": "s3://?region=x"`), `checkpoint.storage: "s3://?region=x": an s3 URL names a bucket, as s3://bucket?region=us-east-1`, "checkpoint.storage"},
		{"inline threshold too big", edit(`"retained": 3`, `"retained": 3, "inline_threshold": 100000000`), "checkpoint.inline_threshold: must be between 0 and 1048576 bytes, not 100000000", "checkpoint.inline_threshold"},
		{"bad duration", edit(`"timeout": "30s"`, `"timeout": "30 seconds"`), `checkpoint.timeout: must be a duration string such as "500ms", not "30 seconds"`, "checkpoint.timeout"},
		{"duration as number", edit(`"interval": "1s"`, `"interval": 1000`), `checkpoint.interval: must be a duration string such as "500ms", not 1000`, "checkpoint.interval"},
		{"number as string", edit(`"parallelism": 2}`, `"parallelism": "2"}`), "source.parallelism: must be a number, not a JSON string", "source.parallelism"},
		{"brokers as string", edit(`"brokers": ["127.0.0.1:9092"], "topic": "words"`, `"brokers": "127.0.0.1:9092", "topic": "words"`), "source.brokers: must be an array, not a JSON string", "source.brokers"},
		{"not an object", `[1, 2]`, "parse job spec: cannot unmarshal array into Go value of type fsm.JobSpec", ""},
		{"empty", ``, "parse job spec: empty document", ""},
		{"truncated", designSpec[:40], "parse job spec: unexpected EOF", ""},
		{"syntax error", `{"name": wordcount}`, "parse job spec: invalid JSON at byte 10: invalid character 'w' looking for beginning of value", ""},
		{"two documents", designSpec + designSpec, "parse job spec: data after the JSON object", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseJobSpec([]byte(tc.doc), knownOps)
			if err == nil {
				t.Fatal("no error")
			}
			if err.Error() != tc.want {
				t.Fatalf("error %q\nwant  %q", err, tc.want)
			}
			var fe *FieldError
			if isField := errors.As(err, &fe); isField != (tc.field != "") || (isField && fe.Field != tc.field) {
				t.Fatalf("FieldError = %+v, want field %q", fe, tc.field)
			}
		})
	}
}

func TestValidateWithoutOperatorRegistry(t *testing.T) {
	spec := testSpec()
	spec.Operator.Name = "my-custom-op"
	if err := spec.Validate(nil); err != nil {
		t.Fatalf("Validate(nil) must accept any operator name: %v", err)
	}
	if err := spec.Validate(knownOps); err == nil {
		t.Fatal("Validate(knownOps) accepted an unknown operator")
	}
}

func TestFieldErrorText(t *testing.T) {
	err := &FieldError{Field: "source.topic", Message: "required"}
	if err.Error() != "source.topic: required" {
		t.Fatal(err.Error())
	}
}
