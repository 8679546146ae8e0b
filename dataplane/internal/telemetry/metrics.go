package telemetry

import (
	"strconv"
	"sync"
	"sync/atomic"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc/codes"
)

// Label bounds: model names come from clients, so label sets are capped.
const (
	maxModelVersions = 1000
	maxServices      = 64
	Other            = "other"
	Invalid          = "invalid"
)

// Metrics are the data plane's Prometheus series.
type Metrics struct {
	Registry      *prometheus.Registry
	requests      *prometheus.CounterVec
	duration      *prometheus.HistogramVec
	tritonErrors  *prometheus.CounterVec
	fallbacks     *prometheus.CounterVec
	proxied       *prometheus.CounterVec
	statsOverflow prometheus.Counter
	features      *prometheus.CounterVec
	featuresTime  *prometheus.HistogramVec
	featureValues *prometheus.CounterVec
	storeErrors   *prometheus.CounterVec
	logged        *prometheus.CounterVec
	pairs         *limiter
	services      *limiter
	// resolved holds each admitted (method, model, version)'s children, so that a call
	// records its request without hashing its labels or building the limiter's key again.
	resolved sync.Map // seriesKey -> *series
}

type seriesKey struct{ method, model, version string }

// series is one (method, model, version)'s children; ok is created by the first answered
// call (a series appears only once something was counted in it, as before).
type series struct {
	duration prometheus.Observer
	ok       atomic.Pointer[prometheus.Counter]
}

// NewMetrics registers the series (and Go runtime/process collectors) on a fresh registry.
func NewMetrics() *Metrics {
	reg := prometheus.NewRegistry()
	m := &Metrics{
		Registry: reg,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "loopmesh_dataplane_requests_total",
			Help: "Open Inference Protocol calls answered by the data plane.",
		}, []string{"method", "model", "version", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "loopmesh_dataplane_request_duration_seconds",
			Help:    "Time to answer an Open Inference Protocol call.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"method", "model", "version"}),
		tritonErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "loopmesh_dataplane_triton_errors_total",
			Help: "Triton calls that failed (other than INVALID_ARGUMENT), by code.",
		}, []string{"model", "version", "code"}),
		fallbacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "loopmesh_dataplane_fallbacks_total",
			Help: "Canary failures answered by the stable version instead.",
		}, []string{"model"}),
		proxied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "loopmesh_dataplane_proxied_total",
			Help: "Calls proxied to the control plane, by service and code.",
		}, []string{"service", "code"}),
		statsOverflow: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "loopmesh_dataplane_stats_overflow_total",
			Help: "Calls left out of the drained per-version figures (too many versions).",
		}),
		features: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "loopmesh_dataplane_feature_requests_total",
			Help: "FeatureService calls answered by the data plane, by method and code.",
		}, []string{"method", "code"}),
		featuresTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "loopmesh_dataplane_feature_request_duration_seconds",
			Help:    "Time to answer a FeatureService call.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"method"}),
		featureValues: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "loopmesh_dataplane_feature_values_total",
			Help: "Feature values served, by status (present, missing, stale).",
		}, []string{"status"}),
		storeErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "loopmesh_dataplane_online_store_errors_total",
			Help: "Online-store reads that failed (answered UNAVAILABLE), by store.",
		}, []string{"store"}),
		logged: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "loopmesh_dataplane_predictions_logged_total",
			Help: "Predictions produced to Kafka by outcome: logged (acknowledged), dropped (buffer full), failed.",
		}, []string{"outcome"}),
		pairs:    newLimiter(maxModelVersions),
		services: newLimiter(maxServices),
	}
	reg.MustRegister(m.requests, m.duration, m.tritonErrors, m.fallbacks, m.proxied, m.statsOverflow,
		m.features, m.featuresTime, m.featureValues, m.storeErrors, m.logged,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Version renders a version label ("" when none was chosen).
func Version(v int64) string {
	if v <= 0 {
		return ""
	}
	return strconv.FormatInt(v, 10)
}

// labels caps the (model, version) label sets: past the cap, new ones become "other".
func (m *Metrics) labels(model, version string) (string, string) {
	if m.pairs.allow(model + "\x00" + version) {
		return model, version
	}
	return Other, Other
}

// Request records one answered OIP call. model must be a valid name, "invalid" or "".
func (m *Metrics) Request(method, model, version string, code codes.Code, seconds float64) {
	key := seriesKey{method, model, version}
	s, _ := m.resolved.Load(key)
	if s == nil {
		model, version = m.labels(model, version)
		if model == Other { // past the cap: never kept, so the cache stays bounded too
			m.requests.WithLabelValues(method, model, version, CodeName(code)).Inc()
			m.duration.WithLabelValues(method, model, version).Observe(seconds)
			return
		}
		s, _ = m.resolved.LoadOrStore(key, &series{duration: m.duration.WithLabelValues(method, model, version)})
	}
	r := s.(*series)
	if code != codes.OK {
		m.requests.WithLabelValues(method, model, version, CodeName(code)).Inc()
	} else if ok := r.ok.Load(); ok != nil {
		(*ok).Inc()
	} else {
		c := m.requests.WithLabelValues(method, model, version, CodeName(code))
		r.ok.Store(&c)
		c.Inc()
	}
	r.duration.Observe(seconds)
}

// TritonError records a failed Triton call.
func (m *Metrics) TritonError(model, version string, code codes.Code) {
	model, version = m.labels(model, version)
	m.tritonErrors.WithLabelValues(model, version, CodeName(code)).Inc()
}

// Fallback records a canary failure answered by stable.
func (m *Metrics) Fallback(model string) {
	model, _ = m.labels(model, "")
	m.fallbacks.WithLabelValues(model).Inc()
}

// Proxied records a proxied call's outcome.
func (m *Metrics) Proxied(service string, code codes.Code) {
	if !utf8.ValidString(service) || !m.services.allow(service) {
		service = Other
	}
	m.proxied.WithLabelValues(service, CodeName(code)).Inc()
}

// FeatureRequest records one answered FeatureService call (method is a fixed name).
func (m *Metrics) FeatureRequest(method string, code codes.Code, seconds float64) {
	m.features.WithLabelValues(method, CodeName(code)).Inc()
	m.featuresTime.WithLabelValues(method).Observe(seconds)
}

// FeatureValues counts the values of one answer by status.
func (m *Metrics) FeatureValues(present, missing, stale int) {
	for _, c := range []struct {
		status string
		n      int
	}{{"present", present}, {"missing", missing}, {"stale", stale}} {
		if c.n > 0 {
			m.featureValues.WithLabelValues(c.status).Add(float64(c.n))
		}
	}
}

// StoreError counts a failed online-store read.
func (m *Metrics) StoreError(store string) { m.storeErrors.WithLabelValues(store).Inc() }

// PredictionLogged counts a prediction record's outcome ("logged", "dropped" or "failed").
func (m *Metrics) PredictionLogged(outcome string) { m.logged.WithLabelValues(outcome).Inc() }

// StatsOverflow counts a call the per-version figures could not hold.
func (m *Metrics) StatsOverflow() { m.statsOverflow.Inc() }

// limiter admits at most max distinct keys; the ones seen first stay admitted.
type limiter struct {
	seen sync.Map
	mu   sync.Mutex
	n    int
	max  int
}

func newLimiter(max int) *limiter { return &limiter{max: max} }

func (l *limiter) allow(key string) bool {
	if _, ok := l.seen.Load(key); ok {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.seen.Load(key); ok {
		return true
	}
	if l.n >= l.max {
		return false
	}
	l.seen.Store(key, struct{}{})
	l.n++
	return true
}
