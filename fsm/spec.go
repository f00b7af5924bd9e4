package fsm

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Job spec defaults and limits. They are part of the user contract
// (docs/architecture.md): change them only with the docs.
const (
	// DefaultStart is where a source starts on a partition with no checkpointed offset.
	DefaultStart = "earliest"
	// DefaultGroupPrefix prefixes the job name to form the default consumer group.
	DefaultGroupPrefix = "coordflow-"
	// DefaultMaxParallelism is the default number of key groups.
	DefaultMaxParallelism = 128
	// MaxKeyGroups bounds operator.max_parallelism (as in Flink) and source.parallelism.
	MaxKeyGroups = 32768
	// DefaultStateBackend is where map tasks keep state unless the spec says.
	DefaultStateBackend = "memory"
	// DefaultInlineThreshold is the state size below which a map task's
	// state stays inline in Raft rather than in a file (Flink's
	// state.storage.fs.memory-threshold is 20 KiB).
	DefaultInlineThreshold = 16 << 10
	// MaxInlineThreshold bounds checkpoint.inline_threshold: inline state
	// goes through Raft, which must stay small.
	MaxInlineThreshold = 1 << 20
	// DefaultCheckpointInterval is the default time between checkpoint triggers.
	DefaultCheckpointInterval = Duration(time.Second)
	// MinCheckpointInterval is the shortest checkpoint interval a spec may ask for.
	MinCheckpointInterval = Duration(10 * time.Millisecond)
	// DefaultCheckpointTimeout is how long a checkpoint may stay pending by default.
	DefaultCheckpointTimeout = Duration(30 * time.Second)
	// DefaultTransactionTimeoutCheckpoints: an exactly-once sink's
	// transaction timeout defaults to the checkpoint interval plus this many
	// checkpoint timeouts (see MinTransactionTimeout for why).
	DefaultTransactionTimeoutCheckpoints = 3
	// MaxTransactionTimeout is Kafka's default transaction.max.timeout.ms: a
	// broker refuses producers that ask for more.
	MaxTransactionTimeout = Duration(15 * time.Minute)
	// DefaultRetained is how many completed checkpoints a job keeps by default.
	DefaultRetained = 3
	// DefaultTolerableFailures is how many consecutive aborts a job tolerates by
	// default before its attempt is restarted.
	DefaultTolerableFailures = 3
	// DefaultRestartInitial is the first restart backoff.
	DefaultRestartInitial = Duration(100 * time.Millisecond)
	// DefaultRestartMax caps the restart backoff.
	DefaultRestartMax = Duration(30 * time.Second)
	// DefaultRestartResetAfter is how long an attempt must run before the
	// backoff starts over from Initial.
	DefaultRestartResetAfter = Duration(10 * time.Minute)
)

// DefaultTransactionTimeout is the transaction timeout of an exactly-once
// sink whose spec names none: the checkpoint interval plus three checkpoint
// timeouts (91 s with the defaults), at most MaxTransactionTimeout.
func DefaultTransactionTimeout(c CheckpointSpec) Duration {
	return min(c.Interval+DefaultTransactionTimeoutCheckpoints*c.Timeout, MaxTransactionTimeout)
}

// MinTransactionTimeout is the shortest transaction timeout an exactly-once
// sink may have with checkpoint settings c. A map task pre-commits a
// transaction at a barrier only if it has two checkpoint timeouts left
// before the broker would abort it: one for the checkpoint to complete, one
// for the commit to reach the broker (through a leader failover or a
// restore). A transaction is about one interval old at its barrier.
func MinTransactionTimeout(c CheckpointSpec) Duration {
	return c.Interval + 2*c.Timeout
}

// FieldError says which field of a job spec is wrong and why; the HTTP API
// shows its text to the user as is.
type FieldError struct {
	Field   string // JSON path, such as "source.topic" or "source.brokers[1]"
	Message string
}

// Error returns "<field>: <message>".
func (e *FieldError) Error() string { return e.Field + ": " + e.Message }

func fieldErr(field, format string, args ...any) *FieldError {
	return &FieldError{Field: field, Message: fmt.Sprintf(format, args...)}
}

