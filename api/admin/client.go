package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"syscall"
	"time"
)

// Client talks to an agent's admin API over its unix socket.
type Client struct {
	socket string
	hc     *http.Client
}

// NewClient returns a client for the admin API at socket.
func NewClient(socket string) *Client {
	return &Client{socket: socket, hc: &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", socket)
			},
			// A unix socket is cheap to dial, and an idle kept-alive connection would
			// hold a goroutine and a file in the agent per client ever made.
			DisableKeepAlives: true,
		},
	}}
}

// Status fetches the agent's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	return st, c.get(ctx, "/status", &st)
}

// Connections fetches the agent's live and recently ended connections.
func (c *Client) Connections(ctx context.Context) (Connections, error) {
	var cs Connections
	return cs, c.get(ctx, "/connections", &cs)
}

// Workloads fetches the mesh workloads the agent knows and which it enrolled.
func (c *Client) Workloads(ctx context.Context) (Workloads, error) {
	var v Workloads
	return v, c.get(ctx, "/workloads", &v)
}

// Certs fetches the local workloads' certificates and the trust bundle.
func (c *Client) Certs(ctx context.Context) (Certs, error) {
	var v Certs
	return v, c.get(ctx, "/certs", &v)
}

// Config fetches how the agent runs.
func (c *Client) Config(ctx context.Context) (AgentConfig, error) {
	var v AgentConfig
	return v, c.get(ctx, "/config", &v)
}

// State fetches the applied NodeState (protobuf JSON, no private keys).
func (c *Client) State(ctx context.Context) ([]byte, error) {
	var raw json.RawMessage
	err := c.get(ctx, "/state", &raw)
	return raw, err
}

func (c *Client) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent"+path, nil)
	if err != nil {
		return fmt.Errorf("agent admin API %s: %w", path, err)
	}
	resp, err := c.do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("agent admin API %s: %s", path, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		return fmt.Errorf("agent admin API %s: %w", path, err)
	}
	return nil
}

// do sends req, saying in its error whether the agent is there at all.
func (c *Client) do(req *http.Request) (*http.Response, error) {
	resp, err := c.hc.Do(req)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("agent admin API: %w (is the agent running? its admin socket %s is missing)", err, c.socket)
	case errors.Is(err, syscall.ECONNREFUSED):
		return nil, fmt.Errorf("agent admin API: %w (the agent that owned %s is not running)", err, c.socket)
	case err != nil:
		return nil, fmt.Errorf("agent admin API: %w", err)
	}
	return resp, nil
}
