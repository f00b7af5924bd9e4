package storage

import (
	"context"
	"errors"
	"sync"
)

// Pool shares one open Store per URL: an S3 client is costly to build, and
// every task of a job names the same URL. It is safe for concurrent use.
type Pool struct {
	mu     sync.Mutex
	stores map[string]*Store
	closed bool
}

// NewPool returns an empty pool.
func NewPool() *Pool {
	return &Pool{stores: make(map[string]*Store)}
}

// errPoolClosed is returned by Get after Close.
var errPoolClosed = errors.New("checkpoint storage pool closed")

// Get returns the store for url, opening it on first use.
func (p *Pool) Get(ctx context.Context, url string) (*Store, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, errPoolClosed
	}
	if s, ok := p.stores[url]; ok {
		return s, nil
	}
	s, err := Open(ctx, url)
	if err != nil {
		return nil, err
	}
	p.stores[url] = s
	return s, nil
}

// Close closes every store; no user may still hold one.
func (p *Pool) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	var errs []error
	for url, s := range p.stores {
		errs = append(errs, s.Close())
		delete(p.stores, url)
	}
	return errors.Join(errs...)
}
