package operator

import (
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/api/mesh"
	"github.com/ferrymesh/ferry/internal/observertls"
	"github.com/ferrymesh/ferry/operator/ca"
	"github.com/ferrymesh/ferry/operator/local"
	"github.com/spf13/pflag"
)

// Config configures an Operator. Addresses are host:port or unix:///path; an empty
// address disables that listener. DefaultConfig holds every default, and Flags
// registers the flags of ferry-operator over it.
type Config struct {
	Kubeconfig string // "" means in-cluster
	// Local is a folder of manifests to serve instead of a cluster.
	Local string
	// StateDir keeps local mode's CA and node tokens.
	StateDir     string
	Namespace    string
	GRPCAddr     string
	HealthAddr   string
	MetricsAddr  string
	TrustDomain  string
	CASecret     string
	UserCASecret string
	CertTTL      time.Duration
	// AgentServiceAccount is the service account (in Namespace) whose tokens
	// agents present; "" accepts any pod-bound token.
	AgentServiceAccount string
	// ServingNames are extra DNS names of the gRPC serving certificate.
	ServingNames []string

	LeaderElect   bool
	LeaseDuration time.Duration
	RenewDeadline time.Duration
	RetryPeriod   time.Duration
	// Identity names this replica in the Lease; default hostname plus a random suffix.
	Identity string
	// PollInterval is how often local mode looks for changed manifests.
	PollInterval time.Duration
	// CRDPollInterval is how often, in a cluster without Ferry's TrafficPolicy
	// CRD, the operator looks for it again.
	CRDPollInterval time.Duration
	// ServiceCIDR is where local mode allocates cluster IPs for Services that set
	// none, as the API server's --service-cluster-ip-range.
	ServiceCIDR netip.Prefix

	// RelayAddr serves the cluster-wide flow relay (Observer API); "" turns it off.
	RelayAddr string
	// RelayAgents are Observer addresses of agents the relay always reads
	// ("unix:///path" or host:port), e.g. the lab's agents in local mode.
	RelayAgents []string
	// RelayAgentPort, when set, makes the relay read every running agent pod at
	// its IP and this port (the agents' --observer-addr).
	RelayAgentPort int

	// EscapedSlashes and CaseInsensitivePaths are how every node proxy matches
	// request paths (MeshConfig): what an encoded slash or backslash in a path
	// becomes ("" or Keep, Decode, Reject), and whether AuthorizationPolicy paths
	// match whatever their case. In both local mode and a cluster.
	EscapedSlashes       string
	CaseInsensitivePaths bool
	// RelayTLS is the relay's mutual TLS with the mesh CA: required to serve it on
	// TCP and to read agents on TCP (the Observer API on TCP is mTLS only).
	RelayTLS observertls.Files
}

// DefaultConfig is the configuration of a ferry-operator started without flags.
func DefaultConfig() Config {
	return Config{
		StateDir:            "/var/lib/ferry-operator",
		Namespace:           "ferry-system",
		GRPCAddr:            ":15012",
		HealthAddr:          ":15021",
		MetricsAddr:         ":15014",
		TrustDomain:         "cluster.local",
		CASecret:            "ferry-ca",
		CertTTL:             ca.DefaultTTL,
		AgentServiceAccount: DefaultAgentSA,
		LeaseDuration:       15 * time.Second,
		RenewDeadline:       10 * time.Second,
		RetryPeriod:         2 * time.Second,
		Identity:            os.Getenv("POD_NAME"),
		PollInterval:        500 * time.Millisecond,
		CRDPollInterval:     30 * time.Second,
		ServiceCIDR:         netip.MustParsePrefix(local.DefaultServiceCIDR),
	}
}

