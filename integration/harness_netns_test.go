package integration

// Network namespaces for real network partitions (issue 8).
//
// newTestNet builds, for one test, a small network that only that test's
// processes use:
//
//	hub namespace   a Linux bridge
//	one namespace per node ("devkafka", "c1", ..., "w1", ...), each with a
//	                veth pair to the bridge and one address in 10.213.X.0/24
//	the test's own  a veth from the test's namespace to the bridge, with
//	namespace       10.213.X.1, so that the test reaches every node's HTTP API,
//	                metrics and the broker directly
//
// X is random and checked unused in the test's namespace, and every
// namespace name starts with cfit<pid>-<random>-, so parallel runs do not
// collide. The nodes have no route but their /24 (and the test's namespace
// forwards nothing), so traffic flows only between the namespaces the test
// created and the test itself. A cluster started with clusterOpts.net runs
// each process with `ip netns exec NS`, which execs the daemon (same pid:
// SIGKILL reaches it; checkProcesses checks), bound to its node's address
// on fixed ports.
//
// cut blackholes the routes between two groups of nodes in both directions
// (`ip -n NS route add blackhole IP/32` in each): TCP segments and UDP
// datagrams are dropped, established connections stall, new ones fail.
// heal deletes those routes. Everything is removed in t.Cleanup, after the
// cluster's processes are killed, also when the test fails; namespaces left
// by a test binary that died are removed by the next run.
//
// Where namespaces cannot be made (not root, no ip, no bridge support) the
// test is skipped with the reason, unless COORDFLOW_IT_REQUIRE_NETNS=1.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// procNet places the processes of a cluster in networks of their own
// (clusterOpts.net). node is "devkafka", a coordinator's or a worker's id.
type procNet interface {
	// command is the prefix that runs a program in node's network. It must
	// exec the program, so that the pid the harness signals is the
	// program's.
	command(node string) []string
	// addrs returns n distinct listen addresses for node.
	addrs(node string, n int) []string
}

// addrs returns n listen addresses for node: free loopback ports, or
// addresses in node's own network when the cluster has one (opts.net).
func (c *cluster) addrs(t *testing.T, node string, n int) []string {
	t.Helper()
	if c.opts.net != nil {
		return c.opts.net.addrs(node, n)
	}
	return freeAddrs(t, n)
}

// command returns the executable and the arguments launch starts for the
// process called name ("devkafka", "coordd c1", "workerd w1"): the built
// command, under its node's network prefix when the cluster has a network.
func (c *cluster) command(t *testing.T, name string, args func() []string) (string, func() []string) {
	t.Helper()
	words := strings.Fields(name)
	if img := c.opts.image; img != nil {
		bin, _ := img.command(words[0], nil)
		return bin, func() []string {
			_, argv := img.command(words[0], args())
			return argv
		}
	}
	bin := binary(t, words[0])
	if c.opts.net == nil {
		return bin, args
	}
	prefix := c.opts.net.command(words[len(words)-1])
	return prefix[0], func() []string { return slices.Concat(prefix[1:], []string{bin}, args()) }
}

const (
	netnsTag    = "cfit" // first letters of every namespace and link name a testNet makes
	ipTimeout   = 10 * time.Second
	netFirstOct = "10.213."
	netHostIP   = 1  // the test's own address: 10.213.X.1
	netNodeIP   = 10 // the first node's address: 10.213.X.10, then .11, ...
	netPortBase = 7001
)

// testNet is one test's network of namespaces.
type testNet struct {
	ip     string // the ip command
	prefix string // of every namespace name: cfit<pid>-<hex>-
	subnet string // "10.213.X."
	hub    string // namespace of the bridge
	hostIf string // the test's veth, in the test's own namespace
	nodes  map[string]*netNode
	order  []string // node names, in creation order

	mu  sync.Mutex
	cut map[[2]string]bool // blackhole routes in place: in node [0]'s namespace, to node [1]
}

type netNode struct {
	name string
	ns   string // namespace name
	ip   string
}

