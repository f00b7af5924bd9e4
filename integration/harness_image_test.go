package integration

import (
	"cmp"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The container image of docs/deploy/Dockerfile, laid out without a
// container engine: buildImage runs the build stage's RUN commands as the
// file writes them, then copies what the final stage's COPY lines name into
// a directory that stands for the image's file system. Processes of a
// cluster with clusterOpts.image run chrooted there, as the image's USER
// and with its PATH, so they have exactly the files the image would give
// them.

// dockerfile is the image's build file, from the integration directory.
const dockerfile = "../docs/deploy/Dockerfile"

// image is a built image: its root file system and its runtime settings.
type image struct {
	root       string   // the directory that stands for the image's /
	user       string   // USER, "uid:gid"
	path       string   // PATH from ENV
	workdir    string   // WORKDIR
	entrypoint []string // ENTRYPOINT, exec form
	cmd        []string // CMD, exec form
}

// instruction is one Dockerfile instruction: its keyword and the rest.
type instruction struct {
	op, args string
}

// parseDockerfile splits a Dockerfile into instructions, joining continued
// lines and dropping comments.
func parseDockerfile(text string) []instruction {
	var out []instruction
	var cur strings.Builder
	for line := range strings.Lines(text) {
		line = strings.TrimRight(line, "\r\n")
		if t := strings.TrimSpace(line); cur.Len() == 0 && (t == "" || strings.HasPrefix(t, "#")) {
			continue
		}
		if strings.HasSuffix(line, "\\") {
			cur.WriteString(strings.TrimSuffix(line, "\\"))
			cur.WriteString(" ")
			continue
		}
		cur.WriteString(line)
		op, args, _ := strings.Cut(strings.TrimSpace(cur.String()), " ")
		out = append(out, instruction{op: strings.ToUpper(op), args: strings.TrimSpace(args)})
		cur.Reset()
	}
	return out
}

// buildImage builds docs/deploy/Dockerfile's image into a directory. It
// needs root (the files are owned as the COPY lines say, and the processes
// run chrooted); without it the test is skipped.
func buildImage(t *testing.T) *image {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("laying out the image and chrooting into it needs root")
	}
	text, err := os.ReadFile(dockerfile)
	if err != nil {
		t.Fatal(err)
	}
	repo, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	out := filepath.Join(dir, "out") // the build stage's /out
	img := &image{root: filepath.Join(dir, "root")}
	if err := os.MkdirAll(img.root, 0o755); err != nil {
		t.Fatal(err)
	}
	stage := ""
	for _, in := range parseDockerfile(string(text)) {
		switch in.op {
		case "FROM":
			fields := strings.Fields(in.args)
			stage = fields[len(fields)-1]
			if stage != "build" && stage != "scratch" {
				t.Fatalf("%s: stage %q: this harness knows a build stage and a final stage FROM scratch", dockerfile, in.args)
			}
		case "RUN":
			if stage != "build" {
				t.Fatalf("%s: RUN in the final stage: the image has no shell", dockerfile)
			}
			if err := os.MkdirAll(out, 0o755); err != nil {
				t.Fatal(err)
			}
			// The build stage's WORKDIR holds the source (COPY . .): here
			// the repository itself; its /out is out.
			script := strings.ReplaceAll(in.args, "/out", out)
			cmd := exec.Command("sh", "-ec", script)
			cmd.Dir = repo
			start := time.Now()
			if b, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%s: RUN %s: %v\n%s", dockerfile, in.args, err, b)
			}
			t.Logf("RUN %s (%v)", truncate(in.args, 60), time.Since(start).Round(time.Second))
		case "COPY":
			if stage == "scratch" {
				copyIntoImage(t, img.root, out, in.args)
			}
		case "USER":
			img.user = in.args
		case "WORKDIR":
			if stage == "scratch" {
				img.workdir = in.args
			}
		case "ENV":
			if stage == "scratch" {
				if v, ok := strings.CutPrefix(in.args, "PATH="); ok {
					img.path = v
				}
			}
		case "ENTRYPOINT":
			img.entrypoint = execForm(t, in.args)
		case "CMD":
			img.cmd = execForm(t, in.args)
		}
	}
	if img.user == "" || img.path == "" || len(img.entrypoint) == 0 {
		t.Fatalf("%s: want USER, ENV PATH and ENTRYPOINT in the final stage, got %+v", dockerfile, img)
	}
	checkStatic(t, img)
	return img
}

// execForm parses an exec-form ENTRYPOINT or CMD: ["a", "b"].
func execForm(t *testing.T, args string) []string {
	t.Helper()
	inner, ok := strings.CutPrefix(strings.TrimSpace(args), "[")
	inner, ok2 := strings.CutSuffix(inner, "]")
	if !ok || !ok2 {
		t.Fatalf("%s: %q is not in exec form", dockerfile, args)
	}
	var out []string
	for f := range strings.SplitSeq(inner, ",") {
		s, err := strconv.Unquote(strings.TrimSpace(f))
		if err != nil {
			t.Fatalf("%s: %q: %v", dockerfile, args, err)
		}
		out = append(out, s)
	}
	return out
}

