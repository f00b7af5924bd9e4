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
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Job spec defaults and limits. They are part of the user contract
// (docs/architecture.md): change them only with the docs.
const (
	// DefaultStart is where a source starts on a partition with no checkpointed offset.
	DefaultStart = "earliest"
	// DefaultPartitionDiscovery is how often a source task looks for
	// partitions added to its topic unless the spec says.
	DefaultPartitionDiscovery = Duration(10 * time.Second)
	// MinPartitionDiscovery and MaxPartitionDiscovery bound
	// source.partition_discovery: each look is a metadata request per topic
	// and worker, and a partition waits up to one interval to be read.
	MinPartitionDiscovery = Duration(time.Second)
	MaxPartitionDiscovery = Duration(time.Hour)
	// IsolationReadUncommitted and IsolationReadCommitted are the values of
	// source.isolation_level, named as Kafka's isolation.level names them.
	// Read uncommitted, Kafka's default, is the default.
	IsolationReadUncommitted = "read_uncommitted"
	IsolationReadCommitted   = "read_committed"
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

// Limits of a job spec that ParseJobSpec applies to every submission, on top
// of the rules of Validate. The FSM does not check them (see Validate): a
// limit may be lowered in a later version without making Raft logs that hold
// specs accepted before replay differently. They are part of the user
// contract (docs/operations.md): change them only with the docs.
const (
	// MaxNameLength bounds the job name, and operator.name: the name also
	// starts the job id and the default consumer group.
	MaxNameLength = 64
	// MaxTopicLength is Kafka's own limit on a topic name.
	MaxTopicLength = 249
	// MaxBrokers bounds source.brokers and sink.brokers: they are bootstrap
	// addresses, and a client needs only a few of the cluster's brokers.
	MaxBrokers = 64
	// MaxGroupLength bounds source.group, in bytes (Kafka itself allows
	// 32 KiB; tools and ACLs expect far less).
	MaxGroupLength = 255
	// MaxTransactionalIDPrefixLength bounds sink.transactional_id_prefix,
	// leaving room in Kafka's transactional id for the task and slot after it.
	MaxTransactionalIDPrefixLength = 128
	// MaxTaskParallelism caps source.parallelism and operator.parallelism
	// whatever operator.max_parallelism is: every task is a deployment, a
	// data channel per source and map task pair, and an entry in every
	// checkpoint's Raft record. Both must also not exceed
	// operator.max_parallelism.
	MaxTaskParallelism = 1024
	// MaxCheckpointInterval bounds checkpoint.interval from above: a
	// failure replays up to one interval of input, and the offsets committed
	// to the consumer group lag by as much.
	MaxCheckpointInterval = Duration(time.Hour)
	// MinCheckpointTimeout bounds checkpoint.timeout from below: a barrier
	// must cross every task, and the completion a Raft write, in that time.
	MinCheckpointTimeout = Duration(100 * time.Millisecond)
	// MaxCheckpointTimeout bounds checkpoint.timeout from above (Flink's
	// default is 10 minutes). An exactly-once sink bounds it further: its
	// transaction timeout must exceed interval + 2 x timeout and stay within
	// MaxTransactionTimeout.
	MaxCheckpointTimeout = Duration(time.Hour)
	// MaxMinPause bounds checkpoint.min_pause, like MaxCheckpointInterval.
	MaxMinPause = Duration(time.Hour)
	// MaxRetained bounds checkpoint.retained: every retained checkpoint
	// stays in the Raft state and its snapshots, with its inline state.
	MaxRetained = 100
	// MaxTolerableFailures bounds checkpoint.tolerable_failures.
	MaxTolerableFailures = 1000
	// MinRestartBackoff bounds restart.initial and restart.max from below,
	// so that a failing job cannot redeploy in a tight loop.
	MinRestartBackoff = Duration(10 * time.Millisecond)
	// MaxRestartBackoff bounds restart.initial and restart.max from above.
	MaxRestartBackoff = Duration(time.Hour)
	// MinRestartResetAfter and MaxRestartResetAfter bound restart.reset_after.
	MinRestartResetAfter = Duration(time.Second)
	MaxRestartResetAfter = Duration(24 * time.Hour)
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
// field is an error naming it), then the defaults of ApplyDefaults, then
// Validate together with the limits of new submissions (MaxRetained and the
// others of that block), in document order. Defaults fill only fields absent
// from the document (or null): a field the user gives keeps its value, so an
// explicit zero such as "interval": "0s" or "retained": 0 is an error naming
// the field and its bounds, never the default in disguise. Where zero is
// meaningful it is kept: tolerable_failures 0 restarts on the first abort,
// min_pause "0s" is no pause, inline_threshold 0 writes every state to a
// file (given checkpoint storage). knownOperator may be nil to accept any operator name.
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
	given := givenFields(data)
	spec.applyDefaults(given)
	if err := spec.validate(knownOperator, &submission{given: given}); err != nil {
		return JobSpec{}, err
	}
	return spec, nil
}

// specFields lists the fields a job spec document gives a value other than
// null, as "name", "source" or "source.group", duplicates included.
type specFields []string

// givenFields lists the fields data gives. Data must already have decoded
// into a JobSpec: it is then an object whose sections, if given, are objects.
func givenFields(data []byte) specFields {
	var fields specFields
	forEachMember(data, func(key string, val json.RawMessage) {
		if isNull(val) {
			return
		}
		fields = append(fields, key)
		forEachMember(val, func(inner string, v json.RawMessage) {
			if !isNull(v) {
				fields = append(fields, key+"."+inner)
			}
		})
	})
	return fields
}

// has reports whether the document gives field. Names compare as
// encoding/json matches keys to fields: without regard to case.
func (f specFields) has(field string) bool {
	return slices.ContainsFunc(f, func(g string) bool { return strings.EqualFold(g, field) })
}

// forEachMember calls fn with every member of the JSON object data, in order
// and duplicates included (encoding/json decodes each of them into the
// struct). It does nothing if data is not an object.
func forEachMember(data []byte, fn func(key string, val json.RawMessage)) {
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return
	}
	for dec.More() {
		tok, err := dec.Token()
		key, ok := tok.(string)
		if err != nil || !ok {
			return
		}
		var val json.RawMessage
		if dec.Decode(&val) != nil {
			return
		}
		fn(key, val)
	}
}

