// Package bpf holds Ferry's eBPF programs (ferry.c), the Go objects bpf2go generates
// from them (ferry_bpfel.go and .o, both committed), and typed load and map helpers.
package bpf

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel -type pod_info -type addr_port -type orig_key -type sock_key -type ip_key -type ferry_counter -type strict_key -type strict_event -type mtls_mode ferry ferry.c -- -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu
