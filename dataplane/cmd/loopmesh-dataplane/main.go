// Command loopmesh-dataplane serves the Open Inference Protocol in front of Triton ("mode":
// "inference", the default) or FeatureService.GetOnlineFeatures from the Feast online store
// ("mode": "features"), and proxies every other gRPC call on the same port to the Python
// control plane that started it.
//
//	loopmesh-dataplane --config -        # JSON config on stdin (tokens never on argv)
//	loopmesh-dataplane --config FILE
//	loopmesh-dataplane --version
//
// Once every listener is bound it prints one JSON line on stdout:
// {"event": "listening", "grpc": ..., "admin": ..., "metrics": ...}. Logs go to stderr.
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"

	"github.com/loopmesh/loopmesh/dataplane/internal/admin"
	"github.com/loopmesh/loopmesh/dataplane/internal/auth"
	"github.com/loopmesh/loopmesh/dataplane/internal/config"
	"github.com/loopmesh/loopmesh/dataplane/internal/features"
	"github.com/loopmesh/loopmesh/dataplane/internal/gateway"
	"github.com/loopmesh/loopmesh/dataplane/internal/predict"
	"github.com/loopmesh/loopmesh/dataplane/internal/proxy"
	"github.com/loopmesh/loopmesh/dataplane/internal/routing"
	"github.com/loopmesh/loopmesh/dataplane/internal/stats"
	"github.com/loopmesh/loopmesh/dataplane/internal/telemetry"
)

// version is set with -ldflags "-X main.version=..." by release builds.
var version = "0.1.0"

const stopTimeout = 10 * time.Second

// logDrainTimeout bounds the wait, at a stop, for Kafka to acknowledge the prediction
// records of the last calls.
const logDrainTimeout = 5 * time.Second

func main() {
	os.Exit(run())
}

func run() int {
	configPath := flag.String("config", "", `config file, or "-" for stdin`)
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Printf("loopmesh-dataplane %s (%s)\n", version, runtime.Version())
		return 0
	}
	log := telemetry.NewLogger(os.Stderr, "inference-dataplane")
	if *configPath == "" || flag.NArg() > 0 {
		log.Error("usage: loopmesh-dataplane --config - | --config FILE | --version")
		return 2
	}
	cfg, err := readConfig(*configPath)
	if err != nil {
		log.Error(err.Error())
		return 2
	}
	log.SetService(cfg.ServiceName)
	telemetry.InstallGRPCLogger(log)
	tuneGC()
	tuneProcs()
	if err := serve(cfg, log); err != nil {
		log.Error(err.Error())
		if errors.As(err, new(configError)) {
			return 2
		}
		return 1
	}
	return 0
}

// configError is a config value that turned out unusable (a certificate file, an address).
type configError struct{ error }

func readConfig(path string) (*config.Config, error) {
	var r io.Reader = os.Stdin
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("config: %v", err)
		}
		defer f.Close()
		r = f
	}
	return config.Load(r)
}

func serve(cfg *config.Config, log *telemetry.Logger) error {
	ctx := context.Background()
	endpoint := ""
	if cfg.OTLPEndpoint != nil {
		endpoint = *cfg.OTLPEndpoint
	}
	tracing, err := telemetry.NewTracing(ctx, endpoint, cfg.ServiceName, log)
	if err != nil {
		return configError{fmt.Errorf("otlp_endpoint: %v", err)}
	}
	metrics := telemetry.NewMetrics()
	backend, err := grpc.NewClient(cfg.Backend, append(proxy.DialOptions(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(gateway.ConnectParams),
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(proxy.Codec{}),
			grpc.MaxCallRecvMsgSize(cfg.MaxMessageBytes), grpc.MaxCallSendMsgSize(cfg.MaxMessageBytes)))...)
	if err != nil {
		return configError{fmt.Errorf("backend: %v", err)}
	}
	defer backend.Close()

	tokens := make([]auth.Token, len(cfg.Tokens))
	for i, t := range cfg.Tokens {
		tokens[i] = auth.Token{Name: t.Name, Secret: t.Token, Roles: t.Roles}
	}
	// Inference answers UNIMPLEMENTED for OIP methods it does not serve; features proxies
	// every FeatureService method but GetOnlineFeatures to the Python process.
	var local []string
	if cfg.Mode == config.ModeInference {
		local = []string{gateway.Service}
	}
	opts := append(proxy.ServerOptions(),
		grpc.ForceServerCodecV2(proxy.Codec{}),
		grpc.UnknownServiceHandler(proxy.Handler(backend, local, metrics.Proxied)),
		grpc.MaxRecvMsgSize(cfg.MaxMessageBytes),
		grpc.MaxSendMsgSize(cfg.MaxMessageBytes),
		grpc.MaxConcurrentStreams(uint32(cfg.MaxConcurrentStreams)),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	if cfg.TLS != nil {
		creds, err := serverCredentials(cfg.TLS)
		if err != nil {
			return configError{err}
		}
		opts = append(opts, grpc.Creds(creds))
	}
	server := grpc.NewServer(opts...)
	var adminHandler http.Handler
	var upstream []any // what the "serving" line names
	var predictor *predict.Service
	var predictions *predict.PredictionLog
	if cfg.Mode == config.ModeFeatures {
		fs, err := features.New(cfg.Features, metrics, auth.New(tokens), tracing, log)
		if err != nil {
			return configError{fmt.Errorf("features.store: %v", err)}
		}
		defer fs.Close()
		fs.Register(server)
		adminHandler = admin.Features(fs.Replace, fs.Config, fs.DrainCalls)
		upstream = []any{"store", cfg.Features.Store.Type}
	} else {
		rec := stats.New(0, 0)
		rec.OnOverflow = metrics.StatsOverflow
		routes := routing.NewStore()
		tritonCreds, err := tritonCredentials(cfg.Triton.TLS)
		if err != nil {
			return configError{err}
		}
		triton, err := gateway.DialTriton(cfg.Triton.Address, cfg.Triton.Channels,
			time.Duration(cfg.Triton.TimeoutS*float64(time.Second)), tritonCreds, cfg.MaxMessageBytes)
		if err != nil {
			return configError{fmt.Errorf("triton.address: %v", err)}
		}
		defer triton.Close()
		(&gateway.Gateway{Triton: triton, Routes: routes, Stats: rec, Metrics: metrics,
			Auth: auth.New(tokens), Tracing: tracing}).Register(server)
		if p := cfg.Predict; p != nil {
			features, err := dialFeatures(p, cfg.MaxMessageBytes)
			if err != nil {
				return configError{err}
			}
			defer features.Close()
			delay := time.Duration(p.BatchMaxDelayMs * float64(time.Millisecond))
			token, model := "", ""
			if p.Features.Token != nil {
				token = *p.Features.Token
			}
			if p.DefaultModel != nil {
				model = *p.DefaultModel
			}
			var key []byte
			if p.EntityIDKey != nil {
				key = []byte(*p.EntityIDKey)
			}
			if predictions, err = predict.NewPredictionLog(p.Log, p.LogQueueSize, tracing, metrics, log); err != nil {
				return configError{err}
			}
			predictor = &predict.Service{
				Routes:   routes,
				Features: predict.NewFeatureClient(features, time.Duration(p.Features.TimeoutS*float64(time.Second)), token, p.BatchMaxSize, delay, p.BatchMaxInflight),
				Scorer:   predict.NewScorer(triton, p.BatchMaxSize, delay, p.BatchMaxInflight),
				Backend:  backend, Stats: rec, Counts: predict.NewCounts(), Predictions: predictions,
				Metrics: metrics, Auth: auth.New(tokens), Tracing: tracing, Calls: stats.New(64, 0), Log: log,
				Options: predict.Options{
					DefaultModel: model, Degrade: p.OnFeaturesUnavailable == "degrade", EntityIDKey: key,
					ShadowMaxInflight: p.ShadowMaxInflight,
					ShadowTimeout:     time.Duration(p.ShadowTimeoutMs * float64(time.Millisecond)),
				},
			}
			predictor.Register(server)
		}
		adminHandler = admin.Handler(routes, rec, predictor, predictions)
		upstream = []any{"triton", cfg.Triton.Address, "predict", cfg.Predict != nil}
	}

	// Bind everything before saying where: the control plane reads one line and connects.
	grpcLis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen: %v", err)
	}
	adminLis, err := net.Listen("tcp", cfg.AdminListen)
	if err != nil {
		return fmt.Errorf("admin_listen: %v", err)
	}
	adminServer := &http.Server{Handler: adminHandler, ReadHeaderTimeout: 10 * time.Second}
	var metricsLis net.Listener
	var metricsServer *http.Server
	if cfg.MetricsListen != nil {
		if metricsLis, err = net.Listen("tcp", *cfg.MetricsListen); err != nil {
			return fmt.Errorf("metrics_listen: %v", err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", promhttp.HandlerFor(metrics.Registry, promhttp.HandlerOpts{}))
		metricsServer = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	}
	if err := announce(grpcLis, adminLis, metricsLis); err != nil {
		return err
	}

	served := make(chan error, 3)
	go func() { served <- server.Serve(grpcLis) }()
	go func() { served <- adminServer.Serve(adminLis) }()
	if metricsServer != nil {
		go func() { served <- metricsServer.Serve(metricsLis) }()
	}
	log.Info("serving", append([]any{"mode", cfg.Mode, "grpc", grpcLis.Addr().String()}, append(upstream,
		"backend", cfg.Backend, "tls", cfg.TLS != nil, "auth", len(tokens) > 0, "tracing", endpoint != "")...)...)

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	orphaned := make(chan struct{})
	if cfg.StopOnStdinEOF {
		go func() { _, _ = io.Copy(io.Discard, os.Stdin); close(orphaned) }()
	}
	var failed error
	select {
	case sig := <-signals:
		log.Info("stopping", "signal", sig.String())
	case <-orphaned:
		log.Warn("stopping: standard input closed (the control plane is gone)")
	case err := <-served:
		failed = fmt.Errorf("a listener stopped: %v", err)
	}
	stopGracefully(server)
	if predictor != nil {
		predictor.WaitShadows() // each bounded by the shadow timeout
		// Records still buffered get up to logDrainTimeout (brokers away: they are lost).
		if !predictions.Close(logDrainTimeout) {
			log.Warn("stopping with predictions Kafka did not acknowledge")
		}
		logged, batching := predictions.Totals(), predictor.Totals()
		log.Info("predictions produced", "logged", logged.Logged, "dropped", logged.Dropped,
			"rows", batching.Rows, "triton_requests", batching.TritonRequests,
			"feature_fetches", batching.FeatureFetches, "feature_calls", batching.FeatureCalls)
	}
	shutdownCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_ = adminServer.Shutdown(shutdownCtx)
	if metricsServer != nil {
		_ = metricsServer.Shutdown(shutdownCtx)
	}
	if err := tracing.Shutdown(shutdownCtx); err != nil {
		log.Warn("flushing spans failed", "error", err)
	}
	log.Info("stopped")
	return failed
}

// tuneGC trades memory for CPU unless GOGC/GOMEMLIMIT say otherwise: the live heap is small
// (the calls in flight) and the allocation rate high, so the default GOGC=100 collects very
// often (about 15% more throughput measured on two cores); the soft limit makes the collector
// work harder again once large tensors fill the heap.
func tuneGC() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(400)
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(1 << 30)
	}
}

