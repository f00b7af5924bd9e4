package integration

import (
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// TestImage builds the image of docs/deploy/Dockerfile without a container
// engine (buildImage: the build stage's commands as written, the final
// stage's files as its COPY lines say) and runs from it what
// docs/deploy/compose.yaml runs: devkafka, three coordinators and two
// workers, each chrooted into the image as its unprivileged user, with
// nothing but the image's files. The image's ENTRYPOINT and CMD print
// coordd's help, and a wordcount job over the cluster ends with the exact
// counts of its input.
func TestImage(t *testing.T) {
	img := buildImage(t)

	bin, argv := img.command(img.entrypoint[0], slices.Concat(img.entrypoint[1:], img.cmd))
	cmd := exec.Command(bin, argv...)
	cmd.Env = append(os.Environ(), img.env()...)
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "Usage: coordd") {
		t.Fatalf("the image's ENTRYPOINT %v and CMD %v: %v\n%s", img.entrypoint, img.cmd, err, out)
	}

	c := startCluster(t, clusterOpts{image: img, coordinators: 3, workers: 2, topics: map[string]int32{"words": 4}})
	wantUID, err := strconv.Atoi(strings.SplitN(img.user, ":", 2)[0])
	if err != nil {
		t.Fatalf("USER %q: %v", img.user, err)
	}
	for _, p := range c.current() {
		if uid, err := processUID(p.cmd.Process.Pid); err != nil || uid != wantUID {
			t.Errorf("%s runs as uid %d (%v), want the image's user %d", p.name, uid, err, wantUID)
		}
	}

	in := newWordInput(31, 20_000, 4)
	produce(t, c.brokers(), "words", in.recs)
	job := c.submitJob(t, wordcountSpec(c.brokers(), "words"))
	c.checkExact(t, job, in.want)
}
