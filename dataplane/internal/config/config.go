// Package config reads the data plane's JSON config (from stdin or a file: secrets never
// travel on argv). Unknown keys are errors; every error names the key at fault.
//
// One binary, two modes: "inference" (the default: the Open Inference Protocol in front of
// Triton) and "features" (FeatureService.GetOnlineFeatures from the Feast online store).
// Both proxy every other call on their port to the Python process that started them.
package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
)

// TLS is the public server's certificate; with ClientCAFile, clients must present a
// certificate signed by it (mTLS).
type TLS struct {
	CertFile     string  `json:"cert_file"`
	KeyFile      string  `json:"key_file"`
	ClientCAFile *string `json:"client_ca_file"`
}

// TritonTLS is the Triton client's TLS: a CA (nil: the system's) and an optional client
// certificate.
type TritonTLS struct {
	CAFile   *string `json:"ca_file"`
	CertFile *string `json:"cert_file"`
	KeyFile  *string `json:"key_file"`
}

// Token is one bearer credential and its roles.
type Token struct {
	Name  string   `json:"name"`
	Token string   `json:"token"`
	Roles []string `json:"roles"`
}

// Triton is where inference goes.
type Triton struct {
	Address  string     `json:"address"`
	Channels int        `json:"channels"`
	TimeoutS float64    `json:"timeout_s"`
	TLS      *TritonTLS `json:"tls"`
}

// Modes of the data plane.
const (
	ModeInference = "inference"
	ModeFeatures  = "features"
)

// Config is the whole config.
type Config struct {
	// Mode is "inference" (default) or "features".
	Mode                 string  `json:"mode"`
	Listen               string  `json:"listen"`
	Backend              string  `json:"backend"`
	TLS                  *TLS    `json:"tls"`
	Tokens               []Token `json:"tokens"`
	Triton               Triton  `json:"triton"`
	AdminListen          string  `json:"admin_listen"`
	MetricsListen        *string `json:"metrics_listen"`
	MaxMessageBytes      int     `json:"max_message_bytes"`
	MaxConcurrentStreams int64   `json:"max_concurrent_streams"`
	OTLPEndpoint         *string `json:"otlp_endpoint"`
	ServiceName          string  `json:"service_name"`
	// Features is the features mode's schema and online store (required there).
	Features *Features `json:"features"`
	// Predict serves loopmesh.v1.InferenceService/Predict here (inference mode; nil: proxied).
	Predict *Predict `json:"predict"`
	// StopOnStdinEOF: the data plane stops (gracefully) once its standard input closes,
	// so a control plane that dies, even by SIGKILL, never leaves it holding the port.
	StopOnStdinEOF bool `json:"stop_on_stdin_eof"`
}

// Roles a token may hold (loopmesh.mesh.auth.Role).
var Roles = map[string]bool{"ingest": true, "feedback": true, "predict": true, "operator": true, "features": true}

// Load reads one JSON object from r (more input after it is ignored) and checks it.
func Load(r io.Reader) (*Config, error) {
	c := &Config{
		Mode:                 ModeInference,
		Listen:               "127.0.0.1:0",
		AdminListen:          "127.0.0.1:0",
		Triton:               Triton{Channels: 2, TimeoutS: 2.0},
		MaxMessageBytes:      64 << 20,
		MaxConcurrentStreams: 1024,
		ServiceName:          "inference-dataplane",
	}
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(c); err != nil {
		return nil, explain(err)
	}
	return c, c.check()
}

// explain turns encoding/json's errors into "config: <key>: ..." messages.
func explain(err error) error {
	var typeErr *json.UnmarshalTypeError
	var syntaxErr *json.SyntaxError
	switch {
	case errors.As(err, &typeErr):
		return fmt.Errorf("config: %s: expected %s, got JSON %s", typeErr.Field, typeErr.Type, typeErr.Value)
	case errors.As(err, &syntaxErr):
		return fmt.Errorf("config: not JSON (at byte %d): %v", syntaxErr.Offset, err)
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return fmt.Errorf("config: unknown key %s", strings.TrimPrefix(err.Error(), "json: unknown field "))
	case errors.Is(err, io.EOF):
		return errors.New("config: empty input, expected a JSON object")
	}
	return fmt.Errorf("config: %v", err)
}

func (c *Config) check() error {
	fail := func(key, format string, a ...any) error {
		return fmt.Errorf("config: %s: %s", key, fmt.Sprintf(format, a...))
	}
	if c.Mode != ModeInference && c.Mode != ModeFeatures {
		return fail("mode", "%q is not %q or %q", c.Mode, ModeInference, ModeFeatures)
	}
	addrs := map[string]string{"listen": c.Listen, "backend": c.Backend, "admin_listen": c.AdminListen}
	if c.Mode == ModeInference {
		addrs["triton.address"] = c.Triton.Address
	}
	for key, addr := range addrs {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return fail(key, "%q is not HOST:PORT", addr)
		}
	}
	if c.Mode == ModeFeatures {
		if c.Features == nil {
			return fail("features", "required in mode %q", ModeFeatures)
		}
		if err := c.Features.Check(); err != nil {
			return fmt.Errorf("config: features.%v", err)
		}
	} else if c.Features != nil {
		return fail("features", "only in mode %q", ModeFeatures)
	}
	if c.Predict != nil {
		if c.Mode != ModeInference {
			return fail("predict", "only in mode %q", ModeInference)
		}
		if err := c.Predict.Check(); err != nil {
			return fmt.Errorf("config: predict.%v", err)
		}
	}
	if host, _, _ := net.SplitHostPort(c.AdminListen); !loopback(host) {
		return fail("admin_listen", "%q must be a loopback address", c.AdminListen)
	}
	if c.MetricsListen != nil {
		if _, _, err := net.SplitHostPort(*c.MetricsListen); err != nil {
			return fail("metrics_listen", "%q is not HOST:PORT", *c.MetricsListen)
		}
	}
	if c.TLS != nil && (c.TLS.CertFile == "" || c.TLS.KeyFile == "") {
		return fail("tls", "cert_file and key_file are both required")
	}
	if t := c.Triton.TLS; t != nil && (t.CertFile == nil) != (t.KeyFile == nil) {
		return fail("triton.tls", "cert_file and key_file go together")
	}
	if c.Triton.Channels < 1 || c.Triton.Channels > 64 {
		return fail("triton.channels", "%d is not within [1, 64]", c.Triton.Channels)
	}
	if !(c.Triton.TimeoutS > 0) {
		return fail("triton.timeout_s", "%v is not positive", c.Triton.TimeoutS)
	}
	if c.MaxMessageBytes < 1024 {
		return fail("max_message_bytes", "%d is below 1024", c.MaxMessageBytes)
	}
	if c.MaxConcurrentStreams < 1 || c.MaxConcurrentStreams > 1<<31-1 {
		return fail("max_concurrent_streams", "%d is not within [1, 2^31)", c.MaxConcurrentStreams)
	}
	if c.ServiceName == "" {
		return fail("service_name", "must not be empty")
	}
	for i, t := range c.Tokens {
		key := fmt.Sprintf("tokens[%d]", i)
		if t.Name == "" || t.Token == "" {
			return fail(key, "name and token are required")
		}
		for _, r := range t.Roles {
			if !Roles[r] {
				return fail(key+".roles", "unknown role %q", r)
			}
		}
	}
	return nil
}

func loopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
