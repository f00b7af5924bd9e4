package integration

import (
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// handedOut holds every port freeAddrs has returned in this test binary. A
// port picked for one process is free until that process binds it, so
// without this a later call, for the next coordinator of the same cluster
// or for a parallel test, could pick it again: two coordinators then share
// an HTTP address and the second one's start fails.
var handedOut struct {
	sync.Mutex
	ports map[int]bool
}

// freeAddrs returns n distinct loopback addresses whose TCP and UDP ports
// (memberlist binds both) were free a moment ago. The ports are drawn below
// the kernel's ephemeral range, so that the outgoing connections of other
// processes cannot take a port while a restarted process re-binds it. No
// port is returned twice in one test binary (handedOut); another program can
// still take one before our child binds it, which launch retries.
func freeAddrs(t *testing.T, n int) []string {
	t.Helper()
	lo, hi := 20000, ephemeralLow()
	if hi-lo < 1000 {
		lo = 1024 // an unusual ip_local_port_range: use what lies below it
	}
	handedOut.Lock()
	defer handedOut.Unlock()
	if handedOut.ports == nil || len(handedOut.ports) > (hi-lo)/2 {
		// A long run has used half the range: start over rather than
		// search ever longer. Processes of tests long finished hold none.
		handedOut.ports = make(map[int]bool)
	}
	addrs := make([]string, 0, n)
	for attempts := 0; len(addrs) < n; attempts++ {
		if attempts == 10000 {
			t.Fatalf("no free TCP+UDP port in [%d, %d) after %d attempts", lo, hi, attempts)
		}
		port := lo + rand.IntN(hi-lo)
		if handedOut.ports[port] {
			continue
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		l, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		defer l.Close()
		u, err := net.ListenPacket("udp", addr)
		if err != nil {
			continue
		}
		defer u.Close()
		handedOut.ports[port] = true
		addrs = append(addrs, addr)
	}
	return addrs
}

// ephemeralLow returns the low end of the kernel's ephemeral port range, or
// the IANA default 32768 when it cannot be read.
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 32768
	}
	lo, err := strconv.Atoi(f[0])
	if err != nil || lo <= 1024 {
		return 32768
	}
	return lo
}