// copyIntoImage does one COPY of the final stage: --from=build sources are
// the build stage's files (its /out is out; other paths, such as the CA
// bundle of its Debian base, are the same files on this Debian host).
func copyIntoImage(t *testing.T, root, out, args string) {
	t.Helper()
	fields := strings.Fields(args)
	uid, gid := 0, 0
	from := ""
	for len(fields) > 0 && strings.HasPrefix(fields[0], "--") {
		k, v, _ := strings.Cut(fields[0], "=")
		switch k {
		case "--from":
			from = v
		case "--chown":
			u, g, _ := strings.Cut(v, ":")
			var err1, err2 error
			uid, err1 = strconv.Atoi(u)
			gid, err2 = strconv.Atoi(g)
			if err1 != nil || err2 != nil {
				t.Fatalf("%s: COPY %s: want a numeric --chown", dockerfile, args)
			}
		}
		fields = fields[1:]
	}
	if from != "build" || len(fields) < 2 {
		t.Fatalf("%s: COPY %s: want --from=build and sources and a destination", dockerfile, args)
	}
	srcs, dst := fields[:len(fields)-1], fields[len(fields)-1]
	for _, src := range srcs {
		host := src
		if rest, ok := strings.CutPrefix(src, "/out"); ok {
			host = out + rest
		}
		target := filepath.Join(root, dst)
		if strings.HasSuffix(dst, "/") {
			target = filepath.Join(root, dst, filepath.Base(src))
		}
		copyTree(t, host, target, uid, gid)
	}
}

// copyTree copies a file or a directory to dst, owned by uid:gid.
func copyTree(t *testing.T, src, dst string, uid, gid int) {
	t.Helper()
	err := filepath.Walk(src, func(path string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		to := filepath.Join(dst, rel)
		if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
			return err
		}
		if fi.IsDir() {
			if err := os.MkdirAll(to, fi.Mode().Perm()); err != nil {
				return err
			}
		} else {
			in, err := os.Open(path)
			if err != nil {
				return err
			}
			defer in.Close()
			f, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, fi.Mode().Perm())
			if err != nil {
				return err
			}
			if _, err := io.Copy(f, in); err != nil {
				f.Close()
				return err
			}
			if err := f.Close(); err != nil {
				return err
			}
		}
		return os.Lchown(to, uid, gid)
	})
	if err != nil {
		t.Fatalf("%s: copy %s to the image: %v", dockerfile, src, err)
	}
}

// checkStatic fails unless every program on the image's PATH is a static
// ELF executable: an image FROM scratch has no dynamic loader or libc.
func checkStatic(t *testing.T, img *image) {
	t.Helper()
	var progs []string
	for _, dir := range filepath.SplitList(img.path) {
		entries, err := os.ReadDir(filepath.Join(img.root, dir))
		if err != nil {
			continue
		}
		for _, e := range entries {
			progs = append(progs, filepath.Join(img.root, dir, e.Name()))
		}
	}
	if len(progs) == 0 {
		t.Fatalf("no programs on the image's PATH %s", img.path)
	}
	for _, p := range progs {
		f, err := elf.Open(p)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		libs, _ := f.ImportedLibraries()
		interp := slices.ContainsFunc(f.Progs, func(p *elf.Prog) bool { return p.Type == elf.PT_INTERP })
		f.Close()
		if interp || len(libs) > 0 {
			t.Errorf("%s is dynamically linked (interpreter %v, libraries %v): it cannot run FROM scratch", filepath.Base(p), interp, libs)
		}
	}
}

// dataDir returns a new directory under the image's WORKDIR that its USER
// owns, for a cluster's files.
func (img *image) dataDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp(filepath.Join(img.root, img.workdir), "it-")
	if err != nil {
		t.Fatal(err)
	}
	uid, gid, _ := strings.Cut(img.user, ":")
	u, err1 := strconv.Atoi(uid)
	g, err2 := strconv.Atoi(gid)
	if err1 != nil || err2 != nil {
		t.Fatalf("USER %q: want numeric uid:gid", img.user)
	}
	if err := os.Chown(dir, u, g); err != nil {
		t.Fatal(err)
	}
	return dir
}

// command returns how to run program prog of the image with args: chrooted
// into its root, as its user, finding prog on its PATH; paths into the root
// in args become paths inside it.
func (img *image) command(prog string, args []string) (string, []string) {
	inside := make([]string, 0, len(args))
	for _, a := range args {
		if rest, ok := strings.CutPrefix(a, img.root); ok && (rest == "" || strings.HasPrefix(rest, "/")) {
			a = cmp.Or(rest, "/")
		}
		inside = append(inside, a)
	}
	return "/usr/sbin/chroot", slices.Concat([]string{"--userspec=" + img.user, img.root, prog}, inside)
}

// env is what the image's processes get in their environment on top of
// the harness's: the image's PATH, which chroot searches for the program.
func (img *image) env() []string { return []string{"PATH=" + img.path} }

// processUID returns the real uid a process runs as, from /proc.
func processUID(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				return strconv.Atoi(f[0])
			}
		}
	}
	return 0, fmt.Errorf("no Uid line in /proc/%d/status", pid)
}
