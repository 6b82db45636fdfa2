package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
)

// ErrEventsClosed is returned by StrictEvents.Read once Close was called.
var ErrEventsClosed = errors.New("strict events closed")

// ErrBadEvent is returned by StrictEvents.Read for a record it cannot decode; the
// next Read goes on with the next record.
var ErrBadEvent = errors.New("malformed strict event")

// StrictEvents reads the plaintext connections sk_lookup refused from the
// strict_events ring buffer. The ring buffer is pinned, so events of refusals made
// while no agent ran wait for the next one (up to the buffer's size).
type StrictEvents struct {
	m *ebpf.Map
	r *ringbuf.Reader
}

// OpenStrictEvents opens the pinned strict_events ring buffer under pinDir.
func OpenStrictEvents(pinDir string) (*StrictEvents, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, MapStrictEvents), nil)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("open pinned map %s: %w", MapStrictEvents, os.ErrNotExist)
		}
		return nil, fmt.Errorf("open pinned map %s: %w", MapStrictEvents, err)
	}
	return NewStrictEvents(m)
}

// NewStrictEvents reads events from m, a strict_events map, which it owns from now
// on (Close closes it).
func NewStrictEvents(m *ebpf.Map) (*StrictEvents, error) {
	r, err := ringbuf.NewReader(m)
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("read %s: %w", MapStrictEvents, err)
	}
	return &StrictEvents{m: m, r: r}, nil
}

// Read blocks for the next event; after Close it returns ErrEventsClosed.
func (s *StrictEvents) Read() (StrictEvent, error) {
	var ev StrictEvent
	rec, err := s.r.Read()
	if err != nil {
		if errors.Is(err, ringbuf.ErrClosed) {
			return ev, ErrEventsClosed
		}
		return ev, fmt.Errorf("read %s: %w", MapStrictEvents, err)
	}
	if len(rec.RawSample) < int(unsafe.Sizeof(ev)) {
		return ev, fmt.Errorf("read %s: a %d-byte event, want %d: %w", MapStrictEvents, len(rec.RawSample), unsafe.Sizeof(ev), ErrBadEvent)
	}
	if _, err := binary.Decode(rec.RawSample, binary.LittleEndian, &ev); err != nil {
		return ev, fmt.Errorf("decode %s event: %w: %w", MapStrictEvents, ErrBadEvent, err)
	}
	return ev, nil
}

// Close stops a blocked Read and releases the ring buffer.
func (s *StrictEvents) Close() error {
	return errors.Join(s.r.Close(), s.m.Close())
}