// netnsUnavailable says why network namespaces cannot be made here, or ""
// when they can (as far as can be told without making one): for a test
// that runs without partitions rather than skipping.
func netnsUnavailable() string {
	switch {
	case os.Getenv("COORDFLOW_IT_REQUIRE_NETNS") == "1":
		return "" // newTestNet fails the test with the reason
	case runtime.GOOS != "linux":
		return "not Linux (" + runtime.GOOS + ")"
	case os.Geteuid() != 0:
		return fmt.Sprintf("the test runs as uid %d, and ip netns, veth pairs and bridges need root", os.Geteuid())
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return fmt.Sprintf("no ip command (iproute2) in PATH: %v", err)
	}
	return ""
}

// newTestNet creates the hub, one namespace per node and the test's veth,
// or skips the test when namespaces cannot be made here.
func newTestNet(t *testing.T, nodes ...string) *testNet {
	t.Helper()
	skip := func(format string, args ...any) {
		t.Helper()
		msg := "network namespaces cannot be made here: " + fmt.Sprintf(format, args...)
		if os.Getenv("COORDFLOW_IT_REQUIRE_NETNS") == "1" {
			t.Fatal(msg + " (COORDFLOW_IT_REQUIRE_NETNS=1)")
		}
		t.Skip(msg)
	}
	if runtime.GOOS != "linux" {
		skip("not Linux (%s)", runtime.GOOS)
	}
	if os.Geteuid() != 0 {
		skip("the test runs as uid %d, and ip netns, veth pairs and bridges need root", os.Geteuid())
	}
	ipBin, err := exec.LookPath("ip")
	if err != nil {
		skip("no ip command (iproute2) in PATH: %v", err)
	}
	tag := rand.Uint32() & 0xffffff
	n := &testNet{
		ip:     ipBin,
		prefix: fmt.Sprintf("%s%d-%06x-", netnsTag, os.Getpid(), tag),
		hostIf: fmt.Sprintf("%s%06x", netnsTag, tag),
		nodes:  make(map[string]*netNode, len(nodes)),
		cut:    make(map[[2]string]bool),
	}
	n.hub = n.prefix + "hub"
	n.removeStale(t)
	if n.subnet, err = freeSubnet(); err != nil {
		skip("%v", err)
	}

	if out, err := n.run("netns", "add", n.hub); err != nil {
		skip("ip netns add: %v: %s", err, out)
	}
	// Registered at once, so that whatever was made is removed; it runs
	// after the cluster's cleanups (registered later), when no process is
	// left in the namespaces.
	t.Cleanup(func() { n.remove(t) })
	if out, err := n.run("-n", n.hub, "link", "add", "br0", "type", "bridge"); err != nil {
		skip("no Linux bridge: %v: %s", err, out)
	}
	n.must(t, "-n", n.hub, "link", "set", "br0", "up")
	for i, name := range nodes {
		node := &netNode{name: name, ns: n.prefix + name, ip: n.subnet + strconv.Itoa(netNodeIP+i)}
		n.must(t, "netns", "add", node.ns)
		n.nodes[name] = node
		n.order = append(n.order, name)
		port := fmt.Sprintf("p%d", i)
		n.must(t, "-n", node.ns, "link", "set", "lo", "up")
		n.must(t, "-n", n.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", node.ns)
		n.must(t, "-n", n.hub, "link", "set", port, "master", "br0", "up")
		n.must(t, "-n", node.ns, "addr", "add", node.ip+"/24", "dev", "eth0")
		n.must(t, "-n", node.ns, "link", "set", "eth0", "up")
	}
	n.must(t, "link", "add", n.hostIf, "type", "veth", "peer", "name", "host", "netns", n.hub)
	n.must(t, "-n", n.hub, "link", "set", "host", "master", "br0", "up")
	n.must(t, "addr", "add", n.subnet+strconv.Itoa(netHostIP)+"/24", "dev", n.hostIf)
	n.must(t, "link", "set", n.hostIf, "up")
	t.Logf("network %s0/24: hub %s, test at %s%d via %s, nodes %s", n.subnet, n.hub, n.subnet, netHostIP, n.hostIf, n.describe())
	return n
}

func (n *testNet) describe() string {
	var parts []string
	for _, name := range n.order {
		parts = append(parts, name+"="+n.nodes[name].ip)
	}
	return strings.Join(parts, " ")
}

// freeSubnet picks 10.213.X. with a random X that no address of the test's
// namespace is in.
func freeSubnet() (string, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return "", fmt.Errorf("list addresses: %w", err)
	}
	for range 100 {
		subnet := fmt.Sprintf("%s%d.", netFirstOct, 1+rand.IntN(254))
		_, cidr, _ := net.ParseCIDR(subnet + "0/24")
		if !slices.ContainsFunc(addrs, func(a net.Addr) bool {
			ipn, ok := a.(*net.IPNet)
			return ok && cidr.Contains(ipn.IP)
		}) {
			return subnet, nil
		}
	}
	return "", errors.New("no unused 10.213.X.0/24 after 100 tries")
}

