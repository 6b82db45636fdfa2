// Package local feeds Kubernetes manifests from a folder into an in-memory
// clientset, so that the operator's informers, views and servers run unchanged with
// no cluster (local mode: the lab and the demo).
package local

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/ferrymesh/ferry/api/v1alpha1"
	"github.com/ferrymesh/ferry/operator/mesh"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/dynamic"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// ManifestError is one manifest document that could not be loaded.
type ManifestError struct {
	File     string // path relative to the folder
	Document int    // 1-based position in the file
	Object   string // "Kind namespace/name" when known
	Field    string // JSON path of the offending field, when known
	Err      error
}

func (e *ManifestError) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Document > 0 {
		fmt.Fprintf(&b, ": document %d", e.Document)
	}
	if e.Object != "" {
		fmt.Fprintf(&b, " (%s)", e.Object)
	}
	if e.Field != "" {
		fmt.Fprintf(&b, ": field %s", e.Field)
	}
	fmt.Fprintf(&b, ": %v", e.Err)
	return b.String()
}

func (e *ManifestError) Unwrap() error { return e.Err }

// key identifies an object across files.
type key struct {
	kind, namespace, name string
}

// Loader keeps the clientset equal to the manifests in a folder.
type Loader struct {
	dir    string
	client kubernetes.Interface
	// policies holds Ferry's custom resources (SetPolicyClient).
	policies dynamic.Interface
	log      *slog.Logger
	// onNodes is told the node names the manifests mention after each load.
	onNodes func([]string)

	mu      sync.Mutex
	files   map[string]fileState // last good objects per file
	applied map[key]any          // what the clientset holds
	errs    []*ManifestError     // from the last load
	stamp   string               // folder listing with sizes and mtimes
	// serviceCIDR is where Services without a spec.clusterIP get one, and allocated
	// what each got (clusterip.go).
	serviceCIDR netip.Prefix
	allocated   map[key]netip.Addr
	// created is when each pod, policy or route was first applied: its
	// creationTimestamp, as an API server sets it, unless the manifest sets one.
	// The oldest of two policies on one Service wins, and route precedence uses it.
	created map[key]metav1.Time
	// generation counts each custom object's versions from 1, as an API server
	// does, so ConfigStatus can say which version is in force.
	generation map[key]int64
}

type fileState struct {
	objects map[key]any
}

// NewLoader validates the folder; Load or Start reads it.
func NewLoader(dir string, client kubernetes.Interface, onNodes func([]string), log *slog.Logger) (*Loader, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("manifests folder: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("manifests folder %s: not a folder", dir)
	}
	return &Loader{dir: dir, client: client, log: log, onNodes: onNodes, files: map[string]fileState{}, applied: map[key]any{},
		serviceCIDR: netip.MustParsePrefix(DefaultServiceCIDR), created: map[key]metav1.Time{}, generation: map[key]int64{}}, nil
}

// NewPolicyClient is an in-memory client for the custom resources local mode
// reads (Ferry's AuthorizationPolicy, PeerAuthentication and TrafficPolicy, Gateway API's HTTPRoute, GRPCRoute and
// ReferenceGrant), to hand to SetPolicyClient and to the informers that read them.
func NewPolicyClient() dynamic.Interface {
	kinds := map[schema.GroupVersionResource]string{}
	for _, c := range customKinds {
		kinds[c.resource()] = c.kind + "List"
	}
	return dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), kinds)
}

// customKind is a custom resource local mode stores in the policy client.
type customKind struct {
	kind     string
	resource func() schema.GroupVersionResource
	// apiVersions the manifests may use; all are stored as the resource's.
	apiVersions []string
	new         func() metav1.Object
}

var customKinds = []customKind{
	{"AuthorizationPolicy", mesh.AuthorizationPolicyResource, []string{v1alpha1.GroupVersion().String()}, func() metav1.Object { return &v1alpha1.AuthorizationPolicy{} }},
	{"PeerAuthentication", mesh.PeerAuthenticationResource, []string{v1alpha1.GroupVersion().String()}, func() metav1.Object { return &v1alpha1.PeerAuthentication{} }},
	{"TrafficPolicy", mesh.TrafficPolicyResource, []string{v1alpha1.GroupVersion().String()}, func() metav1.Object { return &v1alpha1.TrafficPolicy{} }},
	{"ReferenceGrant", mesh.ReferenceGrantResource, []string{gatewayv1beta1.GroupVersion.String(), gatewayv1.GroupVersion.String()}, func() metav1.Object { return &gatewayv1beta1.ReferenceGrant{} }},
	{"HTTPRoute", mesh.HTTPRouteResource, []string{gatewayv1.GroupVersion.String()}, func() metav1.Object { return &gatewayv1.HTTPRoute{} }},
	{"GRPCRoute", mesh.GRPCRouteResource, []string{gatewayv1.GroupVersion.String()}, func() metav1.Object { return &gatewayv1.GRPCRoute{} }},
}

