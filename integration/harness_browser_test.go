package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
)

// A headless Chromium driven over the DevTools protocol (chromedp), for the
// dashboard's tests: open a page, read elements' text, click, wait for a
// condition, take screenshots. The page's own failures (uncaught
// exceptions, console.error, Content-Security-Policy violations) are
// collected as they happen and fail the test at its end.

// browserCommands are the names a Chromium is installed under, in the order
// tried; COORDFLOW_IT_BROWSER names another.
var browserCommands = []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"}

const (
	// browserStepTimeout bounds one step in the browser: a navigation, a
	// click, a query, a screenshot.
	browserStepTimeout = 30 * time.Second
	// screenshotWidth and screenshotHeight are the browser window's size;
	// full-page screenshots extend the height to the page's.
	screenshotWidth  = 1400
	screenshotHeight = 900
)

// browser is one headless browser with one tab.
type browser struct {
	t   *testing.T
	ctx context.Context // the tab's chromedp context
	// artifacts is where screenshots and the browser's log go; it outlives
	// the test.
	artifacts string

	mu       sync.Mutex
	problems []string // the page's failures, in order
}

// findBrowser returns the path of an installed Chromium, or "".
func findBrowser() string {
	names := browserCommands
	if b := os.Getenv("COORDFLOW_IT_BROWSER"); b != "" {
		names = []string{b}
	}
	for _, name := range names {
		if path, err := exec.LookPath(name); err == nil {
			return path
		}
	}
	return ""
}

// startBrowser starts a headless Chromium for the test, with extra options
// (such as chromedp.IgnoreCertErrors for a cluster's own CA), and stops it
// when the test ends. Without one installed it skips the test, except on
// CI, where .ci/run installs one and its absence is a failure.
func startBrowser(t *testing.T, extra ...chromedp.ExecAllocatorOption) *browser {
	t.Helper()
	path := findBrowser()
	if path == "" {
		msg := fmt.Sprintf("no browser to drive: none of %s is on PATH (install Debian's chromium, or name one in COORDFLOW_IT_BROWSER)", strings.Join(browserCommands, ", "))
		if os.Getenv("CI") == "true" {
			t.Fatal(msg + "; .ci/run installs it")
		}
		t.Skip(msg)
	}
	b := &browser{t: t, artifacts: artifactDir(t)}
	browserLog, err := os.Create(filepath.Join(b.artifacts, "chromium.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { browserLog.Close() })
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		chromedp.Headless,
		chromedp.NoSandbox, // the tests run as root, where Chromium's sandbox refuses to start
		chromedp.DisableGPU,
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(screenshotWidth, screenshotHeight),
		chromedp.CombinedOutput(browserLog),
	)
	opts = append(opts, extra...)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelTab := chromedp.NewContext(allocCtx)
	b.ctx = ctx
	// Cleanups run last-registered first: the failure screenshot, then
	// the check of the page's failures, then the browser stops.
	t.Cleanup(func() {
		cancelTab()
		cancelAlloc() // waits for the browser to exit
	})
	t.Cleanup(b.checkPage)
	t.Cleanup(func() {
		if t.Failed() {
			b.screenshot("failure")
		}
	})

	// The first action starts the browser, which lives as long as the
	// context of that action: b.ctx itself, not a child with a deadline
	// (as do's); the timer bounds the start instead.
	watchdog := time.AfterFunc(startTimeout, cancelTab)
	err = chromedp.Do(ctx, chromedp.Navigate("about:blank"))
	if !watchdog.Stop() {
		err = fmt.Errorf("not started after %v: %w", startTimeout, err)
	}
	if err != nil {
		t.Fatalf("start %s: %v (its output is in %s)", path, err, browserLog.Name())
	}
	if err := chromedp.Listen(ctx, b.record); err != nil {
		t.Fatal(err)
	}
	if _, err := chromedp.Call(ctx, log.Enable, cdp.Empty{}); err != nil {
		t.Fatalf("enable the browser's log: %v", err)
	}
	version, _ := b.eval("navigator.userAgent")
	t.Logf("browser %s (%s); screenshots go to %s", path, strings.Trim(string(version), `"`), b.artifacts)
	return b
}

// artifactDir returns a directory for the test's screenshots that
// outlives the test: $COORDFLOW_IT_ARTIFACTS/<test> if set, else one beside
// the logs the harness keeps (printLogsIfFailed).
func artifactDir(t *testing.T) string {
	name := strings.ReplaceAll(t.Name(), "/", "_")
	dir := filepath.Join(os.TempDir(), "coordflow-it-logs", name+"-screenshots-"+time.Now().Format("150405"))
	if root := os.Getenv("COORDFLOW_IT_ARTIFACTS"); root != "" {
		dir = filepath.Join(root, name)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		dir = t.TempDir()
		t.Logf("artifacts: %v; using %s, removed after the test", err, dir)
	}
	return dir
}

// record keeps the page's failures. It runs in chromedp's event loop, so it
// only appends under the lock (chromedp.Listen).
func (b *browser) record(ev any) {
	var problem string
	switch ev := ev.(type) {
	case *runtime.EventExceptionThrown:
		d := ev.ExceptionDetails
		problem = fmt.Sprintf("uncaught exception at %s:%d: %s", d.URL, d.LineNumber+1, d.Text)
		if d.Exception != nil && d.Exception.Description != "" {
			problem += ": " + d.Exception.Description
		}
	case *runtime.EventConsoleAPICalled:
		if ev.Type != runtime.ConsoleAPICalledTypeError {
			return
		}
		var args []string
		for _, a := range ev.Args {
			args = append(args, cmpOr(a.Description, string(a.Value)))
		}
		problem = "console.error: " + strings.Join(args, " ")
	case *log.EventEntryAdded:
		// Security entries are Content-Security-Policy violations: code
		// or style the browser refused, which the page silently lacks.
		if ev.Entry.Source != log.EntrySourceSecurity {
			return
		}
		problem = "refused by the browser: " + ev.Entry.Text
	default:
		return
	}
	b.mu.Lock()
	b.problems = append(b.problems, problem)
	b.mu.Unlock()
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// checkPage fails the test if the page had failures.
func (b *browser) checkPage() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, p := range b.problems {
		b.t.Errorf("dashboard page: %s", p)
	}
}

// do runs chromedp actions in the tab, bounded by browserStepTimeout.
func (b *browser) do(actions ...chromedp.Action[chromedp.Void]) error {
	ctx, cancel := context.WithTimeout(b.ctx, browserStepTimeout)
	defer cancel()
	return chromedp.Do(ctx, actions...)
}

// eval evaluates a JavaScript expression in the page and returns its value
// as JSON.
func (b *browser) eval(expr string) (json.RawMessage, error) {
	ctx, cancel := context.WithTimeout(b.ctx, browserStepTimeout)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[[]byte](expr))
	return json.RawMessage(v), err
}

