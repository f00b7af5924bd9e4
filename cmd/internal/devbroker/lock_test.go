package devbroker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"
)

// TestDataDirLock: a broker holds its data dir; a second one on the same dir,
// in this process or another, fails naming the dir and the holder's pid, and
// starts once the holder has closed (or died).
func TestDataDirLock(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir := t.TempDir()
	start := func() (*Broker, error) {
		return Start(ctx, Config{Addr: "127.0.0.1:0", Topics: map[string]int32{"words": 1}, DataDir: dir})
	}
	refused := func(holder int) {
		t.Helper()
		b, err := start()
		if err == nil {
			b.Close()
			t.Fatal("a second broker started on a data dir in use")
		}
		want := fmt.Sprintf("data dir %s is in use by another devkafka (pid %d)", dir, holder)
		if !errors.Is(err, ErrDataDirInUse) || err.Error() != want {
			t.Fatalf("second broker on the data dir: %v, want %q", err, want)
		}
	}

	b, err := start()
	if err != nil {
		t.Fatal(err)
	}
	refused(os.Getpid())
	b.Close()
	b.Close() // twice is fine

	// Another process holds the dir: its pid is named; once it is killed
	// the kernel drops its lock.
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperHoldDataDir$")
	cmd.Env = append(os.Environ(), "DEVBROKER_HOLD_DIR="+dir)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "locked\n" {
		t.Fatalf("helper process: %q, %v", line, err)
	}
	refused(cmd.Process.Pid)
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()

	b, err = start()
	if err != nil {
		t.Fatalf("broker on a data dir whose holder died: %v", err)
	}
	b.Close()
}

// TestHelperHoldDataDir is the other process of TestDataDirLock: it locks
// $DEVBROKER_HOLD_DIR, says so, and waits to be killed.
func TestHelperHoldDataDir(t *testing.T) {
	dir := os.Getenv("DEVBROKER_HOLD_DIR")
	if dir == "" {
		t.Skip("helper process of TestDataDirLock")
	}
	if _, err := lockDataDir(dir); err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	fmt.Println("locked")
	time.Sleep(time.Minute)
	os.Exit(0)
}