// ParseJobSpec reads a job spec as users submit it: strict JSON (an unknown
// field is an error naming it), then ApplyDefaults, then Validate. A
// tolerable_failures absent from the document defaults to
// DefaultTolerableFailures, while an explicit 0 is kept (it means: restart on
// the first abort). knownOperator may be nil to accept any operator name.
func ParseJobSpec(data []byte, knownOperator func(name string) bool) (JobSpec, error) {
	// Fields present in the document overwrite this preset; absent ones keep it.
	spec := JobSpec{Checkpoint: CheckpointSpec{TolerableFailures: DefaultTolerableFailures}}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&spec); err != nil {
		if ferr := durationFieldError(data); ferr != nil {
			return JobSpec{}, ferr
		}
		return JobSpec{}, specDecodeError(err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return JobSpec{}, errors.New("parse job spec: data after the JSON object")
	}
	spec.applyDefaults()
	if err := spec.Validate(knownOperator); err != nil {
		return JobSpec{}, err
	}
	return spec, nil
}

// specDecodeError turns a JSON decoding error into one that names the field
// or the position, without the "json: " prefix of encoding/json.
func specDecodeError(err error) error {
	var typeErr *json.UnmarshalTypeError
	var syntaxErr *json.SyntaxError
	switch {
	case errors.Is(err, io.EOF):
		return errors.New("parse job spec: empty document")
	case errors.As(err, &typeErr) && typeErr.Field != "":
		return fieldErr(typeErr.Field, "must be %s, not a JSON %s", jsonKind(typeErr.Type), typeErr.Value)
	case errors.As(err, &syntaxErr):
		return fmt.Errorf("parse job spec: invalid JSON at byte %d: %v", syntaxErr.Offset, err)
	}
	return fmt.Errorf("parse job spec: %s", strings.TrimPrefix(err.Error(), "json: "))
}

// jsonKind names the JSON value a Go type is decoded from.
func jsonKind(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Bool:
		return "true or false"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64,
		reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.String:
		return "a string"
	case reflect.Slice, reflect.Array:
		return "an array"
	}
	return "an object"
}

// durationFields lists the spec's Duration fields in document order.
var durationFields = []struct{ section, key string }{
	{"checkpoint", "interval"}, {"checkpoint", "timeout"}, {"checkpoint", "min_pause"},
	{"restart", "initial"}, {"restart", "max"}, {"restart", "reset_after"},
}

// durationFieldError finds the duration field that made decoding fail:
// encoding/json does not say which field a Duration.UnmarshalJSON error came
// from. It returns nil if no duration field is at fault.
func durationFieldError(data []byte) error {
	var doc map[string]json.RawMessage
	if json.Unmarshal(data, &doc) != nil {
		return nil
	}
	for _, f := range durationFields {
		var section map[string]json.RawMessage
		if json.Unmarshal(doc[f.section], &section) != nil {
			continue
		}
		raw, ok := section[f.key]
		if !ok {
			continue
		}
		var d Duration
		if err := d.UnmarshalJSON(raw); err != nil {
			return fieldErr(f.section+"."+f.key, "must be a duration string such as \"500ms\", not %s", raw)
		}
	}
	return nil
}

// ApplyDefaults fills every field left at its zero value with its default
// (zero is never a meaningful value for those). TolerableFailures is the
// exception: 0 is meaningful, so it is defaulted only when the whole
// checkpoint section is zero, i.e. absent. ParseJobSpec does better and
// defaults it whenever the field itself is absent from the document.
func (s *JobSpec) ApplyDefaults() {
	if s.Checkpoint == (CheckpointSpec{}) {
		s.Checkpoint.TolerableFailures = DefaultTolerableFailures
	}
	s.applyDefaults()
}

// applyDefaults is ApplyDefaults without the TolerableFailures rule.
func (s *JobSpec) applyDefaults() {
	setDefault(&s.Source.Start, DefaultStart)
	setDefault(&s.Source.Group, DefaultGroupPrefix+s.Name)
	setDefault(&s.Operator.MaxParallelism, DefaultMaxParallelism)
	setDefault(&s.State.Backend, DefaultStateBackend)
	c := &s.Checkpoint
	setDefault(&c.InlineThreshold, DefaultInlineThreshold)
	setDefault(&c.Interval, DefaultCheckpointInterval)
	setDefault(&c.Timeout, DefaultCheckpointTimeout)
	setDefault(&c.Retained, DefaultRetained)
	r := &s.Restart
	setDefault(&r.Initial, DefaultRestartInitial)
	setDefault(&r.Max, DefaultRestartMax)
	setDefault(&r.ResetAfter, DefaultRestartResetAfter)
	if s.Sink != nil {
		setDefault(&s.Sink.Delivery, DeliveryExactlyOnce)
		if s.Sink.Delivery == DeliveryExactlyOnce {
			setDefault(&s.Sink.TransactionTimeout, DefaultTransactionTimeout(*c))
		}
	}
}

func setDefault[T comparable](field *T, def T) {
	var zero T
	if *field == zero {
		*field = def
	}
}