func isNull(raw json.RawMessage) bool { return bytes.Equal(bytes.TrimSpace(raw), []byte("null")) }

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
	// Such as an unknown field, named in full: cut a long name short.
	msg := strings.TrimPrefix(err.Error(), "json: ")
	if len(msg) > 4*maxQuoted {
		msg = cutString(msg, 4*maxQuoted) + "..."
	}
	return fmt.Errorf("parse job spec: %s", msg)
}

// jsonKind names the JSON value a Go type is decoded from.
func jsonKind(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Bool:
		return "true or false"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer"
	case reflect.Float32, reflect.Float64:
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
	{"source", "partition_discovery"},
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
			return fieldErr(f.section+"."+f.key, "must be a duration string such as \"500ms\", not %s", clip(string(raw)))
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
	s.applyDefaults(nil)
}

// applyDefaults is ApplyDefaults without the TolerableFailures rule, and
// without touching the fields given lists (nil: none).
func (s *JobSpec) applyDefaults(given specFields) {
	absent := func(field string) bool { return !given.has(field) }
	if absent("source.start") {
		setDefault(&s.Source.Start, DefaultStart)
	}
	if absent("source.group") {
		setDefault(&s.Source.Group, DefaultGroupPrefix+s.Name)
	}
	if absent("operator.max_parallelism") {
		setDefault(&s.Operator.MaxParallelism, DefaultMaxParallelism)
	}
	if absent("state.backend") {
		setDefault(&s.State.Backend, DefaultStateBackend)
	}
	c := &s.Checkpoint
	if absent("checkpoint.inline_threshold") {
		setDefault(&c.InlineThreshold, DefaultInlineThreshold)
	}
	if absent("checkpoint.interval") {
		setDefault(&c.Interval, DefaultCheckpointInterval)
	}
	if absent("checkpoint.timeout") {
		setDefault(&c.Timeout, DefaultCheckpointTimeout)
	}
	if absent("checkpoint.retained") {
		setDefault(&c.Retained, DefaultRetained)
	}
	r := &s.Restart
	if absent("restart.initial") {
		setDefault(&r.Initial, DefaultRestartInitial)
	}
	if absent("restart.max") {
		setDefault(&r.Max, DefaultRestartMax)
	}
	if absent("restart.reset_after") {
		setDefault(&r.ResetAfter, DefaultRestartResetAfter)
	}
	if absent("recovery.scope") {
		setDefault(&s.Recovery.Scope, RecoveryScopeTasks)
	}
	if s.Sink != nil {
		if absent("sink.delivery") {
			setDefault(&s.Sink.Delivery, DeliveryExactlyOnce)
		}
		if s.Sink.Delivery == DeliveryExactlyOnce && absent("sink.transaction_timeout") {
			setDefault(&s.Sink.TransactionTimeout, DefaultTransactionTimeout(*c))
		}
	}
}

