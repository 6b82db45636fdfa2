// Package mesh builds the operator's view of the mesh from Kubernetes informers:
// which pods are enrolled, their SPIFFE identities and addresses, and the services
// that select them. Every agent's NodeState is cut from the same snapshot.
package mesh

import (
	"cmp"
	"context"
	"crypto/sha256"
	"fmt"
	"github.com/ferrymesh/ferry/api/spiffe"
	"github.com/ferrymesh/ferry/api/v1alpha1"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/protobuf/proto"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/informers"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
)

// Snapshot is one version of the mesh, shared read-only by every stream.
type Snapshot struct {
	// Version increases with every change. It is taken from the clock (microseconds)
	// when that is larger than the last version plus one, so versions keep growing
	// across operator restarts and between replicas.
	Version   uint64
	Workloads []*ferryv1.Workload // sorted by namespace/name
	Services  []*ferryv1.Service  // sorted by namespace/name
	// ConfigStatus is what became of every route and policy, sorted by kind and
	// name (NodeState.config_status).
	ConfigStatus []*ferryv1.ConfigStatus
	// Authorization is every AuthorizationPolicy in force that selects a workload,
	// sorted by name (NodeState.authorization).
	Authorization []*ferryv1.AuthorizationPolicy
	// Conflicts are the addresses more than one enrolled pod claims, and what the
	// view did about each (conflicts.go), sorted by address.
	Conflicts []Conflict
	// Built is when the snapshot was computed.
	Built time.Time
}

// View keeps the current Snapshot up to date from the informers.
type View struct {
	trustDomain string
	log         *slog.Logger

	pods       listersv1.PodLister
	namespaces listersv1.NamespaceLister
	services   listersv1.ServiceLister

	dirty chan struct{}

	// Only rebuild uses these: the policy and route notes the last rebuild
	// logged, and the last generation of each route and policy that compiled
	// (kept while the object exists; seenPolicies collects which do).
	logged        map[policyNote]bool
	loggedRoutes  map[routeNote]bool
	goodRoutes    map[configKey]lastGood[*routeSpec]
	goodPolicies  map[configKey]lastGood[*policyResult]
	seenPolicies  map[configKey]bool
	goodAuthz     goodSpecs[*authzSpec]
	goodPeerAuthn goodSpecs[*peerAuthnSpec]
	// withheld are the pods (namespace/name) the last rebuild left out of the mesh
	// for an address conflict; loggedConflicts the conflicts it has logged.
	withheld        map[string]bool
	loggedConflicts map[string]bool

	mu       sync.Mutex
	synced   []cache.InformerSynced
	running  bool                // Run has started waiting for synced
	policies cache.GenericLister // TrafficPolicies; nil until WatchTrafficPolicies
	// HTTPRoutes, GRPCRoutes and ReferenceGrants; nil until watched.
	httpRoutes, grpcRoutes, grants cache.GenericLister
	// authz lists AuthorizationPolicies (nil until watched); a policy in
	// rootNamespace selects across the mesh.
	authz cache.GenericLister
	// peerAuthn lists PeerAuthentications (nil until watched).
	peerAuthn     cache.GenericLister
	rootNamespace string
	snap          *Snapshot
	changed       chan struct{} // closed when snap is replaced
}

// NewView registers the informers it needs with factory; start the factory after.
func NewView(factory informers.SharedInformerFactory, trustDomain string, log *slog.Logger) (*View, error) {
	if trustDomain == "" {
		return nil, fmt.Errorf("mesh view: trust domain is required")
	}
	core := factory.Core().V1()
	v := &View{
		trustDomain:     trustDomain,
		log:             log,
		pods:            core.Pods().Lister(),
		namespaces:      core.Namespaces().Lister(),
		services:        core.Services().Lister(),
		dirty:           make(chan struct{}, 1),
		changed:         make(chan struct{}),
		goodRoutes:      map[configKey]lastGood[*routeSpec]{},
		goodPolicies:    map[configKey]lastGood[*policyResult]{},
		goodAuthz:       newGoodSpecs[*authzSpec](),
		goodPeerAuthn:   newGoodSpecs[*peerAuthnSpec](),
		loggedConflicts: map[string]bool{},
	}
	for _, inf := range []cache.SharedIndexInformer{core.Pods().Informer(), core.Namespaces().Informer(), core.Services().Informer(), core.ServiceAccounts().Informer()} {
		if _, err := inf.AddEventHandler(v.handler()); err != nil {
			return nil, fmt.Errorf("mesh view: %w", err)
		}
		v.synced = append(v.synced, inf.HasSynced)
	}
	return v, nil
}