func custom(kind string) (customKind, bool) {
	i := slices.IndexFunc(customKinds, func(c customKind) bool { return c.kind == kind })
	if i < 0 {
		return customKind{}, false
	}
	return customKinds[i], true
}

// SetPolicyClient makes the loader apply the TrafficPolicies and Gateway API
// routes of the folder to d (call before Load); without it they are reported as
// not loaded.
func (l *Loader) SetPolicyClient(d dynamic.Interface) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.policies = d
}

// Errors returns the manifest errors of the last load.
func (l *Loader) Errors() []*ManifestError {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.errs)
}

// Load reads the folder once and makes the clientset match it. A file with an error
// keeps contributing the objects of its last good version; every other file is
// applied as it is now.
func (l *Loader) Load(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	stamp, paths, err := l.scan()
	if err != nil {
		return err
	}
	l.stamp = stamp
	var errs []*ManifestError
	seen := map[string]bool{}
	for _, p := range paths {
		rel, _ := filepath.Rel(l.dir, p)
		seen[rel] = true
		objs, ferrs := parseFile(p, rel)
		if len(ferrs) > 0 {
			errs = append(errs, ferrs...)
			continue
		}
		l.files[rel] = fileState{objects: objs}
	}
	for rel := range l.files {
		if !seen[rel] {
			delete(l.files, rel)
		}
	}
	want := map[key]any{}
	owner := map[key]string{}
	for _, rel := range sortedKeys(l.files) {
		for k, o := range l.files[rel].objects {
			if other, dup := owner[k]; dup {
				errs = append(errs, &ManifestError{File: rel, Object: describe(k), Err: fmt.Errorf("also defined in %s; that one is used", other)})
				continue
			}
			owner[k] = rel
			want[k] = o
		}
	}
	errs = append(errs, l.assignClusterIPs(want, owner)...)
	for _, e := range errs {
		l.log.Error("manifest not loaded; serving its last good version", "file", e.File, "document", e.Document, "object", e.Object, "field", e.Field, "error", e.Err)
	}
	l.errs = errs
	applyErr := l.apply(ctx, want)
	if l.onNodes != nil {
		l.onNodes(nodeNames(want))
	}
	return applyErr
}

// Start loads the folder again whenever a file in it changes (polled every
// interval), until ctx ends. Call Load once before.
func (l *Loader) Start(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		l.mu.Lock()
		stamp, _, err := l.scan()
		changed := err == nil && stamp != l.stamp
		l.mu.Unlock()
		if err != nil {
			l.log.Error("manifests folder", "error", err)
			continue
		}
		if changed {
			if err := l.Load(ctx); err != nil {
				l.log.Error("apply manifests", "error", err)
			}
		}
	}
}

// scan lists the manifest files (.yaml, .yml, .json; dot files and folders
// skipped) and a stamp that changes when any of them does.
func (l *Loader) scan() (string, []string, error) {
	var paths []string
	var stamp strings.Builder
	err := filepath.WalkDir(l.dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if strings.HasPrefix(d.Name(), ".") && p != l.dir {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if d.IsDir() {
			return nil
		}
		switch filepath.Ext(p) {
		case ".yaml", ".yml", ".json":
		default:
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		paths = append(paths, p)
		fmt.Fprintf(&stamp, "%s %d %d\n", p, fi.Size(), fi.ModTime().UnixNano())
		return nil
	})
	if err != nil {
		return "", nil, fmt.Errorf("scan manifests: %w", err)
	}
	return stamp.String(), paths, nil
}

// apply makes the clientset hold exactly want: namespaces and service accounts
// before the pods that need them, pods before the namespaces they live in go away.
func (l *Loader) apply(ctx context.Context, want map[key]any) error {
	var errs []error
	order := func(k key) int {
		return slices.Index([]string{"Namespace", "Node", "ServiceAccount", "Service", "Pod", "AuthorizationPolicy", "PeerAuthentication", "TrafficPolicy", "ReferenceGrant", "HTTPRoute", "GRPCRoute"}, k.kind)
	}
	var keys []key
	for k := range want {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if oi, oj := order(keys[i]), order(keys[j]); oi != oj {
			return oi < oj
		}
		return describe(keys[i]) < describe(keys[j])
	})
	for _, k := range keys {
		o := want[k]
		old, exists := l.applied[k]
		if exists && reflect.DeepEqual(old, o) {
			continue
		}
		if err := l.put(ctx, k, o, exists); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", describe(k), err))
			continue
		}
		l.applied[k] = o
	}
	var gone []key
	for k := range l.applied {
		if _, ok := want[k]; !ok {
			gone = append(gone, k)
		}
	}
	sort.Slice(gone, func(i, j int) bool { return order(gone[i]) > order(gone[j]) })
	for _, k := range gone {
		if err := l.remove(ctx, k); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", describe(k), err))
			continue
		}
		delete(l.applied, k)
	}
	return errors.Join(errs...)
}

