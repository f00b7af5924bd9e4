package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// documentedOptions returns the options docs/operations.md lists for one
// daemon (section "#### coordd agent" or "#### workerd" of Config files),
// which TestAgentOptionsDocumented and workerd's TestOptionsDocumented hold
// equal to the daemons' flags.
func documentedOptions(t *testing.T, section string) []string {
	t.Helper()
	docs, err := os.ReadFile("../../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(docs)
	i := strings.Index(s, section+"\n")
	if i < 0 {
		t.Fatalf("docs/operations.md has no %q", section)
	}
	s = s[i+len(section):]
	if j := strings.Index(s, "\n#"); j >= 0 {
		s = s[:j]
	}
	var names []string
	for _, m := range regexp.MustCompile("(?m)^\\| `([a-z0-9-]+)` \\|").FindAllStringSubmatch(s, -1) {
		names = append(names, m[1])
	}
	return names
}

// commandFlags returns the flag names an argument list uses (-name or
// -name=value), skipping the values of flags given as separate arguments.
func commandFlags(args []string) []string {
	var names []string
	for _, a := range args {
		if name, ok := strings.CutPrefix(a, "-"); ok && name != "" && (name[0] < '0' || name[0] > '9') {
			name, _, _ = strings.Cut(strings.TrimPrefix(name, "-"), "=")
			names = append(names, name)
		}
	}
	return names
}

// TestDeploymentFiles parses docs/deploy's compose file and Kubernetes
// manifests and checks what they promise: every coordd and workerd command
// uses only flags the daemon has, the coordinators' ids are distinct and as
// many as -bootstrap-expect waits for, coordd is probed on /v1/status, and
// the Dockerfile builds static binaries into an image that runs as non-root.
func TestDeploymentFiles(t *testing.T) {
	agentFlags, workerFlags := documentedOptions(t, "#### coordd agent"), documentedOptions(t, "#### workerd")
	if len(agentFlags) < 30 || len(workerFlags) < 20 {
		t.Fatalf("documented options: %d of coordd agent, %d of workerd", len(agentFlags), len(workerFlags))
	}
	checkCommand := func(where string, binary string, args []string) {
		t.Helper()
		known := workerFlags
		if binary == "coordd" {
			if len(args) == 0 || args[0] != "agent" {
				t.Fatalf("%s: coordd runs %v, want agent", where, args)
			}
			known = agentFlags
		}
		for _, f := range commandFlags(args) {
			if !slices.Contains(known, f) {
				t.Errorf("%s: %s has no flag -%s", where, binary, f)
			}
		}
	}

	// docker compose
	var compose struct {
		Services map[string]struct {
			Image      string   `yaml:"image"`
			Entrypoint []string `yaml:"entrypoint"`
			Command    []string `yaml:"command"`
		} `yaml:"services"`
	}
	data, err := os.ReadFile("../../docs/deploy/compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(data, &compose); err != nil {
		t.Fatalf("compose.yaml: %v", err)
	}
	var ids []string
	expect := ""
	for name, svc := range compose.Services {
		if svc.Image != "coordflow" || len(svc.Entrypoint) != 1 {
			t.Errorf("compose service %s: image %q entrypoint %v", name, svc.Image, svc.Entrypoint)
			continue
		}
		switch bin := svc.Entrypoint[0]; bin {
		case "coordd", "workerd":
			checkCommand("compose service "+name, bin, svc.Command)
			if bin == "coordd" {
				ids = append(ids, argValue(svc.Command, "id"))
				expect = argValue(svc.Command, "bootstrap-expect")
			}
		case "devkafka":
		default:
			t.Errorf("compose service %s runs %s", name, bin)
		}
	}
	slices.Sort(ids)
	if len(slices.Compact(slices.Clone(ids))) != 3 || expect != "3" {
		t.Errorf("compose coordinators %v with -bootstrap-expect %s, want 3 distinct", ids, expect)
	}

	// Kubernetes
	files, err := filepath.Glob("../../docs/deploy/k8s/*.yaml")
	if err != nil || len(files) < 2 {
		t.Fatalf("k8s manifests: %v %v", files, err)
	}
	kinds := map[string]int{}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(data))
		for {
			var obj k8sObject
			if err := dec.Decode(&obj); err != nil {
				if err.Error() == "EOF" {
					break
				}
				t.Fatalf("%s: %v", file, err)
			}
			kinds[obj.Kind]++
			for _, c := range obj.Spec.Template.Spec.Containers {
				where := filepath.Base(file) + " " + obj.Kind + " " + obj.Metadata.Name
				if len(c.Command) != 1 {
					t.Errorf("%s: command %v", where, c.Command)
					continue
				}
				checkCommand(where, c.Command[0], c.Args)
				if c.Command[0] == "coordd" {
					if got := argValue(c.Args, "bootstrap-expect"); got != "3" || obj.Spec.Replicas != 3 {
						t.Errorf("%s: %d replicas, -bootstrap-expect %s", where, obj.Spec.Replicas, got)
					}
					if c.ReadinessProbe.HTTPGet.Path != "/v1/status" || c.LivenessProbe.HTTPGet.Path != "/v1/status" {
						t.Errorf("%s: probes %+v %+v, want GET /v1/status", where, c.ReadinessProbe, c.LivenessProbe)
					}
				}
			}
			if sc := obj.Spec.Template.Spec.SecurityContext; obj.Kind != "Service" && (!sc.RunAsNonRoot || sc.RunAsUser == 0) {
				t.Errorf("%s %s runs as root", obj.Kind, obj.Metadata.Name)
			}
		}
	}
	if kinds["StatefulSet"] != 1 || kinds["Deployment"] != 1 || kinds["Service"] < 1 {
		t.Errorf("k8s objects %v, want a StatefulSet, a Deployment and Services", kinds)
	}

	// Dockerfile
	data, err = os.ReadFile("../../docs/deploy/Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	df := string(data)
	for _, want := range []string{" AS build", "\nFROM scratch", "CGO_ENABLED=0 go build -trimpath -ldflags=\"-s -w\" -o /out/coordd ./cmd/coordd",
		"-o /out/workerd ./cmd/workerd", "-o /out/devkafka ./cmd/devkafka", "\nUSER 65532:65532"} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	if strings.Count(df, "go build") != strings.Count(df, "CGO_ENABLED=0 go build") {
		t.Error("Dockerfile: every go build must be static (CGO_ENABLED=0)")
	}
}