// tuneProcs runs Go code on half the CPUs Go would use (at least one) unless GOMAXPROCS
// says otherwise. The data plane waits on sockets: a call costs it tens of microseconds,
// mostly system calls. Each processor beyond what it needs costs every call more, not less:
// threads woken and put back to sleep to hand a call from one goroutine to the next, idle
// ones spinning to steal work, and gRPC's writer running beside the handler so that a
// response's headers, message and trailers leave in separate writes instead of one. Measured
// on two cores beside Triton and the load generator: 10 to 20% less CPU per ModelInfer with
// one processor than with two. The other half is Triton's and the control plane's. (Go's
// default follows the container's CPU limit at start; setting it ends Go's later updates.)
func tuneProcs() {
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(max(1, runtime.GOMAXPROCS(0)/2))
	}
}

// stopGracefully lets in-flight calls finish for up to stopTimeout, then cuts the rest.
func stopGracefully(s *grpc.Server) {
	done := make(chan struct{})
	go func() { s.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(stopTimeout):
		s.Stop()
		<-done
	}
}

// dialFeatures opens the connection Predict reads features through (lazily).
func dialFeatures(p *config.Predict, maxMessage int) (*grpc.ClientConn, error) {
	creds, err := clientCredentials(p.Features.TLS)
	if err != nil {
		return nil, fmt.Errorf("predict.features.%v", err)
	}
	conn, err := grpc.NewClient(p.Features.Address, append(proxy.DialOptions(),
		grpc.WithTransportCredentials(creds),
		grpc.WithConnectParams(gateway.ConnectParams),
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(proxy.Codec{}),
			grpc.MaxCallRecvMsgSize(maxMessage), grpc.MaxCallSendMsgSize(maxMessage)))...)
	if err != nil {
		return nil, fmt.Errorf("predict.features.address: %v", err)
	}
	// Connected by the first call, as Python's channels are: dialled now, a features service
	// still starting would put it in reconnect backoff, and calls fail fast until it retries.
	return conn, nil
}

func clientCredentials(c *config.ClientTLS) (credentials.TransportCredentials, error) {
	if c == nil {
		return insecure.NewCredentials(), nil
	}
	conf, err := c.Config()
	if err != nil {
		return nil, err
	}
	return credentials.NewTLS(conf), nil
}

func announce(grpcLis, adminLis, metricsLis net.Listener) error {
	line := struct {
		Event   string  `json:"event"`
		GRPC    string  `json:"grpc"`
		Admin   string  `json:"admin"`
		Metrics *string `json:"metrics"`
	}{Event: "listening", GRPC: grpcLis.Addr().String(), Admin: adminLis.Addr().String()}
	if metricsLis != nil {
		addr := metricsLis.Addr().String()
		line.Metrics = &addr
	}
	out, err := json.Marshal(line)
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(append(out, '\n')) // os.Stdout is unbuffered: this is the flush
	return err
}

func serverCredentials(c *config.TLS) (credentials.TransportCredentials, error) {
	cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("tls: %v", err)
	}
	conf := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if c.ClientCAFile != nil {
		pool, err := config.LoadPool(*c.ClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("tls.client_ca_file: %v", err)
		}
		conf.ClientCAs, conf.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return credentials.NewTLS(conf), nil
}

func tritonCredentials(c *config.TritonTLS) (credentials.TransportCredentials, error) {
	if c == nil {
		return insecure.NewCredentials(), nil
	}
	conf, err := (&config.ClientTLS{CAFile: c.CAFile, CertFile: c.CertFile, KeyFile: c.KeyFile}).Config()
	if err != nil {
		return nil, fmt.Errorf("triton.%v", err)
	}
	return credentials.NewTLS(conf), nil
}
