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