var (
	namePattern  = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)
	topicPattern = regexp.MustCompile(`^[A-Za-z0-9._-]{1,249}$`)
	// txnPrefixPattern leaves room in Kafka's 32 KiB transactional id for
	// the task id and slot that follow.
	txnPrefixPattern = regexp.MustCompile(`^[A-Za-z0-9._-]{1,128}$`)
)

// Validate checks a spec (after defaults) and returns a *FieldError for the
// first field that is wrong, in document order. knownOperator may be nil to
// accept any operator name: the FSM validates that way, because operator
// registries belong to the workers, not to the replicated state.
func (s JobSpec) Validate(knownOperator func(string) bool) error {
	if s.Name == "" {
		return fieldErr("name", "required")
	}
	if !namePattern.MatchString(s.Name) {
		return fieldErr("name", "must be 1-64 characters of A-Z a-z 0-9 . _ -")
	}
	if err := validateBrokers("source.brokers", s.Source.Brokers); err != nil {
		return err
	}
	if err := validateTopic("source.topic", s.Source.Topic); err != nil {
		return err
	}
	if s.Source.Start != "earliest" && s.Source.Start != "latest" {
		return fieldErr("source.start", "must be \"earliest\" or \"latest\", not %q", s.Source.Start)
	}
	if err := validateParallelism("source.parallelism", s.Source.Parallelism, MaxKeyGroups, strconv.Itoa(MaxKeyGroups)); err != nil {
		return err
	}
	if s.Source.Group == "" {
		return fieldErr("source.group", "required")
	}
	op := s.Operator
	if op.Name == "" {
		return fieldErr("operator.name", "required")
	}
	if knownOperator != nil && !knownOperator(op.Name) {
		return fieldErr("operator.name", "unknown operator %q", op.Name)
	}
	if op.MaxParallelism < 1 || op.MaxParallelism > MaxKeyGroups {
		return fieldErr("operator.max_parallelism", "must be between 1 and %d, not %d", MaxKeyGroups, op.MaxParallelism)
	}
	if err := validateParallelism("operator.parallelism", op.Parallelism, op.MaxParallelism,
		fmt.Sprintf("operator.max_parallelism (%d)", op.MaxParallelism)); err != nil {
		return err
	}
	if s.Sink != nil {
		if err := validateBrokers("sink.brokers", s.Sink.Brokers); err != nil {
			return err
		}
		if err := validateTopic("sink.topic", s.Sink.Topic); err != nil {
			return err
		}
	}
	if b := s.State.Backend; b != "memory" && b != "disk" {
		return fieldErr("state.backend", "must be \"memory\" or \"disk\", not %q", b)
	}
	c := s.Checkpoint
	if err := ValidateStorageURL(c.Storage); err != nil {
		return fieldErr("checkpoint.storage", "%v", err)
	}
	switch {
	case c.InlineThreshold < 0 || c.InlineThreshold > MaxInlineThreshold:
		return fieldErr("checkpoint.inline_threshold", "must be between 0 and %d bytes, not %d", MaxInlineThreshold, c.InlineThreshold)
	case c.Interval < MinCheckpointInterval:
		return fieldErr("checkpoint.interval", "must be at least %v, not %v", time.Duration(MinCheckpointInterval), time.Duration(c.Interval))
	case c.Timeout <= 0:
		return fieldErr("checkpoint.timeout", "must be positive, not %v", time.Duration(c.Timeout))
	case c.MinPause < 0:
		return fieldErr("checkpoint.min_pause", "must not be negative, not %v", time.Duration(c.MinPause))
	case c.Retained < 1:
		return fieldErr("checkpoint.retained", "must be at least 1, not %d", c.Retained)
	case c.TolerableFailures < 0:
		return fieldErr("checkpoint.tolerable_failures", "must not be negative, not %d", c.TolerableFailures)
	}
	// Checked after checkpoint: the transaction timeout's bounds depend on it.
	if s.Sink != nil {
		if err := validateDelivery(*s.Sink, c); err != nil {
			return err
		}
	}
	r := s.Restart
	switch {
	case r.Initial <= 0:
		return fieldErr("restart.initial", "must be positive, not %v", time.Duration(r.Initial))
	case r.Max <= 0:
		return fieldErr("restart.max", "must be positive, not %v", time.Duration(r.Max))
	case r.Initial > r.Max:
		return fieldErr("restart.initial", "must not exceed restart.max (%v), not %v", time.Duration(r.Max), time.Duration(r.Initial))
	case r.ResetAfter <= 0:
		return fieldErr("restart.reset_after", "must be positive, not %v", time.Duration(r.ResetAfter))
	}
	return nil
}

