package coordinator

import (
	"encoding/binary"
	"fmt"
	"io"
)

// The on-disk layout of a bbolt page, which checkBoltPages reads (bbolt's
// internal/common/page.go): a 16-byte header, then count elements of 16
// bytes, each locating its key (and a leaf's value) by an offset from the
// element itself. bbolt writes the fields in the machine's byte order.
const (
	boltPageHeader   = 16 // id u64, flags u16, count u16, overflow u32
	boltElementSize  = 16 // branch: pos u32, ksize u32, pgid u64; leaf: flags, pos, ksize, vsize u32
	boltBranchPage   = 0x01
	boltLeafPage     = 0x02
	boltBucketLeaf   = 0x01 // a leaf element whose value is a bucket
	boltBucketHeader = 16   // root pgid u64, sequence u64; an inline bucket's page follows
	boltFreelistPage = 0x10
	// A meta page's fields, from the page's start: its free list's page
	// (none: boltNoFreelist) and its transaction id.
	boltMetaFreelist = boltPageHeader + 32
	boltMetaTxid     = boltPageHeader + 48
	boltNoFreelist   = 1<<64 - 1
)

// checkBoltPages reads the pages of a bbolt file that bbolt's checks read,
// from r with ReadAt, and checks what bbolt would otherwise trust. The free
// list of transaction txid's meta page, if the file keeps one, lies within
// its page. Every page of the tree, from the root bucket's root page (root)
// down through every nested bucket, says it is the page it is read as and
// lies below the high-water mark (hwm, in pages of pageSize bytes), is a
// branch with elements or a leaf, and every element's key and value lie
// within the page; a branch's children are pages of the file, each reached
// once. bbolt reads pages through its memory map with none of these checks,
// and some of its walks (Tx.Check's; the one that rebuilds a free list not
// kept in the file, NoFreelistSync) run in goroutines of their own, where a
// garbled offset faults or panics beyond any recover and crashes coordd. A
// file that passes gives them nothing out of bounds to read; what is left
// (keys out of order, pages unreachable or freed twice) they report as
// errors.
func checkBoltPages(r io.ReaderAt, pageSize int, hwm, root, txid uint64) error {
	w := &boltWalk{r: r, pageSize: uint64(pageSize), hwm: hwm, seen: make(map[uint64]bool)}
	if err := w.freelist(txid); err != nil {
		return err
	}
	return w.tree(root)
}

// boltWalk is one checkBoltPages pass.
type boltWalk struct {
	r        io.ReaderAt
	pageSize uint64
	hwm      uint64
	seen     map[uint64]bool
}

// tree checks the pages of the tree rooted at page id.
func (w *boltWalk) tree(id uint64) error {
	if id < 2 || id >= w.hwm {
		return fmt.Errorf("page %d: a tree page outside the file's pages 2 to %d", id, w.hwm-1)
	}
	if w.seen[id] {
		return fmt.Errorf("page %d: reached twice", id)
	}
	w.seen[id] = true
	page, err := w.read(id)
	if err != nil {
		return err
	}
	ne := binary.NativeEndian
	if got := ne.Uint64(page); got != id {
		return fmt.Errorf("page %d: its header says page %d", id, got)
	}
	flags, count := ne.Uint16(page[8:]), uint64(ne.Uint16(page[10:]))
	switch flags {
	case boltBranchPage:
		if count == 0 {
			// bbolt never writes one, and its cursor would follow
			// element 0 all the same.
			return fmt.Errorf("branch page %d: no elements", id)
		}
		if err := checkElements(page, count, false); err != nil {
			return fmt.Errorf("branch page %d: %w", id, err)
		}
		for i := range count {
			if err := w.tree(ne.Uint64(page[boltPageHeader+i*boltElementSize+8:])); err != nil {
				return err
			}
		}
	case boltLeafPage:
		if err := checkElements(page, count, true); err != nil {
			return fmt.Errorf("leaf page %d: %w", id, err)
		}
		for i := range count {
			if err := w.bucket(page, i); err != nil {
				return fmt.Errorf("leaf page %d: %w", id, err)
			}
		}
	default:
		return fmt.Errorf("page %d: flags %#x, not a branch or a leaf", id, flags)
	}
	return nil
}

