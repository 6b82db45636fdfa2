// Read-only inspection of the pinned state, for `ferry bpf progs` and `ferry bpf maps`.
// It needs only the pins, not a running agent's memory.

package datapath

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/ferrymesh/ferry/bpf"
)

// ErrNoState means nothing is pinned at the pin folder.
var ErrNoState = errors.New("no Ferry state pinned")

func checkPinDir(pinDir string) error {
	if _, err := os.Stat(filepath.Join(pinDir, bpf.MapEnrolledNetns)); err != nil {
		return fmt.Errorf("%w at %s: is the agent running? (%v)", ErrNoState, pinDir, err)
	}
	return nil
}

// ProgramInfo is one of Ferry's attached programs, found through its pinned link.
type ProgramInfo struct {
	Name   string `json:"name"`
	Type   string `json:"type"`
	ID     uint32 `json:"id"`
	LinkID uint32 `json:"link_id"`
	Attach string `json:"attach"` // cgroup path, netns (and pod), or map
	Pin    string `json:"pin"`
}

// Programs lists the programs attached through the links pinned under pinDir, with
// their attach points.
func Programs(pinDir string) ([]ProgramInfo, error) {
	if err := checkPinDir(pinDir); err != nil {
		return nil, err
	}
	maps, err := bpf.OpenPinnedMaps(pinDir, true)
	if err != nil {
		return nil, err
	}
	defer maps.Close()
	pods, _ := maps.Enrolled()
	cgRoot, _ := Cgroup2Mount()

	dir := filepath.Join(pinDir, linksDir)
	entries, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("read links folder: %w", err)
	}
	var out []ProgramInfo
	for _, e := range entries {
		pin := filepath.Join(dir, e.Name())
		// Links refuse BPF_F_RDONLY; only Info is called on this one.
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			return nil, fmt.Errorf("load pinned link %s: %w", e.Name(), err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			return nil, fmt.Errorf("link %s info: %w", e.Name(), err)
		}
		p := ProgramInfo{ID: uint32(info.Program), LinkID: uint32(info.ID), Pin: pin}
		if prog, err := ebpf.NewProgramFromID(info.Program); err == nil {
			if pi, err := prog.Info(); err == nil {
				p.Name, p.Type = pi.Name, pi.Type.String()
			}
			prog.Close()
		}
		switch {
		case info.Cgroup() != nil:
			path := cgroupPathByID(cgRoot, info.Cgroup().CgroupId)
			if path == "" {
				path = "id " + strconv.FormatUint(info.Cgroup().CgroupId, 10)
			}
			p.Attach = "cgroup " + path
		case info.NetNs() != nil:
			p.Attach = fmt.Sprintf("netns inode %d", info.NetNs().NetnsInode)
			if c, ok := skLookupCookie(e.Name()); ok {
				p.Attach = fmt.Sprintf("netns cookie %d inode %d (%s)", c, info.NetNs().NetnsInode, podName(pods, c))
			}
		case e.Name() == linkSkMsg:
			p.Attach = "map " + bpf.MapLocalSocks
		default:
			p.Attach = "link type " + strconv.Itoa(int(info.Type))
		}
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Pin < out[j].Pin })
	return out, nil
}

func podName(pods map[uint64]string, cookie uint64) string {
	if p, ok := pods[cookie]; ok {
		return p
	}
	return "not enrolled"
}

// WriteProgramsTable prints programs as an aligned table.
func WriteProgramsTable(w io.Writer, progs []ProgramInfo) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tTYPE\tID\tLINK\tATTACHED TO")
	for _, p := range progs {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\n", p.Name, p.Type, p.ID, p.LinkID, p.Attach)
	}
	return tw.Flush()
}

// MapInfo describes one pinned map.
type MapInfo struct {
	Name       string `json:"name"`
	Type       string `json:"type"`
	ID         uint32 `json:"id"`
	Entries    int    `json:"entries"`
	MaxEntries uint32 `json:"max_entries"`
}

// EnrolledNetns is an entry of enrolled_netns.
type EnrolledNetns struct {
	NetnsCookie uint64 `json:"netns_cookie"`
	Pod         string `json:"pod"`
}

// OrigDst is an entry of orig_dst with the pod it came from.
type OrigDst struct {
	NetnsCookie uint64         `json:"netns_cookie"`
	Pod         string         `json:"pod"`
	ClientPort  uint16         `json:"client_port"`
	Dst         netip.AddrPort `json:"dst"`
}

// PendingOrigDst is an entry of sock_orig_dst (captured, not yet established).
type PendingOrigDst struct {
	SocketCookie uint64         `json:"socket_cookie"`
	Dst          netip.AddrPort `json:"dst"`
}

// MapsDump is every pinned map with its readable contents.
type MapsDump struct {
	Maps             []MapInfo             `json:"maps"`
	Enrolled         []EnrolledNetns       `json:"enrolled_netns"`
	OrigDsts         []OrigDst             `json:"orig_dst"`
	Pending          []PendingOrigDst      `json:"sock_orig_dst"`
	LocalSockets     []bpf.LocalSocket     `json:"local_socks"`
	InboundListeners []bpf.InboundListener `json:"inbound_listeners"`
	ExcludedPorts    []uint16              `json:"excluded_ports"`
	// StrictPorts are the pods' mTLS modes sk_lookup enforces (port 0: the pod's
	// other ports).
	StrictPorts []bpf.StrictPort `json:"strict_ports"`
}

