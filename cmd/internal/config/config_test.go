package config

import (
	"flag"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// flags is a flag set with one flag of every kind the daemons use.
type flags struct {
	fs       *flag.FlagSet
	id       string
	verbose  bool
	slots    int
	snapshot uint64
	lease    time.Duration
	join     string
	key      string
}

func newFlags() *flags {
	f := &flags{fs: flag.NewFlagSet("daemon", flag.ContinueOnError)}
	f.fs.SetOutput(io.Discard)
	f.fs.StringVar(&f.id, "id", "", "")
	f.fs.BoolVar(&f.verbose, "enable-debug", false, "")
	f.fs.IntVar(&f.slots, "slots", 4, "")
	f.fs.Uint64Var(&f.snapshot, "raft-snapshot-threshold", 1024, "")
	f.fs.DurationVar(&f.lease, "worker-lease", 5*time.Second, "")
	f.fs.StringVar(&f.join, "join", "", "")
	f.fs.StringVar(&f.key, "encrypt", "", "")
	return f
}

func env(vars map[string]string) func(string) (string, bool) {
	return func(name string) (string, bool) {
		v, ok := vars[name]
		return v, ok
	}
}

func TestApplyEveryKindOfValue(t *testing.T) {
	f := newFlags()
	if err := f.fs.Parse([]string{"-slots", "9"}); err != nil {
		t.Fatal(err)
	}
	file := `{
		"id": "c1", "enable-debug": true, "slots": 2, "raft-snapshot-threshold": 18446744073709551615,
		"worker-lease": "7s", "join": ["10.0.0.1:7301", "10.0.0.2:7301"], "encrypt": {"env": "GOSSIP_KEY"}
	}`
	if err := apply(f.fs, "agent.json", []byte(file), env(map[string]string{"GOSSIP_KEY": "c2VjcmV0"})); err != nil {
		t.Fatal(err)
	}
	if f.id != "c1" || !f.verbose || f.snapshot != 1<<64-1 || f.lease != 7*time.Second ||
		f.join != "10.0.0.1:7301,10.0.0.2:7301" || f.key != "c2VjcmV0" {
		t.Fatalf("options not applied: %+v", *f)
	}
	if f.slots != 9 {
		t.Fatalf("slots = %d: the command line's 9 must override the file's 2", f.slots)
	}
}

func TestApplyNamesWhatIsWrong(t *testing.T) {
	for _, tc := range []struct {
		file string
		want string
	}{
		{`[1]`, "want one JSON object of options"},
		{`null`, "not null"},
		{`{"id": "c1",}`, "want one JSON object"},
		{`{"bootstrap": 3}`, `unknown option "bootstrap"`},
		{`{"slots": 2, "id": "c1", "slots": 3}`, `option "slots" is given twice`},
		{`{"config": "other.json"}`, `option "config": a config file cannot name another`},
		{`{"slots": "many"}`, `option "slots": invalid value "many"`},
		{`{"slots": 2.5}`, `option "slots": invalid value "2.5"`},
		{`{"worker-lease": 5}`, `option "worker-lease": invalid value "5"`},
		{`{"id": null}`, `option "id": value is null`},
		{`{"join": [{"a": 1}]}`, `option "join": list element 0 is an object`},
		{`{"join": ["a,b"]}`, `option "join": list element "a,b" contains a comma`},
		{`{"encrypt": {"env": "MISSING"}}`, `option "encrypt": environment variable MISSING is not set`},
		{`{"encrypt": {"file": "k"}}`, `option "encrypt": an object must be {"env": "VARIABLE"}`},
	} {
		f := newFlags()
		_ = f.fs.Parse(nil)
		err := apply(f.fs, "bad.json", []byte(tc.file), env(nil))
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "bad.json") {
			t.Errorf("%s: err = %v, want one naming bad.json and containing %q", tc.file, err, tc.want)
		}
	}
}

// TestApplyTakesAliasesForTheirFlag: a flag given on the command line wins
// over the file's value of its alias, and the other way round; a file that
// gives a flag and its alias is refused.
func TestApplyTakesAliasesForTheirFlag(t *testing.T) {
	newAliased := func() (*flag.FlagSet, *time.Duration) {
		fs := flag.NewFlagSet("workerd", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		d := new(time.Duration)
		fs.DurationVar(d, "gossip-probe-interval", time.Second, "")
		fs.DurationVar(d, "probe-interval", time.Second, "alias of -gossip-probe-interval")
		fs.String("id", "", "")
		return fs, d
	}
	for _, tc := range []struct{ arg, file string }{
		{"-gossip-probe-interval", `{"probe-interval": "5s", "id": "w1"}`},
		{"-probe-interval", `{"gossip-probe-interval": "5s", "id": "w1"}`},
	} {
		fs, d := newAliased()
		if err := fs.Parse([]string{tc.arg, "2s"}); err != nil {
			t.Fatal(err)
		}
		if err := apply(fs, "w.json", []byte(tc.file), env(nil)); err != nil {
			t.Fatal(err)
		}
		if *d != 2*time.Second || fs.Lookup("id").Value.String() != "w1" {
			t.Errorf("%s 2s on the command line, %s in the file: %v and id %q, want the command line's 2s and the file's id",
				tc.arg, tc.file, *d, fs.Lookup("id").Value.String())
		}
	}
	fs, _ := newAliased()
	_ = fs.Parse(nil)
	err := apply(fs, "w.json", []byte(`{"probe-interval": "5s", "gossip-probe-interval": "3s"}`), env(nil))
	if err == nil || !strings.Contains(err.Error(), `options "gossip-probe-interval" and "probe-interval" set the same flag`) {
		t.Errorf("a file giving a flag and its alias: %v, want a refusal naming both", err)
	}
}

func TestApplyReadsTheFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "workerd.json")
	if err := os.WriteFile(path, []byte(`{"id": "w1"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	f := newFlags()
	_ = f.fs.Parse(nil)
	if err := Apply(f.fs, path); err != nil || f.id != "w1" {
		t.Fatalf("Apply = %v, id %q", err, f.id)
	}
	if err := Apply(f.fs, filepath.Join(t.TempDir(), "missing.json")); err == nil || !strings.Contains(err.Error(), "missing.json") {
		t.Fatalf("a missing file: %v", err)
	}
	if err := Apply(f.fs, ""); err != nil {
		t.Fatalf("no file: %v", err)
	}
}

// TestSplitList: a list flag's value, as given or as the file joins it,
// splits on commas with blanks and empty items dropped.
func TestSplitList(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"a", []string{"a"}},
		{"127.0.0.1:7946, 127.0.0.1:7947,,", []string{"127.0.0.1:7946", "127.0.0.1:7947"}},
		{" , ", nil},
	} {
		if got := SplitList(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("SplitList(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
