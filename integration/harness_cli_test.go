package integration

import (
	"bytes"
	"context"
	"errors"
	"os/exec"
	"strings"
	"testing"
)

// cli runs `coordd ARGS...` against the HTTP API at addr (through
// COORD_ADDR) and returns its stdout; a non-zero exit fails the test.
func (c *cluster) cli(t *testing.T, addr string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary(t, "coordd"), args...)
	cmd.Env = c.cliEnv(addr)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("coordd %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// cliResult runs `coordd ARGS...` against the HTTP API at addr and returns
// its exit code, stdout and stderr, for commands expected to fail.
func (c *cluster) cliResult(t *testing.T, addr string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary(t, "coordd"), args...)
	cmd.Env = c.cliEnv(addr)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit):
		code = exit.ExitCode()
	default:
		t.Fatalf("coordd %s: %v", strings.Join(args, " "), err)
	}
	return code, out.String(), errOut.String()
}