// DumpMaps reads every map pinned under pinDir.
func DumpMaps(pinDir string) (*MapsDump, error) {
	if err := checkPinDir(pinDir); err != nil {
		return nil, err
	}
	m, err := bpf.OpenPinnedMaps(pinDir, true)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	d := &MapsDump{}

	pods, err := m.Enrolled()
	if err != nil {
		return nil, err
	}
	for c, p := range pods {
		d.Enrolled = append(d.Enrolled, EnrolledNetns{NetnsCookie: c, Pod: p})
	}
	sort.Slice(d.Enrolled, func(i, j int) bool { return d.Enrolled[i].Pod < d.Enrolled[j].Pod })

	origs, err := m.OrigDsts()
	if err != nil {
		return nil, err
	}
	for _, o := range origs {
		d.OrigDsts = append(d.OrigDsts, OrigDst{NetnsCookie: o.NetnsCookie, Pod: podName(pods, o.NetnsCookie), ClientPort: o.ClientPort, Dst: o.Dst})
	}
	pending, err := m.PendingOrigDsts()
	if err != nil {
		return nil, err
	}
	for c, dst := range pending {
		d.Pending = append(d.Pending, PendingOrigDst{SocketCookie: c, Dst: dst})
	}
	sort.Slice(d.Pending, func(i, j int) bool { return d.Pending[i].SocketCookie < d.Pending[j].SocketCookie })
	if d.LocalSockets, err = m.LocalSockets(); err != nil {
		return nil, err
	}
	if d.InboundListeners, err = m.ListInboundListeners(); err != nil {
		return nil, err
	}
	if d.ExcludedPorts, err = m.ListExcludedPorts(); err != nil {
		return nil, err
	}
	if d.StrictPorts, err = m.StrictPortEntries(); err != nil {
		return nil, err
	}

	counts := map[string]int{
		bpf.MapEnrolledNetns: len(d.Enrolled), bpf.MapOrigDst: len(d.OrigDsts), bpf.MapSockOrigDst: len(d.Pending),
		bpf.MapLocalSocks: len(d.LocalSockets), bpf.MapInboundListeners: len(d.InboundListeners),
		bpf.MapExcludedPorts: len(d.ExcludedPorts), bpf.MapStrictPorts: len(d.StrictPorts),
	}
	for name, mp := range map[string]*ebpf.Map{
		bpf.MapEnrolledNetns: m.EnrolledNetns, bpf.MapOrigDst: m.OrigDst, bpf.MapSockOrigDst: m.SockOrigDst,
		bpf.MapLocalSocks: m.LocalSocks, bpf.MapInboundListeners: m.InboundListeners, bpf.MapExcludedPorts: m.ExcludedPorts,
		bpf.MapStrictPorts: m.StrictPorts,
	} {
		mi := MapInfo{Name: name, Type: mp.Type().String(), MaxEntries: mp.MaxEntries(), Entries: counts[name]}
		if info, err := mp.Info(); err == nil {
			if id, ok := info.ID(); ok {
				mi.ID = uint32(id)
			}
		}
		d.Maps = append(d.Maps, mi)
	}
	sort.Slice(d.Maps, func(i, j int) bool { return d.Maps[i].Name < d.Maps[j].Name })
	return d, nil
}

// WriteJSON prints the dump as indented JSON.
func (d *MapsDump) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(d)
}

// WriteTable prints a summary of the maps, then each map's contents as a table.
func (d *MapsDump) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	section := func(title string) {
		fmt.Fprintf(tw, "\n%s\n", title)
	}
	fmt.Fprintln(tw, "MAP\tTYPE\tID\tENTRIES/MAX")
	for _, m := range d.Maps {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d/%d\n", m.Name, m.Type, m.ID, m.Entries, m.MaxEntries)
	}

	section("enrolled_netns")
	fmt.Fprintln(tw, "NETNS COOKIE\tPOD")
	for _, e := range d.Enrolled {
		fmt.Fprintf(tw, "%d\t%s\n", e.NetnsCookie, e.Pod)
	}
	section("orig_dst")
	fmt.Fprintln(tw, "NETNS COOKIE\tPOD\tCLIENT PORT\tORIGINAL DESTINATION")
	for _, o := range d.OrigDsts {
		fmt.Fprintf(tw, "%d\t%s\t%d\t%s\n", o.NetnsCookie, o.Pod, o.ClientPort, o.Dst)
	}
	section("sock_orig_dst")
	fmt.Fprintln(tw, "SOCKET COOKIE\tORIGINAL DESTINATION")
	for _, p := range d.Pending {
		fmt.Fprintf(tw, "%d\t%s\n", p.SocketCookie, p.Dst)
	}
	section("local_socks")
	fmt.Fprintln(tw, "NETNS COOKIE\tLOCAL\tREMOTE\tSOCKET COOKIE")
	for _, s := range d.LocalSockets {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\n", s.NetnsCookie, s.Local, s.Remote, s.SocketCookie)
	}
	section("inbound_listeners")
	fmt.Fprintln(tw, "POD IP\tSOCKET COOKIE")
	for _, l := range d.InboundListeners {
		fmt.Fprintf(tw, "%s\t%d\n", l.PodIP, l.SocketCookie)
	}
	section("excluded_ports")
	ports := make([]string, len(d.ExcludedPorts))
	for i, p := range d.ExcludedPorts {
		ports[i] = strconv.Itoa(int(p))
	}
	fmt.Fprintf(tw, "PORTS\t%s\n", strings.Join(ports, ","))
	section("strict_ports")
	fmt.Fprintln(tw, "POD IP\tPORT\tMTLS MODE")
	for _, sp := range d.StrictPorts {
		port := "*"
		if sp.Port != 0 {
			port = strconv.Itoa(int(sp.Port))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", sp.IP, port, sp.Mode)
	}
	return tw.Flush()
}