// bucket checks the bucket that leaf element i of page holds, if it holds
// one: the tree of its root page, or its inline page within the value.
func (w *boltWalk) bucket(page []byte, i uint64) error {
	ne := binary.NativeEndian
	e := page[boltPageHeader+i*boltElementSize:]
	if ne.Uint32(e)&boltBucketLeaf == 0 {
		return nil
	}
	start := boltPageHeader + i*boltElementSize + uint64(ne.Uint32(e[4:])) + uint64(ne.Uint32(e[8:]))
	value := page[start : start+uint64(ne.Uint32(e[12:]))] // in bounds: checkElements
	if len(value) < boltBucketHeader {
		return fmt.Errorf("element %d: a bucket value of %d bytes, under its header's %d", i, len(value), boltBucketHeader)
	}
	if root := ne.Uint64(value); root != 0 {
		return w.tree(root)
	}
	inline := value[boltBucketHeader:]
	if len(inline) < boltPageHeader {
		return fmt.Errorf("element %d: an inline bucket of %d bytes, under a page header", i, len(inline))
	}
	if flags := ne.Uint16(inline[8:]); flags != boltLeafPage {
		return fmt.Errorf("element %d: an inline bucket page with flags %#x, not a leaf", i, flags)
	}
	count := uint64(ne.Uint16(inline[10:]))
	if err := checkElements(inline, count, true); err != nil {
		return fmt.Errorf("element %d's inline bucket: %w", i, err)
	}
	// bbolt reads the buckets nested in an inline bucket too.
	for j := range count {
		if err := w.bucket(inline, j); err != nil {
			return fmt.Errorf("element %d's inline bucket: %w", i, err)
		}
	}
	return nil
}

// freelist checks the free-list page that the meta page of transaction
// txid names, if any: bbolt reads its ids, as many as its count says,
// through the memory map.
func (w *boltWalk) freelist(txid uint64) error {
	ne := binary.NativeEndian
	list := uint64(0)
	found := false
	for meta := range uint64(2) {
		b := make([]byte, boltMetaTxid+8)
		if _, err := w.r.ReadAt(b, int64(meta*w.pageSize)); err != nil {
			return fmt.Errorf("meta page %d: %w", meta, err)
		}
		if ne.Uint64(b[boltMetaTxid:]) == txid {
			list, found = ne.Uint64(b[boltMetaFreelist:]), true
			break
		}
	}
	switch {
	case !found:
		return fmt.Errorf("no meta page of transaction %d", txid)
	case list == boltNoFreelist:
		return nil
	case list < 2 || list >= w.hwm:
		return fmt.Errorf("free list page %d: outside the file's pages 2 to %d", list, w.hwm-1)
	}
	page, err := w.read(list)
	if err != nil {
		return fmt.Errorf("free list: %w", err)
	}
	if got := ne.Uint64(page); got != list {
		return fmt.Errorf("free list page %d: its header says page %d", list, got)
	}
	if flags := ne.Uint16(page[8:]); flags != boltFreelistPage {
		return fmt.Errorf("free list page %d: flags %#x, not a free list", list, flags)
	}
	// A count of 0xFFFF or more is kept in the first id's place.
	count, first := uint64(ne.Uint16(page[10:])), uint64(0)
	if count == 0xFFFF {
		count, first = ne.Uint64(page[boltPageHeader:]), 1
	}
	if room := (uint64(len(page))-boltPageHeader)/8 - first; count > room {
		return fmt.Errorf("free list page %d: %d ids, room for %d", list, count, room)
	}
	return nil
}

// read returns page id with its overflow pages.
func (w *boltWalk) read(id uint64) ([]byte, error) {
	head := make([]byte, boltPageHeader)
	if _, err := w.r.ReadAt(head, int64(id*w.pageSize)); err != nil {
		return nil, fmt.Errorf("page %d: read its header: %w", id, err)
	}
	overflow := uint64(binary.NativeEndian.Uint32(head[12:]))
	if id+overflow >= w.hwm {
		return nil, fmt.Errorf("page %d: %d overflow pages reach past the file's %d pages", id, overflow, w.hwm)
	}
	page := make([]byte, (overflow+1)*w.pageSize)
	if _, err := w.r.ReadAt(page, int64(id*w.pageSize)); err != nil {
		return nil, fmt.Errorf("page %d: read it: %w", id, err)
	}
	return page, nil
}

// checkElements checks that count elements fit in page, and that each
// one's key, and a leaf's value, lie within it.
func checkElements(page []byte, count uint64, leaf bool) error {
	ne := binary.NativeEndian
	size := uint64(len(page))
	if boltPageHeader+count*boltElementSize > size {
		return fmt.Errorf("%d elements do not fit in its %d bytes", count, size)
	}
	for i := range count {
		at := boltPageHeader + i*boltElementSize
		e := page[at:]
		var pos, ksize, vsize uint64
		if leaf {
			pos, ksize, vsize = uint64(ne.Uint32(e[4:])), uint64(ne.Uint32(e[8:])), uint64(ne.Uint32(e[12:]))
		} else {
			pos, ksize = uint64(ne.Uint32(e)), uint64(ne.Uint32(e[4:]))
		}
		if end := at + pos + ksize + vsize; end > size {
			return fmt.Errorf("element %d: key and value end at byte %d, past the page's %d", i, end, size)
		}
	}
	return nil
}
