// This file is the fabric delay line: packets a node receives from the fabric are queued
// by an iptables NFQUEUE rule to a netlink socket this process holds in the node's
// namespace, and each is given its ACCEPT verdict a fixed time after it arrived, in
// arrival order. The kernel keeps the packet meanwhile; only its id crosses to user
// space (copy mode "meta"), so the line costs one small netlink message per packet.
//
// It is the netem delay this lab's kernel cannot do (no sch_netem, no fq), written
// against the nfnetlink_queue messages directly (golang.org/x/sys/unix), since no
// NFQUEUE library is available to the build.

package lab

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/agent/netns"
	"golang.org/x/sys/unix"
)

// delayQueueNum is the NFQUEUE number of a node's delay line. Queues are per network
// namespace, so every node uses the same one.
const delayQueueNum = 1

// DefaultDelayQueue is how many packets a delay line holds at most when
// Impairment.DelayQueue is 0: about 50 ms of 2 Gbit/s in full-sized packets, and far
// more than a few TCP windows in the lab's 64 KiB GSO packets.
const DefaultDelayQueue = 10000

// nfnetlink_queue (include/uapi/linux/netfilter/nfnetlink_queue.h).
const (
	nfnlSubsysQueue = 3

	nfqnlMsgPacket       = 0
	nfqnlMsgConfig       = 2
	nfqnlMsgVerdictBatch = 3

	nfqaPacketHdr  = 1
	nfqaVerdictHdr = 2

	nfqaCfgCmd      = 1
	nfqaCfgParams   = 2
	nfqaCfgQueueMax = 3
	nfqaCfgMask     = 4
	nfqaCfgFlags    = 5

	nfqnlCfgCmdBind   = 1
	nfqnlCfgCmdUnbind = 2
	nfqnlCopyMeta     = 1
	// nfqaCfgFGSO: a GSO packet is queued whole rather than segmented first, since
	// the line never looks at payloads.
	nfqaCfgFGSO = 4

	nfAccept = 1

	// nlaTypeMask clears an attribute type's nested and byte-order flags.
	nlaTypeMask = 0x3fff

	// netlinkNoENOBUFS (SOL_NETLINK): an overrun of the socket's buffer is not
	// reported as ENOBUFS on read; the kernel counts the packets it could not queue
	// (user_dropped, and drops them), which delayLine.stats reports.
	netlinkNoENOBUFS = 5
)

// DelayStats is what a node's delay line did.
type DelayStats struct {
	// Delayed packets were held and released.
	Delayed uint64 `json:"delayed"`
	// QueueDropped packets found the queue full (DelayQueue held) and were dropped by
	// the kernel; UserDropped ones could not be handed to the line (its socket buffer
	// was full) and were dropped too. Both are loss the delay line added.
	QueueDropped uint64 `json:"queueDropped"`
	UserDropped  uint64 `json:"userDropped"`
}

// held is one queued packet.
type held struct {
	id  uint32
	due time.Time
}

// delayLine holds each packet of its queue for delay, then accepts it.
type delayLine struct {
	fd     int
	ns     *netns.Handle
	delay  time.Duration
	queue  chan held
	seq    atomic.Uint32
	stop   chan struct{}
	wg     sync.WaitGroup
	count  atomic.Uint64
	failed atomic.Pointer[error]
}

// newDelayLine binds queue delayQueueNum in the namespace at nsPath, with room for
// maxlen packets. Nothing is queued to it until a rule says so; start runs it.
func newDelayLine(nsPath string, delay time.Duration, maxlen int) (_ *delayLine, err error) {
	ns, err := netns.Open(nsPath)
	if err != nil {
		return nil, err
	}
	d := &delayLine{fd: -1, ns: ns, delay: delay, queue: make(chan held, maxlen+64), stop: make(chan struct{})}
	defer func() {
		if err != nil {
			d.close()
		}
	}()
	err = ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
		if err != nil {
			return fmt.Errorf("netlink socket: %w", err)
		}
		d.fd = fd
		return nil
	})
	if err != nil {
		return nil, err
	}
	// Room for every queued packet's message (about 100 bytes each) several times over.
	if err := unix.SetsockoptInt(d.fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 16<<20); err != nil {
		return nil, fmt.Errorf("netlink receive buffer: %w", err)
	}
	if err := unix.SetsockoptInt(d.fd, unix.SOL_NETLINK, netlinkNoENOBUFS, 1); err != nil {
		return nil, fmt.Errorf("netlink no-enobufs: %w", err)
	}
	// Reads wake up this often to see whether the line is stopping.
	tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(d.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return nil, fmt.Errorf("netlink receive timeout: %w", err)
	}
	if err := unix.Bind(d.fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("netlink bind: %w", err)
	}
	bind := attr(nfqaCfgCmd, []byte{nfqnlCfgCmdBind, 0, 0, unix.AF_INET})
	if err := d.request(nfqnlMsgConfig, bind); err != nil {
		return nil, fmt.Errorf("bind queue %d: %w", delayQueueNum, err)
	}
	params := make([]byte, 5) // copy_range 0, copy_mode meta
	params[4] = nfqnlCopyMeta
	cfg := attr(nfqaCfgParams, params)
	cfg = append(cfg, attr(nfqaCfgQueueMax, be32(uint32(maxlen)))...)
	cfg = append(cfg, attr(nfqaCfgMask, be32(nfqaCfgFGSO))...)
	cfg = append(cfg, attr(nfqaCfgFlags, be32(nfqaCfgFGSO))...)
	if err := d.request(nfqnlMsgConfig, cfg); err != nil {
		return nil, fmt.Errorf("configure queue %d: %w", delayQueueNum, err)
	}
	return d, nil
}

