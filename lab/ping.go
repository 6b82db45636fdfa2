// This file sends ICMP echo requests from inside a pod, for connectivity checks on
// machines without a ping binary.

package lab

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Ping sends one ICMP echo request from the pod to dst and waits for the reply (at
// most until ctx ends, and 2 seconds without a deadline).
func (l *Lab) Ping(ctx context.Context, pod string, dst netip.Addr) error {
	h, err := l.Netns(pod)
	if err != nil {
		return err
	}
	defer h.Close()
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(2 * time.Second)
	}
	var fd int
	err = h.Do(func() error {
		var err error
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
		return err
	})
	if err != nil {
		return fmt.Errorf("ping from %s: raw socket: %w", pod, err)
	}
	defer unix.Close(fd)
	if !dst.Is4() {
		return fmt.Errorf("ping from %s: %s is not IPv4", pod, dst)
	}
	id := uint16(os.Getpid())
	const seq = 1
	req := make([]byte, 16)
	req[0] = 8 // echo request
	binary.BigEndian.PutUint16(req[4:], id)
	binary.BigEndian.PutUint16(req[6:], seq)
	copy(req[8:], "ferrylab")
	binary.BigEndian.PutUint16(req[2:], icmpChecksum(req))
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrInet4{Addr: dst.As4()}); err != nil {
		return fmt.Errorf("ping %s from %s: %w", dst, pod, err)
	}
	buf := make([]byte, 1500)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("ping %s from %s: no reply", dst, pod)
		}
		tv := unix.NsecToTimeval(left.Nanoseconds())
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return fmt.Errorf("ping %s from %s: %w", dst, pod, err)
		}
		n, from, err := unix.Recvfrom(fd, buf, 0)
		if err == unix.EAGAIN || err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("ping %s from %s: %w", dst, pod, err)
		}
		src, ok := from.(*unix.SockaddrInet4)
		if !ok || netip.AddrFrom4(src.Addr) != dst || n < 20 {
			continue
		}
		// A raw IPv4 socket returns the IP header too.
		ihl := int(buf[0]&0x0f) * 4
		if n < ihl+8 {
			continue
		}
		icmp := buf[ihl:n]
		if icmp[0] == 0 && binary.BigEndian.Uint16(icmp[4:]) == id && binary.BigEndian.Uint16(icmp[6:]) == seq {
			return nil
		}
		if icmp[0] == 3 { // destination unreachable
			return fmt.Errorf("ping %s from %s: destination unreachable (code %d)", dst, pod, icmp[1])
		}
	}
}

func icmpChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
