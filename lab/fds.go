package lab

import "golang.org/x/sys/unix"

// childrenInheritNothing marks every descriptor above stderr close-on-exec, so the
// processes the lab starts and leaves running (agents, the operator, pod servers) do
// not inherit descriptors this process inherited. Above all the lock of
// `flock /tmp/ferry-lab.lock CMD`: a demo lab left up would otherwise hold it for as
// long as the lab stays up, and every other lab run on the machine would wait. Go
// opens its own descriptors close-on-exec already; this only changes inherited ones.
func childrenInheritNothing() {
	_ = unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
}