// start runs the reader, which timestamps each packet as it arrives, and the
// releaser, which accepts packets when they are due.
func (d *delayLine) start() {
	d.wg.Add(2)
	go func() {
		defer d.wg.Done()
		defer close(d.queue)
		d.read()
	}()
	go func() {
		defer d.wg.Done()
		d.release()
	}()
}

// read queues each packet message's id until stop, then drains what the socket still
// holds so that shutdown can accept it.
func (d *delayLine) read() {
	buf := make([]byte, 1<<16)
	stopping := false
	for {
		n, _, err := unix.Recvfrom(d.fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				if stopping {
					return
				}
				select {
				case <-d.stop:
					stopping = true
				default:
				}
				continue
			}
			// Unbind, so that the rule's --queue-bypass lets packets pass undelayed
			// instead of filling a queue nobody reads and then dropping everything.
			d.fail(fmt.Errorf("delay line read: %w", err))
			_ = unix.Sendto(d.fd, d.message(nfqnlMsgConfig, 0, attr(nfqaCfgCmd, []byte{nfqnlCfgCmdUnbind, 0, 0, unix.AF_INET})), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
			return
		}
		now := time.Now()
		for _, id := range packetIDs(buf[:n]) {
			d.queue <- held{id: id, due: now.Add(d.delay)}
		}
		if !stopping {
			select {
			case <-d.stop:
				stopping = true
			default:
			}
		}
	}
}

// release accepts packets in order once due, all those due at once in one batch
// verdict (which covers every id up to the one given); on stop it accepts the rest at
// once.
func (d *delayLine) release() {
	var last uint32
	have := false
	flush := func() {
		if !have {
			return
		}
		if err := d.verdictBatch(last); err != nil {
			d.fail(err)
		}
		have = false
	}
	for h := range d.queue {
		if wait := time.Until(h.due); wait > 0 {
			flush()
			select {
			case <-time.After(wait):
			case <-d.stop:
			}
		}
		last, have = h.id, true
		d.count.Add(1)
		if len(d.queue) == 0 {
			flush()
		}
	}
	flush()
}

// close stops the line: packets held are accepted at once, then the queue is unbound
// and the socket closed. Packets still queued then get the kernel's verdict for a
// queue nobody listens to (the rule's --queue-bypass: accepted).
func (d *delayLine) close() error {
	select {
	case <-d.stop:
	default:
		close(d.stop)
	}
	d.wg.Wait()
	var err error
	if d.fd >= 0 {
		_ = d.request(nfqnlMsgConfig, attr(nfqaCfgCmd, []byte{nfqnlCfgCmdUnbind, 0, 0, unix.AF_INET}))
		err = unix.Close(d.fd)
		d.fd = -1
	}
	if d.ns != nil {
		d.ns.Close()
	}
	if p := d.failed.Load(); p != nil {
		return *p
	}
	return err
}

func (d *delayLine) fail(err error) { d.failed.CompareAndSwap(nil, &err) }

// stats reads the line's counters and the kernel's for its queue
// (/proc/net/netfilter/nfnetlink_queue of the node's namespace).
func (d *delayLine) stats() (DelayStats, error) {
	s := DelayStats{Delayed: d.count.Load()}
	if p := d.failed.Load(); p != nil {
		return s, *p
	}
	var data []byte
	err := d.ns.Do(func() error {
		var err error
		data, err = os.ReadFile("/proc/thread-self/net/netfilter/nfnetlink_queue")
		return err
	})
	if err != nil {
		return s, fmt.Errorf("delay line counters: %w", err)
	}
	// queue_number peer_portid queue_total copy_mode copy_range queue_dropped user_dropped id_sequence 1
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 7 || f[0] != strconv.Itoa(delayQueueNum) {
			continue
		}
		s.QueueDropped, _ = strconv.ParseUint(f[5], 10, 64)
		s.UserDropped, _ = strconv.ParseUint(f[6], 10, 64)
	}
	return s, nil
}