// Flags registers the operator's flags on fs, each defaulting to c's current value
// (start from DefaultConfig).
func (c *Config) Flags(fs *pflag.FlagSet) {
	fs.StringVar(&c.Kubeconfig, "kubeconfig", c.Kubeconfig, "kubeconfig file (default: in-cluster configuration)")
	fs.StringVar(&c.Local, "local", c.Local, "local mode: serve the manifests in this folder instead of a cluster")
	fs.TextVar(&c.ServiceCIDR, "service-cidr", c.ServiceCIDR, "local mode: range cluster IPs are allocated from for Services that set none")
	fs.StringVar(&c.StateDir, "state-dir", c.StateDir, "local mode: folder for the CA (ca.crt, ca.key) and node tokens (tokens/<node>)")
	fs.StringVar(&c.Namespace, "namespace", c.Namespace, "namespace of the CA Secret, the trust bundle ConfigMap and the Lease")
	fs.StringVar(&c.GRPCAddr, "grpc-addr", c.GRPCAddr, "address of the Discovery and Certificates gRPC services (host:port or unix:///path)")
	fs.StringVar(&c.HealthAddr, "health-addr", c.HealthAddr, "address of /healthz and /readyz (\"\" disables)")
	fs.StringVar(&c.MetricsAddr, "metrics-addr", c.MetricsAddr, "address of Prometheus /metrics (\"\" disables)")
	fs.StringVar(&c.TrustDomain, "trust-domain", c.TrustDomain, "SPIFFE trust domain")
	fs.StringVar(&c.CASecret, "ca-secret", c.CASecret, "Secret holding the CA root (tls.crt, tls.key); created on first start")
	fs.StringVar(&c.UserCASecret, "user-ca-secret", c.UserCASecret, "Secret with a user-supplied CA (tls.crt, tls.key) used instead when it exists")
	fs.StringVar(&c.AgentServiceAccount, "agent-service-account", c.AgentServiceAccount, "service account (in --namespace) of the agents; \"\" accepts any pod-bound token")
	fs.StringSliceVar(&c.ServingNames, "serving-names", c.ServingNames, "extra DNS names for the gRPC serving certificate")
	fs.BoolVar(&c.LeaderElect, "leader-elect", c.LeaderElect, "elect a leader with the Lease ferry-operator (run more than one replica)")
	fs.DurationVar(&c.LeaseDuration, "lease-duration", c.LeaseDuration, "leader election: how long a lease lasts without renewal")
	fs.DurationVar(&c.RenewDeadline, "renew-deadline", c.RenewDeadline, "leader election: how long the leader retries renewing before it steps down")
	fs.DurationVar(&c.RetryPeriod, "retry-period", c.RetryPeriod, "leader election: time between attempts")
	fs.StringVar(&c.Identity, "id", c.Identity, "this replica's name in the Lease (default $POD_NAME, else hostname and a random suffix)")
	fs.DurationVar(&c.CertTTL, "cert-ttl", c.CertTTL, "lifetime of workload certificates (agents renew at half life)")
	fs.StringVar(&c.RelayAddr, "relay-addr", c.RelayAddr, "serve the cluster-wide flow relay (Observer API) here, host:port or unix:///path (\"\" disables)")
	fs.StringArrayVar(&c.RelayAgents, "relay-agent", c.RelayAgents, "an agent Observer address the relay reads, unix:///path or host:port (repeatable)")
	fs.StringVar(&c.EscapedSlashes, "escaped-slashes", c.EscapedSlashes, "what an encoded slash or backslash (%2F, %5C) in a request path becomes before policies and routes see it: Keep (a character, not a separator), Decode (a separator, then merged and resolved) or Reject (400)")
	fs.BoolVar(&c.CaseInsensitivePaths, "case-insensitive-paths", c.CaseInsensitivePaths, "AuthorizationPolicy paths match request paths whatever their case (the app still gets the path as sent)")
	fs.IntVar(&c.RelayAgentPort, "relay-agent-port", c.RelayAgentPort, "also read every running agent pod at its IP and this port (the agents' --observer-addr)")
	fs.StringVar(&c.RelayTLS.Cert, "relay-tls-cert", c.RelayTLS.Cert, "the relay's certificate (PEM, from the mesh CA): required to serve --relay-addr on TCP and to read agents on TCP")
	fs.StringVar(&c.RelayTLS.Key, "relay-tls-key", c.RelayTLS.Key, "the relay certificate's private key (PEM)")
	fs.StringVar(&c.RelayTLS.CA, "relay-tls-ca", c.RelayTLS.CA, "the mesh CA bundle the relay's clients and agents must prove a certificate from")
}

// meshConfig is the MeshConfig every node's state carries, from c: the one place
// its fields are checked.
func (c Config) meshConfig() (*ferryv1.MeshConfig, error) {
	es, err := mesh.ParseEscapedSlashes(c.EscapedSlashes)
	if err != nil {
		return nil, fmt.Errorf("operator config: escaped slashes: %w", err)
	}
	return &ferryv1.MeshConfig{EscapedSlashes: string(es), CaseInsensitivePaths: c.CaseInsensitivePaths}, nil
}

// withDefaults fills the fields a Config literal left zero where zero means
// nothing, from DefaultConfig. Addresses, the state folder and the agents'
// service account keep "": there it means "off" or "any".
func (c Config) withDefaults() Config {
	d := DefaultConfig()
	for _, f := range []struct {
		v   *string
		def string
	}{{&c.Namespace, d.Namespace}, {&c.TrustDomain, d.TrustDomain}, {&c.CASecret, d.CASecret}} {
		if *f.v == "" {
			*f.v = f.def
		}
	}
	for _, f := range []struct {
		v   *time.Duration
		def time.Duration
	}{{&c.CertTTL, d.CertTTL}, {&c.LeaseDuration, d.LeaseDuration}, {&c.RenewDeadline, d.RenewDeadline}, {&c.RetryPeriod, d.RetryPeriod}, {&c.PollInterval, d.PollInterval}, {&c.CRDPollInterval, d.CRDPollInterval}} {
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	if !c.ServiceCIDR.IsValid() {
		c.ServiceCIDR = d.ServiceCIDR
	}
	return c
}
