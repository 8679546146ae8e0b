package config

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"slices"
)

// Predict configures the Predict hot path (inference mode); nil: every Predict is proxied to
// the control plane.
type Predict struct {
	DefaultModel          *string         `json:"default_model"`
	Features              PredictFeatures `json:"features"`
	OnFeaturesUnavailable string          `json:"on_features_unavailable"`
	BatchMaxSize          int             `json:"batch_max_size"`
	BatchMaxDelayMs       float64         `json:"batch_max_delay_ms"`
	BatchMaxInflight      int             `json:"batch_max_inflight"`
	ShadowMaxInflight     int             `json:"shadow_max_inflight"`
	ShadowTimeoutMs       float64         `json:"shadow_timeout_ms"`
	LogQueueSize          int             `json:"log_queue_size"`
	Log                   *PredictLog     `json:"log"`
	// EntityIDKey pseudonymises entity ids (HMAC-SHA256) like the control plane; secret.
	EntityIDKey *string `json:"entity_id_key"`
}

// PredictFeatures is how Predict reaches the FeatureService.
type PredictFeatures struct {
	Address  string     `json:"address"`
	TimeoutS float64    `json:"timeout_s"`
	TLS      *ClientTLS `json:"tls"`
	// Token is sent as "authorization: Bearer <token>" (the control plane's client token).
	Token *string `json:"token"`
}

// PredictLog is how Predict's records reach the predictions topic: the control plane's
// Kafka settings (loopmesh.mesh.settings.KafkaSettings) and producer options.
type PredictLog struct {
	Topic            string   `json:"topic"`
	Brokers          []string `json:"brokers"`
	ClientID         string   `json:"client_id"`
	SecurityProtocol string   `json:"security_protocol"` // PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL
	SASLMechanism    *string  `json:"sasl_mechanism"`    // PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
	SASLUsername     *string  `json:"sasl_username"`
	SASLPassword     *string  `json:"sasl_password"` // secret
	// TLS of the SSL protocols (ca_file, cert_file, key_file; nil CA: the system's).
	TLS              *ClientTLS `json:"tls"`
	LingerMs         float64    `json:"linger_ms"`
	RequestTimeoutMs int        `json:"request_timeout_ms"`
}

