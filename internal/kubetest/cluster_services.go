// The cluster services a node's pods expect besides kubelet and kube-proxy: the
// "kubernetes" Service's endpoint (in-cluster clients of the API) and DNS names
// for Services.

package kubetest

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/ferrymesh/ferry/lab/dns"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// dnsRefresh is how often the cluster DNS rereads the Services.
const dnsRefresh = 500 * time.Millisecond

// pointKubernetesService gives the "kubernetes" Service the endpoint the API server
// (started with --endpoint-reconciler-type=none) does not write: the forwarders on
// the nodes' addresses. kube-proxy then carries 10.96.0.1:443 to one of them.
func (c *Cluster) pointKubernetesService(ctx context.Context, nodes []*Node) error {
	client, err := kubernetes.NewForConfig(c.RestConfig)
	if err != nil {
		return fmt.Errorf("kubernetes Service: client: %w", err)
	}
	var svc *corev1.Service
	deadline := time.Now().Add(30 * time.Second)
	for {
		svc, err = client.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kubernetes Service: the API server has not made it: %w", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	port := int32(6443) // the forwarders'
	var endpoints []discoveryv1.Endpoint
	for _, n := range nodes {
		endpoints = append(endpoints, discoveryv1.Endpoint{Addresses: []string{n.IP}, Conditions: discoveryv1.EndpointConditions{Ready: new(true)}})
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: "kubernetes", Namespace: "default", Labels: map[string]string{
			discoveryv1.LabelServiceName: svc.Name,
			discoveryv1.LabelManagedBy:   "kubetest",
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   endpoints,
		Ports:       []discoveryv1.EndpointPort{{Name: new(svc.Spec.Ports[0].Name), Port: &port, Protocol: new(corev1.ProtocolTCP)}},
	}
	_, err = client.DiscoveryV1().EndpointSlices("default").Create(ctx, slice, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("kubernetes Service: endpoint slice: %w", err)
	}
	return nil
}

// serveDNS answers NAME.NAMESPACE.svc.ClusterDomain with each Service's cluster
// IPs on each node's address, port 53, inside the node's namespace (kubelet's
// clusterDNS), rereading the Services every dnsRefresh until ctx ends.
func (c *Cluster) serveDNS(ctx context.Context, nodes []*Node) error {
	client, err := kubernetes.NewForConfig(c.RestConfig)
	if err != nil {
		return fmt.Errorf("client: %w", err)
	}
	zone := func() (*dns.Zone, error) {
		list, err := client.CoreV1().Services("").List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, err
		}
		var services []dns.Service
		for _, s := range list.Items {
			svc := dns.Service{Name: s.Name, Namespace: s.Namespace}
			for _, ip := range s.Spec.ClusterIPs {
				if a, err := netip.ParseAddr(ip); err == nil {
					svc.IPs = append(svc.IPs, a)
				}
			}
			if len(svc.IPs) > 0 {
				services = append(services, svc)
			}
		}
		return dns.NewZone(ClusterDomain, services)
	}
	z, err := zone()
	if err != nil {
		return err
	}
	var endpoints []dns.Endpoint
	for _, n := range nodes {
		endpoints = append(endpoints, dns.Endpoint{Netns: n.NetnsPath, Addr: netip.AddrPortFrom(netip.MustParseAddr(n.IP), dns.Port)})
	}
	srv, err := dns.New(dns.Config{Zone: z, Endpoints: endpoints}, nil)
	if err != nil {
		return err
	}
	if err := srv.Start(ctx); err != nil {
		return err
	}
	go func() {
		defer srv.Stop()
		tick := time.NewTicker(dnsRefresh)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			if z, err := zone(); err == nil {
				srv.SetZone(z)
			}
		}
	}()
	return nil
}
