// Package config reads a daemon's options from a JSON file, for
// `coordd agent -config FILE` and `workerd -config FILE`.
//
// The file is one JSON object whose keys are the daemon's flag names and whose
// values are what the flag would be given: a string, a number, a boolean, a
// list (joined with commas, for flags such as join), or {"env": "NAME"} to
// take the value from an environment variable, so that secrets such as the
// gossip key stay out of the file. A flag given on the command line overrides
// the file. An unknown option, a value of the wrong type or a value the flag
// refuses is an error that names the option and the file.
package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"maps"
	"os"
	"reflect"
	"slices"
	"strings"
)

// SplitList splits a comma-separated flag value (a list flag such as -join,
// or a list the config file joined with commas), dropping empty items.
func SplitList(s string) []string {
	var out []string
	for _, item := range strings.Split(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

// Flag defines the -config flag on fs and returns its value, for Apply.
func Flag(fs *flag.FlagSet) *string {
	return fs.String("config", "", "options from a JSON `FILE`: {\"flag-name\": value, ...}; flags on the command line override it (docs/operations.md, Config files)")
}

// Apply sets the options of the config file at path (none when path is
// empty) on fs, which has been parsed: every option whose flag was not given
// on the command line.
func Apply(fs *flag.FlagSet, path string) error {
	if path == "" {
		return nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config file: %w", err)
	}
	return apply(fs, path, data, os.LookupEnv)
}

// apply is Apply on the file's contents, with env to look up environment
// variables.
func apply(fs *flag.FlagSet, path string, data []byte, env func(string) (string, bool)) error {
	var opts map[string]json.RawMessage
	if err := json.Unmarshal(data, &opts); err != nil {
		return fmt.Errorf("config file %s: want one JSON object of options: %w", path, err)
	}
	if opts == nil {
		return fmt.Errorf("config file %s: want one JSON object of options, not null", path)
	}
	if dup := duplicateKey(data); dup != "" {
		return fmt.Errorf("config file %s: option %q is given twice", path, dup)
	}
	// A flag and its aliases (workerd's -probe-interval for
	// -gossip-probe-interval, say) set one variable: the command line's
	// value of any of them wins over the file's of any other.
	given := make(map[any]bool)
	fs.Visit(func(f *flag.Flag) { given[target(f)] = true })
	inFile := make(map[any]string)
	for _, name := range slices.Sorted(maps.Keys(opts)) {
		if name == "config" {
			return fmt.Errorf("config file %s: option %q: a config file cannot name another", path, name)
		}
		f := fs.Lookup(name)
		if f == nil {
			return fmt.Errorf("config file %s: unknown option %q (the options are the flags %s -h lists, without the dash)", path, name, fs.Name())
		}
		if other, ok := inFile[target(f)]; ok {
			return fmt.Errorf("config file %s: options %q and %q set the same flag: give one", path, other, name)
		}
		inFile[target(f)] = name
		if given[target(f)] {
			continue // the command line wins
		}
		v, err := value(opts[name], env)
		if err != nil {
			return fmt.Errorf("config file %s: option %q: %w", path, name, err)
		}
		if err := fs.Set(name, v); err != nil {
			return fmt.Errorf("config file %s: option %q: invalid value %q: %w", path, name, v, err)
		}
	}
	return nil
}

// target identifies the variable flag f sets: the pointer its Value is,
// the same for a flag and its aliases (defined with the same variable), or
// the flag's name for a Value that is not a pointer.
func target(f *flag.Flag) any {
	if v := reflect.ValueOf(f.Value); v.Kind() == reflect.Pointer {
		return v.Pointer()
	}
	return f.Name
}

// duplicateKey returns a key the top-level object of data (valid JSON)
// holds twice, or "": encoding/json would keep the last silently, and a
// repeated option is more likely a mistake than a choice.
func duplicateKey(data []byte) string {
	dec := json.NewDecoder(bytes.NewReader(data))
	if _, err := dec.Token(); err != nil { // {
		return ""
	}
	seen := make(map[string]bool)
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return ""
		}
		key, _ := tok.(string)
		if seen[key] {
			return key
		}
		seen[key] = true
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return ""
		}
	}
	return ""
}

// value turns a JSON value into a flag's text.
func value(raw json.RawMessage, env func(string) (string, bool)) (string, error) {
	var v any
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.UseNumber()
	if err := dec.Decode(&v); err != nil {
		return "", err
	}
	switch v := v.(type) {
	case string:
		return v, nil
	case json.Number:
		return v.String(), nil
	case bool:
		if v {
			return "true", nil
		}
		return "false", nil
	case []any:
		parts := make([]string, len(v))
		for i, e := range v {
			switch e := e.(type) {
			case string:
				if strings.Contains(e, ",") {
					return "", fmt.Errorf("list element %q contains a comma", e)
				}
				parts[i] = e
			case json.Number:
				parts[i] = e.String()
			default:
				return "", fmt.Errorf("list element %d is %s, want a string or a number", i, kind(e))
			}
		}
		return strings.Join(parts, ","), nil
	case map[string]any:
		name, ok := v["env"].(string)
		if len(v) != 1 || !ok || name == "" {
			return "", errors.New(`an object must be {"env": "VARIABLE"}`)
		}
		s, ok := env(name)
		if !ok {
			return "", fmt.Errorf("environment variable %s is not set", name)
		}
		return s, nil
	default:
		return "", fmt.Errorf("value is %s, want a string, number, boolean, list or {\"env\": \"VARIABLE\"}", kind(v))
	}
}

// kind names a decoded JSON value's type for errors.
func kind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "a boolean"
	case []any:
		return "a list"
	case map[string]any:
		return "an object"
	default:
		return fmt.Sprintf("%T", v)
	}
}
