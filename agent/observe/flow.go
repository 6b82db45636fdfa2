package observe

import (
	"net/netip"
	"strings"

	"github.com/ferrymesh/ferry/agent/metrics"
	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// flow turns an ended connection into a flow record. The verdict and the reason
// come from the record's typed outcome; the error text only follows the reason,
// for people to read.
func (o *Observer) flow(c admin.Conn) *ferryv1.Flow {
	return &ferryv1.Flow{
		Time:          timestamppb.New(c.End),
		Node:          o.node,
		Direction:     string(c.Direction),
		Source:        endpoint(c.SrcPod, c.SrcIdentity, c.SrcNode, c.Src),
		Destination:   endpoint(c.DstPod, c.DstIdentity, c.DstNode, c.Dst),
		Verdict:       flowVerdict(c.Verdict),
		Reason:        flowReason(c),
		Security:      string(c.Security),
		Protocol:      "tcp",
		BytesSent:     uint64(max(c.BytesSent, 0)),
		BytesReceived: uint64(max(c.BytesRecv, 0)),
		Duration:      durationpb.New(c.End.Sub(c.Start)),
	}
}

// flowVerdict is the Observer API's name for a verdict: the mesh denying a
// connection is a drop.
func flowVerdict(v admin.Verdict) ferryv1.Verdict {
	switch v {
	case admin.VerdictDenied:
		return ferryv1.Verdict_VERDICT_DROPPED
	case admin.VerdictError:
		return ferryv1.Verdict_VERDICT_ERROR
	}
	return ferryv1.Verdict_VERDICT_FORWARDED
}

// flowReason is the reason, then the error text: "forbidden: refused by
// destination: status 403: target is not this pod".
func flowReason(c admin.Conn) string {
	switch {
	case c.Reason == admin.ReasonNone:
		return c.Error
	case c.Error == "":
		return string(c.Reason)
	}
	return string(c.Reason) + ": " + c.Error
}

func endpoint(pod, identity, node string, ap netip.AddrPort) *ferryv1.Endpoint {
	e := &ferryv1.Endpoint{Identity: identity, Ip: ap.Addr().Unmap().String(), Port: uint32(ap.Port()), Node: node}
	if ns, name, ok := strings.Cut(pod, "/"); ok {
		e.Namespace, e.Pod = ns, name
	} else {
		e.Pod = pod
	}
	return e
}

// connLabels are the Istio labels of a connection: workloads by pod name (there are no
// Deployments to name them by), no addresses or ports.
func connLabels(c admin.Conn, svc service) metrics.Labels {
	l := metrics.Labels{
		DestinationService:       svc.metric,
		Reporter:                 metrics.ReporterSource,
		SourcePrincipal:          c.SrcIdentity,
		DestinationPrincipal:     c.DstIdentity,
		ConnectionSecurityPolicy: metrics.None,
	}
	if c.Direction == admin.Inbound {
		l.Reporter = metrics.ReporterDestination
	}
	if c.Security == admin.MTLS || c.Security == admin.SameNode {
		// Same node: both identities are proven by the listeners the agent owns, so
		// the connection is as authenticated as a mutual-TLS one.
		l.ConnectionSecurityPolicy = metrics.MutualTLS
	}
	if ns, name, ok := strings.Cut(c.SrcPod, "/"); ok {
		l.SourceWorkloadNamespace, l.SourceWorkload = ns, name
	}
	if ns, name, ok := strings.Cut(c.DstPod, "/"); ok {
		l.DestinationWorkloadNamespace, l.DestinationWorkload = ns, name
	}
	return l
}