var protocols = []string{"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}
var mechanisms = []string{"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"}

// Check validates the values; errors name the key under "predict.log".
func (l *PredictLog) Check() error {
	fail := func(key, format string, a ...any) error {
		return fmt.Errorf("log.%s: %s", key, fmt.Sprintf(format, a...))
	}
	if l.Topic == "" {
		return fail("topic", "empty")
	}
	if len(l.Brokers) == 0 {
		return fail("brokers", "empty")
	}
	for _, b := range l.Brokers {
		if _, _, err := net.SplitHostPort(b); err != nil {
			return fail("brokers", "%q is not HOST:PORT", b)
		}
	}
	if !slices.Contains(protocols, l.SecurityProtocol) {
		return fail("security_protocol", "%q is not one of %v", l.SecurityProtocol, protocols)
	}
	sasl := l.SecurityProtocol == "SASL_PLAINTEXT" || l.SecurityProtocol == "SASL_SSL"
	if sasl != (l.SASLMechanism != nil) {
		return fail("sasl_mechanism", "set exactly when security_protocol is SASL_PLAINTEXT or SASL_SSL")
	}
	if sasl && !slices.Contains(mechanisms, *l.SASLMechanism) {
		return fail("sasl_mechanism", "%q is not one of %v", *l.SASLMechanism, mechanisms)
	}
	if sasl && (l.SASLUsername == nil || *l.SASLUsername == "") {
		return fail("sasl_username", "needed with SASL")
	}
	ssl := l.SecurityProtocol == "SSL" || l.SecurityProtocol == "SASL_SSL"
	if ssl != (l.TLS != nil) {
		return fail("tls", "set exactly when security_protocol is SSL or SASL_SSL")
	}
	if t := l.TLS; t != nil && (t.CertFile == nil) != (t.KeyFile == nil) {
		return fail("tls", "cert_file and key_file go together")
	}
	if !(l.LingerMs >= 0) || math.IsInf(l.LingerMs, 0) {
		return fail("linger_ms", "%v is not >= 0", l.LingerMs)
	}
	if l.RequestTimeoutMs < 1 {
		return fail("request_timeout_ms", "%d is below 1", l.RequestTimeoutMs)
	}
	return nil
}

// TLSConfig is the producer's TLS (nil: plaintext).
func (l *PredictLog) TLSConfig() (*tls.Config, error) {
	if l.TLS == nil {
		return nil, nil
	}
	return l.TLS.Config()
}

// ClientTLS is a client's TLS: a CA (nil: the system's), an optional client certificate and
// the name to expect in the server's certificate (nil: the address' host).
type ClientTLS struct {
	CAFile     *string `json:"ca_file"`
	CertFile   *string `json:"cert_file"`
	KeyFile    *string `json:"key_file"`
	ServerName *string `json:"server_name"`
}

// UnmarshalJSON fills the defaults under what the JSON sets.
func (p *Predict) UnmarshalJSON(b []byte) error {
	type plain Predict
	v := plain{
		Features:              PredictFeatures{TimeoutS: 0.5},
		OnFeaturesUnavailable: "degrade",
		BatchMaxSize:          64,
		BatchMaxDelayMs:       1,
		BatchMaxInflight:      2,
		ShadowMaxInflight:     64,
		ShadowTimeoutMs:       2000,
		LogQueueSize:          10000,
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields() // the outer decoder's setting does not reach a custom unmarshaller
	if err := dec.Decode(&v); err != nil {
		return err
	}
	*p = Predict(v)
	return nil
}

// Check validates the values; errors name the key under "predict".
func (p *Predict) Check() error {
	fail := func(key, format string, a ...any) error {
		return fmt.Errorf("%s: %s", key, fmt.Sprintf(format, a...))
	}
	if _, _, err := net.SplitHostPort(p.Features.Address); err != nil {
		return fail("features.address", "%q is not HOST:PORT", p.Features.Address)
	}
	if !(p.Features.TimeoutS > 0) || math.IsInf(p.Features.TimeoutS, 0) {
		return fail("features.timeout_s", "%v is not positive", p.Features.TimeoutS)
	}
	if t := p.Features.TLS; t != nil && (t.CertFile == nil) != (t.KeyFile == nil) {
		return fail("features.tls", "cert_file and key_file go together")
	}
	if p.OnFeaturesUnavailable != "degrade" && p.OnFeaturesUnavailable != "fail" {
		return fail("on_features_unavailable", "%q is not \"degrade\" or \"fail\"", p.OnFeaturesUnavailable)
	}
	if p.BatchMaxSize < 1 {
		return fail("batch_max_size", "%d is below 1", p.BatchMaxSize)
	}
	if !(p.BatchMaxDelayMs >= 0) || math.IsInf(p.BatchMaxDelayMs, 0) {
		return fail("batch_max_delay_ms", "%v is not >= 0", p.BatchMaxDelayMs)
	}
	if p.BatchMaxInflight < 1 {
		return fail("batch_max_inflight", "%d is below 1", p.BatchMaxInflight)
	}
	if p.ShadowMaxInflight < 0 {
		return fail("shadow_max_inflight", "%d is below 0", p.ShadowMaxInflight)
	}
	if !(p.ShadowTimeoutMs > 0) || math.IsInf(p.ShadowTimeoutMs, 0) {
		return fail("shadow_timeout_ms", "%v is not positive", p.ShadowTimeoutMs)
	}
	if p.LogQueueSize < 1 {
		return fail("log_queue_size", "%d is below 1", p.LogQueueSize)
	}
	if p.Log == nil {
		return fail("log", "missing (where the predictions go)")
	}
	if err := p.Log.Check(); err != nil {
		return err
	}
	if p.EntityIDKey != nil && len(*p.EntityIDKey) < 32 {
		return fail("entity_id_key", "shorter than 32 characters")
	}
	return nil
}

// Config builds the client's tls.Config from the files (read now).
func (c *ClientTLS) Config() (*tls.Config, error) {
	conf := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.ServerName != nil {
		conf.ServerName = *c.ServerName
	}
	if c.CAFile != nil {
		pool, err := LoadPool(*c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("tls.ca_file: %v", err)
		}
		conf.RootCAs = pool
	}
	if c.CertFile != nil && c.KeyFile != nil {
		cert, err := tls.LoadX509KeyPair(*c.CertFile, *c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("tls: %v", err)
		}
		conf.Certificates = []tls.Certificate{cert}
	}
	return conf, nil
}

// LoadPool reads the PEM certificates of path.
func LoadPool(path string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, errors.New(path + ": no PEM certificate in it")
	}
	return pool, nil
}