// run runs the ip command with args and returns its combined output.
func (n *testNet) run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), ipTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, n.ip, args...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// must runs ip with args and fails the test if it fails.
func (n *testNet) must(t *testing.T, args ...string) {
	t.Helper()
	if out, err := n.run(args...); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func (n *testNet) node(node string) *netNode {
	nd := n.nodes[node]
	if nd == nil {
		// A programming error in the test: every process needs its node.
		panic(fmt.Sprintf("testNet: no node %q (nodes: %s)", node, strings.Join(n.order, ", ")))
	}
	return nd
}

// command implements procNet.
func (n *testNet) command(node string) []string {
	return []string{n.ip, "netns", "exec", n.node(node).ns}
}

// addrs implements procNet: fixed ports on the node's own address, which no
// other process binds.
func (n *testNet) addrs(node string, count int) []string {
	ip := n.node(node).ip
	out := make([]string, count)
	for i := range out {
		out[i] = net.JoinHostPort(ip, strconv.Itoa(netPortBase+100*i))
	}
	return out
}

// remove deletes the test's veth and namespaces, and reports what could
// not be removed.
func (n *testNet) remove(t *testing.T) {
	if out, err := n.run("link", "del", n.hostIf); err != nil && !strings.Contains(out, "Cannot find device") {
		t.Errorf("remove veth %s: %v: %s", n.hostIf, err, out)
	}
	for _, ns := range n.namespaces() {
		if out, err := n.run("netns", "del", ns); err != nil {
			t.Errorf("remove namespace %s: %v: %s", ns, err, out)
		}
	}
	if left := n.namespaces(); len(left) > 0 {
		t.Errorf("namespaces left after cleanup: %v", left)
	}
}

// namespaces lists the namespaces whose names start with n.prefix.
func (n *testNet) namespaces() []string {
	var out []string
	for _, ns := range listNetns() {
		if strings.HasPrefix(ns, n.prefix) {
			out = append(out, ns)
		}
	}
	return out
}

// listNetns returns the names of the named network namespaces (ip netns
// keeps them as files under /run/netns).
func listNetns() []string {
	ents, err := os.ReadDir("/run/netns")
	if err != nil {
		return nil
	}
	names := make([]string, 0, len(ents))
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// removeStale deletes namespaces of earlier test binaries that died before
// their cleanup ran: cfit<pid>-... whose pid no longer exists. (Their veths
// to the test's namespace went with their hub.)
func (n *testNet) removeStale(t *testing.T) {
	for _, ns := range listNetns() {
		rest, ok := strings.CutPrefix(ns, netnsTag)
		if !ok {
			continue
		}
		pidStr, _, ok := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if !ok || err != nil || pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			continue // still running (or not ours to judge)
		}
		if out, err := n.run("netns", "del", ns); err != nil {
			t.Logf("remove stale namespace %s: %v: %s", ns, err, out)
		} else {
			t.Logf("removed stale namespace %s of a test binary (pid %d) that is gone", ns, pid)
		}
	}
}

// cutRoutes blackholes traffic between every node of a and every node of b,
// both ways. Nodes in both groups are not cut from themselves.
func (n *testNet) cutRoutes(t *testing.T, a, b []string) {
	t.Helper()
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, x := range a {
		for _, y := range b {
			if x == y {
				continue
			}
			for _, pair := range [][2]string{{x, y}, {y, x}} {
				if n.cut[pair] {
					continue
				}
				from, to := n.node(pair[0]), n.node(pair[1])
				n.must(t, "-n", from.ns, "route", "add", "blackhole", to.ip+"/32")
				n.cut[pair] = true
			}
		}
	}
	t.Logf("network cut between %v and %v", a, b)
}

// healRoutes removes every blackhole route cutRoutes added.
func (n *testNet) healRoutes(t *testing.T) {
	t.Helper()
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, pair := range slices.SortedFunc(maps.Keys(n.cut), func(p, q [2]string) int {
		return cmp.Or(strings.Compare(p[0], q[0]), strings.Compare(p[1], q[1]))
	}) {
		from, to := n.node(pair[0]), n.node(pair[1])
		n.must(t, "-n", from.ns, "route", "del", "blackhole", to.ip+"/32")
		delete(n.cut, pair)
	}
	t.Logf("network healed")
}

// dial opens a TCP connection from node's namespace to addr and closes it,
// with bash's /dev/tcp under `ip netns exec` and timeout: nil means the path
// is open. (A blackhole route fails the connect at once.)
func (n *testNet) dial(node, addr string, timeout time.Duration) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout+ipTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, n.ip, "netns", "exec", n.node(node).ns,
		"timeout", fmt.Sprint(timeout.Seconds()), "bash", "-c", `exec 3<>"/dev/tcp/$0/$1"`, host, port).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%w: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// checkPaths checks from inside the namespaces that node connects to every
