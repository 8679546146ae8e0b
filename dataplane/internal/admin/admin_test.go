package admin

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

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
	h := Handler(store, rec)
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
		`{"versions":[{"model":"m","version":2,"answered":1,"failed":1,"latencies_ms":[1.5,2.5]}]}` {
		t.Fatalf("drain: %s", w.Body)
	}
	if w := do(h, "POST", "/stats/drain", ""); w.Body.String() != `{"versions":[]}` {
		t.Fatalf("second drain: %s", w.Body)
	}
	if w := do(h, "GET", "/stats/drain", ""); w.Code != http.StatusMethodNotAllowed {
		t.Fatalf("GET drain: %d", w.Code)
	}
}