func (l *Loader) put(ctx context.Context, k key, o any, exists bool) error {
	core := l.client.CoreV1()
	var err error
	switch obj := o.(type) {
	case *corev1.Namespace:
		c := obj.DeepCopy()
		if exists {
			_, err = core.Namespaces().Update(ctx, c, metav1.UpdateOptions{})
		} else {
			_, err = core.Namespaces().Create(ctx, c, metav1.CreateOptions{})
		}
	case *corev1.Node:
		c := obj.DeepCopy()
		if exists {
			_, err = core.Nodes().Update(ctx, c, metav1.UpdateOptions{})
		} else {
			_, err = core.Nodes().Create(ctx, c, metav1.CreateOptions{})
		}
	case *corev1.ServiceAccount:
		c := obj.DeepCopy()
		if exists {
			_, err = core.ServiceAccounts(k.namespace).Update(ctx, c, metav1.UpdateOptions{})
		} else {
			_, err = core.ServiceAccounts(k.namespace).Create(ctx, c, metav1.CreateOptions{})
		}
	case *corev1.Service:
		c := obj.DeepCopy()
		if exists {
			_, err = core.Services(k.namespace).Update(ctx, c, metav1.UpdateOptions{})
		} else {
			_, err = core.Services(k.namespace).Create(ctx, c, metav1.CreateOptions{})
		}
	case *corev1.Pod:
		c := obj.DeepCopy()
		if c.CreationTimestamp.IsZero() {
			// As an API server would: the mesh view tells a stale pod from the live
			// one claiming its address by creation time.
			if _, ok := l.created[k]; !ok {
				l.created[k] = metav1.Now()
			}
			c.CreationTimestamp = l.created[k]
		}
		if exists {
			_, err = core.Pods(k.namespace).Update(ctx, c, metav1.UpdateOptions{})
		} else {
			_, err = core.Pods(k.namespace).Create(ctx, c, metav1.CreateOptions{})
		}
	case *v1alpha1.AuthorizationPolicy, *v1alpha1.PeerAuthentication, *v1alpha1.TrafficPolicy, *gatewayv1beta1.ReferenceGrant, *gatewayv1.HTTPRoute, *gatewayv1.GRPCRoute:
		err = l.putCustom(ctx, k, obj.(runtime.Object), exists)
	default:
		err = fmt.Errorf("kind %T not supported", o)
	}
	return err
}

// putCustom stores a TrafficPolicy or Gateway API object as the API server
// would: unstructured, with its creationTimestamp kept from its first version and
// its generation counted.
func (l *Loader) putCustom(ctx context.Context, k key, o runtime.Object, exists bool) error {
	if l.policies == nil {
		return errors.New("local mode has no client for custom resources")
	}
	ck, _ := custom(k.kind)
	u, err := toUnstructured(o.DeepCopyObject(), ck)
	if err != nil {
		return fmt.Errorf("convert: %w", err)
	}
	u.SetAPIVersion(ck.resource().GroupVersion().String())
	u.SetKind(ck.kind)
	if ts := u.GetCreationTimestamp(); ts.IsZero() {
		if _, ok := l.created[k]; !ok {
			l.created[k] = metav1.Now()
		}
		u.SetCreationTimestamp(l.created[k])
	}
	l.generation[k]++
	u.SetGeneration(l.generation[k])
	res := l.policies.Resource(ck.resource()).Namespace(k.namespace)
	if exists {
		_, err = res.Update(ctx, u, metav1.UpdateOptions{})
	} else {
		_, err = res.Create(ctx, u, metav1.CreateOptions{})
	}
	return err
}