// validateDelivery checks a sink's delivery settings against the
// checkpoint settings they depend on.
func validateDelivery(sink SinkSpec, c CheckpointSpec) error {
	switch sink.Delivery {
	case DeliveryAtLeastOnce:
		if sink.TransactionTimeout != 0 || sink.TransactionalIDPrefix != "" {
			return fieldErr("sink.delivery", "an at_least_once sink writes no transactions: remove transaction_timeout and transactional_id_prefix, or use exactly_once")
		}
		return nil
	case DeliveryExactlyOnce:
	default:
		return fieldErr("sink.delivery", "must be %q or %q, not %q", DeliveryExactlyOnce, DeliveryAtLeastOnce, sink.Delivery)
	}
	t := sink.TransactionTimeout
	switch {
	case MinTransactionTimeout(c) >= MaxTransactionTimeout:
		return fieldErr("sink.transaction_timeout", "must exceed checkpoint.interval + 2 x checkpoint.timeout (%v), longer than Kafka allows a transaction by default (%v): lower checkpoint.timeout, or use at_least_once",
			time.Duration(MinTransactionTimeout(c)), time.Duration(MaxTransactionTimeout))
	case t > MaxTransactionTimeout:
		return fieldErr("sink.transaction_timeout", "must not exceed %v (Kafka's default transaction.max.timeout.ms), not %v; with checkpoint.timeout %v the default would be %v: lower checkpoint.timeout",
			time.Duration(MaxTransactionTimeout), time.Duration(t), time.Duration(c.Timeout), time.Duration(c.Interval+DefaultTransactionTimeoutCheckpoints*c.Timeout))
	case t <= MinTransactionTimeout(c):
		return fieldErr("sink.transaction_timeout", "must exceed checkpoint.interval + 2 x checkpoint.timeout (%v), not %v: a transaction must outlive its checkpoint and the commit after it",
			time.Duration(MinTransactionTimeout(c)), time.Duration(t))
	case t%Duration(time.Millisecond) != 0:
		return fieldErr("sink.transaction_timeout", "must be whole milliseconds, not %v", time.Duration(t))
	}
	if p := sink.TransactionalIDPrefix; p != "" && !txnPrefixPattern.MatchString(p) {
		return fieldErr("sink.transactional_id_prefix", "must be 1-128 characters of A-Z a-z 0-9 . _ -")
	}
	return nil
}

func validateParallelism(field string, p, limit int, limitName string) error {
	if p < 1 {
		return fieldErr(field, "must be at least 1")
	}
	if p > limit {
		return fieldErr(field, "must not exceed %s, not %d", limitName, p)
	}
	return nil
}

func validateBrokers(field string, brokers []string) error {
	if len(brokers) == 0 {
		return fieldErr(field, "required")
	}
	for i, b := range brokers {
		host, port, err := net.SplitHostPort(b)
		if err == nil && host == "" {
			err = errors.New("no host")
		}
		if err == nil {
			if n, perr := strconv.Atoi(port); perr != nil || n < 1 || n > 65535 {
				err = fmt.Errorf("bad port %q", port)
			}
		}
		if err != nil {
			return fieldErr(fmt.Sprintf("%s[%d]", field, i), "%q is not host:port", b)
		}
	}
	return nil
}

func validateTopic(field, topic string) error {
	if topic == "" {
		return fieldErr(field, "required")
	}
	if !topicPattern.MatchString(topic) {
		return fieldErr(field, "%q is not a Kafka topic name (1-249 characters of A-Z a-z 0-9 . _ -)", topic)
	}
	return nil
}

// ValidateStorageURL checks the form of a checkpoint storage URL: empty (no
// storage), file:///absolute/dir, or s3://bucket with query options. It does
// not contact the storage.
func ValidateStorageURL(raw string) error {
	if raw == "" {
		return nil
	}
	if len(raw) > 2048 {
		return fmt.Errorf("URL is %d characters long; at most 2048", len(raw))
	}
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("%q is not a URL: %v", raw, err)
	}
	switch u.Scheme {
	case "file":
		if u.Host != "" || !strings.HasPrefix(u.Path, "/") {
			return fmt.Errorf("%q: a file URL names an absolute directory, as file:///var/lib/coordflow/checkpoints", raw)
		}
	case "s3":
		if u.Host == "" {
			return fmt.Errorf("%q: an s3 URL names a bucket, as s3://bucket?region=us-east-1", raw)
		}
	default:
		return fmt.Errorf("%q: scheme must be file or s3", raw)
	}
	return nil
}