// handler marks the view dirty on every change of an informer's objects.
func (v *View) handler() cache.ResourceEventHandler {
	return cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { v.markDirty() },
		UpdateFunc: func(any, any) { v.markDirty() },
		DeleteFunc: func(any) { v.markDirty() },
	}
}

func (v *View) markDirty() {
	select {
	case v.dirty <- struct{}{}:
	default:
	}
}

// Run rebuilds the snapshot after the informers have synced and again after every
// change, until ctx ends. Changes that arrive during a rebuild are folded into the
// next one.
func (v *View) Run(ctx context.Context) {
	v.mu.Lock()
	v.running = true
	synced := slices.Clone(v.synced)
	v.mu.Unlock()
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return
	}
	v.rebuild()
	for {
		select {
		case <-ctx.Done():
			return
		case <-v.dirty:
			v.rebuild()
		}
	}
}

// Current returns the latest snapshot (nil until the informers have synced) and a
// channel closed when a newer one replaces it.
func (v *View) Current() (*Snapshot, <-chan struct{}) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.snap, v.changed
}

// HasPod reports whether a running pod with service account sa in namespace ns is
// scheduled on node: the condition for an agent to get that identity.
func (v *View) HasPod(node, ns, sa string) bool {
	pods, err := v.pods.Pods(ns).List(labels.Everything())
	if err != nil {
		return false
	}
	for _, p := range pods {
		if p.Spec.NodeName == node && serviceAccount(p) == sa && !finished(p) {
			return true
		}
	}
	return false
}

func (v *View) rebuild() {
	start := time.Now()
	ws, byNS, conflicts, err := v.workloads()
	if err != nil {
		v.log.Error("mesh view: list pods", "error", err)
		return
	}
	v.logConflicts(conflicts)
	var notes []policyNote
	statuses := conflictStatuses(conflicts)
	v.seenPolicies = map[configKey]bool{}
	svcs, err := v.servicesFor(byNS, &notes, &statuses)
	if err != nil {
		v.log.Error("mesh view: list services", "error", err)
		return
	}
	for k := range v.goodPolicies {
		if !v.seenPolicies[k] {
			delete(v.goodPolicies, k)
		}
	}
	routeStatus, routeNotes, err := v.routes(svcs)
	if err != nil {
		v.log.Error("mesh view: list routes", "error", err)
		return
	}
	statuses = append(statuses, routeStatus...)
	authz, err := v.authorizationPolicies(byNS, &statuses)
	if err != nil {
		v.log.Error("mesh view: list authorization policies", "error", err)
		return
	}
	if err := v.peerAuthentications(byNS, &statuses); err != nil {
		v.log.Error("mesh view: list peer authentications", "error", err)
		return
	}
	slices.SortFunc(statuses, func(a, b *ferryv1.ConfigStatus) int {
		return cmp.Or(strings.Compare(a.Kind, b.Kind), strings.Compare(a.Name, b.Name))
	})
	v.logNotes(notes)
	v.logRoutes(routeNotes)
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.snap != nil && sameList(v.snap.Workloads, ws) && sameList(v.snap.Services, svcs) && sameList(v.snap.ConfigStatus, statuses) && sameList(v.snap.Authorization, authz) && slices.EqualFunc(v.snap.Conflicts, conflicts, Conflict.equal) {
		return
	}
	version := uint64(time.Now().UnixMicro())
	if v.snap != nil && version <= v.snap.Version {
		version = v.snap.Version + 1
	}
	v.snap = &Snapshot{Version: version, Workloads: ws, Services: svcs, ConfigStatus: statuses, Authorization: authz, Conflicts: conflicts, Built: time.Now()}
	close(v.changed)
	v.changed = make(chan struct{})
	v.log.Debug("mesh view rebuilt", "version", version, "workloads", len(ws), "services", len(svcs), "took", time.Since(start))
}

// enrolledPod pairs a workload with its pod's labels, for service selectors.
type enrolledPod struct {
	w      *ferryv1.Workload
	labels labels.Set
}

