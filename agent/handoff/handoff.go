// Package handoff passes a running agent's listening sockets and locks to the agent
// that replaces it (an upgrade, a restart), so that no connection the kernel
// redirects to an in-pod listener meets a closed socket.
//
// The running agent listens on a unix SOCK_SEQPACKET socket in its state folder
// (handoff.sock, mode 0600). A new agent that finds the node's lock held connects
// and the two exchange JSON messages, one per packet, sockets attached with
// SCM_RIGHTS:
//
//	new → old  hello     {v, node, pid}
//	old → new  sockets   {v, pid, sockets[]} + their fds (at most maxFDs a packet),
//	                     as many packets as needed, the last with done=true
//	new → old  serving   the new agent serves on every socket it was given
//	old → new  draining  the old one has stopped accepting; it drains and exits
//
// or old → new refused {v, reason} (another version, another node, a handoff in
// progress). Both processes accept from the same sockets between sockets and
// draining, so a queued connection is never dropped. A new agent that does not get
// to serving (an error, the old one died) closes what it received; the old one,
// which never stopped accepting, carries on. The lock files' descriptors are among
// the sockets: a flock belongs to the open file description, so the new agent's
// copy keeps the lock held once the old one exits.
package handoff

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// Version is the protocol's version; agents hand over only with the same one.
const Version = 1

// maxFDs is how many descriptors one packet carries (the kernel's SCM_MAX_FD is 253).
const maxFDs = 64

// maxPacket bounds a message's JSON.
const maxPacket = 256 << 10

// Kind says what a passed descriptor is.
type Kind string

const (
	// KindPod is a listener in a pod's network namespace (15001, 15006, 15008).
	KindPod Kind = "pod"
	// KindNode is a TCP listener in the node's network namespace (health, metrics,
	// the observer's TCP address).
	KindNode Kind = "node"
	// KindLock is a lock file or folder's descriptor, flock held.
	KindLock Kind = "lock"
)

// Socket describes one passed descriptor.
type Socket struct {
	Kind Kind `json:"kind"`
	// Pod is the pod's UID and Name its namespace/name (KindPod).
	Pod  string `json:"pod,omitempty"`
	Name string `json:"name,omitempty"`
	// Netns is the cookie of the network namespace the socket is in.
	Netns uint64 `json:"netns,omitempty"`
	// Addr is the listener's address (KindPod, KindNode).
	Addr string `json:"addr,omitempty"`
	// Path is the locked file or folder (KindLock).
	Path string `json:"path,omitempty"`
}

// Op is a message's type.
type Op string

const (
	OpHello    Op = "hello"
	OpSockets  Op = "sockets"
	OpServing  Op = "serving"
	OpDraining Op = "draining"
	OpRefused  Op = "refused"
)

// message is one packet's JSON.
type message struct {
	Version int      `json:"v"`
	Op      Op       `json:"op"`
	Node    string   `json:"node,omitempty"`
	PID     int      `json:"pid,omitempty"`
	Sockets []Socket `json:"sockets,omitempty"`
	Done    bool     `json:"done,omitempty"`
	Reason  string   `json:"reason,omitempty"`
}

// Reason says why a handoff did not happen, for the new agent to decide what to do.
type Reason string

const (
	// NoPeer: nothing answers on the handoff socket (an agent without handoff, or
	// one that died).
	NoPeer Reason = "no peer"
	// Refused: the running agent said no (Error.Detail says why).
	Refused Reason = "refused"
	// Broken: the exchange failed half-way (the peer died, a malformed message).
	Broken Reason = "broken"
)

// Error is a failed handoff.
type Error struct {
	Reason Reason
	Detail string
	Err    error
}

func (e *Error) Error() string {
	s := "handoff " + string(e.Reason)
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *Error) Unwrap() error { return e.Err }

// send writes m with files attached.
func send(c *net.UnixConn, m message, files []*os.File) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	_, _, err = c.WriteMsgUnix(b, oob, nil)
	return err
}

// recv reads one message and the files attached to it.
func recv(c *net.UnixConn) (message, []*os.File, error) {
	b := make([]byte, maxPacket)
	oob := make([]byte, unix.CmsgSpace(maxFDs*4))
	n, oobn, flags, _, err := c.ReadMsgUnix(b, oob)
	if err != nil {
		return message{}, nil, err
	}
	var files []*os.File
	if oobn > 0 {
		cms, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return message{}, nil, fmt.Errorf("control message: %w", err)
		}
		for _, cm := range cms {
			fds, err := unix.ParseUnixRights(&cm)
			if err != nil {
				continue
			}
			for _, fd := range fds {
				unix.CloseOnExec(fd)
				files = append(files, os.NewFile(uintptr(fd), "handoff"))
			}
		}
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		closeAll(files)
		return message{}, nil, errors.New("message truncated")
	}
	if n == 0 {
		closeAll(files)
		return message{}, nil, errors.New("peer closed")
	}
	var m message
	if err := json.Unmarshal(b[:n], &m); err != nil {
		closeAll(files)
		return message{}, nil, fmt.Errorf("malformed message: %w", err)
	}
	return m, files, nil
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}