// verdictBatch accepts every queued packet with an id up to id.
func (d *delayLine) verdictBatch(id uint32) error {
	v := make([]byte, 8)
	binary.BigEndian.PutUint32(v[0:], nfAccept)
	binary.BigEndian.PutUint32(v[4:], id)
	msg := d.message(nfqnlMsgVerdictBatch, 0, attr(nfqaVerdictHdr, v))
	if err := unix.Sendto(d.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("delay line verdict: %w", err)
	}
	return nil
}

// request sends a message asking for an acknowledgement and waits for it; only for
// set-up and shutdown, when no packet messages arrive.
func (d *delayLine) request(typ uint16, attrs []byte) error {
	msg := d.message(typ, unix.NLM_F_ACK, attrs)
	seq := binary.NativeEndian.Uint32(msg[8:])
	if err := unix.Sendto(d.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 1<<16)
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		n, _, err := unix.Recvfrom(d.fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		for b := buf[:n]; len(b) >= unix.NLMSG_HDRLEN; {
			l := int(binary.NativeEndian.Uint32(b[0:]))
			if l < unix.NLMSG_HDRLEN || l > len(b) {
				break
			}
			if binary.NativeEndian.Uint16(b[4:]) == unix.NLMSG_ERROR && binary.NativeEndian.Uint32(b[8:]) == seq && l >= unix.NLMSG_HDRLEN+4 {
				if errno := int32(binary.NativeEndian.Uint32(b[unix.NLMSG_HDRLEN:])); errno != 0 {
					return unix.Errno(-errno)
				}
				return nil
			}
			b = b[nlmAlign(l):]
		}
	}
	return errors.New("no acknowledgement from nfnetlink_queue")
}

// message is a netlink message of the queue subsystem for the line's queue.
func (d *delayLine) message(typ, flags uint16, attrs []byte) []byte {
	msg := make([]byte, unix.NLMSG_HDRLEN+4, unix.NLMSG_HDRLEN+4+len(attrs))
	msg = append(msg, attrs...)
	binary.NativeEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.NativeEndian.PutUint16(msg[4:], nfnlSubsysQueue<<8|typ)
	binary.NativeEndian.PutUint16(msg[6:], unix.NLM_F_REQUEST|flags)
	binary.NativeEndian.PutUint32(msg[8:], d.seq.Add(1))
	// nfgenmsg: family AF_UNSPEC, version 0, res_id the queue number (big endian).
	msg[unix.NLMSG_HDRLEN] = unix.AF_UNSPEC
	binary.BigEndian.PutUint16(msg[unix.NLMSG_HDRLEN+2:], delayQueueNum)
	return msg
}

// packetIDs are the ids of the packet messages in a buffer read from the socket.
func packetIDs(b []byte) []uint32 {
	var ids []uint32
	for len(b) >= unix.NLMSG_HDRLEN {
		l := int(binary.NativeEndian.Uint32(b[0:]))
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			break
		}
		if binary.NativeEndian.Uint16(b[4:]) == nfnlSubsysQueue<<8|nfqnlMsgPacket && l >= unix.NLMSG_HDRLEN+4 {
			a := b[unix.NLMSG_HDRLEN+4 : l]
			for len(a) >= unix.SizeofNlAttr {
				al := int(binary.NativeEndian.Uint16(a[0:]))
				if al < unix.SizeofNlAttr || al > len(a) {
					break
				}
				if binary.NativeEndian.Uint16(a[2:])&nlaTypeMask == nfqaPacketHdr && al >= unix.SizeofNlAttr+4 {
					ids = append(ids, binary.BigEndian.Uint32(a[unix.SizeofNlAttr:]))
					break
				}
				a = a[min(nlaAlign(al), len(a)):]
			}
		}
		b = b[min(nlmAlign(l), len(b)):]
	}
	return ids
}

// attr is a netlink attribute, padded to 4 bytes.
func attr(typ uint16, data []byte) []byte {
	b := make([]byte, unix.SizeofNlAttr, nlaAlign(unix.SizeofNlAttr+len(data)))
	binary.NativeEndian.PutUint16(b[0:], uint16(unix.SizeofNlAttr+len(data)))
	binary.NativeEndian.PutUint16(b[2:], typ)
	b = append(b, data...)
	return append(b, make([]byte, cap(b)-len(b))...)
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

func nlmAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }
func nlaAlign(n int) int { return (n + unix.NLA_ALIGNTO - 1) &^ (unix.NLA_ALIGNTO - 1) }