// k8sObject is the part of a manifest the test reads.
type k8sObject struct {
	Kind     string `yaml:"kind"`
	Metadata struct {
		Name string `yaml:"name"`
	} `yaml:"metadata"`
	Spec struct {
		Replicas int `yaml:"replicas"`
		Template struct {
			Spec struct {
				SecurityContext struct {
					RunAsNonRoot bool `yaml:"runAsNonRoot"`
					RunAsUser    int  `yaml:"runAsUser"`
				} `yaml:"securityContext"`
				Containers []struct {
					Command        []string `yaml:"command"`
					Args           []string `yaml:"args"`
					ReadinessProbe probe    `yaml:"readinessProbe"`
					LivenessProbe  probe    `yaml:"livenessProbe"`
				} `yaml:"containers"`
			} `yaml:"spec"`
		} `yaml:"template"`
	} `yaml:"spec"`
}

type probe struct {
	HTTPGet struct {
		Path string `yaml:"path"`
	} `yaml:"httpGet"`
}

// argValue returns the value of -name in args (-name value or -name=value).
func argValue(args []string, name string) string {
	for i, a := range args {
		if v, ok := strings.CutPrefix(a, "-"+name+"="); ok {
			return v
		}
		if a == "-"+name && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

// TestGrafanaDashboard: docs/grafana-dashboard.json is a dashboard whose
// every query names metrics coordd or workerd export (a metric is a name the
// coordinator or worker source registers; _bucket, _sum and _count are a
// histogram's series).
func TestGrafanaDashboard(t *testing.T) {
	data, err := os.ReadFile("../../docs/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(data, &dash); err != nil || dash.Title == "" || len(dash.Panels) < 8 {
		t.Fatalf("dashboard: %v, %d panels", err, len(dash.Panels))
	}
	exported := map[string]bool{}
	for _, dir := range []string{"../../coordinator", "../../worker"} {
		files, err := filepath.Glob(filepath.Join(dir, "*.go"))
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			src, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range regexp.MustCompile(`"(coordflow_[a-z_]+)"`).FindAllStringSubmatch(string(src), -1) {
				exported[m[1]] = true
			}
		}
	}
	metric := regexp.MustCompile(`coordflow_[a-z_]+`)
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, q := range p.Targets {
			for _, name := range metric.FindAllString(q.Expr, -1) {
				base := name
				for _, suffix := range []string{"_bucket", "_sum", "_count"} {
					if b, ok := strings.CutSuffix(name, suffix); ok && exported[b] {
						base = b
					}
				}
				if !exported[base] {
					t.Errorf("panel %q queries %s, which no coordd or workerd exports", p.Title, name)
				}
			}
		}
	}
}
