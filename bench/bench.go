// Package bench is Ferry's benchmark harness: in one lab and one run it measures
// Ferry (eBPF capture across nodes and on one node, with and without the sockmap fast
// path, and with iptables capture) side by side with no mesh and with a pair of
// HAProxy processes doing the same job, and writes a markdown table and PNG plots.
package bench

// LabPodNet is the pod network of the benchmark's labs (10.104.0.0/16), apart from
// the shared e2e lab's and other engineers' labs.
const LabPodNet = 104