// open navigates the tab to url and fails the test if it cannot.
func (b *browser) open(url string) {
	b.t.Helper()
	if err := b.do(chromedp.Navigate(url)); err != nil {
		b.t.Fatalf("open %s: %v", url, err)
	}
	b.t.Logf("browser: opened %s", url)
}

// click clicks the first element that matches a CSS selector.
func (b *browser) click(sel string) {
	b.t.Helper()
	if err := b.do(chromedp.Click(chromedp.CSS(sel))); err != nil {
		b.t.Fatalf("click %s: %v", sel, err)
	}
}

// setValue sets the value of the first input that matches a CSS selector.
func (b *browser) setValue(sel, value string) {
	b.t.Helper()
	if err := b.do(chromedp.SetValue(chromedp.CSS(sel), value)); err != nil {
		b.t.Fatalf("set %s to %q: %v", sel, value, err)
	}
}

// element is what the page shows of one element.
type element struct {
	Found   bool              `json:"found"`
	Visible bool              `json:"visible"` // rendered: not hidden, nor inside a hidden element
	Text    string            `json:"text"`    // textContent, trimmed
	Data    map[string]string `json:"data"`    // data-* attributes
}

// query returns the first element that matches a CSS selector (Found is
// false when none does).
func (b *browser) query(sel string) (element, error) {
	q, _ := json.Marshal(sel)
	raw, err := b.eval(fmt.Sprintf(`(() => {
		const e = document.querySelector(%s);
		if (!e) return {found: false, visible: false, text: "", data: {}};
		return {found: true, visible: e.getClientRects().length > 0, text: e.textContent.trim(), data: {...e.dataset}};
	})()`, q))
	if err != nil {
		return element{}, fmt.Errorf("query %s: %w", sel, err)
	}
	var e element
	if err := json.Unmarshal(raw, &e); err != nil {
		return element{}, fmt.Errorf("query %s: %w", sel, err)
	}
	return e, nil
}

// queryAll returns every element that matches a CSS selector, in document
// order.
func (b *browser) queryAll(sel string) ([]element, error) {
	q, _ := json.Marshal(sel)
	raw, err := b.eval(fmt.Sprintf(`[...document.querySelectorAll(%s)].map(e =>
		({found: true, visible: e.getClientRects().length > 0, text: e.textContent.trim(), data: {...e.dataset}}))`, q))
	if err != nil {
		return nil, fmt.Errorf("query %s: %w", sel, err)
	}
	var es []element
	if err := json.Unmarshal(raw, &es); err != nil {
		return nil, fmt.Errorf("query %s: %w", sel, err)
	}
	return es, nil
}

// waitElement polls the first element that matches sel until cond accepts
// it, and returns it; cond's error says why not yet. It fails the test
// after timeout, or when a process of c exits unexpectedly (c.waitFor).
func (b *browser) waitElement(c *cluster, timeout time.Duration, what, sel string, cond func(element) error) element {
	b.t.Helper()
	var last element
	c.waitFor(b.t, timeout, what, func() (bool, error) {
		e, err := b.query(sel)
		if err != nil {
			return false, err
		}
		if !e.Found {
			return false, fmt.Errorf("no element matches %s", sel)
		}
		if err := cond(e); err != nil {
			return false, fmt.Errorf("%s shows %q: %w", sel, truncate(e.Text, 200), err)
		}
		last = e
		return true, nil
	})
	return last
}

// screenshot saves a full-page PNG of the tab as <name>.png in the
// artifact directory and, with COORDFLOW_UPDATE_SCREENSHOTS=1, in
// docs/screenshots, for the documentation. A failure is logged, not fatal:
// a screenshot is a record of the test, not a check.
func (b *browser) screenshot(name string) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, browserStepTimeout)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100)) // quality 100: PNG
	if err != nil {
		b.t.Logf("screenshot %s: %v", name, err)
		return
	}
	dirs := []string{b.artifacts}
	if os.Getenv("COORDFLOW_UPDATE_SCREENSHOTS") == "1" {
		dirs = append(dirs, filepath.Join("..", "docs", "screenshots"))
	}
	for _, dir := range dirs {
		path := filepath.Join(dir, name+".png")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			b.t.Logf("screenshot %s: %v", name, err)
			continue
		}
		if err := os.WriteFile(path, png, 0o644); err != nil {
			b.t.Logf("screenshot %s: %v", name, err)
			continue
		}
		b.t.Logf("screenshot: %s", path)
	}
}
