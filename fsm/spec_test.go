package fsm

import (
	"encoding/json"
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
		State:    StateSpec{Backend: "memory"},
		Restart:  RestartSpec{Initial: DefaultRestartInitial, Max: DefaultRestartMax, ResetAfter: DefaultRestartResetAfter},
		Recovery: RecoverySpec{Scope: RecoveryScopeTasks},
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
		State:    StateSpec{Backend: DefaultStateBackend},
		Restart:  RestartSpec{Initial: DefaultRestartInitial, Max: DefaultRestartMax, ResetAfter: DefaultRestartResetAfter},
		Recovery: RecoverySpec{Scope: RecoveryScopeTasks},
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
		{"bad topic", edit(`"topic": "words"`, `"topic": "a b"`), `source.topic: "a b" is not a Kafka topic name (1-249 characters of A-Z a-z 0-9 . _ -, not . or ..)`, "source.topic"},
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
		{"storage prefix not a directory", edit(`"retained": 3`, `"retained": 3, "storage": "s3://b?prefix=team-a"`), `checkpoint.storage: "s3://b?prefix=team-a": prefix=team-a must end in "/" (prefix=team-a/): it names a directory`, "checkpoint.storage"},
		{"bad transactional id prefix", edit(`"topic": "counts"`, `"topic": "counts", "transactional_id_prefix": "a b"`), "sink.transactional_id_prefix: must be 1-128 characters of A-Z a-z 0-9 . _ -", "sink.transactional_id_prefix"},
		{"interval too short", edit(`"interval": "1s"`, `"interval": "5ms"`), "checkpoint.interval: must be between 10ms and 1h, not 5ms", "checkpoint.interval"},
		{"negative timeout", edit(`"timeout": "30s"`, `"timeout": "-1s"`), "checkpoint.timeout: must be between 100ms and 1h, not -1s", "checkpoint.timeout"},
		{"negative min pause", edit(`"min_pause": "0s"`, `"min_pause": "-1s"`), "checkpoint.min_pause: must be between 0s and 1h, not -1s", "checkpoint.min_pause"},
		{"negative retained", edit(`"retained": 3`, `"retained": -1`), "checkpoint.retained: must be between 1 and 100, not -1", "checkpoint.retained"},
		{"negative tolerable failures", edit(`"tolerable_failures": 3`, `"tolerable_failures": -1`), "checkpoint.tolerable_failures: must be between 0 and 1000, not -1", "checkpoint.tolerable_failures"},
		{"restart initial above max", edit(`"tolerable_failures": 3}`, `"tolerable_failures": 3}, "restart": {"initial": "1m", "max": "10s"}`), "restart.initial: must not exceed restart.max (10s), not 1m0s", "restart.initial"},
		{"negative restart max", edit(`"tolerable_failures": 3}`, `"tolerable_failures": 3}, "restart": {"max": "-1s"}`), "restart.max: must be between 10ms and 1h, not -1s", "restart.max"},
		{"bad backend", edit(`"tolerable_failures": 3}`, `"tolerable_failures": 3}, "state": {"backend": "rocksdb"}`), `state.backend: must be "memory" or "disk", not "rocksdb"`, "state.backend"},
		{"storage scheme", edit(`"retained": 3`, `"retained": 3, "storage": "hdfs://nn/ck"`), `checkpoint.storage: "hdfs://nn/ck": scheme must be file or s3`, "checkpoint.storage"},
		{"relative file storage", edit(`"retained": 3`, `"retained": 3, "storage": "file://ck"`), `checkpoint.storage: "file://ck": a file URL names an absolute directory, as file:///var/lib/coordflow/checkpoints`, "checkpoint.storage"},
		{"s3 without bucket", edit(`"retained": 3`, `"retained": 3, "storage": "s3://?region=x"`), `checkpoint.storage: "s3://?region=x": an s3 URL names a bucket, as s3://bucket?region=us-east-1`, "checkpoint.storage"},
		{"inline threshold too big", edit(`"retained": 3`, `"retained": 3, "inline_threshold": 100000000`), "checkpoint.inline_threshold: must be between 0 and 1048576 bytes, not 100000000", "checkpoint.inline_threshold"},
		{"bad duration", edit(`"timeout": "30s"`, `"timeout": "30 seconds"`), `checkpoint.timeout: must be a duration string such as "500ms", not "30 seconds"`, "checkpoint.timeout"},
		{"duration as number", edit(`"interval": "1s"`, `"interval": 1000`), `checkpoint.interval: must be a duration string such as "500ms", not 1000`, "checkpoint.interval"},
		{"number as string", edit(`"parallelism": 2}`, `"parallelism": "2"}`), "source.parallelism: must be an integer, not a JSON string", "source.parallelism"},
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

// setField returns doc with path ("name" or "section.key") set to the JSON
// value raw; raw "" removes the field.
func setField(t *testing.T, doc, path, raw string) string {
	t.Helper()
	var top map[string]json.RawMessage
	if err := json.Unmarshal([]byte(doc), &top); err != nil {
		t.Fatal(err)
	}
	set := func(m map[string]json.RawMessage, key string) {
		if raw == "" {
			delete(m, key)
		} else {
			m[key] = json.RawMessage(raw)
		}
	}
	section, key, nested := strings.Cut(path, ".")
	if !nested {
		set(top, section)
	} else {
		inner := map[string]json.RawMessage{}
		if r, ok := top[section]; ok {
			if err := json.Unmarshal(r, &inner); err != nil {
				t.Fatal(err)
			}
		}
		set(inner, key)
		b, err := json.Marshal(inner)
		if err != nil {
			t.Fatal(err)
		}
		top[section] = b
	}
	b, err := json.Marshal(top)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// setFields applies setField to pairs of path and value.
func setFields(t *testing.T, doc string, pathsAndValues ...string) string {
	t.Helper()
	for i := 0; i+1 < len(pathsAndValues); i += 2 {
		doc = setField(t, doc, pathsAndValues[i], pathsAndValues[i+1])
	}
	return doc
}

// jsonString is s as a JSON string.
func jsonString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// jsonList is a JSON array of n copies of s.
func jsonList(n int, s string) string {
	return "[" + strings.TrimSuffix(strings.Repeat(jsonString(s)+",", n), ",") + "]"
}

// TestParseJobSpecBounds checks every limit of a submitted spec just inside
// and just outside, and that a value the user gives is never replaced by a
// default: an explicit zero is an error naming the field and its bounds.
func TestParseJobSpecBounds(t *testing.T) {
	// noSink is the design example without its exactly-once sink, whose
	// transaction timeout would bound the checkpoint durations first.
	noSink := setField(t, designSpec, "sink", "")
	atLeastOnce := setField(t, designSpec, "sink.delivery", `"at_least_once"`)
	long := func(n int) string { return jsonString(strings.Repeat("a", n)) }
	host := func(n int) string { return jsonString(strings.Repeat("h", n) + ":9092") }
	tests := []struct {
		name  string
		doc   string
		want  string // the exact error; "" if the spec is accepted
		field string
	}{
		{"name of 64", setField(t, designSpec, "name", long(64)), "", ""},
		{"name of 65", setField(t, designSpec, "name", long(65)), "name: must be 1-64 characters of A-Z a-z 0-9 . _ -", "name"},
		{"empty name", setField(t, designSpec, "name", `""`), "name: required", "name"},

		{"64 brokers", setField(t, designSpec, "source.brokers", jsonList(64, "k:9092")), "", ""},
		{"65 brokers", setField(t, designSpec, "source.brokers", jsonList(65, "k:9092")), "source.brokers: must list at most 64 brokers, not 65", "source.brokers"},
		{"broker host of 253", setField(t, designSpec, "source.brokers", "["+host(253)+"]"), "", ""},
		{"broker host of 254", setField(t, designSpec, "source.brokers", "["+host(254)+"]"), `source.brokers[0]: "hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh"... is not host:port`, "source.brokers[0]"},
		{"broker dns name", setField(t, designSpec, "source.brokers", `["kafka-1.prod_east.example.com:9092"]`), "", ""},
		{"broker ipv6", setField(t, designSpec, "source.brokers", `["[::1]:9092"]`), "", ""},
		{"broker bad host", setField(t, designSpec, "source.brokers", `["k:9092", "kafka/1:9092"]`), `source.brokers[1]: "kafka/1:9092" is not host:port`, "source.brokers[1]"},
		{"broker port 65535", setField(t, designSpec, "source.brokers", `["k:65535"]`), "", ""},
		{"broker port 65536", setField(t, designSpec, "source.brokers", `["k:65536"]`), `source.brokers[0]: "k:65536" is not host:port`, "source.brokers[0]"},
		{"65 sink brokers", setField(t, designSpec, "sink.brokers", jsonList(65, "k:9092")), "sink.brokers: must list at most 64 brokers, not 65", "sink.brokers"},

		{"topic of 249", setField(t, designSpec, "source.topic", long(249)), "", ""},
		{"topic of 250", setField(t, designSpec, "source.topic", long(250)), `source.topic: "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"... is not a Kafka topic name (1-249 characters of A-Z a-z 0-9 . _ -, not . or ..)`, "source.topic"},
		{"topic dot", setField(t, designSpec, "source.topic", `"."`), `source.topic: "." is not a Kafka topic name (1-249 characters of A-Z a-z 0-9 . _ -, not . or ..)`, "source.topic"},
		{"topic dot dot", setField(t, designSpec, "sink.topic", `".."`), `sink.topic: ".." is not a Kafka topic name (1-249 characters of A-Z a-z 0-9 . _ -, not . or ..)`, "sink.topic"},
		{"topic three dots", setField(t, designSpec, "source.topic", `"..."`), "", ""},
		{"sink topic of 250", setField(t, designSpec, "sink.topic", long(250)), `sink.topic: "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"... is not a Kafka topic name (1-249 characters of A-Z a-z 0-9 . _ -, not . or ..)`, "sink.topic"},
		{"explicit empty start", setField(t, designSpec, "source.start", `""`), `source.start: must be "earliest" or "latest", not ""`, "source.start"},

		{"source parallelism at max_parallelism", setField(t, designSpec, "source.parallelism", "128"), "", ""},
		{"source parallelism above max_parallelism", setField(t, designSpec, "source.parallelism", "129"), "source.parallelism: must not exceed operator.max_parallelism (128), not 129", "source.parallelism"},
		{"source parallelism 1024", setFields(t, designSpec, "source.parallelism", "1024", "operator.max_parallelism", "32768"), "", ""},
		{"source parallelism 1025", setFields(t, designSpec, "source.parallelism", "1025", "operator.max_parallelism", "32768"), "source.parallelism: must not exceed 1024, not 1025", "source.parallelism"},
		{"source parallelism 32768", setFields(t, designSpec, "source.parallelism", "32768", "operator.max_parallelism", "32768"), "source.parallelism: must not exceed 1024, not 32768", "source.parallelism"},
		{"operator parallelism 1024", setFields(t, designSpec, "operator.parallelism", "1024", "operator.max_parallelism", "32768"), "", ""},
		{"operator parallelism 1025", setFields(t, designSpec, "operator.parallelism", "1025", "operator.max_parallelism", "32768"), "operator.parallelism: must not exceed 1024, not 1025", "operator.parallelism"},
		{"operator parallelism 32768", setFields(t, designSpec, "operator.parallelism", "32768", "operator.max_parallelism", "32768"), "operator.parallelism: must not exceed 1024, not 32768", "operator.parallelism"},
		{"max_parallelism 32768", setField(t, designSpec, "operator.max_parallelism", "32768"), "", ""},
		{"max_parallelism 32769", setField(t, designSpec, "operator.max_parallelism", "32769"), "operator.max_parallelism: must be between 1 and 32768, not 32769", "operator.max_parallelism"},
		{"explicit max_parallelism 0", setField(t, designSpec, "operator.max_parallelism", "0"), "operator.max_parallelism: must be between 1 and 32768, not 0", "operator.max_parallelism"},

		{"group of 255", setField(t, designSpec, "source.group", long(255)), "", ""},
		{"group of 256", setField(t, designSpec, "source.group", long(256)), "source.group: must be at most 255 bytes, not 256", "source.group"},
		{"group of 900 KB", setField(t, designSpec, "source.group", long(900<<10)), "source.group: must be at most 255 bytes, not 921600", "source.group"},
		{"group with any text", setField(t, designSpec, "source.group", `"team:wc/prod é"`), "", ""},
		{"group with a newline", setField(t, designSpec, "source.group", `"a\nb"`), "source.group: must be UTF-8 text without control characters", "source.group"},
		{"explicit empty group", setField(t, designSpec, "source.group", `""`), "source.group: must not be empty (leave it out for coordflow-<name>)", "source.group"},

		{"operator name of 64", setField(t, designSpec, "operator.name", long(64)), "", ""},
		{"operator name of 65", setField(t, designSpec, "operator.name", long(65)), "operator.name: must be 1-64 characters of A-Z a-z 0-9 . _ -", "operator.name"},

		{"explicit empty delivery", setField(t, designSpec, "sink.delivery", `""`), `sink.delivery: must be "exactly_once" or "at_least_once", not ""`, "sink.delivery"},
		{"explicit transaction timeout 0s", setField(t, designSpec, "sink.transaction_timeout", `"0s"`), "sink.transaction_timeout: must exceed checkpoint.interval + 2 x checkpoint.timeout (1m1s), not 0s: a transaction must outlive its checkpoint and the commit after it", "sink.transaction_timeout"},
		{"transactional id prefix of 128", setField(t, designSpec, "sink.transactional_id_prefix", long(128)), "", ""},
		{"transactional id prefix of 129", setField(t, designSpec, "sink.transactional_id_prefix", long(129)), "sink.transactional_id_prefix: must be 1-128 characters of A-Z a-z 0-9 . _ -", "sink.transactional_id_prefix"},
		{"explicit empty transactional id prefix", setField(t, designSpec, "sink.transactional_id_prefix", `""`), "sink.transactional_id_prefix: must be 1-128 characters of A-Z a-z 0-9 . _ -", "sink.transactional_id_prefix"},
		{"at least once with empty prefix", setField(t, atLeastOnce, "sink.transactional_id_prefix", `""`), "sink.delivery: an at_least_once sink writes no transactions: remove transaction_timeout and transactional_id_prefix, or use exactly_once", "sink.delivery"},
		{"at least once with 0s timeout", setField(t, atLeastOnce, "sink.transaction_timeout", `"0s"`), "sink.delivery: an at_least_once sink writes no transactions: remove transaction_timeout and transactional_id_prefix, or use exactly_once", "sink.delivery"},
		{"explicit empty backend", setField(t, designSpec, "state.backend", `""`), `state.backend: must be "memory" or "disk", not ""`, "state.backend"},
		{"explicit empty storage", setField(t, designSpec, "checkpoint.storage", `""`), "checkpoint.storage: must be a file or s3 URL, not empty (leave it out for coordd's -checkpoint-storage)", "checkpoint.storage"},
		{"inline threshold 1 MiB", setField(t, designSpec, "checkpoint.inline_threshold", "1048576"), "", ""},
		{"inline threshold 1 MiB + 1", setField(t, designSpec, "checkpoint.inline_threshold", "1048577"), "checkpoint.inline_threshold: must be between 0 and 1048576 bytes, not 1048577", "checkpoint.inline_threshold"},

		{"interval 10ms", setField(t, noSink, "checkpoint.interval", `"10ms"`), "", ""},
		{"interval 9ms", setField(t, noSink, "checkpoint.interval", `"9ms"`), "checkpoint.interval: must be between 10ms and 1h, not 9ms", "checkpoint.interval"},
		{"interval 0s", setField(t, noSink, "checkpoint.interval", `"0s"`), "checkpoint.interval: must be between 10ms and 1h, not 0s", "checkpoint.interval"},
		{"interval 1h", setField(t, noSink, "checkpoint.interval", `"1h"`), "", ""},
		{"interval 1h1ms", setField(t, noSink, "checkpoint.interval", `"1h0m0.001s"`), "checkpoint.interval: must be between 10ms and 1h, not 1h0m0.001s", "checkpoint.interval"},
		{"timeout 100ms", setField(t, noSink, "checkpoint.timeout", `"100ms"`), "", ""},
		{"timeout 99ms", setField(t, noSink, "checkpoint.timeout", `"99ms"`), "checkpoint.timeout: must be between 100ms and 1h, not 99ms", "checkpoint.timeout"},
		{"timeout 1ns", setField(t, noSink, "checkpoint.timeout", `"1ns"`), "checkpoint.timeout: must be between 100ms and 1h, not 1ns", "checkpoint.timeout"},
		{"timeout 0s", setField(t, noSink, "checkpoint.timeout", `"0s"`), "checkpoint.timeout: must be between 100ms and 1h, not 0s", "checkpoint.timeout"},
		{"timeout 1h", setField(t, noSink, "checkpoint.timeout", `"1h"`), "", ""},
		{"timeout 1h1s", setField(t, noSink, "checkpoint.timeout", `"1h1s"`), "checkpoint.timeout: must be between 100ms and 1h, not 1h0m1s", "checkpoint.timeout"},
		{"timeout 1h at least once", setField(t, atLeastOnce, "checkpoint.timeout", `"1h"`), "", ""},
		{"min pause 0s", setField(t, noSink, "checkpoint.min_pause", `"0s"`), "", ""},
		{"min pause 1h", setField(t, noSink, "checkpoint.min_pause", `"1h"`), "", ""},
		{"min pause 1h1s", setField(t, noSink, "checkpoint.min_pause", `"1h1s"`), "checkpoint.min_pause: must be between 0s and 1h, not 1h0m1s", "checkpoint.min_pause"},
		{"min pause -1ns", setField(t, noSink, "checkpoint.min_pause", `"-1ns"`), "checkpoint.min_pause: must be between 0s and 1h, not -1ns", "checkpoint.min_pause"},
		{"retained 0", setField(t, designSpec, "checkpoint.retained", "0"), "checkpoint.retained: must be between 1 and 100, not 0", "checkpoint.retained"},
		{"retained 1", setField(t, designSpec, "checkpoint.retained", "1"), "", ""},
		{"retained 100", setField(t, designSpec, "checkpoint.retained", "100"), "", ""},
		{"retained 101", setField(t, designSpec, "checkpoint.retained", "101"), "checkpoint.retained: must be between 1 and 100, not 101", "checkpoint.retained"},
		{"retained 1e9", setField(t, designSpec, "checkpoint.retained", "1000000000"), "checkpoint.retained: must be between 1 and 100, not 1000000000", "checkpoint.retained"},
		{"retained 1e9 in exponent form", setField(t, designSpec, "checkpoint.retained", "1e9"), "checkpoint.retained: must be an integer, not a JSON number 1e9", "checkpoint.retained"},
		{"tolerable failures 1000", setField(t, designSpec, "checkpoint.tolerable_failures", "1000"), "", ""},
		{"tolerable failures 1001", setField(t, designSpec, "checkpoint.tolerable_failures", "1001"), "checkpoint.tolerable_failures: must be between 0 and 1000, not 1001", "checkpoint.tolerable_failures"},

		{"restart initial 10ms", setField(t, designSpec, "restart", `{"initial": "10ms"}`), "", ""},
		{"restart initial 9ms", setField(t, designSpec, "restart", `{"initial": "9ms"}`), "restart.initial: must be between 10ms and 1h, not 9ms", "restart.initial"},
		{"restart initial 0s", setField(t, designSpec, "restart", `{"initial": "0s"}`), "restart.initial: must be between 10ms and 1h, not 0s", "restart.initial"},
		{"restart max 1h", setField(t, designSpec, "restart", `{"max": "1h"}`), "", ""},
		{"restart max 1h1s", setField(t, designSpec, "restart", `{"max": "1h1s"}`), "restart.max: must be between 10ms and 1h, not 1h0m1s", "restart.max"},
		{"restart max 0s", setField(t, designSpec, "restart", `{"max": "0s"}`), "restart.max: must be between 10ms and 1h, not 0s", "restart.max"},
		{"reset after 1s", setField(t, designSpec, "restart", `{"reset_after": "1s"}`), "", ""},
		{"reset after 999ms", setField(t, designSpec, "restart", `{"reset_after": "999ms"}`), "restart.reset_after: must be between 1s and 24h, not 999ms", "restart.reset_after"},
		{"reset after 24h", setField(t, designSpec, "restart", `{"reset_after": "24h"}`), "", ""},
		{"reset after 25h", setField(t, designSpec, "restart", `{"reset_after": "25h"}`), "restart.reset_after: must be between 1s and 24h, not 25h", "restart.reset_after"},
		{"reset after 0s", setField(t, designSpec, "restart", `{"reset_after": "0s"}`), "restart.reset_after: must be between 1s and 24h, not 0s", "restart.reset_after"},

		// encoding/json matches keys without regard to case, and decodes
		// every duplicate: so does the check for given fields.
		{"interval 0s in another case", setFields(t, noSink, "checkpoint.interval", "", "checkpoint.Interval", `"0s"`), "checkpoint.interval: must be between 10ms and 1h, not 0s", "checkpoint.interval"},
		{"interval 0s then null", strings.Replace(noSink, `"interval":"1s"`, `"interval":"0s","interval":null`, 1), "checkpoint.interval: must be between 10ms and 1h, not 0s", "checkpoint.interval"},
		{"long bad duration", setField(t, noSink, "checkpoint.interval", long(1000)), `checkpoint.interval: must be a duration string such as "500ms", not "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...`, "checkpoint.interval"},
		{"long unknown field", setField(t, designSpec, strings.Repeat("x", 1000), "1"), `parse job spec: unknown field "` + strings.Repeat("x", 4*maxQuoted-len(`unknown field "`)) + "...", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseJobSpec([]byte(tc.doc), nil)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("accepted")
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

// TestParseJobSpecKeepsGivenZeros: where zero is a meaningful value, an
// explicit zero is kept rather than replaced by the default; a field given
// as null counts as absent.
func TestParseJobSpecKeepsGivenZeros(t *testing.T) {
	doc := setFields(t, designSpec,
		"checkpoint.inline_threshold", "0", "checkpoint.tolerable_failures", "0", "checkpoint.min_pause", `"0s"`,
		"checkpoint.interval", "null", "checkpoint.retained", "null")
	spec, err := ParseJobSpec([]byte(doc), nil)
	if err != nil {
		t.Fatal(err)
	}
	c := spec.Checkpoint
	if c.InlineThreshold != 0 || c.TolerableFailures != 0 || c.MinPause != 0 {
		t.Fatalf("given zeros not kept: %+v", c)
	}
	if c.Interval != DefaultCheckpointInterval || c.Retained != DefaultRetained {
		t.Fatalf("null fields not defaulted: %+v", c)
	}
}

// TestParseJobSpecRoundTrip: an accepted spec, written back as JSON, parses
// to itself (the stored form never holds a zero the parser would reject).
func TestParseJobSpecRoundTrip(t *testing.T) {
	for name, doc := range map[string]string{
		"design":        designSpec,
		"minimal":       minimalSpec,
		"at least once": setFields(t, designSpec, "sink.delivery", `"at_least_once"`, "checkpoint.inline_threshold", "0"),
		"no sink":       setFields(t, designSpec, "sink", "", "checkpoint.tolerable_failures", "0"),
	} {
		t.Run(name, func(t *testing.T) {
			spec, err := ParseJobSpec([]byte(doc), nil)
			if err != nil {
				t.Fatal(err)
			}
			b, err := json.Marshal(spec)
			if err != nil {
				t.Fatal(err)
			}
			again, err := ParseJobSpec(b, nil)
			if err != nil {
				t.Fatalf("%s: %v", b, err)
			}
			if !reflect.DeepEqual(again, spec) {
				t.Fatalf("got  %+v\nwant %+v", again, spec)
			}
		})
	}
}

// TestValidateKeepsAcceptingStoredSpecs: the FSM's Validate does not apply
// the limits of new submissions, so that a RegisterJob an earlier version
// accepted replays the same; ParseJobSpec rejects the same spec.
func TestValidateKeepsAcceptingStoredSpecs(t *testing.T) {
	spec := testSpec()
	spec.Source.Parallelism = 2000
	spec.Operator.MaxParallelism, spec.Operator.Parallelism = MaxKeyGroups, MaxKeyGroups
	spec.Sink = nil
	spec.Checkpoint.Retained = 1_000_000_000
	spec.Checkpoint.Timeout = 1
	spec.Checkpoint.TolerableFailures = 1 << 30
	spec.Source.Group = strings.Repeat("g", 900<<10)
	spec.Restart = RestartSpec{Initial: 1, Max: Duration(1000 * time.Hour), ResetAfter: 1}
	spec.Checkpoint.Storage = "s3://b?prefix=team-a" // refused for new jobs only
	if err := spec.Validate(nil); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	b, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	_, err = ParseJobSpec(b, nil)
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Field != "source.parallelism" {
		t.Fatalf("ParseJobSpec: %v, want an error on source.parallelism", err)
	}
}
