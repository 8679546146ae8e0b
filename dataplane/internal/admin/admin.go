// Package admin is the control plane's loopback HTTP API: it pushes the route table and
// drains the per-version figures.
package admin

import (
	"encoding/json"
	"io"
	"net/http"

	"github.com/loopmesh/loopmesh/dataplane/internal/routing"
	"github.com/loopmesh/loopmesh/dataplane/internal/stats"
)

// maxBody bounds a route table upload.
const maxBody = 16 << 20

// Handler serves PUT/GET /routes, POST /stats/drain and GET /healthz.
func Handler(routes *routing.Store, rec *stats.Recorder) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /routes", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
		if err != nil {
			http.Error(w, "routes: "+err.Error(), http.StatusBadRequest)
			return
		}
		table, err := routing.Parse(body)
		if err != nil {
			http.Error(w, "routes: "+err.Error(), http.StatusBadRequest)
			return
		}
		routes.Replace(table)
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("GET /routes", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, routes.Load())
	})
	mux.HandleFunc("POST /stats/drain", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, map[string][]stats.Version{"versions": rec.Drain()})
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		_, _ = io.WriteString(w, "ok")
	})
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(body)
}
