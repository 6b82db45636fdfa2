package operator

import (
	"context"
	"errors"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

// The flags' defaults are DefaultConfig's, and flags change only their field.
func TestFlagsDefaults(t *testing.T) {
	cfg := DefaultConfig()
	fs := pflag.NewFlagSet("ferry-operator", pflag.ContinueOnError)
	cfg.Flags(fs)
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cfg, DefaultConfig()) {
		t.Errorf("config after no flags %+v, want DefaultConfig %+v", cfg, DefaultConfig())
	}
	if err := fs.Parse([]string{"--health-addr=", "--lease-duration=1m", "--relay-agent=a", "--relay-agent=b"}); err != nil {
		t.Fatal(err)
	}
	want := DefaultConfig()
	want.HealthAddr, want.LeaseDuration, want.RelayAgents = "", time.Minute, []string{"a", "b"}
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("config after flags %+v, want %+v", cfg, want)
	}
}

// A Config literal gets DefaultConfig's values where zero means nothing, and keeps
// "" where it means off or any.
func TestWithDefaults(t *testing.T) {
	got := Config{GRPCAddr: "unix:///x", CertTTL: time.Hour}.withDefaults()
	d := DefaultConfig()
	want := Config{GRPCAddr: "unix:///x", CertTTL: time.Hour, Namespace: d.Namespace, TrustDomain: d.TrustDomain, CASecret: d.CASecret,
		LeaseDuration: d.LeaseDuration, RenewDeadline: d.RenewDeadline, RetryPeriod: d.RetryPeriod, PollInterval: d.PollInterval, CRDPollInterval: d.CRDPollInterval, ServiceCIDR: d.ServiceCIDR}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("withDefaults = %+v, want %+v", got, want)
	}
}

func TestComponentsOrder(t *testing.T) {
	var log []string
	c := func(name string, startErr error) component {
		return component{name: name,
			start: func(context.Context) error { log = append(log, "start "+name); return startErr },
			stop:  func(context.Context) error { log = append(log, "stop "+name); return nil }}
	}
	started, err := startAll(context.Background(), []component{c("a", nil), c("b", nil), c("c", nil)})
	if err != nil {
		t.Fatal(err)
	}
	if err := stopAll(context.Background(), started); err != nil {
		t.Fatal(err)
	}
	if want := []string{"start a", "start b", "start c", "stop c", "stop b", "stop a"}; !slices.Equal(log, want) {
		t.Errorf("order %v, want %v", log, want)
	}

	log = nil
	boom := errors.New("boom")
	if _, err := startAll(context.Background(), []component{c("a", nil), c("b", nil), c("c", boom), c("d", nil)}); !errors.Is(err, boom) {
		t.Fatalf("start: %v, want boom", err)
	}
	if want := []string{"start a", "start b", "start c", "stop b", "stop a"}; !slices.Equal(log, want) {
		t.Errorf("order after a failed start %v, want %v", log, want)
	}
}

func TestGroupStopWaits(t *testing.T) {
	g := newGroup(context.Background())
	var done bool
	g.run(func(ctx context.Context) {
		<-ctx.Done()
		time.Sleep(10 * time.Millisecond)
		done = true
	})
	if err := g.stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !done {
		t.Error("stop returned before the goroutine ended")
	}

	g = newGroup(context.Background())
	block := make(chan struct{})
	g.run(func(context.Context) { <-block })
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := g.stop(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("stop of a stuck goroutine with an ended context: %v", err)
	}
	close(block)
}

// The path-matching flags become every node's MeshConfig; a choice that is not one
// stops the operator with an error that names the flag's values.
func TestMeshConfigFlags(t *testing.T) {
	cfg := DefaultConfig()
	fs := pflag.NewFlagSet("ferry-operator", pflag.ContinueOnError)
	cfg.Flags(fs)
	if err := fs.Parse([]string{"--escaped-slashes=Decode", "--case-insensitive-paths"}); err != nil {
		t.Fatal(err)
	}
	mc, err := cfg.meshConfig()
	if err != nil || mc.GetEscapedSlashes() != "Decode" || !mc.GetCaseInsensitivePaths() {
		t.Fatalf("mesh config %v, %v", mc, err)
	}
	if mc, err := DefaultConfig().meshConfig(); err != nil || mc.GetEscapedSlashes() != "Keep" || mc.GetCaseInsensitivePaths() {
		t.Fatalf("default mesh config %v, %v", mc, err)
	}
	cfg.EscapedSlashes = "decode"
	_, err = New(cfg, nil)
	if err == nil || err.Error() != `operator config: escaped slashes: "decode" is not Keep, Decode or Reject` {
		t.Fatalf("New with escaped slashes %q: %v", cfg.EscapedSlashes, err)
	}
}