// toUnstructured converts a custom resource for the policy client. Through JSON:
// the unstructured converter cannot write maps with number keys
// (PeerAuthentication's portLevelMtls), which JSON carries as strings.
func toUnstructured(o runtime.Object, ck customKind) (*unstructured.Unstructured, error) {
	b, err := json.Marshal(o)
	if err != nil {
		return nil, err
	}
	m := map[string]any{}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	m["apiVersion"], m["kind"] = ck.resource().GroupVersion().String(), ck.kind
	b, err = json.Marshal(m)
	if err != nil {
		return nil, err
	}
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(b); err != nil {
		return nil, err
	}
	return u, nil
}

func (l *Loader) remove(ctx context.Context, k key) error {
	core := l.client.CoreV1()
	switch k.kind {
	case "Namespace":
		return core.Namespaces().Delete(ctx, k.name, metav1.DeleteOptions{})
	case "Node":
		return core.Nodes().Delete(ctx, k.name, metav1.DeleteOptions{})
	case "ServiceAccount":
		return core.ServiceAccounts(k.namespace).Delete(ctx, k.name, metav1.DeleteOptions{})
	case "Service":
		return core.Services(k.namespace).Delete(ctx, k.name, metav1.DeleteOptions{})
	case "Pod":
		return core.Pods(k.namespace).Delete(ctx, k.name, metav1.DeleteOptions{})
	}
	if ck, ok := custom(k.kind); ok {
		if err := l.policies.Resource(ck.resource()).Namespace(k.namespace).Delete(ctx, k.name, metav1.DeleteOptions{}); err != nil {
			return err
		}
		delete(l.created, k)
		delete(l.generation, k)
		return nil
	}
	return fmt.Errorf("kind %s not supported", k.kind)
}

// parseFile reads every document of one file. Any error makes the whole file
// count as not loaded, so a half-edited file never half-applies.
func parseFile(path, rel string) (map[key]any, []*ManifestError) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, []*ManifestError{{File: rel, Err: err}}
	}
	out := map[key]any{}
	var errs []*ManifestError
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for doc := 1; ; doc++ {
		raw, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			errs = append(errs, &ManifestError{File: rel, Document: doc, Err: err})
			break
		}
		if len(bytes.TrimSpace(stripComments(raw))) == 0 {
			doc--
			continue
		}
		k, obj, merr := parseDoc(raw)
		if merr != nil {
			merr.File, merr.Document = rel, doc
			errs = append(errs, merr)
			continue
		}
		if obj == nil {
			continue // a kind local mode does not read
		}
		if _, ok := custom(k.kind); ok {
			// Routes and policies say where they came from in their status and
			// the operator's log.
			mo := obj.(metav1.Object)
			mo.SetAnnotations(withAnnotation(mo.GetAnnotations(), mesh.FileAnnotation, rel))
		}
		if _, dup := out[k]; dup {
			errs = append(errs, &ManifestError{File: rel, Document: doc, Object: describe(k), Err: errors.New("defined twice in this file")})
			continue
		}
		out[k] = obj
	}
	return out, errs
}

func withAnnotation(a map[string]string, k, v string) map[string]string {
	out := make(map[string]string, len(a)+1)
	for ak, av := range a {
		out[ak] = av
	}
	out[k] = v
	return out
}

func stripComments(b []byte) []byte {
	var out []byte
	for _, line := range bytes.Split(b, []byte("\n")) {
		if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' {
			out = append(out, line...)
			out = append(out, '\n')
		}
	}
	return out
}

// readKind says whether local mode reads a kind: core v1 kinds the mesh view
// watches, Ferry's AuthorizationPolicy, PeerAuthentication and TrafficPolicy, Gateway API's routes and ReferenceGrant;
// other objects are skipped.
func readKind(tm metav1.TypeMeta) bool {
	if tm.APIVersion == "v1" {
		switch tm.Kind {
		case "Namespace", "Node", "Pod", "Service", "ServiceAccount":
			return true
		}
		return false
	}
	ck, ok := custom(tm.Kind)
	return ok && slices.Contains(ck.apiVersions, tm.APIVersion)
}

