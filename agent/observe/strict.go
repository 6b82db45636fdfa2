// The kernel's STRICT refusals as flows: sk_lookup reports each plaintext
// connection it refused on the strict_events ring buffer, and StrictDrops turns
// each into a DROPPED flow with reason strict_mtls. Counting happens in the kernel
// (ferry_datapath_events_total{event="strict_refused"}, and "strict_event_lost"
// for reports the full ring buffer dropped), so a flow lost never loses a count.

package observe

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/bpf"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// podRef is a workload as a flow names it.
type podRef struct{ pod, identity, node string }

// podIndex indexes the state's workloads by IP.
func podIndex(st *ferryv1.NodeState) *map[netip.Addr]podRef {
	idx := map[netip.Addr]podRef{}
	for _, w := range st.GetWorkloads() {
		r := podRef{pod: w.GetNamespace() + "/" + w.GetName(), identity: w.GetIdentity(), node: w.GetNode()}
		for _, s := range w.GetIps() {
			if ip, err := netip.ParseAddr(s); err == nil {
				idx[ip.Unmap()] = r
			}
		}
	}
	return &idx
}

func (o *Observer) podAt(ip netip.Addr) podRef {
	if p := o.pods.Load(); p != nil {
		return (*p)[ip.Unmap()]
	}
	return podRef{}
}

// StrictRefused records a plaintext connection the kernel refused under STRICT:
// a DROPPED flow, inbound at the destination pod, reason strict_mtls. The source
// is named only when it is a mesh workload (one enrolled elsewhere, or this
// node's, reaching the pod around the mesh); its identity is left out: plaintext
// proves none.
func (o *Observer) StrictRefused(src, dst netip.AddrPort, at time.Time) {
	sp, dp := o.podAt(src.Addr()), o.podAt(dst.Addr())
	f := &ferryv1.Flow{
		Time:        timestamppb.New(at),
		Node:        o.node,
		Direction:   string(admin.Inbound),
		Source:      endpoint(sp.pod, "", sp.node, src),
		Destination: endpoint(dp.pod, dp.identity, dp.node, dst),
		Verdict:     ferryv1.Verdict_VERDICT_DROPPED,
		Reason:      string(admin.ReasonStrictMTLS),
		Security:    string(admin.Plaintext),
		Protocol:    "tcp",
		Duration:    durationpb.New(0),
		Service:     o.service(dst).flow,
	}
	o.ring.Add(f)
}

// StrictDrops reads the kernel's STRICT refusals and records each as a flow. It
// starts after the capture has loaded (and pinned) the ring buffer.
type StrictDrops struct {
	pinDir string
	obs    *Observer
	log    *slog.Logger

	ev *bpf.StrictEvents
	wg sync.WaitGroup
}

// NewStrictDrops returns the reader of the ring buffer pinned under pinDir.
func NewStrictDrops(pinDir string, obs *Observer, log *slog.Logger) *StrictDrops {
	return &StrictDrops{pinDir: pinDir, obs: obs, log: log}
}

// Start opens the ring buffer and reads it until Stop. Without one pinned (a
// capture that loads no eBPF, as in the agent's own tests) there is nothing to
// read and nothing starts.
func (s *StrictDrops) Start(context.Context) error {
	ev, err := bpf.OpenStrictEvents(s.pinDir)
	if errors.Is(err, os.ErrNotExist) {
		s.log.Warn("no strict_events ring buffer pinned: STRICT refusals are counted but make no flows", "pin_dir", s.pinDir)
		return nil
	}
	if err != nil {
		return err
	}
	s.ev = ev
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			e, err := ev.Read()
			if errors.Is(err, bpf.ErrEventsClosed) {
				return
			}
			if errors.Is(err, bpf.ErrBadEvent) {
				s.log.Warn("strict events", "error", err)
				continue
			}
			if err != nil {
				// The reader itself failed: refusals go on and are counted in the
				// kernel, only their flows stop until the agent restarts.
				s.log.Error("strict events: reader stopped; refusals are still counted", "error", err)
				return
			}
			s.obs.StrictRefused(e.Source(), e.Destination(), time.Now())
		}
	}()
	return nil
}

// Stop ends the reader and waits for it.
func (s *StrictDrops) Stop(context.Context) error {
	if s.ev == nil {
		return nil
	}
	err := s.ev.Close()
	s.wg.Wait()
	s.ev = nil
	return err
}
