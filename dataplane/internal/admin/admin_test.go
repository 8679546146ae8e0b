package admin

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/loopmesh/loopmesh/dataplane/internal/config"
	"github.com/loopmesh/loopmesh/dataplane/internal/routing"
	"github.com/loopmesh/loopmesh/dataplane/internal/stats"
)

func do(h http.Handler, method, path, body string) *httptest.ResponseRecorder {
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(method, path, strings.NewReader(body)))
	return w
}

func TestAdminAPI(t *testing.T) {
	store, rec := routing.NewStore(), stats.New(0, 0)
	h := Handler(store, rec, nil, nil)
	if w := do(h, "GET", "/healthz", ""); w.Code != 200 || w.Body.String() != "ok" {
		t.Fatalf("healthz: %d %q", w.Code, w.Body)
	}
	table := `{"ready": true, "routes": {"m": {"stable": 1, "canary": 2, "weight": 0.25, "known": [1, 2, 3]}}}`
	if w := do(h, "PUT", "/routes", table); w.Code != 204 {
		t.Fatalf("put: %d %s", w.Code, w.Body)
	}
	want := `{"ready":true,"routes":{"m":{"stable":1,"canary":2,"weight":0.25,"known":[1,2,3]}}}`
	if w := do(h, "GET", "/routes", ""); w.Body.String() != want {
		t.Fatalf("get: %s", w.Body)
	}
	for _, bad := range []string{`nope`, `{"routes": {"m": {"weight": 2}}}`, `{"routes": {"m m": {}}}`, `{"routes": {"m": {"stable": 0}}}`} {
		if w := do(h, "PUT", "/routes", bad); w.Code != 400 || !strings.HasPrefix(w.Body.String(), "routes: ") {
			t.Errorf("%s: %d %s", bad, w.Code, w.Body)
		}
	}
	if !store.Load().Ready || *store.Get("m").Stable != 1 {
		t.Fatal("a refused table replaced the good one")
	}
	rec.Record("m", 2, true, 1.5)
	rec.Record("m", 2, false, 2.5)
	if w := do(h, "POST", "/stats/drain", ""); w.Body.String() !=
		`{"versions":[{"model":"m","version":2,"answered":1,"failed":1,"latencies_ms":[1.5,2.5],"shadow":false}],`+
			`"predictions":[],"shadow_scores":[],"triton_errors":[],"calls":[],"log":{"logged":0,"dropped":0}}` {
		t.Fatalf("drain: %s", w.Body)
	}
	if w := do(h, "POST", "/stats/drain", ""); w.Body.String() != `{"versions":[],"predictions":[],"shadow_scores":[],"triton_errors":[],"calls":[],"log":{"logged":0,"dropped":0}}` {
		t.Fatalf("second drain: %s", w.Body)
	}
	if w := do(h, "POST", "/predictions/drain?max=5", ""); w.Code != http.StatusNotFound {
		t.Fatalf("predictions drain (gone: the data plane produces them): %d", w.Code)
	}
	if w := do(h, "GET", "/debug/pprof/", ""); w.Code != http.StatusOK || !strings.Contains(w.Body.String(), "goroutine") {
		t.Fatalf("profiles: %d", w.Code)
	}
	if w := do(h, "GET", "/stats/drain", ""); w.Code != http.StatusMethodNotAllowed {
		t.Fatalf("GET drain: %d", w.Code)
	}
}

func TestFeaturesAPI(t *testing.T) {
	password := "secret"
	current := &config.Features{MaxEntities: 1, Store: config.Store{Type: "redis", Redis: &config.Redis{Address: "r:1", Password: &password}}}
	var replaced *config.Features
	h := Features(func(f *config.Features) error { replaced = f; return nil }, func() *config.Features { return current },
		func() []int { return []int{7} })
	if w := do(h, "POST", "/calls/drain", ""); w.Code != 200 || w.Body.String() != `{"calls":[7]}` {
		t.Fatalf("drain: %d %s", w.Code, w.Body)
	}
	if w := do(h, "GET", "/features", ""); w.Code != 200 || strings.Contains(w.Body.String(), "secret") || !strings.Contains(w.Body.String(), `"r:1"`) {
		t.Fatalf("get: %d %s", w.Code, w.Body)
	}
	if *current.Store.Redis.Password != "secret" {
		t.Fatal("GET changed the config in force")
	}
	body := `{"max_entities": 3, "store_timeout_s": 1, "features": [{"view": "v", "name": "f", "join_key": "k"}],
		"views": {"v": {"table": "t", "name": "v"}}, "store": {"type": "sqlite", "path": "/x", "entity_key_serialization_version": 3}}`
	if w := do(h, "PUT", "/features", body); w.Code != 204 || replaced == nil || replaced.MaxEntities != 3 {
		t.Fatalf("put: %d %s", w.Code, w.Body)
	}
	if w := do(h, "PUT", "/features", `{"max_entities": 0}`); w.Code != 400 || !strings.Contains(w.Body.String(), "max_entities") {
		t.Fatalf("bad put: %d %s", w.Code, w.Body)
	}
	if w := do(h, "GET", "/healthz", ""); w.Code != 200 {
		t.Fatal(w.Code)
	}
	if w := do(h, "GET", "/debug/pprof/", ""); w.Code != http.StatusOK || !strings.Contains(w.Body.String(), "goroutine") {
		t.Fatalf("profiles: %d", w.Code)
	}
}