// address open lists for it and to none closed lists. Without bash and
// timeout in PATH it only says so.
func (n *testNet) checkPaths(t *testing.T, open, closed map[string][]string) {
	t.Helper()
	for _, tool := range []string{"bash", "timeout"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Logf("paths across the cut not checked: %v", err)
			return
		}
	}
	for _, from := range slices.Sorted(maps.Keys(open)) {
		for _, addr := range open[from] {
			if err := n.dial(from, addr, 5*time.Second); err != nil {
				t.Fatalf("%s cannot connect to %s, which it should reach: %v", from, addr, err)
			}
		}
	}
	for _, from := range slices.Sorted(maps.Keys(closed)) {
		addrs := closed[from]
		for _, addr := range addrs {
			if err := n.dial(from, addr, time.Second); err == nil {
				t.Fatalf("%s connected to %s across the cut", from, addr)
			}
		}
	}
}

// checkProcesses checks that every process of the cluster is the daemon
// itself (ip netns exec exec'd it: the pid the harness signals is the
// daemon's) and runs in its node's namespace.
func (n *testNet) checkProcesses(t *testing.T, c *cluster) {
	t.Helper()
	for _, p := range c.current() {
		words := strings.Fields(p.name)
		pid := p.cmd.Process.Pid
		exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if err != nil {
			t.Fatalf("%s (pid %d): %v", p.name, pid, err)
		}
		if want := filepath.Join(binaries.dir, words[0]); exe != want {
			t.Fatalf("%s: pid %d runs %s, want %s: the netns prefix did not exec the daemon", p.name, pid, exe, want)
		}
		got, err1 := os.Stat(fmt.Sprintf("/proc/%d/ns/net", pid))
		want, err2 := os.Stat(filepath.Join("/run/netns", n.node(words[len(words)-1]).ns))
		if err := errors.Join(err1, err2); err != nil {
			t.Fatalf("%s: %v", p.name, err)
		}
		if !os.SameFile(got, want) {
			t.Fatalf("%s (pid %d) is not in the network namespace of its node", p.name, pid)
		}
	}
}