// workloads are the enrolled pods' mesh entries, by namespace too, less those an
// address conflict withholds (resolveConflicts), and the conflicts.
func (v *View) workloads() ([]*ferryv1.Workload, map[string][]enrolledPod, []Conflict, error) {
	nss, err := v.namespaces.List(labels.SelectorFromSet(labels.Set{v1alpha1.MeshLabel: v1alpha1.MeshEnabled}))
	if err != nil {
		return nil, nil, nil, err
	}
	var all []claimant
	for _, ns := range nss {
		pods, err := v.pods.Pods(ns.Name).List(labels.Everything())
		if err != nil {
			return nil, nil, nil, err
		}
		for _, p := range pods {
			if w := v.workload(p); w != nil {
				all = append(all, claimant{w: w, pod: p})
			}
		}
	}
	conflicts, withheld := resolveConflicts(all)
	v.withheld = withheld
	var out []*ferryv1.Workload
	byNS := map[string][]enrolledPod{}
	for _, c := range all {
		if withheld[c.pod.Namespace+"/"+c.pod.Name] {
			continue
		}
		out = append(out, c.w)
		byNS[c.pod.Namespace] = append(byNS[c.pod.Namespace], enrolledPod{w: c.w, labels: c.pod.Labels})
	}
	slices.SortFunc(out, func(a, b *ferryv1.Workload) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	return out, byNS, conflicts, nil
}

// workload is the mesh entry of an enrolled pod, or nil when the pod is out of the
// mesh: opted out, not scheduled, without an address yet, finished, or on the host
// network (whose address is the node's, which the agent cannot capture per pod).
func (v *View) workload(p *corev1.Pod) *ferryv1.Workload {
	if p.Labels[v1alpha1.MeshLabel] == v1alpha1.MeshDisabled || p.Spec.HostNetwork || p.Spec.NodeName == "" || finished(p) || p.DeletionTimestamp != nil {
		return nil
	}
	ips := podIPs(p)
	if len(ips) == 0 {
		return nil
	}
	uid := string(p.UID)
	if uid == "" {
		uid = StableUID(p.Namespace, p.Name)
	}
	sa := serviceAccount(p)
	return &ferryv1.Workload{
		Uid:            uid,
		Name:           p.Name,
		Namespace:      p.Namespace,
		ServiceAccount: sa,
		Node:           p.Spec.NodeName,
		Ips:            ips,
		Identity:       spiffe.ID(v.trustDomain, p.Namespace, sa),
		Workload:       WorkloadName(p),
	}
}

// WorkloadName is the name metrics give the pod's workload, as Istio's do: its
// controller's name, a Deployment's for a pod of a ReplicaSet that one made (the
// ReplicaSet's name is the Deployment's and the pod-template-hash), or the pod's
// own name when nothing controls it.
func WorkloadName(p *corev1.Pod) string {
	owner := metav1.GetControllerOf(p)
	if owner == nil {
		return p.Name
	}
	if owner.Kind == "ReplicaSet" {
		if hash := p.Labels[appsv1.DefaultDeploymentUniqueLabelKey]; hash != "" {
			if name, ok := strings.CutSuffix(owner.Name, "-"+hash); ok {
				return name
			}
		}
	}
	return owner.Name
}

// servicesFor lists the Services of the enrolled namespaces with the TrafficPolicy
// that applies to each; what users should hear about policies goes to notes, and
// each policy's conditions to statuses.
func (v *View) servicesFor(byNS map[string][]enrolledPod, notes *[]policyNote, statuses *[]*ferryv1.ConfigStatus) ([]*ferryv1.Service, error) {
	var out []*ferryv1.Service
	for ns, pods := range byNS {
		svcs, err := v.services.Services(ns).List(labels.Everything())
		if err != nil {
			return nil, err
		}
		policies, err := v.trafficPolicies(ns, notes, statuses)
		if err != nil {
			return nil, err
		}
		all, err := v.pods.Pods(ns).List(labels.Everything())
		if err != nil {
			return nil, err
		}
		slices.SortFunc(all, func(a, b *corev1.Pod) int { return strings.Compare(a.Name, b.Name) })
		uids := map[string]string{} // pod name → workload UID, for enrolled pods
		for _, p := range pods {
			uids[p.w.Name] = p.w.Uid
		}
		for _, s := range svcs {
			if len(s.Spec.Selector) == 0 {
				continue // endpoints managed by hand; not in the mesh view yet
			}
			sel := labels.SelectorFromSet(s.Spec.Selector)
			fs := &ferryv1.Service{Name: s.Name, Namespace: s.Namespace}
			for _, ip := range s.Spec.ClusterIPs {
				if ip != "" && ip != corev1.ClusterIPNone {
					fs.ClusterIps = append(fs.ClusterIps, ip)
				}
			}
			for _, p := range s.Spec.Ports {
				sp := &ferryv1.ServicePort{Name: p.Name, Port: uint32(p.Port), TargetPort: p.TargetPort.String()}
				if p.AppProtocol != nil {
					sp.AppProtocol = *p.AppProtocol
				}
				fs.Ports = append(fs.Ports, sp)
			}
			for _, p := range pods {
				if sel.Matches(p.labels) {
					fs.Endpoints = append(fs.Endpoints, p.w.Uid)
				}
			}
			slices.Sort(fs.Endpoints)
			for _, p := range all {
				if v.withheld[p.Namespace+"/"+p.Name] {
					continue // its address is another pod's too: it serves nobody
				}
				if sel.Matches(labels.Set(p.Labels)) {
					if b := backend(p, s.Spec.Ports, uids); b != nil {
						fs.Backends = append(fs.Backends, b)
					}
				}
			}
			if tp := policies[s.Name]; tp != nil {
				applyTrafficPolicy(fs, tp, notes)
			}
			out = append(out, fs)
		}
	}
	slices.SortFunc(out, func(a, b *ferryv1.Service) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	return out, nil
}

// backend is a Service's view of one pod its selector matches, or nil when the pod
// cannot serve: not scheduled, without an address, finished or being deleted.
func backend(p *corev1.Pod, ports []corev1.ServicePort, uids map[string]string) *ferryv1.Backend {
	if p.Spec.NodeName == "" || finished(p) || p.DeletionTimestamp != nil {
		return nil
	}
	ips := podIPs(p)
	if len(ips) == 0 {
		return nil
	}
	b := &ferryv1.Backend{Pod: p.Name, Ips: ips, Node: p.Spec.NodeName, Ready: podReady(p), WorkloadUid: uids[p.Name]}
	for _, sp := range ports {
		b.Ports = append(b.Ports, targetPort(p, sp))
	}
	return b
}

// targetPort is the port a Service port reaches on pod p: its targetPort number, the
// container port of that name, or the Service port itself when targetPort is unset;
// 0 when the name is not among p's container ports (the pod does not serve it).
func targetPort(p *corev1.Pod, sp corev1.ServicePort) uint32 {
	switch {
	case sp.TargetPort.Type == intstr.Int && sp.TargetPort.IntVal == 0:
		return uint32(sp.Port)
	case sp.TargetPort.Type == intstr.Int:
		return uint32(sp.TargetPort.IntVal)
	}
	proto := sp.Protocol
	if proto == "" {
		proto = corev1.ProtocolTCP
	}
	for _, c := range p.Spec.Containers {
		for _, cp := range c.Ports {
			cpProto := cp.Protocol
			if cpProto == "" {
				cpProto = corev1.ProtocolTCP
			}
			if cp.Name == sp.TargetPort.StrVal && cpProto == proto {
				return uint32(cp.ContainerPort)
			}
		}
	}
	return 0
}

// podReady says whether the pod's Ready condition is True, as the endpoints
// controller decides which addresses serve.
func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// podIPs are the pod's addresses, normalised; status.podIP when podIPs is empty.
func podIPs(p *corev1.Pod) []string {
	var ips []string
	for _, ip := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			ips = append(ips, a.String())
		}
	}
	if len(ips) == 0 && p.Status.PodIP != "" {
		if a, err := netip.ParseAddr(p.Status.PodIP); err == nil {
			ips = append(ips, a.String())
		}
	}
	return ips
}

func sameList[M proto.Message](a, b []M) bool {
	return slices.EqualFunc(a, b, func(x, y M) bool { return proto.Equal(x, y) })
}

func serviceAccount(p *corev1.Pod) string {
	if p.Spec.ServiceAccountName != "" {
		return p.Spec.ServiceAccountName
	}
	return "default"
}

func finished(p *corev1.Pod) bool {
	return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
}

// StableUID is a UUID-shaped stand-in for a pod without a UID (local manifests).
func StableUID(ns, name string) string {
	h := sha256.Sum256([]byte(ns + "/" + name))
	h[6] = h[6]&0x0f | 0x50
	h[8] = h[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", h[0:4], h[4:6], h[6:8], h[8:10], h[10:16])
}