// PartitionDiscoveryInterval is how often the source tasks look for
// partitions added to the topic: PartitionDiscovery, or
// DefaultPartitionDiscovery when that is zero (left out). The default is
// resolved here rather than by applyDefaults so that specs stored before the
// field existed, and their JSON, stay as they were.
func (s SourceSpec) PartitionDiscoveryInterval() time.Duration {
	if s.PartitionDiscovery == 0 {
		return time.Duration(DefaultPartitionDiscovery)
	}
	return time.Duration(s.PartitionDiscovery)
}

// ReadCommitted reports whether the source reads only records of committed
// transactions (source.isolation_level read_committed). Left out, in stored
// specs too, it is read uncommitted, Kafka's default.
func (s SourceSpec) ReadCommitted() bool { return s.IsolationLevel == IsolationReadCommitted }

func setDefault[T comparable](field *T, def T) {
	var zero T
	if *field == zero {
		*field = def
	}
}

var (
	namePattern  = regexp.MustCompile(fmt.Sprintf(`^[A-Za-z0-9._-]{1,%d}$`, MaxNameLength))
	topicPattern = regexp.MustCompile(fmt.Sprintf(`^[A-Za-z0-9._-]{1,%d}$`, MaxTopicLength))
	// txnPrefixPattern leaves room in Kafka's 32 KiB transactional id for
	// the task id and slot that follow.
	txnPrefixPattern = regexp.MustCompile(fmt.Sprintf(`^[A-Za-z0-9._-]{1,%d}$`, MaxTransactionalIDPrefixLength))
	// hostPattern is a DNS name of at most 253 characters (with the
	// underscore some internal names carry).
	hostPattern = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}$`)
)

// Validate checks a spec (after defaults) and returns a *FieldError for the
// first field that is wrong, in document order. knownOperator may be nil to
// accept any operator name: the FSM validates that way, because operator
// registries belong to the workers, not to the replicated state.
//
// Validate is what the FSM checks when it applies RegisterJob, so it must
// keep accepting every spec an earlier version accepted: a replica that
// replays its log with a newer version, or runs one in a rolling upgrade,
// must reach the state the others reach. It therefore leaves out the limits
// of new submissions (MaxRetained and the others of that block), which only
// ParseJobSpec applies; a new rule belongs there.
func (s JobSpec) Validate(knownOperator func(string) bool) error {
	return s.validate(knownOperator, nil)
}

// submission is what ParseJobSpec checks beyond Validate: the limits of new
// submissions, and which fields the document gives, so that an empty string
// the user wrote is an error rather than a field left out for a default
// applied later (the transactional id prefix, the checkpoint storage).
type submission struct{ given specFields }

// gives reports whether the submitted document gives field; false for a
// stored spec (sub nil).
func (sub *submission) gives(field string) bool { return sub != nil && sub.given.has(field) }

// validate is Validate, plus the limits of a submission when sub is not nil.
func (s JobSpec) validate(knownOperator func(string) bool, sub *submission) error {
	strict := sub != nil
	if s.Name == "" {
		return fieldErr("name", "required")
	}
	if !namePattern.MatchString(s.Name) {
		return fieldErr("name", "must be 1-%d characters of A-Z a-z 0-9 . _ -", MaxNameLength)
	}
	if err := validateBrokers("source.brokers", s.Source.Brokers, strict); err != nil {
		return err
	}
	if err := validateTopic("source.topic", s.Source.Topic, strict); err != nil {
		return err
	}
	if s.Source.Start != "earliest" && s.Source.Start != "latest" {
		return fieldErr("source.start", "must be \"earliest\" or \"latest\", not %s", brief(s.Source.Start))
	}
	limit, limitName := MaxKeyGroups, strconv.Itoa(MaxKeyGroups)
	if strict {
		limit, limitName = taskLimit(s.Operator.MaxParallelism)
	}
	if err := validateParallelism("source.parallelism", s.Source.Parallelism, limit, limitName); err != nil {
		return err
	}
	if err := validateGroup(s.Source.Group, strict); err != nil {
		return err
	}
	// Zero is the field left out (the default, PartitionDiscoveryInterval),
	// in stored specs too; given as zero it is an error like any other.
	if d := s.Source.PartitionDiscovery; d != 0 || sub.gives("source.partition_discovery") {
		if err := inRange("source.partition_discovery", d, MinPartitionDiscovery, MaxPartitionDiscovery, MinPartitionDiscovery, strict); err != nil {
			return err
		}
	}
	// Left out is the default; given, it must be one of the two. A rule of
	// submissions only (Validate).
	if l := s.Source.IsolationLevel; strict && (l != "" || sub.gives("source.isolation_level")) && l != IsolationReadUncommitted && l != IsolationReadCommitted {
		return fieldErr("source.isolation_level", "must be %q or %q, not %s", IsolationReadUncommitted, IsolationReadCommitted, brief(l))
	}
	op := s.Operator
	if op.Name == "" {
		return fieldErr("operator.name", "required")
	}
	if strict && !namePattern.MatchString(op.Name) {
		return fieldErr("operator.name", "must be 1-%d characters of A-Z a-z 0-9 . _ -", MaxNameLength)
	}
	if knownOperator != nil && !knownOperator(op.Name) {
		return fieldErr("operator.name", "unknown operator %s", brief(op.Name))
	}
	if op.MaxParallelism < 1 || op.MaxParallelism > MaxKeyGroups {
		return fieldErr("operator.max_parallelism", "must be between 1 and %d, not %d", MaxKeyGroups, op.MaxParallelism)
	}
	limit, limitName = op.MaxParallelism, fmt.Sprintf("operator.max_parallelism (%d)", op.MaxParallelism)
	if strict {
		limit, limitName = taskLimit(op.MaxParallelism)
	}
	if err := validateParallelism("operator.parallelism", op.Parallelism, limit, limitName); err != nil {
		return err
	}
	if s.Sink != nil {
		if err := validateBrokers("sink.brokers", s.Sink.Brokers, strict); err != nil {
			return err
		}
		if err := validateTopic("sink.topic", s.Sink.Topic, strict); err != nil {
			return err
		}
	}
	if b := s.State.Backend; b != "memory" && b != "disk" {
		return fieldErr("state.backend", "must be \"memory\" or \"disk\", not %s", brief(b))
	}
	c := s.Checkpoint
	if c.Storage == "" && sub.gives("checkpoint.storage") {
		return fieldErr("checkpoint.storage", "must be a file or s3 URL, not empty (leave it out for coordd's -checkpoint-storage)")
	}
	if err := ValidateStorageURL(c.Storage); err != nil {
		return fieldErr("checkpoint.storage", "%v", err)
	}
	if err := StoragePrefixProblem(c.Storage); strict && err != nil {
		return fieldErr("checkpoint.storage", "%v", err)
	}
	if c.InlineThreshold < 0 || c.InlineThreshold > MaxInlineThreshold {
		return fieldErr("checkpoint.inline_threshold", "must be between 0 and %d bytes, not %d", MaxInlineThreshold, c.InlineThreshold)
	}
	// The third bound of each is the one Validate has always had.
	if err := firstError(
		inRange("checkpoint.interval", c.Interval, MinCheckpointInterval, MaxCheckpointInterval, MinCheckpointInterval, strict),
		inRange("checkpoint.timeout", c.Timeout, MinCheckpointTimeout, MaxCheckpointTimeout, 1, strict),
		inRange("checkpoint.min_pause", c.MinPause, 0, MaxMinPause, 0, strict),
		inRange("checkpoint.retained", c.Retained, 1, MaxRetained, 1, strict),
		inRange("checkpoint.tolerable_failures", c.TolerableFailures, 0, MaxTolerableFailures, 0, strict),
	); err != nil {
		return err
	}
	// Checked after checkpoint: the transaction timeout's bounds depend on it.
	if s.Sink != nil {
		if err := validateDelivery(*s.Sink, c, sub); err != nil {
			return err
		}
	}
	// Empty in specs stored before the field existed: the default.
	if sc := s.Recovery.Scope; (sc != "" || sub.gives("recovery.scope")) && sc != RecoveryScopeTasks && sc != RecoveryScopeJob {
		return fieldErr("recovery.scope", "must be %q or %q, not %s", RecoveryScopeTasks, RecoveryScopeJob, brief(sc))
	}
	r := s.Restart
	if err := firstError(
		inRange("restart.initial", r.Initial, MinRestartBackoff, MaxRestartBackoff, 1, strict),
		inRange("restart.max", r.Max, MinRestartBackoff, MaxRestartBackoff, 1, strict),
	); err != nil {
		return err
	}
	if r.Initial > r.Max {
		return fieldErr("restart.initial", "must not exceed restart.max (%v), not %v", time.Duration(r.Max), time.Duration(r.Initial))
	}
	return inRange("restart.reset_after", r.ResetAfter, MinRestartResetAfter, MaxRestartResetAfter, 1, strict)
}

// inRange checks lo <= v <= hi for a submission (strict). A stored spec
// only has to reach floor, the bound Validate has always had; the error
// names lo and hi all the same, which v is outside of too.
func inRange[T int | int64 | Duration](field string, v, lo, hi, floor T, strict bool) error {
	if v < floor || strict && (v < lo || v > hi) {
		return fieldErr(field, "must be between %s and %s, not %s", show(lo), show(hi), show(v))
	}
	return nil
}

// show formats a bound: a Duration as a Go duration string without zero
// units at the end ("1h", not "1h0m0s").
func show[T int | int64 | Duration](v T) string {
	d, ok := any(v).(Duration)
	if !ok {
		return fmt.Sprint(v)
	}
	s := time.Duration(d).String()
	if t, ok := strings.CutSuffix(s, "m0s"); ok {
		s = t + "m"
	}
	if t, ok := strings.CutSuffix(s, "h0m"); ok {
		s = t + "h"
	}
	return s
}

func firstError(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// taskLimit is the most tasks a submitted source or operator may have, and
// the name of that bound: operator.max_parallelism or MaxTaskParallelism,
// whichever is lower. A max_parallelism out of its own bounds (checked on
// its own) counts as MaxTaskParallelism.
func taskLimit(maxParallelism int) (int, string) {
	if maxParallelism >= 1 && maxParallelism <= MaxTaskParallelism {
		return maxParallelism, fmt.Sprintf("operator.max_parallelism (%d)", maxParallelism)
	}
	return MaxTaskParallelism, strconv.Itoa(MaxTaskParallelism)
}

// validateGroup checks source.group. Kafka allows any string up to 32 KiB;
// a submission is held to MaxGroupLength bytes of text.
func validateGroup(g string, strict bool) error {
	switch {
	case g == "":
		return fieldErr("source.group", "must not be empty (leave it out for %s<name>)", DefaultGroupPrefix)
	case !strict:
		return nil
	case len(g) > MaxGroupLength:
		return fieldErr("source.group", "must be at most %d bytes, not %d", MaxGroupLength, len(g))
	case !utf8.ValidString(g) || strings.ContainsFunc(g, unicode.IsControl):
		return fieldErr("source.group", "must be UTF-8 text without control characters")
	}
	return nil
}

// validateDelivery checks a sink's delivery settings against the
// checkpoint settings they depend on.
func validateDelivery(sink SinkSpec, c CheckpointSpec, sub *submission) error {
	switch sink.Delivery {
	case DeliveryAtLeastOnce:
		if sink.TransactionTimeout != 0 || sink.TransactionalIDPrefix != "" ||
			sub.gives("sink.transaction_timeout") || sub.gives("sink.transactional_id_prefix") {
			return fieldErr("sink.delivery", "an at_least_once sink writes no transactions: remove transaction_timeout and transactional_id_prefix, or use exactly_once")
		}
		return nil
	case DeliveryExactlyOnce:
	default:
		return fieldErr("sink.delivery", "must be %q or %q, not %s", DeliveryExactlyOnce, DeliveryAtLeastOnce, brief(sink.Delivery))
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
	if p := sink.TransactionalIDPrefix; (p != "" || sub.gives("sink.transactional_id_prefix")) && !txnPrefixPattern.MatchString(p) {
		return fieldErr("sink.transactional_id_prefix", "must be 1-%d characters of A-Z a-z 0-9 . _ -", MaxTransactionalIDPrefixLength)
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

// validateBrokers checks a list of bootstrap brokers; a submission may
// list at most MaxBrokers, each a DNS name or IP address and a port.
func validateBrokers(field string, brokers []string, strict bool) error {
	if len(brokers) == 0 {
		return fieldErr(field, "required")
	}
	if strict && len(brokers) > MaxBrokers {
		return fieldErr(field, "must list at most %d brokers, not %d", MaxBrokers, len(brokers))
	}
	for i, b := range brokers {
		host, port, err := net.SplitHostPort(b)
		if err == nil && host == "" {
			err = errors.New("no host")
		}
		if err == nil && strict && net.ParseIP(host) == nil && !hostPattern.MatchString(host) {
			err = errors.New("bad host")
		}
		if err == nil {
			if n, perr := strconv.Atoi(port); perr != nil || n < 1 || n > 65535 {
				err = fmt.Errorf("bad port %q", port)
			}
		}
		if err != nil {
			return fieldErr(fmt.Sprintf("%s[%d]", field, i), "%s is not host:port", brief(b))
		}
	}
	return nil
}

// validateTopic checks a topic name by Kafka's rules; a stored spec is not
// held to the rule against "." and "..", which came later.
func validateTopic(field, topic string, strict bool) error {
	if topic == "" {
		return fieldErr(field, "required")
	}
	if !topicPattern.MatchString(topic) || strict && (topic == "." || topic == "..") {
		return fieldErr(field, "%s is not a Kafka topic name (1-%d characters of A-Z a-z 0-9 . _ -, not . or ..)", brief(topic), MaxTopicLength)
	}
	return nil
}

// maxQuoted bounds how much of a value an error message repeats: the HTTP
// API sends the message back to whoever sent a megabyte of it.
const maxQuoted = 64

// brief quotes s for an error message, cut after maxQuoted bytes.
func brief(s string) string {
	if len(s) <= maxQuoted {
		return strconv.Quote(s)
	}
	return strconv.Quote(cutString(s, maxQuoted)) + "..."
}

// clip is s, or its first maxQuoted bytes and "...".
func clip(s string) string {
	if len(s) <= maxQuoted {
		return s
	}
	return cutString(s, maxQuoted) + "..."
}

// cutString is the longest prefix of s of at most n bytes that does not
// split a UTF-8 sequence.
func cutString(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// StoragePrefixProblem returns an error if storage URL raw has a prefix
// option that does not end in "/". The store puts the prefix before every
// path as it is, so that checkpoints/ would be written under "pcheckpoints/",
// while a savepoint's own URL (storage.SubURL) takes the prefix as a
// directory, "p/": such a savepoint would not restore. Only new jobs are
// held to it (ParseJobSpec, and the API for a savepoint's URL): jobs
// registered with such a URL keep their files where they are.
func StoragePrefixProblem(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return nil // ValidateStorageURL says what is wrong
	}
	if p := u.Query().Get("prefix"); p != "" && !strings.HasSuffix(p, "/") {
		return fmt.Errorf("%q: prefix=%s must end in \"/\" (prefix=%s/): it names a directory", raw, p, p)
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
