package config

import (
	"strings"
	"testing"
)

const minimal = `{"backend": "127.0.0.1:43211", "triton": {"address": "127.0.0.1:8001"}}`

func TestLoadFull(t *testing.T) {
	c, err := Load(strings.NewReader(`{"listen": "127.0.0.1:0", "backend": "127.0.0.1:43211",
	 "tls": null,
	 "tokens": [{"name": "app", "token": "t", "roles": ["predict"]}],
	 "triton": {"address": "127.0.0.1:8001", "channels": 2, "timeout_s": 2.0,
	            "tls": {"ca_file": "/ca.pem", "cert_file": null, "key_file": null}},
	 "admin_listen": "127.0.0.1:0", "metrics_listen": "0.0.0.0:9466",
	 "max_message_bytes": 67108864, "max_concurrent_streams": 1024,
	 "otlp_endpoint": null, "service_name": "inference-dataplane"} trailing is ignored`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Triton.TLS == nil || *c.Triton.TLS.CAFile != "/ca.pem" || *c.MetricsListen != "0.0.0.0:9466" || len(c.Tokens) != 1 {
		t.Fatalf("%+v", c)
	}
}

func TestDefaults(t *testing.T) {
	c, err := Load(strings.NewReader(minimal))
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "127.0.0.1:0" || c.Triton.Channels != 2 || c.Triton.TimeoutS != 2 ||
		c.MaxMessageBytes != 64<<20 || c.MaxConcurrentStreams != 1024 || c.MetricsListen != nil {
		t.Fatalf("%+v", c)
	}
}

func TestErrorsNameTheKey(t *testing.T) {
	cases := map[string]string{
		`{"backend": "b:1", "triton": {"address": "t:1"}, "colour": 1}`:                                                `unknown key "colour"`,
		`{"backend": "b:1", "triton": {"address": "t:1", "chanels": 1}}`:                                               `unknown key "chanels"`,
		`{"backend": "b:1", "triton": {"address": "t:1", "channels": "2"}}`:                                            "triton.channels:",
		`{"backend": "b:1", "triton": {"address": "t:1", "channels": 0}}`:                                              "triton.channels:",
		`{"backend": "b:1", "triton": {"address": "t:1", "timeout_s": 0}}`:                                             "triton.timeout_s:",
		`{"triton": {"address": "t:1"}}`:                                                                               "backend:",
		`{"backend": "b:1", "triton": {}}`:                                                                             "triton.address:",
		`{"backend": "b:1", "triton": {"address": "t:1"}, "admin_listen": "0.0.0.0:0"}`:                                "admin_listen:",
		`{"backend": "b:1", "triton": {"address": "t:1"}, "tokens": [{"name": "a", "token": "x", "roles": ["root"]}]}`: "tokens[0].roles:",
		`{"backend": "b:1", "triton": {"address": "t:1"}, "tls": {"cert_file": "c"}}`:                                  "tls:",
		`{"backend": "b:1", "triton": {"address": "t:1"}, "max_message_bytes": 10}`:                                    "max_message_bytes:",
		``:   "empty input",
		`{,`: "not JSON",
	}
	for body, want := range cases {
		_, err := Load(strings.NewReader(body))
		if err == nil || !strings.Contains(err.Error(), want) || !strings.HasPrefix(err.Error(), "config: ") {
			t.Errorf("%s: got %v, want %q", body, err, want)
		}
	}
}

const featuresMinimal = `{"mode": "features", "backend": "127.0.0.1:1", "features": {"max_entities": 10,
	"store_timeout_s": 1.5, "features": [{"view": "v", "name": "f", "dtype": "Int64", "join_key": "entity_id",
	"max_age_s": null}], "views": {"v": {"table": "p_v", "name": "v"}},
	"store": {"type": "sqlite", "path": "/x.db", "project": "p", "redis": null, "entity_key_serialization_version": 3}}}`

func TestFeaturesMode(t *testing.T) {
	c, err := Load(strings.NewReader(featuresMinimal))
	if err != nil {
		t.Fatal(err)
	}
	if c.Mode != ModeFeatures || c.Features.MaxEntities != 10 || c.Features.Features[0].MaxAgeS != nil {
		t.Fatalf("%+v", c)
	}
	f := `"features": {"max_entities": 10, "store_timeout_s": 1, "features": [{"view": "v", "name": "f", "join_key": "k"}], "views": {"v": {"table": "t", "name": "v"}}, "store": %s}`
	cases := map[string]string{
		`{"mode": "both", "backend": "b:1"}`:                               "mode:",
		`{"mode": "features", "backend": "b:1"}`:                           "features: required",
		`{"backend": "b:1", "triton": {"address": "t:1"}, "features": {}}`: "features: only in mode",
		`{"mode": "features", "backend": "b:1", ` + strings.Replace(f, "%s", `{"type": "sqlite", "path": "/x", "entity_key_serialization_version": 2}`, 1) + `}`:                "features.store.entity_key_serialization_version:",
		`{"mode": "features", "backend": "b:1", ` + strings.Replace(f, "%s", `{"type": "mongo", "entity_key_serialization_version": 3}`, 1) + `}`:                               "features.store.type:",
		`{"mode": "features", "backend": "b:1", ` + strings.Replace(f, "%s", `{"type": "redis", "entity_key_serialization_version": 3}`, 1) + `}`:                               "features.store.redis:",
		`{"mode": "features", "backend": "b:1", ` + strings.Replace(f, "%s", `{"type": "redis", "redis": {"address": "nope"}, "entity_key_serialization_version": 3}`, 1) + `}`: "features.store.redis.address:",
		`{"mode": "features", "backend": "b:1", "features": {"max_entities": 0}}`:                                                                                               "features.max_entities:",
	}
	for body, want := range cases {
		_, err := Load(strings.NewReader(body))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: got %v, want %q", body, err, want)
		}
	}
	if _, err := ParseFeatures([]byte(`{"max_entities": 1} {}`)); err == nil {
		t.Fatal("two values")
	}
	if _, err := ParseFeatures([]byte(`{"max_entities": 1, "colour": 2}`)); err == nil || !strings.Contains(err.Error(), `unknown key "colour"`) {
		t.Fatalf("%v", err)
	}
}

const logOK = `{"topic": "predictions", "brokers": ["k1:9092", "k2:9092"], "client_id": "loopmesh-inference-dataplane",
	"security_protocol": "PLAINTEXT", "sasl_mechanism": null, "sasl_username": null, "sasl_password": null,
	"tls": null, "linger_ms": 20, "request_timeout_ms": 15000}`

func withPredict(log string) string {
	return `{"backend": "b:1", "triton": {"address": "t:1"}, "predict": {"features": {"address": "f:1"}, "log": ` + log + `}}`
}

func TestPredictLogIsRequiredAndChecked(t *testing.T) {
	c, err := Load(strings.NewReader(withPredict(logOK)))
	if err != nil {
		t.Fatal(err)
	}
	if l := c.Predict.Log; l.Topic != "predictions" || len(l.Brokers) != 2 || l.LingerMs != 20 || c.Predict.LogQueueSize != 10000 {
		t.Fatalf("%+v", l)
	}
	if conf, err := c.Predict.Log.TLSConfig(); conf != nil || err != nil {
		t.Fatalf("PLAINTEXT has no TLS: %v %v", conf, err)
	}
	sasl := strings.NewReplacer(`"PLAINTEXT"`, `"SASL_SSL"`, `"sasl_mechanism": null`, `"sasl_mechanism": "SCRAM-SHA-256"`,
		`"sasl_username": null`, `"sasl_username": "mesh"`, `"tls": null`, `"tls": {"ca_file": null}`).Replace(logOK)
	if _, err := Load(strings.NewReader(withPredict(sasl))); err != nil {
		t.Fatalf("SASL_SSL: %v", err)
	}
	cases := map[string]string{
		strings.Replace(logOK, `"predictions"`, `""`, 1):                                    "predict.log.topic:",
		strings.Replace(logOK, `["k1:9092", "k2:9092"]`, `[]`, 1):                           "predict.log.brokers:",
		strings.Replace(logOK, `"k2:9092"`, `"k2"`, 1):                                      "predict.log.brokers:",
		strings.Replace(logOK, `"PLAINTEXT"`, `"KERBEROS"`, 1):                              "predict.log.security_protocol:",
		strings.Replace(logOK, `"PLAINTEXT"`, `"SASL_PLAINTEXT"`, 1):                        "predict.log.sasl_mechanism:",
		strings.Replace(sasl, `"SCRAM-SHA-256"`, `"GSSAPI"`, 1):                             "predict.log.sasl_mechanism:",
		strings.Replace(sasl, `"mesh"`, `""`, 1):                                            "predict.log.sasl_username:",
		strings.Replace(sasl, `{"ca_file": null}`, `null`, 1):                               "predict.log.tls:",
		strings.Replace(logOK, `"tls": null`, `"tls": {"ca_file": "/ca.pem"}`, 1):           "predict.log.tls:",
		strings.Replace(logOK, `"linger_ms": 20`, `"linger_ms": -1`, 1):                     "predict.log.linger_ms:",
		strings.Replace(logOK, `"request_timeout_ms": 15000`, `"request_timeout_ms": 0`, 1): "predict.log.request_timeout_ms:",
		`null`: "predict.log: missing",
	}
	for log, want := range cases {
		_, err := Load(strings.NewReader(withPredict(log)))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: got %v, want %q", log, err, want)
		}
	}
}
