package config

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"net"
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
	if p.EntityIDKey != nil && len(*p.EntityIDKey) < 32 {
		return fail("entity_id_key", "shorter than 32 characters")
	}
	return nil
}
