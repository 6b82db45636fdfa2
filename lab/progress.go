package lab

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
)

// ProgressHandler is a slog handler that prints one plain line per record at info
// level and above: how the lab's Up, Clean and Demo report their progress to a
// person at a terminal ("- step", "warning: ...", "error: ...").
type ProgressHandler struct {
	mu    *sync.Mutex
	w     io.Writer
	attrs []slog.Attr
}

// NewProgressHandler prints progress lines to w.
func NewProgressHandler(w io.Writer) *ProgressHandler {
	return &ProgressHandler{mu: &sync.Mutex{}, w: w}
}

// Enabled reports whether level l is printed: info and above.
func (h *ProgressHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelInfo }

// Handle prints r as one line.
func (h *ProgressHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	switch {
	case r.Level >= slog.LevelError:
		b.WriteString("error: ")
	case r.Level >= slog.LevelWarn:
		b.WriteString("warning: ")
	default:
		b.WriteString("- ")
	}
	b.WriteString(r.Message)
	add := func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	}
	for _, a := range h.attrs {
		add(a)
	}
	r.Attrs(add)
	b.WriteByte('\n')
	h.mu.Lock()
	defer h.mu.Unlock()
	_, err := io.WriteString(h.w, b.String())
	return err
}

// WithAttrs returns a handler that prints attrs on every line too.
func (h *ProgressHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &ProgressHandler{mu: h.mu, w: h.w, attrs: append(append([]slog.Attr(nil), h.attrs...), attrs...)}
}

// WithGroup returns h: progress lines have no groups.
func (h *ProgressHandler) WithGroup(string) slog.Handler { return h }
