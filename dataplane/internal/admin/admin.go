// Package admin is the control plane's loopback HTTP API: in inference mode it pushes the
// route table and drains the per-version figures; in features mode it pushes the schema and
// the online store's location.
package admin

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/pprof"

	"github.com/loopmesh/loopmesh/dataplane/internal/config"
	"github.com/loopmesh/loopmesh/dataplane/internal/predict"
	"github.com/loopmesh/loopmesh/dataplane/internal/routing"
	"github.com/loopmesh/loopmesh/dataplane/internal/stats"
)

// maxBody bounds a route table upload.
const maxBody = 16 << 20

// Handler serves PUT/GET /routes, POST /stats/drain, GET /predict/totals and GET /healthz.
// pred and predictions (its log) are nil when Predict is not served here.
func Handler(routes *routing.Store, rec *stats.Recorder, pred *predict.Service, predictions *predict.PredictionLog) http.Handler {
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
		out := struct {
			Versions []stats.Version `json:"versions"`
			predict.Drained
			Calls []stats.Call      `json:"calls"`
			Log   predict.LogCounts `json:"log"`
		}{Versions: rec.Drain(), Calls: []stats.Call{}}
		if pred != nil {
			out.Drained = pred.Counts.Drain()
			out.Calls = pred.DrainCalls()
			out.Log = predictions.Drain()
		} else {
			out.Drained = predict.NewCounts().Drain() // empty lists, not nulls
		}
		writeJSON(w, out)
	})
	mux.HandleFunc("GET /predict/totals", func(w http.ResponseWriter, _ *http.Request) {
		var t predict.Totals
		if pred != nil {
			t = pred.Totals()
		}
		writeJSON(w, t)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		_, _ = io.WriteString(w, "ok")
	})
	profiling(mux)
	return mux
}

// profiling serves Go's profiles (GET /debug/pprof/...) on the loopback admin API, where an
// operator on the host can reach them and nobody else can.
func profiling(mux *http.ServeMux) {
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
}

// Features serves PUT/GET /features (the whole features config: schema and store), POST
// /calls/drain (the calls answered since the last drain, by method and code, for the control
// plane's own RPC metrics) and GET /healthz. GET leaves the Redis password out.
func Features[C any](replace func(*config.Features) error, current func() *config.Features, drain func() []C) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /calls/drain", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, map[string][]C{"calls": drain()})
	})
	mux.HandleFunc("PUT /features", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
		if err != nil {
			http.Error(w, "features: "+err.Error(), http.StatusBadRequest)
			return
		}
		f, err := config.ParseFeatures(body)
		if err != nil {
			http.Error(w, "features: "+err.Error(), http.StatusBadRequest)
			return
		}
		if err := replace(f); err != nil {
			http.Error(w, "features: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("GET /features", func(w http.ResponseWriter, _ *http.Request) {
		f := *current()
		if f.Store.Redis != nil && f.Store.Redis.Password != nil {
			redis := *f.Store.Redis
			hidden := "**********"
			redis.Password = &hidden
			f.Store.Redis = &redis
		}
		writeJSON(w, f)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		_, _ = io.WriteString(w, "ok")
	})
	profiling(mux)
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
