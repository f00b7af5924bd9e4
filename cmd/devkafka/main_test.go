package main

import (
	"bytes"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// TestComposeFlags: the devkafka service of docs/deploy/compose.yaml uses
// only flags devkafka has (cmd/coordd's TestDeploymentFiles checks the
// coordinators' and workers').
func TestComposeFlags(t *testing.T) {
	var usage bytes.Buffer
	run([]string{"-h"}, &bytes.Buffer{}, &usage)
	var flags []string
	for _, line := range strings.Split(usage.String(), "\n") {
		if rest, ok := strings.CutPrefix(line, "  -"); ok {
			flags = append(flags, strings.Fields(rest)[0])
		}
	}
	data, err := os.ReadFile("../../docs/deploy/compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var compose struct {
		Services map[string]struct {
			Command []string `yaml:"command"`
		} `yaml:"services"`
	}
	if err := yaml.Unmarshal(data, &compose); err != nil {
		t.Fatal(err)
	}
	svc, ok := compose.Services["devkafka"]
	if !ok || len(svc.Command) == 0 || len(flags) < 4 {
		t.Fatalf("no devkafka service with a command (%v), or no flags in devkafka -h (%v)", svc.Command, flags)
	}
	for _, a := range svc.Command {
		if name, ok := strings.CutPrefix(a, "-"); ok {
			name, _, _ = strings.Cut(name, "=")
			if !slices.Contains(flags, name) {
				t.Errorf("compose service devkafka: devkafka has no flag -%s", name)
			}
		}
	}
}

// TestVersion: `devkafka version` prints the binary, its build and the Go
// version.
func TestVersion(t *testing.T) {
	var out bytes.Buffer
	if code := run([]string{"version"}, &out, &bytes.Buffer{}); code != 0 || !strings.HasPrefix(out.String(), "devkafka ") || !strings.Contains(out.String(), runtime.Version()) {
		t.Fatalf("devkafka version = %d %q", code, out.String())
	}
}