// parseDoc decodes one document; a nil object with no error is a kind local mode
// skips.
func parseDoc(raw []byte) (key, any, *ManifestError) {
	js, err := yaml.YAMLToJSON(raw)
	if err != nil {
		return key{}, nil, &ManifestError{Err: err}
	}
	var tm metav1.TypeMeta
	if err := sigsjson.UnmarshalCaseSensitivePreserveInts(js, &tm); err != nil {
		return key{}, nil, &ManifestError{Err: err}
	}
	if tm.Kind == "" {
		return key{}, nil, &ManifestError{Field: "kind", Err: errors.New("required")}
	}
	if tm.APIVersion == "" {
		return key{}, nil, &ManifestError{Field: "apiVersion", Err: errors.New("required")}
	}
	if !readKind(tm) {
		// Deployments, ConfigMaps and the like may share the folder; the mesh does
		// not read them in local mode.
		return key{kind: tm.Kind}, nil, nil
	}
	var obj interface {
		GetName() string
		GetNamespace() string
		SetNamespace(string)
	}
	namespaced := true
	switch tm.Kind {
	case "Namespace":
		obj, namespaced = &corev1.Namespace{}, false
	case "Node":
		obj, namespaced = &corev1.Node{}, false
	case "Pod":
		obj = &corev1.Pod{}
	case "Service":
		obj = &corev1.Service{}
	case "ServiceAccount":
		obj = &corev1.ServiceAccount{}
	default:
		ck, _ := custom(tm.Kind)
		obj = ck.new()
	}
	strict, err := sigsjson.UnmarshalStrict(js, obj)
	if err != nil {
		return key{}, nil, &ManifestError{Field: fieldOf(err), Err: err}
	}
	if len(strict) > 0 {
		return key{}, nil, &ManifestError{Field: fieldOf(strict[0]), Err: strict[0]}
	}
	if obj.GetName() == "" {
		return key{}, nil, &ManifestError{Object: tm.Kind, Field: "metadata.name", Err: errors.New("required")}
	}
	if namespaced && obj.GetNamespace() == "" {
		obj.SetNamespace(metav1.NamespaceDefault)
	}
	if !namespaced {
		obj.SetNamespace("")
	}
	k := key{kind: tm.Kind, namespace: obj.GetNamespace(), name: obj.GetName()}
	if p, ok := obj.(*corev1.Pod); ok {
		if merr := checkPod(p); merr != nil {
			merr.Object = describe(k)
			return key{}, nil, merr
		}
	}
	return k, obj, nil
}

// checkPod checks what the mesh reads from a pod that the API server would have
// validated in a cluster, and fills what a cluster would have filled.
func checkPod(p *corev1.Pod) *ManifestError {
	if p.Status.PodIP != "" {
		if _, err := netip.ParseAddr(p.Status.PodIP); err != nil {
			return &ManifestError{Field: "status.podIP", Err: fmt.Errorf("%q is not an IP address", p.Status.PodIP)}
		}
	}
	for i, ip := range p.Status.PodIPs {
		if _, err := netip.ParseAddr(ip.IP); err != nil {
			return &ManifestError{Field: fmt.Sprintf("status.podIPs[%d].ip", i), Err: fmt.Errorf("%q is not an IP address", ip.IP)}
		}
	}
	if p.UID == "" {
		p.UID = types.UID(mesh.StableUID(p.Namespace, p.Name))
	}
	if p.Status.Phase == "" && p.Spec.NodeName != "" {
		p.Status.Phase = corev1.PodRunning
	}
	// A running pod that says nothing of readiness is Ready, as kubelet reports a
	// pod without probes; a manifest can set the condition to False.
	if p.Status.Phase == corev1.PodRunning && !slices.ContainsFunc(p.Status.Conditions, func(c corev1.PodCondition) bool { return c.Type == corev1.PodReady }) {
		p.Status.Conditions = append(p.Status.Conditions, corev1.PodCondition{Type: corev1.PodReady, Status: corev1.ConditionTrue})
	}
	return nil
}

// fieldOf pulls the field path out of a JSON decoding error.
func fieldOf(err error) string {
	s := err.Error()
	if i := strings.Index(s, "unknown field \""); i >= 0 {
		rest := s[i+len("unknown field \""):]
		if j := strings.IndexByte(rest, '"'); j >= 0 {
			return rest[:j]
		}
	}
	if i := strings.Index(s, "Go struct field "); i >= 0 {
		rest := s[i+len("Go struct field "):]
		if j := strings.IndexByte(rest, ' '); j >= 0 {
			rest = rest[:j]
		}
		// "PodSpec.spec.nodeName": drop the Go type name.
		if j := strings.IndexByte(rest, '.'); j >= 0 {
			return rest[j+1:]
		}
		return rest
	}
	return ""
}

func describe(k key) string {
	if k.namespace == "" {
		return k.kind + " " + k.name
	}
	return k.kind + " " + k.namespace + "/" + k.name
}

func nodeNames(objs map[key]any) []string {
	set := map[string]bool{}
	for k, o := range objs {
		switch k.kind {
		case "Node":
			set[k.name] = true
		case "Pod":
			if n := o.(*corev1.Pod).Spec.NodeName; n != "" {
				set[n] = true
			}
		}
	}
	var out []string
	for n := range set {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
