package observe

import (
	"cmp"
	"net/netip"
	"strconv"
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
	f := &ferryv1.Flow{
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
		Policy:        c.Policy,
		CertExpiring:  c.CertExpiring,
	}
	if !c.CertNotAfter.IsZero() {
		f.CertNotAfter = timestamppb.New(c.CertNotAfter)
	}
	return f
}

// requestFlow turns a request the proxy carried at L7 (c.HTTP set) into a flow: the
// connection's fields, with the request's bounds as its time and duration and its
// bodies as its bytes, and the HTTP fields.
func (o *Observer) requestFlow(c admin.Conn) *ferryv1.Flow {
	f := o.flow(c)
	h := c.HTTP
	f.Protocol = requestProtocol(c)
	f.Http = &ferryv1.HTTP{
		Method: h.Method, Path: h.Path, Status: uint32(max(h.Status, 0)), Authority: h.Authority,
		Version: h.Proto, GrpcStatus: h.GRPCStatus, TraceId: h.TraceID,
		Route: h.Route, RouteRule: uint32(max(h.RouteRule, 0)), Retries: uint32(max(h.Retries, 0)),
	}
	if h.FaultDelay > 0 {
		f.Http.FaultDelay = durationpb.New(h.FaultDelay)
	}
	return f
}

// requestProtocol is a request's protocol in flows and in request_protocol: "grpc"
// for a gRPC call, else "http" (HTTP/1.x and HTTP/2 alike, as Istio counts them).
func requestProtocol(c admin.Conn) string {
	if c.Protocol == admin.GRPC || (c.HTTP != nil && c.HTTP.GRPCStatus != "") {
		return metrics.ProtocolGRPC
	}
	return metrics.ProtocolHTTP
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

// reporters are the sides a record is counted for in the metrics. A connection that
// crosses nodes is recorded by both agents, each for its own side; one between two
// pods of the same node passes one proxy only, which stands for both sides, so it is
// counted once as the source's and once as the destination's, as two sidecars (or
// ztunnel) would count it: dashboards written for Istio, which count requests by
// reporter="destination", see same-node traffic too.
func reporters(c admin.Conn) []string {
	switch {
	case c.Security == admin.SameNode:
		return []string{metrics.ReporterSource, metrics.ReporterDestination}
	case c.Direction == admin.Inbound:
		return []string{metrics.ReporterDestination}
	}
	return []string{metrics.ReporterSource}
}

// connLabels are the Istio labels of a connection: workloads by the names the
// operator gives them (a Deployment's, a Job's, ... or the pod's), no addresses or
// ports.
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
	if ns, name, ok := strings.Cut(cmp.Or(c.SrcWorkload, c.SrcPod), "/"); ok {
		l.SourceWorkloadNamespace, l.SourceWorkload = ns, name
	}
	if ns, name, ok := strings.Cut(cmp.Or(c.DstWorkload, c.DstPod), "/"); ok {
		l.DestinationWorkloadNamespace, l.DestinationWorkload = ns, name
	}
	return l
}

// requestLabels are a request's Istio labels: its connection's (connLabels, the one
// helper both kinds of metrics use) and the request's own. Every value is bounded:
// a status outside 100-999 is "0", a gRPC status that is not a code is "unknown".
func requestLabels(c admin.Conn, svc service) metrics.RequestLabels {
	l := metrics.RequestLabels{
		Labels:                      connLabels(c, svc),
		DestinationServiceName:      svc.name,
		DestinationServiceNamespace: svc.namespace,
		RequestProtocol:             requestProtocol(c),
		ResponseCode:                "0",
		ResponseFlags:               responseFlags(c),
	}
	// Istio's canonical service falls back to the workload's name when the pod has no
	// app labels; the state carries no pod labels, so app and version stay unknown.
	l.SourceCanonicalService = l.SourceWorkload
	if h := c.HTTP; h != nil {
		if h.Status >= 100 && h.Status <= 999 {
			l.ResponseCode = strconv.Itoa(h.Status)
		}
		l.Route = h.Route
		if g := h.GRPCStatus; g != "" {
			l.GRPCResponseStatus = metrics.Unknown
			if n, err := strconv.ParseUint(g, 10, 8); err == nil && n <= 16 {
				l.GRPCResponseStatus = strconv.FormatUint(n, 10)
			}
		}
	}
	return l
}

// responseFlags are Envoy's response flags for what the mesh did to a request, so
// queries written for Istio (response_flags="UH") find the same requests. A request
// fault injection delayed is DI whatever came after; with another flag Envoy joins
// them with commas in its own order, where DI follows UH, UT, UF, UC, UO and NR and
// precedes FI, RL, DC and URX: "DI,FI" for a request delayed and then aborted.
func responseFlags(c admin.Conn) string {
	flag := reasonFlag(c)
	if c.HTTP == nil || c.HTTP.FaultDelay <= 0 {
		return flag
	}
	switch flag {
	case metrics.NoFlags:
		return "DI"
	case "FI", "RL", "DC", "URX", "RBAC":
		return "DI," + flag
	}
	return flag + ",DI"
}

// reasonFlag is the Envoy flag for why the request ended as it did. A request the
// mesh retried whose last try still failed is URX, as Envoy flags a request whose
// retries ran out (or that the retry budget stopped) with a failure.
func reasonFlag(c admin.Conn) string {
	switch c.Reason {
	case admin.ReasonFault:
		return "FI" // fault injection abort
	case admin.ReasonCircuitOpen:
		return "UO" // upstream overflow: a connection pool limit
	case admin.ReasonRateLimited:
		return "RL" // rate limited
	case admin.ReasonNoRoute:
		return "NR" // no route
	case admin.ReasonNoEndpoints:
		return "UH" // no healthy upstream
	case admin.ReasonRefused, admin.ReasonUnreachable, admin.ReasonTunnel:
		return "UF" // upstream connection failure
	case admin.ReasonTimeout:
		return "UT" // upstream request timeout
	case admin.ReasonReset:
		return "UC" // upstream connection termination
	case admin.ReasonCanceled:
		return "DC" // downstream connection termination
	case admin.ReasonForbidden:
		return "RBAC" // denied by authorization policy
	case admin.ReasonNone:
		if h := c.HTTP; h != nil && h.Retries > 0 && h.Status >= 500 {
			return "URX" // upstream retry limit exceeded
		}
	}
	return metrics.NoFlags
}
