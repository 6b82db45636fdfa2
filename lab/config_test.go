package lab

import (
	"net/netip"
	"os"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseNodeFlag(t *testing.T) {
	got, err := ParseNodeFlag("n1=shop/web,legacy:out,,shop/api@api-sa")
	if err != nil {
		t.Fatal(err)
	}
	want := NodeConfig{Name: "n1", Pods: []PodConfig{
		{Name: "web", Namespace: "shop", Enrolled: true},
		{Name: "legacy"},
		{Name: "api", Namespace: "shop", ServiceAccount: "api-sa", Enrolled: true},
	}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
	for _, bad := range []string{"n1", "=a", "n1=shop/", "n1=@sa"} {
		if _, err := ParseNodeFlag(bad); err == nil {
			t.Errorf("ParseNodeFlag(%q) passed", bad)
		}
	}
}

// Service ports say their name, appProtocol and load balancer, and a bad value is
// refused with the field and what is wanted.
func TestServiceConfigValidation(t *testing.T) {
	base := func(sv ServiceConfig, operator bool) Config {
		c := DefaultConfig()
		sv.Name, sv.ClusterIP, sv.Port = "web", netip.MustParseAddr("10.96.0.50"), 80
		c.Services = []ServiceConfig{sv}
		if operator {
			c.Operator.Binary = "/bin/true"
		}
		return c
	}
	good, err := base(ServiceConfig{PortName: "http-web", AppProtocol: "kubernetes.io/h2c", LoadBalancer: "RoundRobin", Pods: []string{"b", "c"}}, false).withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if sv := good.Services[0]; sv.TargetPort != 80 || sv.Namespace != "default" {
		t.Errorf("defaults: %+v", sv)
	}
	for _, tc := range []struct {
		sv       ServiceConfig
		operator bool
		want     string
	}{
		{ServiceConfig{PortName: "HTTP"}, false, `portName "HTTP"`},
		{ServiceConfig{PortName: "http-a-very-long-name"}, false, `portName "http-a-very-long-name"`},
		{ServiceConfig{PortName: "80"}, false, `portName "80"`},
		{ServiceConfig{AppProtocol: "h2"}, false, `appProtocol "h2": want one of http, http2, grpc`},
		{ServiceConfig{LoadBalancer: "Fastest"}, true, `loadBalancer "Fastest"`},
		{ServiceConfig{LoadBalancer: "RingHash"}, false, `loadBalancer "RingHash"`},
	} {
		_, err := base(tc.sv, tc.operator).withDefaults()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: error %v, want one saying %q", tc.sv, err, tc.want)
		}
	}
}

// A descriptor this process inherited (as a command run by flock(1) inherits its
// lock) is not passed on to the processes the lab starts.
func TestChildrenInheritNothing(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	// Clear close-on-exec, as an inherited descriptor has it cleared.
	if _, err := unix.FcntlInt(w.Fd(), unix.F_SETFD, 0); err != nil {
		t.Fatal(err)
	}
	childrenInheritNothing()
	flags, err := unix.FcntlInt(w.Fd(), unix.F_GETFD, 0)
	if err != nil {
		t.Fatal(err)
	}
	if flags&unix.FD_CLOEXEC == 0 {
		t.Error("an inherited descriptor would pass to the lab's processes")
	}
}
